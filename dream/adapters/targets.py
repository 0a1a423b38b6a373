"""Which layers a LoRA adapts: presets for DREAM and diffusers models, explicit names, regexes, and a guard.

Presets for :class:`~dream.models.DREAM` (module names as in the official checkpoints; the decoder's q/k/v
are packed: ``self_attn.qkv`` holds q, k and v, ``cross_attn.kv`` holds k and v):

=================  =========================================================================================
``decoder_attn``   q/k/v/out of the decoder's self- and cross-attention (``decoder_blocks.*.self_attn.{qkv,proj}``,
                   ``decoder_blocks.*.cross_attn.{q,kv,proj}``); the default for DREAM
``decoder``        ``decoder_attn`` + the decoder MLPs (``decoder_blocks.*.mlp.{fc1,fc2}``)
``text_aligner``   the text aligner blocks (``text_aligner.*.attn.{qkv,proj}``, ``text_aligner.*.mlp.{fc1,fc2}``)
``diffloss``       the diffusion head MLP: ``res_blocks.*.mlp.{0,2}``, ``res_blocks.*.adaLN_modulation.1``,
                   ``cond_embed``, ``input_proj``, ``final_layer.{linear,adaLN_modulation.1}``
``encoder``        the image encoder blocks (``encoder_blocks.*.attn.{qkv,proj}``, ``encoder_blocks.*.mlp.*``)
``all``            every ``nn.Linear`` of the model (the CLIP text tower's packed ``in_proj_weight`` is a bare
                   parameter, not a layer, and is not adapted)
=================  =========================================================================================

diffusers models: ``attn`` = ``to_q, to_k, to_v, to_out.0`` on ``UNet2DConditionModel`` (as diffusers'
``train_text_to_image_lora.py``); on ``SD3Transformer2DModel`` also the context branch ``add_q_proj,
add_k_proj, add_v_proj, to_add_out`` (as diffusers' ``train_dreambooth_lora_sd3.py``). It is their default.

Any other entry is an exact module name, a name suffix at a ``.`` boundary (peft's rule: ``to_out.0`` matches
``...attn1.to_out.0``) or, failing both, a regular expression matched against the whole module name.
Unlike peft, which stays silent when only some entries of ``target_modules`` match, every entry must match
at least one adaptable layer (``nn.Linear`` / ``nn.Conv2d``), or :func:`resolve_targets` raises naming it.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

import torch.nn as nn

from .runtime import is_lora_layer

__all__ = ["DREAM_PRESETS", "DIFFUSERS_PRESETS", "TargetError", "adaptable_modules", "default_targets",
           "resolve_targets"]

_ATTN_MLP = r"(attn\.(qkv|proj)|mlp\.(fc1|fc2))"
_DECODER_ATTN = r"decoder_blocks\.\d+\.(self_attn\.(qkv|proj)|cross_attn\.(q|kv|proj))"
DREAM_PRESETS: dict[str, tuple[str, ...]] = {
    "decoder_attn": (_DECODER_ATTN,),
    "decoder": (_DECODER_ATTN, r"decoder_blocks\.\d+\.mlp\.(fc1|fc2)"),
    "text_aligner": (rf"text_aligner\.\d+\.{_ATTN_MLP}",),
    "diffloss": (r"diffloss\.net\.(res_blocks\.\d+\.(mlp\.[02]|adaLN_modulation\.1)|cond_embed|input_proj"
                 r"|final_layer\.(linear|adaLN_modulation\.1))",),
    "encoder": (rf"encoder_blocks\.\d+\.{_ATTN_MLP}",),
    "all": (r".*",),
}
_UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "UNet2DConditionModel": {"attn": _UNET_ATTN},
    "SD3Transformer2DModel": {"attn": _UNET_ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")},
}
_ADAPTABLE = (nn.Linear, nn.Conv2d)


class TargetError(ValueError):
    """A target entry matched no adaptable layer, or named a layer LoRA cannot adapt."""


def _is_dream(module: nn.Module) -> bool:
    from dream.models.dream import DREAM

    return isinstance(module, DREAM)


def presets_for(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Preset name -> regexes (DREAM) or name suffixes (diffusers) for ``module``'s class."""
    if _is_dream(module):
        return DREAM_PRESETS
    return DIFFUSERS_PRESETS.get(type(module).__name__, {})


