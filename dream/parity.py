"""Recompute every output of an official parity fixture (``dream check-parity FIXTURE_DIR``).

A fixture (made with the official DREAM code, chaoli-charlie/dream @ 5b69ebf; the repository ships one in
``tests/fixtures/official_dream_tiny``, its README says how it was recorded)
holds ``config.json`` (official constructor arguments), ``model.safetensors`` (official key names),
``io.safetensors`` (fixed inputs, substituted RNG values, official outputs) and ``grads.safetensors``
(d loss_total / d param). Each output is compared with max|ours - ref| / max|ref|; integer and bool
outputs must match exactly. Outputs that cannot be recomputed are failures, never skipped.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TOL = 1e-4


# -----------------------------------------------------------------------------------------------
# Building the model from an official fixture config
# -----------------------------------------------------------------------------------------------
def config_from_official(fixture_cfg: dict):
    """Map official constructor arguments (+ CLIPTextCfg) to a :class:`DreamConfig`."""
    from dream.models import DreamConfig

    a, t = fixture_cfg["constructor_args"], fixture_cfg["text_cfg"]
    if a.get("vl_projection", "post_mlp_stablerep") != "post_mlp_stablerep":
        raise ValueError(f"unsupported vl_projection {a['vl_projection']!r}")
    return DreamConfig(
        img_size=a["img_size"], vae_stride=a["vae_stride"], patch_size=a["patch_size"],
        vae_embed_dim=a["vae_embed_dim"], buffer_size=a["buffer_size"], class_num=a["class_num"],
        encoder_embed_dim=a["encoder_embed_dim"], encoder_depth=a["encoder_depth"],
        encoder_num_heads=a["encoder_num_heads"], decoder_embed_dim=a["decoder_embed_dim"],
        decoder_depth=a["decoder_depth"], decoder_num_heads=a["decoder_num_heads"], mlp_ratio=a["mlp_ratio"],
        attn_dropout=a["attn_dropout"], proj_dropout=a["proj_dropout"], text_embed_dim=a["t5_embed_dim"],
        text_max_len=a["text_max_len"], text_aligner_depth=a["text_aligner_depth"],
        clip_context_length=t["context_length"], clip_vocab_size=t["vocab_size"], clip_width=t["width"],
        clip_heads=t["heads"], clip_layers=t["layers"], clip_mlp_ratio=t.get("mlp_ratio", 4.0),
        embed_dim=a["embed_dim"], proj_hidden_dim=a["ssl_mlp_dim"], diffloss_depth=a["diffloss_d"],
        diffloss_width=a["diffloss_w"], diffusion_batch_mul=a["diffusion_batch_mul"],
        num_sampling_steps=str(a["num_sampling_steps"]),
        min_visible_ratio_for_clip=a["min_ratio_for_clip_loss"],
        min_masked_ratio_for_diff=a["min_masked_ratio_for_mar_loss"])


# -----------------------------------------------------------------------------------------------
# Noise tapes
# -----------------------------------------------------------------------------------------------
class NoiseTape:
    """Serves recorded ``torch.randn`` draws in call order, checking each requested shape."""

    def __init__(self, tape: torch.Tensor, shapes: torch.Tensor):
        self.entries, off = [], 0
        for r, c in shapes.tolist():
            self.entries.append(tape[off: off + r * c].view(r, c))
            off += r * c
        if off != tape.numel():
            raise ValueError(f"tape has {tape.numel()} values but its shapes cover {off}")
        self.pos = 0

    def __call__(self, shape) -> torch.Tensor:
        if self.pos >= len(self.entries):
            raise RuntimeError("noise tape exhausted: the sampler drew more noise than the official run")
        e = self.entries[self.pos]
        if tuple(e.shape) != tuple(shape):
            raise RuntimeError(f"noise tape entry {self.pos} has shape {tuple(e.shape)}, sampler asked {tuple(shape)}")
        self.pos += 1
        return e


class SADTapeReplay:
    """Replays the official *sequential* SAD tape for our *batched* candidates.

    Official order for steps < tau: step-major, candidate-minor, each [init (n, C), S x (2n, C)]. The
    batched sampler asks per step for [init (K n, C), S x (2 K n, C)] with rows (k, b) and the CFG
    halves [cond of all k; uncond of all k]."""

    def __init__(self, tape: NoiseTape, K: int, tau: int, S: int, guided: bool):
        self.e, self.K, self.tau, self.S, self.guided = tape.entries, K, tau, S, guided
        self.calls = 0  # calls within the current AR step
        self.step = 0

    def __call__(self, shape):
        per = 1 + self.S
        j = self.calls
        self.calls += 1
        if self.calls == per:
            self.calls = 0
            self.step += 1
        s = self.step if self.calls else self.step - 1
        if s < self.tau:
            parts = [self.e[(s * self.K + k) * per + j] for k in range(self.K)]
            if j == 0 or not self.guided:
                out = torch.cat(parts)
            else:
                halves = [p.chunk(2) for p in parts]
                out = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        else:
            out = self.e[self.tau * self.K * per + (s - self.tau) * per + j]
        if tuple(out.shape) != tuple(shape):
            raise RuntimeError(f"SAD tape: step {s} call {j} has shape {tuple(out.shape)}, sampler asked {tuple(shape)}")
        return out


# -----------------------------------------------------------------------------------------------
# The checks
# -----------------------------------------------------------------------------------------------
def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double().cpu(), ref.double()
    if ours.shape != ref.shape:
        raise ValueError(f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}")
    return float((ours - ref).abs().max() / max(float(ref.abs().max()), 1e-12)) if ref.numel() else 0.0


def _exact(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return 0.0 if ours.shape == ref.shape and torch.equal(ours.cpu().to(ref.dtype), ref) else 1.0


def load_fixture(fixture_dir) -> tuple[dict, dict, Optional[dict]]:
    """(config.json, io tensors, grads or None) of a parity fixture; missing files are named."""
    fx = Path(fixture_dir)
    for name in ("config.json", "model.safetensors", "io.safetensors"):
        if not (fx / name).exists():
            raise FileNotFoundError(f"fixture file missing: {fx / name}")
    fcfg = json.loads((fx / "config.json").read_text())
    io = load_file(str(fx / "io.safetensors"))
    grads = load_file(str(fx / "grads.safetensors")) if (fx / "grads.safetensors").exists() else None
    return fcfg, io, grads


# outputs that are fixture inputs or substituted random values, not results to compare
INPUTS = frozenset({
    "latents", "t5_features", "t5_empty", "clip_tokens", "labels", "orders", "mask_ratio", "dnet_x", "dnet_t",
    "dnet_c", "dnet_cfg_scale", "diff_t", "diff_noise", "est_idx", "gate_low_ratio", "gate_high_ratio", "cl_img",
    "cl_txt", "cl_scale", "cl_mask", "gen_tokens", "gen_mask", "gen_t5", "gen_num_iter", "gen_step", "gen_cfg",
    "gen_last_cfg", "sample_t5", "sample_orders", "sample_noise_tape", "sample_noise_shapes", "sad_orders",
    "sad_noise_tape", "sad_noise_shapes", "mw_est_idx", "mw_ratio_seeded"})
# outputs compared exactly although stored as floats
EXACT = frozenset({"gen_mask_to_pred", "gen_mask_next", "gen_last_mask_to_pred", "gen_last_mask_next",
                   "sad_best_idx"})


def compute_outputs(fixture_dir, dtype: torch.dtype = torch.float32, verbose: bool = False,
                    state_dict: Optional[dict] = None) -> dict:
    """Recompute every output of a fixture with our model in ``dtype`` (float32 like the official run, or float64
    as a high-precision reference). Returns ``{name: tensor}``, gradients as ``"grad:<param>"``; an output that
    raised maps to the exception (a failure to compute is a failure, never a skip).

    ``state_dict``: weights to use instead of the fixture's ``model.safetensors`` (same architecture, loaded
    strictly), e.g. a converted checkpoint that should reproduce the fixture's outputs."""
    import dream
    from dream.masking import MaskingWarmup, MaskingWarmupConfig, mask_from_orders, num_masked
    from dream.models.contrastive import clip_loss_unfiltered, filtered_clip_loss
    from dream.sampling import MARSampler, SamplerConfig, SemanticallyAlignedDecoding

    fx = Path(fixture_dir)
    fcfg, io, grads = load_fixture(fx)
    io = {k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in io.items()}   # inputs in ``dtype``
    cfg = config_from_official(fcfg)
    torch.manual_seed(0)
    model = dream.create_model(cfg, pretrained=fx / "model.safetensors" if state_dict is None else False,
                               attn_backend="auto").eval()
    if state_dict is not None:
        from dream.models.convert import load_state_dict_strict

        load_state_dict_strict(model, state_dict)
    model = model.to(dtype)
    outputs: dict = {}

    def check(name: str, fn: Callable[[], torch.Tensor], exact: bool = False):
        try:
            outputs[name] = fn()
        except Exception as e:  # noqa: BLE001
            outputs[name] = e
            if verbose:
                print(f"  {name}: {type(e).__name__}: {e}", file=sys.stderr)

    L, C = cfg.seq_len, cfg.token_dim
    x = model.patchify(io["latents"])
    mask = io["mask"].bool()
    with torch.no_grad():
        check("x_tokens", lambda: x)
        check("enc_out", lambda: model.forward_encoder(x, mask))
        check("text_embed", lambda: model.encode_text(io["clip_tokens"], normalize=False))
        check("text_features", lambda: model.encode_text(io["clip_tokens"]))
        check("logit_scale_exp", lambda: model.logit_scale.exp())
        check("eot_index", lambda: io["clip_tokens"].argmax(-1))
        check("enc_out_nomask", lambda: model.forward_encoder(x))
        h = model.forward_encoder(x, mask)
        check("img_embed_pooled", lambda: model.pool(h))
        check("img_embed", lambda: model.image_projection(model.pool(h)))
        check("img_embed_nomask", lambda: model.encode_image(x, normalize=False))
        y = model.forward_text_aligner(io["t5_features"])
        check("text_aligner_out", lambda: y)
        check("z", lambda: model.forward_decoder(h, mask, y))
        net = model.diffloss.net
        check("dnet_out", lambda: net(io["dnet_x"], io["dnet_t"], io["dnet_c"]))
        check("dnet_time_embed", lambda: net.time_embed(io["dnet_t"]))
        check("dnet_out_cfg", lambda: net.forward_with_cfg(io["dnet_x"], io["dnet_t"], io["dnet_c"],
                                                            float(io["dnet_cfg_scale"])))
        check("sched_train_betas", lambda: model.diffloss.train_diffusion.betas)
        gen = MARSampler(model, SamplerConfig(num_iter=1, cfg=1.0)).token_sampler.diffusion
        check("sched_gen_betas", lambda: gen.betas)
        check("sched_gen_timestep_map", lambda: gen.timestep_map)
        # BN with batch statistics (single-GPU training behaviour)
        import copy

        proj = copy.deepcopy(model.image_projection).train()
        check("img_embed_bn_batchstats", lambda: proj(io["img_embed_pooled"]))
        # diffusion internals with the fixed RNG
        B = x.shape[0]
        mul = cfg.diffusion_batch_mul
        target = x.reshape(B * L, C).repeat(mul, 1)
        zz = model.forward_decoder(h, mask, y).reshape(B * L, -1).repeat(mul, 1)
        terms = model.diffloss.train_diffusion.training_losses(net, target, io["diff_t"], io["diff_noise"], c=zz)
        check("diff_x_t", lambda: terms["x_t"])
        check("diff_terms_mse", lambda: terms["mse"])
        check("diff_terms_vb", lambda: terms["vb"])
        check("diff_terms_loss", lambda: terms["loss"])
        check("diff_mask_rep", lambda: mask.reshape(-1).float().repeat(mul))
        # standalone contrastive loss variants
        cm = io["cl_mask"]
        check("cl_loss_filter", lambda: filtered_clip_loss(io["cl_img"], io["cl_txt"], io["cl_scale"], cm,
                                                           gather=False))
        check("cl_avg_unmasked_ratio", lambda: cm.float().sum() / (cm.numel() + 1e-6))
        check("cl_loss_nofilter_scaled", lambda: clip_loss_unfiltered(
            io["cl_img"], io["cl_txt"], io["cl_scale"], scale_by=float(cm.float().sum() / (cm.numel() + 1e-6))))
        check("cl_loss_nofilter_unscaled", lambda: clip_loss_unfiltered(io["cl_img"], io["cl_txt"], io["cl_scale"]))
        # linear-probe features (official linprobe_vit: no encoder_norm, buffer mean, fresh fc_norm)
        def probe(kind):
            f = model.pool(model.forward_encoder(x, apply_norm=False, buffer=kind), how="buffer")
            return F.layer_norm(f, f.shape[-1:], eps=1e-6)
        check("linprobe_feat_fake_latent", lambda: probe("fake_latent"))
        check("linprobe_feat_class_emb", lambda: probe("class"))

    # ---- masking: official masks from orders, Masking Warmup mean schedule ----
    check("mask", lambda: mask_from_orders(io["orders"], num_masked(float(io["mask_ratio"]), L)).float())
    for g in ("gate_low", "gate_high"):
        check(f"{g}_mask", lambda g=g: mask_from_orders(io["orders"], num_masked(float(io[f"{g}_ratio"]), L)).float())
    a = fcfg["constructor_args"]
    mw = MaskingWarmup(MaskingWarmupConfig(mu_start=a["mask_ratio_mu_start"], mu_end=a["mask_ratio_mu_end"],
                                           warmup_start=a["masking_warmup"], warmup_end=a["masking_warmup_end"],
                                           std=a["mask_ratio_std"], total_epochs=a["epochs"]))
    check("mw_mu", lambda: torch.tensor([mw.mu(float(e)) for e in io["mw_est_idx"]], dtype=torch.float64))
    check("mw_num_masked_seeded", lambda: torch.tensor([num_masked(float(r), L) for r in io["mw_ratio_seeded"]]))
    check("mask_info_mar_mask_ratio", lambda: mask.double().mean())

    # ---- the training loss and its gradients ----
    out = model(x, io["clip_tokens"], io["t5_features"], mask, diff_t=io["diff_t"], diff_noise=io["diff_noise"])
    check("loss_diff", lambda: out["diff_loss"])
    check("loss_clip", lambda: out["clip_loss"])
    check("loss_total", lambda: out["loss"])
    check("mask_info_percentage_batch_with_clip", lambda: out["clip_gate"] * B / (B + 1e-6))
    model.zero_grad(set_to_none=True)
    out["loss"].backward()
    for n, prm in model.named_parameters():
        outputs["grad:" + n] = torch.zeros_like(prm) if prm.grad is None else prm.grad
    for g in ("gate_low", "gate_high"):
        m2 = io[f"{g}_mask"].bool()
        with torch.no_grad():
            o2 = model(x, io["clip_tokens"], io["t5_features"], m2, diff_t=io["diff_t"], diff_noise=io["diff_noise"])
        check(f"{g}_loss_diff", lambda o2=o2: o2["diff_loss"])
        check(f"{g}_loss_clip", lambda o2=o2: o2["clip_loss"])
    # train mode (dropout 0): BN batch statistics
    tm = copy.deepcopy(model).train()
    for mod in tm.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
        if hasattr(mod, "attn_drop") and isinstance(mod.attn_drop, float):
            mod.attn_drop = 0.0
    with torch.no_grad():
        o3 = tm(x, io["clip_tokens"], io["t5_features"], mask, diff_t=io["diff_t"], diff_noise=io["diff_noise"])
    check("trainmode_loss_diff", lambda: o3["diff_loss"])
    check("trainmode_loss_clip", lambda: o3["clip_loss"])
    check("trainmode_bn1_running_mean_after", lambda: tm.image_projection.bn1.running_mean)
    check("trainmode_bn1_num_batches_tracked_after", lambda: tm.image_projection.bn1.num_batches_tracked)

    # ---- generation ----
    with torch.no_grad():
        def gen_step(cfg_scale: float, step: int):
            s = MARSampler(model, SamplerConfig(num_iter=int(io["gen_num_iter"]), cfg=cfg_scale))
            t5 = io["gen_t5"][:B] if cfg_scale != 1.0 else io["t5_features"]
            st = s.init_state(t5, io["gen_t5"][B:] if cfg_scale != 1.0 else None, orders=io["orders"])
            st.tokens, st.mask = io["gen_tokens"].clone(), io["gen_mask"].bool()
            return s.condition(st, step)

        r = gen_step(float(io["gen_cfg"]), int(io["gen_step"]))
        check("gen_z_sel", lambda: r[0])
        check("gen_mask_to_pred", lambda: r[1], exact=True)
        check("gen_mask_next", lambda: r[2], exact=True)
        check("gen_cfg_iter", lambda: torch.tensor(r[3], dtype=torch.float64))
        r2 = gen_step(float(io["gen_last_cfg"]), int(io["gen_num_iter"]) - 1)
        check("gen_last_z_sel", lambda: r2[0])
        check("gen_last_mask_to_pred", lambda: r2[1], exact=True)
        check("gen_last_mask_next", lambda: r2[2], exact=True)
        check("gen_last_cfg_iter", lambda: torch.tensor(r2[3], dtype=torch.float64))
        check("sad_text_features", lambda: model.encode_text(io["clip_tokens"]))
        from dream.sampling.sad import critic_scores

        check("sad_clip_scores", lambda: critic_scores(model, io["gen_tokens"], io["gen_mask"].bool(),
                                                       model.encode_text(io["clip_tokens"])))

        sc = fcfg["sampling"]
        scfg = SamplerConfig(num_iter=sc["num_iter"], cfg=sc["cfg"], temperature=sc["temperature"])
        guided = scfg.cfg != 1.0
        t5c, t5n = (io["sample_t5"][:B], io["sample_t5"][B:]) if guided else (io["sample_t5"], None)

        def plain():
            tape = NoiseTape(io["sample_noise_tape"], io["sample_noise_shapes"])
            toks = MARSampler(model, scfg).sample(t5c, t5n, orders=io["sample_orders"], noise_fn=tape)
            if tape.pos != len(tape.entries):
                raise RuntimeError(f"sampler used {tape.pos} of {len(tape.entries)} tape entries")
            return model.unpatchify(toks)

        check("sample_out", plain)
        sad_res = {}

        def sad():
            tape = NoiseTape(io["sad_noise_tape"], io["sad_noise_shapes"])
            S = MARSampler(model, scfg).token_sampler.num_steps
            replay = SADTapeReplay(tape, sc["sad_candidates"], sc["sad_threshold"], S, guided)
            sd = SemanticallyAlignedDecoding(model, scfg, sc["sad_candidates"], sc["sad_threshold"])
            res = sd.sample(t5c, io["clip_tokens"], t5n, orders=io["sad_orders"], noise_fn=replay)
            sad_res["r"] = res
            return model.unpatchify(res.tokens)

        check("sad_out", sad)
        check("sad_scores_all", lambda: sad_res["r"].scores)
        check("sad_best_idx", lambda: sad_res["r"].best, exact=True)

    return outputs


