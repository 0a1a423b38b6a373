"""Soft text tokens for SoftREPA (arXiv 2503.08250; code softrepa/SoftREPA @ ff92f4b) and AGSM (arXiv 2605.30038;
code jaayeon/AGSM @ 5524482): a few trainable vectors that join a frozen text-to-image model's text stream.

:class:`SoftTokenBank` holds ``tokens`` (n_sets, n_layers, n_tokens, dim), n_sets = 1 (SoftREPA: one set s) or 2
(AGSM: set 0 = psi+, set 1 = psi-), and an optional time table ``t_tokens`` (bins, n_layers * dim) whose row
``bin(t) = clamp(t, 0, T - 1) * bins // T`` (t // 10 for T = 1000 and 100 bins, as both codes index it) is added to
every token of its layer. Nothing else trains; the bank is saved as ``soft_tokens.safetensors`` plus
``soft_tokens.json`` (its :class:`SoftTokenConfig`).

Where the tokens go:

* **DREAM** (:func:`attach_dream`): the tokens of the chosen set are appended to the aligned text ``y`` (after the
  text aligner, padding-mask entries False), so every decoder block's cross-attention sees them. The decoder runs
  once per AR step while the diffusion head runs S steps per AR step, so a per-diffusion-step token inside the
  decoder would cost S decoder runs per step; instead the time table's row for the head's timestep is added to the
  head's condition ``z`` before ``cond_embed`` (``cond_embed(z + d_t) = cond_embed(z) + W_c d_t``: a per-step shift
  of the head's time embedding, precomputed in the fused sampler). The sampler asks the model for the extra tokens
  (:meth:`dream.models.DREAM.extend_text_condition`: conditional branch psi+, unconditional branch psi- when
  ``uncon2neg`` else psi+) and the head adds its ``time_condition``; both are submodules attached here.
* **diffusers** (:class:`DiffusersSoftTokens`): an attention-processor wrapper around the processor of the chosen
  attention modules; SD 1.x / SDXL UNets: the cross-attention (``attn2``) of the chosen block groups (down / mid /
  up), tokens inserted after BOS: ``[BOS, s_1..s_n, tok_1 ...]``; SD3 MM-DiT: the joint attention of the first
  ``n_layers`` blocks, one token set per block appended to the block's (normalised) context and stripped from its
  context output. The processors read (set index, t) from a per-forward :class:`SoftTokenContext`: t from a
  forward pre-hook on the model's ``timestep`` argument, the set index from :meth:`DiffusersSoftTokens.use`.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from dream.utils.config import ConfigBase

__all__ = ["SoftTokenConfig", "SoftTokenBank", "load_soft_tokens", "ema_update_", "attach_dream", "detach_dream",
           "SoftTokenContext", "SoftTokenProcessor", "DiffusersSoftTokens", "TOKENS_FILE", "CONFIG_FILE"]

TOKENS_FILE = "soft_tokens.safetensors"
CONFIG_FILE = "soft_tokens.json"
BACKBONES = ("dream", "unet", "sd3")
GROUPS = ("down", "mid", "up")


@dataclass(frozen=True)
class SoftTokenConfig(ConfigBase):
    """Shape and placement of a soft-token bank (stored next to the tokens)."""

    dim: int = 192                         # token width: DREAM's decoder width, a UNet's cross_attention_dim, ...
    n_tokens: int = 4
    n_sets: int = 1                        # 1: SoftREPA; 2: AGSM (0 = psi+, 1 = psi-)
    n_layers: int = 1                      # token sets per layer (SD3: blocks; UNet per_layer: wrapped modules)
    time_bins: int = 0                     # 0 = no time table; 100 = the authors' t // 10
    num_timesteps: int = 1000
    init: str = "normal"                   # normal (N(0, init_std)) | zeros | given (e.g. the null prompt's BOS)
    init_std: float = 0.02
    backbone: str = "dream"                # dream | unet | sd3
    groups: tuple = ("down", "mid")        # UNet block groups whose cross-attention gets the tokens
    per_layer: bool = False                # UNet: one token set per wrapped cross-attention (n_layers of them)
    uncon2neg: bool = False                # CFG: the unconditional branch uses psi- (AGSM --uncon2neg)
    method: str = ""                       # softrepa | agsm (informational)

    def __post_init__(self):
        super().__post_init__()
        if min(self.dim, self.n_tokens, self.n_layers) < 1 or self.n_sets not in (1, 2):
            raise ValueError(f"need dim, n_tokens, n_layers >= 1 and n_sets in (1, 2), got {self}")
        if self.time_bins < 0 or self.num_timesteps < 1:
            raise ValueError(f"time_bins must be >= 0 and num_timesteps >= 1, got {self.time_bins}, "
                             f"{self.num_timesteps}")
        if self.init not in ("normal", "zeros", "given"):
            raise ValueError(f"unknown init {self.init!r} (normal | zeros | given)")
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r} ({' | '.join(BACKBONES)})")
        bad = [g for g in self.groups if g not in GROUPS]
        if bad:
            raise ValueError(f"unknown block groups {bad} (down | mid | up)")
        if self.uncon2neg and self.n_sets < 2:
            raise ValueError("uncon2neg needs two token sets (psi+, psi-)")


class SoftTokenBank(nn.Module):
    """The trainable soft tokens (and optional time table) of SoftREPA / AGSM.

    Args:
        config: shapes and placement. generator: RNG of the N(0, init_std) init.
        init_tokens: with ``init="given"``: a (dim,) or (n_tokens, dim) tensor copied into every set and layer
            (the authors initialise SD1.5 tokens with the null prompt's BOS embedding).
    """

    def __init__(self, config: SoftTokenConfig, generator: Optional[torch.Generator] = None,
                 init_tokens: Optional[torch.Tensor] = None):
        super().__init__()
        c = self.config = config
        self.tokens = nn.Parameter(torch.zeros(c.n_sets, c.n_layers, c.n_tokens, c.dim))
        if c.init == "normal":
            with torch.no_grad():
                self.tokens.copy_(torch.randn(self.tokens.shape, generator=generator) * c.init_std)
        elif c.init == "given":
            if init_tokens is None:
                raise ValueError("init='given' needs init_tokens")
            with torch.no_grad():
                self.tokens.copy_(torch.as_tensor(init_tokens, dtype=torch.float32).expand_as(self.tokens))
        # zero-initialised: at the start the time table leaves every token (and DREAM's head) as it is
        self.t_tokens = nn.Embedding(c.time_bins, c.n_layers * c.dim) if c.time_bins else None
        if self.t_tokens is not None:
            nn.init.zeros_(self.t_tokens.weight)

    # ------------------------------------------------------------------------------------------
    def time_bin(self, t: torch.Tensor) -> torch.Tensor:
        """Original-scale timesteps (any shape) -> time-table rows (long)."""
        c = self.config
        t = torch.as_tensor(t, device=self.tokens.device)
        t = t.round().long() if t.is_floating_point() else t.long()
        return t.clamp(0, c.num_timesteps - 1) * c.time_bins // c.num_timesteps

    def time_term(self, t: torch.Tensor, layer: int = 0) -> Optional[torch.Tensor]:
        """The time table's row for ``t`` (N,) at ``layer``: (N, dim), or None without a table."""
        if self.t_tokens is None:
            return None
        d = self.config.dim
        return self.t_tokens(self.time_bin(t).reshape(-1))[:, layer * d: (layer + 1) * d]

    def forward(self, set_idx: Union[int, torch.Tensor], t: Optional[torch.Tensor] = None,
                layer: int = 0) -> torch.Tensor:
        """Tokens for ``set_idx`` (B,) long (or one int) at ``layer``, plus the time term of ``t`` (B,):
        (B, n_tokens, dim) ((1, n_tokens, dim) for an int without t)."""
        c = self.config
        if not 0 <= layer < c.n_layers:
            raise IndexError(f"layer {layer} out of range for {c.n_layers} layer(s)")
        tok = self.tokens[:, layer]                                       # (n_sets, n, d)
        if isinstance(set_idx, int):
            out = tok[set_idx][None]
        else:
            out = tok.index_select(0, set_idx.reshape(-1).to(tok.device))
        if t is not None and self.t_tokens is not None:
            out = out + self.time_term(t, layer)[:, None]                   # (B or 1, n, d) + (B, 1, d)
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def describe(self) -> str:
        c = self.config
        s = (f"SoftTokenBank[{c.backbone}]: {c.n_sets} set(s) x {c.n_layers} layer(s) x {c.n_tokens} tokens x {c.dim}"
             f" = {self.tokens.numel():,}")
        if self.t_tokens is not None:
            s += f" + time table {c.time_bins} x {c.n_layers * c.dim} = {self.t_tokens.weight.numel():,}"
        return s + f"; {self.num_parameters():,} trainable parameters"

    # ------------------------------------------------------------------------------------------
    def save(self, folder: Union[str, os.PathLike], extra: Optional[dict] = None) -> Path:
        """``folder/soft_tokens.safetensors`` + ``folder/soft_tokens.json`` (the config, plus ``extra``)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"tokens": self.tokens.detach().float().cpu().contiguous()}
        if self.t_tokens is not None:
            tensors["t_tokens"] = self.t_tokens.weight.detach().float().cpu().contiguous()
        meta = {"config": self.config.to_dict(), **(extra or {})}
        tmp = folder / (TOKENS_FILE + f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"dream_soft_tokens": json.dumps(self.config.to_dict())})
        os.replace(tmp, folder / TOKENS_FILE)
        tmp = folder / (CONFIG_FILE + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder / CONFIG_FILE)
        return folder


def load_soft_tokens(path: Union[str, os.PathLike], device=None) -> SoftTokenBank:
    """A bank saved by :meth:`SoftTokenBank.save`: the folder, or its ``.safetensors`` file (config read from the
    file's header, else from the JSON beside it). Shapes are checked against the config."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    file = path / TOKENS_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no soft tokens at {path} (expected {TOKENS_FILE} in a folder, or the file)")
    with safe_open(str(file), "pt") as f:
        header = (f.metadata() or {}).get("dream_soft_tokens")
    if header is not None:
        cfg = SoftTokenConfig.from_dict(json.loads(header))
    else:
        side = file.with_name(CONFIG_FILE)
        if not side.exists():
            raise ValueError(f"{file} has no soft-token config (header or {CONFIG_FILE} beside it)")
        cfg = SoftTokenConfig.from_dict(json.loads(side.read_text())["config"])
    tensors = load_file(str(file))
    bank = SoftTokenBank(cfg.replace(init="zeros"))         # no random draw: every tensor is overwritten below
    bank.config = cfg
    want = {"tokens": tuple(bank.tokens.shape)}
    if bank.t_tokens is not None:
        want["t_tokens"] = tuple(bank.t_tokens.weight.shape)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != want:
        raise ValueError(f"{file}: tensors {got} do not match the config's shapes {want}")
    with torch.no_grad():
        bank.tokens.copy_(tensors["tokens"])
        if bank.t_tokens is not None:
            bank.t_tokens.weight.copy_(tensors["t_tokens"])
    return bank.to(device) if device is not None else bank


@torch.no_grad()
def ema_update_(ema: SoftTokenBank, online: SoftTokenBank, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * online, over the banks' own tensors only (AGSM's EMA teacher; the
    authors' update also walks the frozen base weights, a numerical no-op we skip)."""
    for e, o in zip(ema.parameters(), online.parameters()):
        e.lerp_(o.detach(), 1.0 - decay)


# ----------------------------------------------------------------------------------------------------
# DREAM: tokens after the aligned text, the time table on the diffusion head's condition
# ----------------------------------------------------------------------------------------------------
class DreamSoftText(nn.Module):
    """``(y, pad, branch) -> (y', pad')``: the set's tokens appended to the aligned text (B, Lt, Dd)."""

    def __init__(self, bank: SoftTokenBank, uncon2neg: Optional[bool] = None):
        super().__init__()
        self.bank = bank
        self.uncon2neg = bank.config.uncon2neg if uncon2neg is None else bool(uncon2neg)
        if self.uncon2neg and bank.config.n_sets < 2:
            raise ValueError("uncon2neg needs two token sets (psi+, psi-)")

    def set_for(self, branch: str) -> int:
        if branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', got {branch!r}")
        return 1 if branch == "uncond" and self.uncon2neg else 0

    def forward(self, y: torch.Tensor, pad: Optional[torch.Tensor], branch: str = "cond"):
        tok = self.bank(self.set_for(branch)).to(y.dtype).expand(y.shape[0], -1, -1)
        y = torch.cat([y, tok], dim=1)
        if pad is not None:
            pad = torch.cat([pad, pad.new_zeros(pad.shape[0], tok.shape[1])], dim=1)
        return y, pad


class DreamSoftTime(nn.Module):
    """``t (N,) -> (N, Dd)``: the time table's row, added to the diffusion head's condition."""

    def __init__(self, bank: SoftTokenBank):
        super().__init__()
        self.bank = bank

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.bank.time_term(t)


def attach_dream(model, bank: SoftTokenBank, uncon2neg: Optional[bool] = None) -> None:
    """Attach ``bank`` to a DREAM model for sampling: ``model.soft_text`` (read by
    :meth:`~dream.models.DREAM.extend_text_condition`) and, with a time table, ``model.diffloss.net.time_condition``.
    Replaces tokens attached before. The model's own weights are untouched; :func:`detach_dream` removes them."""
    c = bank.config
    if c.backbone != "dream":
        raise ValueError(f"these soft tokens are for a {c.backbone!r} model, not DREAM")
    if c.dim != model.config.decoder_embed_dim or c.n_layers != 1:
        raise ValueError(f"DREAM soft tokens need dim = decoder width {model.config.decoder_embed_dim} and one layer, "
                         f"got dim {c.dim}, {c.n_layers} layers")
    detach_dream(model)
    dev = next(model.parameters()).device
    bank = bank.to(dev)
    model.soft_text = DreamSoftText(bank, uncon2neg)
    if bank.t_tokens is not None:
        model.diffloss.net.time_condition = DreamSoftTime(bank)


def detach_dream(model) -> Optional[SoftTokenBank]:
    """Remove attached soft tokens; returns the bank that was attached (or None)."""
    ext = model._modules.pop("soft_text", None)
    model.diffloss.net._modules.pop("time_condition", None)
    return None if ext is None else ext.bank


# ----------------------------------------------------------------------------------------------------
# diffusers: an attention-processor wrapper
# ----------------------------------------------------------------------------------------------------
class SoftTokenContext:
    """What the processors of one forward read: ``set_idx`` (B,) or None (set 0; or, with ``cfg_halves``, set 1 for
    the first half of the batch: diffusers pipelines batch [uncond; cond]) and ``t`` (B,) or None."""

    def __init__(self):
        self.set_idx: Optional[torch.Tensor] = None
        self.t: Optional[torch.Tensor] = None
        self.cfg_halves = False
        self.enabled = True

    def sets(self, batch: int, device) -> torch.Tensor:
        if self.set_idx is not None:
            s = self.set_idx.reshape(-1).to(device)
            if s.numel() == 1:
                return s.expand(batch)
            if s.numel() != batch:
                raise ValueError(f"soft-token set index has {s.numel()} entries for a batch of {batch}")
            return s
        s = torch.zeros(batch, dtype=torch.long, device=device)
        if self.cfg_halves and batch % 2 == 0:
            s[: batch // 2] = 1
        return s

    def times(self, batch: int, device) -> Optional[torch.Tensor]:
        if self.t is None:
            return None
        t = self.t.reshape(-1).to(device)
        return t.expand(batch) if t.numel() == 1 else t


class SoftTokenProcessor:
    """Wraps an attention processor: inserts the bank's tokens into ``encoder_hidden_states`` (after BOS for a
    cross-attention, appended for a joint attention whose context outputs are then stripped) and calls the wrapped
    processor. A plain object, not a module: the bank's tensors never enter the model's state dict."""

    def __init__(self, inner, bank: SoftTokenBank, context: SoftTokenContext, layer: int = 0, joint: bool = False):
        self.inner, self.bank, self.context, self.layer, self.joint = inner, bank, context, layer, joint

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        ctx = self.context
        if not ctx.enabled or encoder_hidden_states is None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        B, dev = encoder_hidden_states.shape[0], encoder_hidden_states.device
        soft = self.bank(ctx.sets(B, dev), ctx.times(B, dev), self.layer).to(encoder_hidden_states.dtype)
        n = soft.shape[1]
        ehs = encoder_hidden_states
        if self.joint:
            ehs = torch.cat([ehs, soft], dim=1)
        else:
            ehs = torch.cat([ehs[:, :1], soft, ehs[:, 1:]], dim=1)
            if attention_mask is not None and attention_mask.shape[-1] == encoder_hidden_states.shape[1]:
                zeros = attention_mask.new_zeros(*attention_mask.shape[:-1], n)       # additive bias: keep
                attention_mask = torch.cat([attention_mask[..., :1], zeros, attention_mask[..., 1:]], dim=-1)
        out = self.inner(attn, hidden_states, ehs, attention_mask, *args, **kwargs)
        if self.joint and isinstance(out, tuple):
            out = (out[0], out[1][:, : out[1].shape[1] - n])
        return out


def _timestep_position(model) -> int:
    names = list(inspect.signature(model.forward).parameters)
    return names.index("timestep") if "timestep" in names else -1


class DiffusersSoftTokens:
    """Soft tokens in a diffusers ``UNet2DConditionModel`` (SD 1.x, SDXL) or ``SD3Transformer2DModel``.

    Example::

        st = DiffusersSoftTokens(unet, bank)          # bank.config.backbone "unet", groups ("down", "mid")
        with st.use(set_idx):                          # (B,) per row; default set 0 (see SoftTokenContext)
            eps = unet(x_t, t, text_emb).sample         # t reaches the time table through a forward pre-hook
        st.remove()                                    # the original processors back
    """

    def __init__(self, model, bank: SoftTokenBank, uncon2neg: Optional[bool] = None):
        c = bank.config
        self.model, self.bank = model, bank
        self.context = SoftTokenContext()
        self.context.cfg_halves = c.uncon2neg if uncon2neg is None else bool(uncon2neg)
        if self.context.cfg_halves and c.n_sets < 2:
            raise ValueError("uncon2neg needs two token sets (psi+, psi-)")
        self.names = self.select(model, c)
        if c.backbone == "sd3" or c.per_layer:
            if len(self.names) != c.n_layers:
                raise ValueError(f"the bank has {c.n_layers} layer(s) for {len(self.names)} wrapped attention modules")
        self._original = dict(model.attn_processors)
        procs = dict(self._original)
        for i, name in enumerate(self.names):
            layer = i if (c.backbone == "sd3" or c.per_layer) else 0
            procs[name] = SoftTokenProcessor(procs[name], bank, self.context, layer, joint=c.backbone == "sd3")
        model.set_attn_processor(procs)
        pos = _timestep_position(model)

        def pre_hook(module, args, kwargs):
            t = kwargs.get("timestep", args[pos] if 0 <= pos < len(args) else None)
            self.context.t = None if t is None else torch.as_tensor(t).reshape(-1)
        self._hook = model.register_forward_pre_hook(pre_hook, with_kwargs=True)

    @staticmethod
    def select(model, config: SoftTokenConfig) -> list[str]:
        """Processor names that get tokens: UNet ``attn2`` in the chosen groups; SD3 the first n_layers blocks."""
        names = list(model.attn_processors)
        if config.backbone == "sd3":
            out = [f"transformer_blocks.{i}.attn.processor" for i in range(config.n_layers)]
            missing = [n for n in out if n not in names]
            if missing:
                raise ValueError(f"the model has no joint attention {missing[0]!r}")
            return out
        if config.backbone != "unet":
            raise ValueError(f"DiffusersSoftTokens needs a 'unet' or 'sd3' bank, got {config.backbone!r}")
        prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}
        out = [n for n in names if n.endswith("attn2.processor")
               and any(n.startswith(prefix[g]) for g in config.groups)]
        if not out:
            raise ValueError(f"no cross-attention in the block groups {config.groups}")
        return out

    @contextlib.contextmanager
    def use(self, set_idx: Optional[Union[int, torch.Tensor]] = None, enabled: bool = True):
        """Within the block, forwards use ``set_idx`` ((B,) or one int; None = the default rule)."""
        old = (self.context.set_idx, self.context.enabled)
        self.context.set_idx = None if set_idx is None else torch.as_tensor(set_idx, dtype=torch.long)
        self.context.enabled = enabled
        try:
            yield self
        finally:
            self.context.set_idx, self.context.enabled = old

    def remove(self) -> None:
        """Restore the model's original processors and drop the hook."""
        self.model.set_attn_processor(dict(self._original))
        self._hook.remove()