def default_targets(module: nn.Module) -> str:
    """The preset used when ``targets`` is None: ``decoder_attn`` for DREAM, ``attn`` for a supported diffusers
    model; anything else must name its targets."""
    if _is_dream(module):
        return "decoder_attn"
    if type(module).__name__ in DIFFUSERS_PRESETS:
        return "attn"
    raise TargetError(f"no default LoRA targets for a {type(module).__name__}: pass targets=[module names or "
                      f"regexes] (presets exist for DREAM and {', '.join(DIFFUSERS_PRESETS)})")


def adaptable_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer for every layer a LoRA can wrap. A layer already wrapped by peft is listed once, under
    its own name, as its base layer (its ``base_layer`` / ``lora_A`` children are not targets)."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, m in module.named_modules():
        if inside and name.startswith(inside[-1]):
            continue
        if is_lora_layer(m):
            inside.append(name + ".")
            base = m.get_base_layer()
            if isinstance(base, _ADAPTABLE):
                out[name] = base
        elif isinstance(m, _ADAPTABLE) and name:
            out[name] = m
    return out


def _as_list(targets: Union[str, Sequence[str]], presets: dict) -> list[str]:
    """Entries of ``targets``; ``"a+b"`` is split when every part is a preset name (else it is one regex)."""
    items = [targets] if isinstance(targets, str) else list(targets)
    if not items or not all(isinstance(t, str) and t for t in items):
        raise TargetError(f"targets must be preset names, module names or regexes (non-empty strings), "
                          f"got {targets!r}")
    out: list[str] = []
    for t in items:
        parts = t.split("+")
        out.extend(parts if len(parts) > 1 and all(p in presets for p in parts) else [t])
    return out


def _matches(entry: str, names: Iterable[str]) -> list[str]:
    names = list(names)
    hit = [n for n in names if n == entry or n.endswith("." + entry)]
    if hit:
        return hit
    try:
        rx = re.compile(entry)
    except re.error:
        return []
    return [n for n in names if rx.fullmatch(n)]


def resolve_targets(module: nn.Module, targets: Union[None, str, Sequence[str]] = None) -> list[str]:
    """The full names of the layers ``targets`` selects in ``module`` (sorted in module order).

    ``targets``: None (the module's default preset), a preset name, ``"preset+preset"``, or a list mixing
    presets, exact names / suffixes and regexes. Raises :class:`TargetError` naming every entry that matched
    no adaptable layer, and every selected module that is not a ``nn.Linear`` / ``nn.Conv2d``."""
    presets = presets_for(module)
    entries = _as_list(default_targets(module) if targets is None else targets, presets)
    layers = adaptable_modules(module)
    chosen: set[str] = set()
    empty: list[str] = []
    for entry in entries:
        if entry in presets:
            hit = sorted({n for pat in presets[entry] for n in _matches(pat, layers)})
        else:
            hit = _matches(entry, layers)
            if not hit:
                wrong = [n for n, m in module.named_modules() if n and (n == entry or n.endswith("." + entry))]
                if wrong:
                    kinds = sorted({type(module.get_submodule(n)).__name__ for n in wrong})
                    raise TargetError(f"LoRA target {entry!r} names {len(wrong)} module(s) of type "
                                      f"{', '.join(kinds)} (e.g. {wrong[0]!r}); LoRA adapts nn.Linear / nn.Conv2d")
        if not hit:
            empty.append(entry)
        chosen.update(hit)
    if empty:
        known = ", ".join(presets) or "none"
        raise TargetError(f"LoRA targets matched no Linear/Conv2d layer of this {type(module).__name__}: {empty} "
                          f"(presets here: {known}; else give module names, name suffixes or regexes)")
    order = {n: i for i, n in enumerate(layers)}
    return sorted(chosen, key=order.__getitem__)


def preset_names(module: Optional[nn.Module] = None) -> list[str]:
    """Preset names for ``module`` (all DREAM presets when None)."""
    return list(presets_for(module) if module is not None else DREAM_PRESETS)
