"""``DreamPipeline``: tokenizer + CLIP BPE tokenizer + frozen text conditioner + DREAM, end to end.

    pipe = DreamPipeline.from_pretrained("dream_tiny.shapes")          # shipped weights, no network
    images = pipe.generate(["a red square", "two blue circles"], seed=0)  # (N, 3, H, W) in [-1, 1]
    pipe.score(images, ["a red square", "two blue circles"])             # DREAM's own image-text cosine

A pipeline folder holds ``model/`` (model.safetensors + config.json), ``tokenizer/`` (config.json and,
for a VAE, its weights; or ``pipeline.json`` names a shipped tokenizer such as ``shapes_vae``) and ``pipeline.json``
(text-encoder spec, padding-mask switch, the sampler settings the checkpoint was tuned with: ``num_iter``,
``cfg``, ``cfg_schedule``, ``temperature``, ``clip_denoised``; ``soft_tokens``: a soft-token folder loaded with the
model). The frozen text encoder is referenced, not copied:
``minilm``, ``hf:/path/to/t5-large`` or ``random``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from dream.utils.config import ConfigError, check_seed, read_config_file

PIPELINE_FILE = "pipeline.json"
# what ``generate`` uses when neither the call nor the pipeline (``pipeline.json``) says otherwise
SAMPLING_DEFAULTS = {"num_iter": 64, "cfg": 3.0, "temperature": 1.0, "cfg_schedule": "linear"}


def pipeline_meta(name_or_path: Union[str, os.PathLike]) -> tuple[Path, dict]:
    """(folder, settings) of a pipeline: a shipped tag (``dream_tiny.shapes``, from the public pretrained table,
    files sha256-checked) or a folder (its ``pipeline.json``; a folder without one gets the defaults)."""
    from dream.models.pretrained import get_pretrained_cfg, is_pretrained_tag

    if is_pretrained_tag(name_or_path, "pipeline"):
        pc = get_pretrained_cfg(os.fspath(name_or_path))
        return pc.verify(), {"tokenizer": pc.tokenizer, "text_encoder": pc.text_encoder,
                             "use_padding_mask": pc.use_padding_mask, **pc.sampler}
    folder = Path(name_or_path)
    if not folder.is_dir():
        from dream.models.pretrained import list_pretrained

        raise FileNotFoundError(f"pipeline folder not found: {folder} (shipped pipelines: "
                                f"{', '.join(list_pretrained('pipeline'))})")
    meta_file = folder / PIPELINE_FILE
    meta = read_config_file(meta_file, "pipeline") if meta_file.exists() else {}
    known = {"tokenizer", "text_encoder", "use_padding_mask", "clip_denoised", "weights", "soft_tokens",
             *SAMPLING_DEFAULTS}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise ConfigError(f"unknown keys in {meta_file}: {unknown} (known: {sorted(known)})")
    return folder, meta


def pipeline_tokenizer_spec(name_or_path: Union[str, os.PathLike]) -> Optional[str]:
    """The tokenizer a pipeline (shipped tag or folder) was trained with: the path of its ``tokenizer/`` folder
    or a name such as ``"shapes_vae"`` (see ``create_tokenizer``); None when it is not a pipeline."""
    try:
        folder, meta = pipeline_meta(name_or_path)
    except FileNotFoundError:
        return None
    if not meta and not (folder / PIPELINE_FILE).exists():
        return None
    return _tokenizer_spec(folder, meta)


def _tokenizer_spec(folder: Path, meta: dict) -> str:
    spec = meta.get("tokenizer", "tokenizer")
    return str(folder / spec) if (folder / spec).exists() else spec


class DreamPipeline:
    """Images and strings in, embeddings / scores / images out."""

    def __init__(self, model, tokenizer, text_encoder: str = "minilm", use_padding_mask: bool = False,
                 device: Union[str, torch.device, None] = None, clip_denoised: Union[float, None, str] = "auto",
                 sampling_defaults: Optional[dict] = None):
        from dream.text.inputs import TextInputs

        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer.to(self.device) if hasattr(tokenizer, "to") else tokenizer
        c = model.config
        self.text_encoder_spec = text_encoder
        self.use_padding_mask = bool(use_padding_mask)
        # raw pixels are bounded to [-1, 1]: clip the diffusion head's x0 (IDDPM clip_denoised); VAE latents: official
        # (no clip) unless the pipeline says otherwise (a small, briefly trained head needs it: see pipeline.json)
        from dream.models.tokenizers import PixelTokenizer

        if clip_denoised == "auto":
            clip_denoised = 1.0 if isinstance(tokenizer, PixelTokenizer) else None
        if clip_denoised is not None and not float(clip_denoised) > 0:
            raise ValueError(f"clip_denoised must be > 0, None or 'auto', got {clip_denoised!r}")
        self.clip_denoised = None if clip_denoised is None else float(clip_denoised)
        unknown = sorted(set(sampling_defaults or {}) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown sampling defaults {unknown} (known: {sorted(SAMPLING_DEFAULTS)})")
        self.sampling_defaults = dict(sampling_defaults or {})
        self.text = TextInputs(text_encoder, c.text_embed_dim, c.text_max_len, c.clip_context_length, self.device,
                               use_padding_mask, clip_vocab_size=c.clip_vocab_size)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], device=None, text_encoder: Optional[str] = None,
                        **model_overrides) -> "DreamPipeline":
        """Load a shipped pipeline (``dream_tiny.shapes``, see :func:`dream.models.pretrained.list_pretrained`) or a
        pipeline folder (``model/``, ``tokenizer/`` or a tokenizer name, ``pipeline.json``)."""
        import dream
        from dream.models.pretrained import is_pretrained_tag
        from dream.models.tokenizers import create_tokenizer

        folder, meta = pipeline_meta(name_or_path)
        if is_pretrained_tag(name_or_path, "pipeline"):
            model = dream.create_model(os.fspath(name_or_path), **model_overrides)
        else:
            model = dream.create_model(folder / "model" if (folder / "model").is_dir() else folder, **model_overrides)
        tokenizer = create_tokenizer(_tokenizer_spec(folder, meta))
        pipe = cls(model, tokenizer, text_encoder or meta.get("text_encoder", "minilm"),
                   meta.get("use_padding_mask", False), device, meta.get("clip_denoised", "auto"),
                   {k: meta[k] for k in SAMPLING_DEFAULTS if k in meta})
        if meta.get("soft_tokens"):
            pipe.load_soft_tokens(folder / meta["soft_tokens"])
        return pipe

    def load_lora(self, path: Union[str, os.PathLike], weight: float = 1.0, name: Optional[str] = None,
                  fuse: bool = False) -> str:
        """Load a LoRA adapter (peft folder, diffusers or kohya file: see :func:`dream.adapters.load_lora`) with
        ``weight``; repeatable (adapters stack with their weights). ``fuse=True`` then merges every active
        adapter into the weights and removes the wrappers: sampling costs what the base model costs, and the
        adapters can no longer be changed. Returns the adapter name."""
        from dream.adapters import load_lora, merge_lora

        name = load_lora(self.model, path, name=name, weight=weight)
        if fuse:
            merge_lora(self.model, unload=True)
        return name

    def load_soft_tokens(self, path: Union[str, os.PathLike], uncon2neg: Optional[bool] = None):
        """Load SoftREPA / AGSM soft tokens (a folder or ``soft_tokens.safetensors`` written by
        :meth:`dream.align.soft_tokens.SoftTokenBank.save`) into the model: they join the decoder's text stream in
        sampling (CFG: the conditional branch uses psi+, the unconditional branch psi- when ``uncon2neg``, default:
        the tokens' own setting), a time table shifts the diffusion head's condition. Replaces tokens loaded before;
        works with LoRA adapters. Returns the bank."""
        from dream.align.soft_tokens import attach_dream, load_soft_tokens

        bank = load_soft_tokens(path, device=self.device)
        attach_dream(self.model, bank, uncon2neg)
        return bank

    def unload_soft_tokens(self) -> None:
        """Remove loaded soft tokens (the model samples as without them)."""
        from dream.align.soft_tokens import detach_dream

        detach_dream(self.model)

    def save_pretrained(self, folder: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> Path:
        import copy

        from dream.adapters.runtime import is_lora_layer
        from dream.align.soft_tokens import detach_dream
        from dream.models.convert import save_pretrained

        folder = Path(folder)
        model = self.model
        bank = None
        if "soft_text" in model._modules:                    # soft tokens: saved beside the model, not inside it
            model = copy.deepcopy(model)
            bank = detach_dream(model)
        if any(is_lora_layer(m) for m in model.modules()):   # LoRA adapters: save the fused weights
            from dream.adapters import merge_lora

            model = merge_lora(copy.deepcopy(model) if model is self.model else model, unload=True)
        save_pretrained(model, folder / "model", dtype=dtype)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        meta = {"tokenizer": "tokenizer", "text_encoder": self.text_encoder_spec,
                "use_padding_mask": self.text.use_padding_mask, "clip_denoised": self.clip_denoised,
                **self.sampling_defaults}
        if bank is not None:
            bank.save(folder / "soft_tokens")
            meta["soft_tokens"] = "soft_tokens"
        (folder / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    # ------------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 -> [-1, 1]; the tokenizer then checks layout, finiteness and range."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a (B, 3, H, W) tensor, got {type(images).__name__}")
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1
        return images.to(self.device)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] (or uint8) -> contrastive embeddings (B, E)."""
        tokens = self.tokenizer.encode(self._check_images(images), sample=False)
        return self.model.encode_image(tokens, normalize=normalize)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Strings -> CLIP-tower embeddings (B, E)."""
        texts = _as_list(texts)
        return self.model.encode_text(self.text.clip_ids(texts), normalize=normalize)

    @torch.no_grad()
    def score(self, images: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """DREAM's own image-text similarity (cosine, B,) for matching pairs."""
        texts = _as_list(texts)
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts")
        return (self.encode_images(images) * self.encode_text(texts)).sum(-1)

    def sampler_config(self, num_iter: Optional[int] = None, cfg: Optional[float] = None,
                       temperature: Optional[float] = None, cfg_schedule: Optional[str] = None,
                       num_sampling_steps: Optional[str] = None, clip_denoised: Optional[float] = "default",
                       fast: bool = False):
        """The :class:`~dream.sampling.SamplerConfig` ``generate`` uses: each None (``"default"`` for
        ``clip_denoised``) is the pipeline's own setting (``pipeline.json``), else MAR's default. ``fast``: the fast
        preset on top (:func:`dream.sampling.fast_config`); an explicit ``num_iter`` or ``num_sampling_steps`` wins."""
        from dream.sampling import SamplerConfig, fast_config

        d = {**SAMPLING_DEFAULTS, **self.sampling_defaults}
        sc = SamplerConfig(num_iter=d["num_iter"] if num_iter is None else num_iter,
                           cfg=d["cfg"] if cfg is None else cfg,
                           cfg_schedule=d["cfg_schedule"] if cfg_schedule is None else cfg_schedule,
                           temperature=d["temperature"] if temperature is None else temperature,
                           num_sampling_steps=num_sampling_steps,
                           clip_denoised=self.clip_denoised if clip_denoised == "default" else clip_denoised)
        if not fast:
            return sc
        explicit = {"num_iter": num_iter, "num_sampling_steps": num_sampling_steps}
        return fast_config(sc, **{k: v for k, v in explicit.items() if v is not None})

    @torch.no_grad()
    def generate(self, prompts: Union[str, Sequence[str]], num_iter: Optional[int] = None, cfg: Optional[float] = None,
                 temperature: Optional[float] = None, seed: Optional[int] = 0, batch_size: int = 16,
                 cfg_schedule: Optional[str] = None, num_sampling_steps: Optional[str] = None,
                 sad: Optional[tuple] = None, rerank: Optional[int] = None, scorer=None,
                 progress: bool = False, return_scores: bool = False, autocast: Optional[torch.dtype] = None,
                 clip_denoised: Optional[float] = "default", fast: bool = False):
        """Generate images for ``prompts`` (chunked by ``batch_size``).

        Args:
            num_iter, cfg, temperature, cfg_schedule: sampler settings; None = the pipeline's own
                (``sampling_defaults``, from ``pipeline.json``), else 64, 3.0, 1.0, "linear" (MAR's defaults).
            sad: ``(K, tau)`` for Semantically Aligned Decoding (tau in steps, or a float fraction of tokens).
            rerank: K for best-of-K reranking (DREAM's own score, or ``scorer(images, prompts) -> (N,)``).
            autocast: e.g. ``torch.bfloat16`` to run the networks under autocast.
            clip_denoised: clamp the diffusion head's x0 to [-c, c]; default: the pipeline's setting (1.0 for
                raw-pixel tokens, None = official for VAE latents).
            fast: the fast sampling preset (:func:`dream.sampling.fast_config`: approximate, its quality cost is
                measured in ``benchmarks/bench_fast_sampling.py``); False = the default sampler, unchanged.
        Returns:
            images (N, 3, H, W) in [-1, 1]; with ``return_scores`` also the per-prompt selection scores.
        """
        from dream.sampling import MARSampler, SemanticallyAlignedDecoding, best_of_k

        prompts = _as_list(prompts)
        if sad is not None and rerank is not None:
            raise ValueError("choose one of sad=(K, tau) and rerank=K")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed is not None:
            check_seed(seed)
        scfg = self.sampler_config(num_iter=num_iter, cfg=cfg, temperature=temperature, cfg_schedule=cfg_schedule,
                                   num_sampling_steps=num_sampling_steps, clip_denoised=clip_denoised, fast=fast)
        if fast and sad is not None and isinstance(sad[1], int) and num_iter is None:
            base_iter = self.sampler_config().num_iter                             # tau in steps: scale with the steps
            sad = (sad[0], max(1, min(scfg.num_iter - 1, round(sad[1] * scfg.num_iter / base_iter))))
        g = torch.Generator(device="cpu")
        if seed is not None:
            g.manual_seed(seed)
        else:
            g.seed()
        images, scores = [], []
        chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
        from tqdm.auto import tqdm

        for chunk in tqdm(chunks, disable=not progress, desc="generate"):
            feats, pad = self.text.features(chunk)
            null, null_pad = self.text.null(len(chunk))
            with torch.autocast(self.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                if sad is not None:
                    k, tau = sad
                    out = SemanticallyAlignedDecoding(self.model, scfg, int(k), tau).sample(
                        feats, self.text.clip_ids(chunk), null, text_padding_mask=pad, null_padding_mask=null_pad,
                        generator=g, progress=progress)
                    toks, sc = out.tokens, out.scores.max(0).values
                elif rerank is not None:
                    ext = None
                    if scorer is not None:
                        ext = (lambda t, c=chunk: scorer(self.tokenizer.decode(t.float()), list(c) * int(rerank)))
                    out = best_of_k(MARSampler(self.model, scfg), feats, self.text.clip_ids(chunk), null,
                                    k=int(rerank), scorer=ext, text_padding_mask=pad, null_padding_mask=null_pad,
                                    generator=g, progress=progress)
                    toks, sc = out.tokens, out.scores.max(0).values
                else:
                    toks = MARSampler(self.model, scfg).sample(feats, null, text_padding_mask=pad,
                                                               null_padding_mask=null_pad, generator=g,
                                                               progress=progress)
                    sc = None
            images.append(self.tokenizer.decode(toks.float()).clamp(-1, 1).cpu())
            if sc is not None:
                scores.append(sc.float().cpu())
        images = torch.cat(images)
        if return_scores:
            return images, (torch.cat(scores) if scores else None)
        return images


def _as_list(texts) -> list:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise ValueError("empty prompt list")
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"prompts must be strings, got {type(t).__name__}")
    return texts