def run_parity(fixture_dir, verbose: bool = False, tol: float = TOL,
               state_dict: Optional[dict] = None) -> list[tuple[str, float, bool]]:
    """Recompute every output in float32; returns (name, error, ok) rows: error = max|ours - ref| / max|ref|,
    ``ok`` = error <= ``tol`` (integer and mask outputs must match exactly). Gradients form one row (the worst)."""
    _, io, grads = load_fixture(fixture_dir)
    outputs = compute_outputs(fixture_dir, torch.float32, verbose, state_dict)
    rows: list[tuple[str, float, bool]] = []
    for name, ours in outputs.items():
        if name.startswith("grad:"):
            continue
        if isinstance(ours, Exception):
            rows.append((name, math.inf, False))
            continue
        ref = io[name]
        exact = name in EXACT or not ref.is_floating_point()
        err = _exact(ours, ref) if exact else _rel(ours, ref)
        rows.append((name, err, err == 0.0 if exact else err <= tol))
    if grads is None:
        rows.append(("grads", math.inf, False))
    else:
        worst, worst_name = 0.0, ""
        ours = {n[5:]: g for n, g in outputs.items() if n.startswith("grad:")}
        missing = sorted(set(grads) ^ set(ours))
        for n in set(grads) & set(ours):
            ref = grads[n]
            e = _rel(ours[n], ref) if float(ref.abs().max()) > 0 else float(ours[n].abs().max())
            if e > worst:
                worst, worst_name = e, n
        rows.append((f"grads (worst: {worst_name or '-'})", worst if not missing else math.inf,
                     worst <= tol and not missing))
    # inputs and RNG substitutions are not outputs; everything else must have been recomputed
    for name in sorted(set(io) - set(outputs) - INPUTS):
        rows.append((name, math.inf, False))  # an output we do not know how to recompute
    if not bool((io["labels"] == 0).all()):
        rows.append(("labels (DREAM uses class 0 only)", math.inf, False))
    return rows
