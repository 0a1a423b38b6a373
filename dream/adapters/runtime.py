"""What a LoRA-wrapped layer really computes, for code that reads weights directly (no peft import).

Fast paths such as the diffusion sampler's fused step (:mod:`dream.sampling.diffusion_sampler`) and the
row-restricted last decoder block (:func:`dream.sampling.mar.decode_rows`) call ``F.linear`` on a module's
``.weight``. On a peft LoRA layer (Hu et al. 2021, arXiv 2106.09685) ``.weight`` is the *base* weight: an
active, unmerged adapter would be silently skipped. These helpers give such code the effective weights:

* :func:`effective_linear` ``(weight, bias)`` of one layer: the base layer's own tensors when no adapter
  changes its output (plain layer, merged, disabled), else the weights peft's own ``merge`` would produce
  (merged in a private copy, so DoRA (arXiv 2402.09353), rsLoRA (arXiv 2312.03732), per-adapter weights and
  several adapters follow peft exactly); cached until the layer's parameters or adapter state change.
* :func:`fused_view` a whole module: the module itself when nothing is active and unmerged, else a plain
  copy (no peft wrappers) holding the effective weights. The copy is kept per module and refreshed in place
  (``copy_``), so its parameters keep their identity and their version counters only grow: caches keyed on
  ``(id(p), p._version)`` stay valid and never confuse an old state with a new one.

Duck-typed on peft's ``BaseTunerLayer`` attributes, so importing this module needs neither peft nor diffusers.
"""
from __future__ import annotations

import copy
import weakref
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["is_lora_layer", "changes_output", "effective_linear", "fused_view"]

_LAYER_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VIEW_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def is_lora_layer(m: nn.Module) -> bool:
    """A peft LoRA layer (``peft.tuners.lora.LoraLayer``: a wrapper holding ``base_layer`` and ``lora_A``)."""
    return hasattr(m, "get_base_layer") and hasattr(m, "lora_A") and hasattr(m, "merged_adapters")


def changes_output(m: nn.Module) -> bool:
    """True when ``m`` is a LoRA layer whose output differs from ``F.linear(x, m.weight, m.bias)``: an enabled,
    unmerged adapter is active, or adapters are disabled while some are merged (peft then unmerges on forward)."""
    if not is_lora_layer(m):
        return False
    if m.disable_adapters:
        return bool(m.merged_adapters)
    return not m.merged_adapters and any(a in m.lora_A for a in m.active_adapters)


def _layer_state(m: nn.Module) -> tuple:
    return (tuple(m.active_adapters), bool(m.disable_adapters), tuple(m.merged_adapters),
            tuple(sorted((k, float(v)) for k, v in m.scaling.items())))


def _param_state(m: nn.Module) -> tuple:
    return tuple((id(p), p._version) for p in m.parameters())


def effective_linear(m: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight, bias)`` such that ``F.linear(x, weight, bias)`` equals ``m(x)`` in eval mode (no dropout).

    A plain ``nn.Linear`` (or a LoRA layer that does not change its output) returns its own tensors; an active
    unmerged adapter returns freshly merged copies (peft's ``merge`` on a private deep copy of the layer)."""
    if not changes_output(m):
        base = m.get_base_layer() if is_lora_layer(m) else m
        return base.weight, base.bias
    key = (_layer_state(m), _param_state(m))
    hit = _LAYER_CACHE.get(m)
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        c = copy.deepcopy(m)
        if c.disable_adapters:
            c.unmerge()
        else:
            c.merge(adapter_names=[a for a in c.active_adapters if a in c.lora_A])
        base = c.get_base_layer()
        out = (base.weight.detach(), None if base.bias is None else base.bias.detach())
    _LAYER_CACHE[m] = (key, out)
    return out


def _plain_copy(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` with every LoRA wrapper replaced by (a copy of) its base layer."""
    view = copy.deepcopy(module)
    for name, m in list(view.named_modules()):
        if is_lora_layer(m) and name:
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, child, m.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        view.__dict__.pop(attr, None)
    view.requires_grad_(False)
    return view


def _source_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the adapter-free architecture, by its plain name, with LoRA layers'
    weight and bias replaced by their effective values."""
    out: dict[str, torch.Tensor] = {}
    skip: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if is_lora_layer(m):
            skip.append(name + ".")
            w, b = effective_linear(m)
            out[f"{name}.weight"] = w
            if b is not None:
                out[f"{name}.bias"] = b
            continue
        for pn, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            out[f"{name}.{pn}" if name else pn] = p
    return out


def fused_view(module: nn.Module) -> nn.Module:
    """``module`` itself when none of its LoRA layers changes its output, else an adapter-free copy whose
    weights are the effective ones (eval-mode function; see the module docstring for the caching rules)."""
    layers = [m for m in module.modules() if is_lora_layer(m)]
    if not any(changes_output(m) for m in layers):
        return module
    key = (_param_state(module), tuple(_layer_state(m) for m in layers))
    hit = _VIEW_CACHE.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    src = _source_tensors(module)
    view = hit[1] if hit is not None else None
    if view is not None:
        dst = dict(view.named_parameters())
        dst.update(view.named_buffers())
        if set(dst) != set(src) or any(dst[k].shape != v.shape or dst[k].dtype != v.dtype
                                       or dst[k].device != v.device for k, v in src.items()):
            view = None
    if view is None:
        view = _plain_copy(module)
    with torch.no_grad():
        dst = dict(view.named_parameters())
        dst.update(view.named_buffers())
        for k, v in src.items():
            dst[k].copy_(v)
    view.train(module.training)
    _VIEW_CACHE[module] = (key, view)
    return view
