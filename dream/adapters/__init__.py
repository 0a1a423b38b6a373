"""LoRA adapters for DREAM and Stable Diffusion models, with peft underneath (``pip install 'dream[align]'``).

    from dream.adapters import add_lora, save_lora, load_lora, merge_lora
    model = dream.create_model("dream_tiny.shapes")
    add_lora(model, rank=16, alpha=32, targets="decoder_attn")   # only the adapter is trainable
    ...train...
    save_lora(model, "runs/x/lora")                              # peft folder; format="diffusers" | "kohya"
    load_lora(other, "runs/x/lora", weight=0.8)                   # detects the format; all-or-nothing
    merge_lora(other, unload=True)                               # fused: plain weights, no wrapper overhead

Importing this package needs neither peft nor diffusers; the functions that build adapters raise an
ImportError naming the ``[align]`` extra when peft is missing. See :mod:`dream.adapters.lora` (API),
:mod:`dream.adapters.targets` (presets), :mod:`dream.adapters.formats` (files).
"""
from .formats import FORMATS, LoraFileError, LoraWeights, combine_lora, detect_format, read_lora_file, write_lora_file
from .lora import (active_adapters, adapter_state_dict, add_lora, base_fingerprint, list_adapters,
                   load_adapter_state_dict, load_lora, lora_parameters, merge_lora, require_peft, save_lora,
                   set_adapters, unmerge_lora)
from .runtime import is_lora_layer
from .spec import lora_spec, parse_lora_path
from .targets import DIFFUSERS_PRESETS, DREAM_PRESETS, TargetError, resolve_targets

__all__ = ["add_lora", "save_lora", "load_lora", "merge_lora", "unmerge_lora", "set_adapters", "lora_parameters",
           "list_adapters", "active_adapters", "adapter_state_dict", "load_adapter_state_dict", "base_fingerprint",
           "require_peft", "resolve_targets", "DREAM_PRESETS", "DIFFUSERS_PRESETS", "TargetError", "FORMATS",
           "LoraFileError", "LoraWeights", "combine_lora", "detect_format", "read_lora_file", "write_lora_file",
           "is_lora_layer", "lora_spec", "parse_lora_path"]
