"""LoRA runs of ``dream train`` (``TrainConfig.lora``): what the trainer delegates to keep its own code unchanged.

* the adapter is added after the model is built and ``init_from`` loaded (:func:`~dream.adapters.add_lora`
  freezes everything else, so the optimizer, which only takes ``requires_grad`` tensors, holds the adapter only);
* a checkpoint's ``model`` entry holds the adapter tensors and a sha256 of the frozen base (names, shapes and
  bytes), not the base itself: ``--resume`` rebuilds the base from the run's config and refuses a different one;
* the frozen base stays bit-identical: its BatchNorm layers (DREAM's image projection) still normalise with batch
  statistics in training but stop updating their running statistics (``track_running_stats = False``, which in
  eval mode keeps using the stored ones), so the saved adapter describes the whole change;
* EMA (``ema_decay > 0``) averages the adapter tensors only (the base is frozen; its shadow shares the live
  tensors, no second copy of the model);
* at the end the adapter is saved in the peft format to ``<out>/lora/`` (the EMA adapter to ``<out>/lora_ema/``);
  no full model is exported: ``load_lora(base, "<out>/lora")`` or ``dream sample --lora <out>/lora``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch.nn as nn

from .lora import add_lora, adapter_state_dict, base_fingerprint, load_adapter_state_dict, save_lora
from .spec import lora_spec

__all__ = ["LoraTraining"]


class LoraTraining:
    """Adds the adapter described by ``spec`` (see :func:`~dream.adapters.lora_spec`) to ``model`` and handles
    its checkpoint state and export."""

    def __init__(self, model: nn.Module, spec: Union[str, Mapping[str, Any]]):
        self.spec = lora_spec(spec)
        self.name = self.spec.get("name", "default")
        add_lora(model, **self.spec)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and \
                    not any(p.requires_grad for p in m.parameters(recurse=False)):
                m.track_running_stats = False      # train: batch statistics, no update; eval: the stored ones
        self.base_sha256 = base_fingerprint(model)

    def state_dict(self, model: nn.Module) -> dict:
        return {"adapter": adapter_state_dict(model), "base_sha256": self.base_sha256}

    def check_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Raise unless ``state`` (a checkpoint's ``model`` entry) is this run's adapter on this base; changes
        nothing (``--resume`` checks every candidate checkpoint before applying one)."""
        if not isinstance(state, Mapping) or "adapter" not in state:
            raise ValueError("this checkpoint is not from a LoRA run (no adapter state); resume it without `lora`")
        if state.get("base_sha256") != self.base_sha256:
            raise ValueError("the checkpoint's LoRA was trained on a different base model (sha256 of the frozen "
                             "weights differs): check `model`, `model_overrides` and `init_from` of the run")
        own = adapter_state_dict(model)
        theirs = state["adapter"]
        bad = sorted(set(own) ^ set(theirs)) + sorted(k for k in set(own) & set(theirs)
                                                      if tuple(own[k].shape) != tuple(theirs[k].shape))
        if bad:
            raise ValueError(f"the checkpoint's adapter does not match this run's ({len(bad)} keys differ, e.g. "
                             f"{bad[:3]})")

    def load_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "adapter" not in state:
            raise ValueError("this checkpoint is not from a LoRA run (no adapter state); resume it without `lora`")
        if state.get("base_sha256") != self.base_sha256:
            raise ValueError("the checkpoint's LoRA was trained on a different base model (sha256 of the frozen "
                             "weights differs): check `model`, `model_overrides` and `init_from` of the run")
        load_adapter_state_dict(model, state["adapter"])

    def export(self, out: Union[str, os.PathLike], model: nn.Module, ema_model: Optional[nn.Module] = None) -> Path:
        out = Path(out)
        path = save_lora(model, out / "lora", format="peft", name=self.name)
        if ema_model is not None:
            save_lora(ema_model, out / "lora_ema", format="peft", name=self.name)
        return path
