"""LoRA files: peft folders, diffusers ``pytorch_lora_weights.safetensors`` and kohya / sd-scripts files.

Every format is read into, and written from, one in-memory form, :class:`LoraWeights`: per adapted module
``A`` (rank x in), ``B`` (out x rank), an optional DoRA magnitude (Liu et al. 2024, arXiv 2402.09353) and the
module's ``alpha``; the update is ``delta W = (alpha / r) B A`` (Hu et al. 2021, arXiv 2106.09685), or
``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023, arXiv 2312.03732).

=============  ==============================================================================================
``peft``       a folder: ``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` /
               ``.lora_B.weight`` / ``.lora_magnitude_vector``, as ``PeftModel.save_pretrained``) and
               ``adapter_config.json`` (peft's own ``LoraConfig.save_pretrained``)
``diffusers``  ``pytorch_lora_weights.safetensors``: keys ``<prefix>.<module>.lora_A.weight`` (prefix ``unet``,
               ``transformer`` for SD3, ``dream`` for DREAM) and the ``LoraConfig`` as JSON in the
               ``lora_adapter_metadata`` header entry with prefixed keys (``unet.r``, ``unet.lora_alpha``, ...),
               which is what makes diffusers' loaders use the right scale when alpha != rank
``kohya``      ``lora_unet_<module path with _>.lora_down.weight`` (= A) / ``.lora_up.weight`` (= B) / ``.alpha``
               (0-d; the real alpha: diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank, wrong
               whenever they differ; with rsLoRA the written alpha is ``alpha sqrt(r)``, same scale). DREAM
               files use ``lora_dream_``. DoRA has no agreed kohya layout here and is refused.
=============  ==============================================================================================

Our files also carry ``dream_lora`` in the safetensors header (JSON: architecture class, format version,
rank/alpha/targets, dream version), used to reject a file made for another architecture by name.
Only safetensors are read or written. Reading never touches a model; :func:`check_against` validates a
:class:`LoraWeights` against one (every key, shape and rank) before anything is injected.
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .targets import adaptable_modules

__all__ = ["LoraFileError", "LoraWeights", "FORMATS", "detect_format", "read_lora_file", "write_lora_file",
           "check_against", "PEFT_WEIGHTS", "PEFT_CONFIG", "DIFFUSERS_WEIGHTS"]

FORMATS = ("peft", "diffusers", "kohya")
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
DIFFUSERS_WEIGHTS, KOHYA_WEIGHTS = "pytorch_lora_weights.safetensors", "lora.safetensors"
META_KEY, DIFFUSERS_META_KEY = "dream_lora", "lora_adapter_metadata"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1
_SUFFIXES = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"}


class LoraFileError(ValueError):
    """A LoRA file is unreadable, malformed, or does not fit the model (the message names file and keys)."""


@dataclass
class LoraWeights:
    """One adapter as plain tensors. ``modules``: module name -> {"lora_A", "lora_B"[, "magnitude"]};
    ``alphas``: module name -> alpha. The rank of a module is ``lora_A.shape[0]``."""

    modules: dict[str, dict[str, torch.Tensor]]
    alphas: dict[str, float]
    use_rslora: bool = False
    use_dora: bool = False
    dropout: float = 0.0
    meta: dict = field(default_factory=dict)
    source: str = ""
    format: str = ""
    declared_ranks: dict[str, int] = field(default_factory=dict)   # what the file's config says, per module

    def rank(self, name: str) -> int:
        return int(self.modules[name]["lora_A"].shape[0])

    def scale(self, name: str) -> float:
        r = self.rank(name)
        return self.alphas[name] / (math.sqrt(r) if self.use_rslora else r)

    def config_kwargs(self) -> dict:
        """peft ``LoraConfig`` keyword arguments that rebuild exactly these modules, ranks and alphas (the most
        common rank / alpha as ``r`` / ``lora_alpha``, exceptions as anchored ``rank_pattern`` / ``alpha_pattern``)."""
        names = list(self.modules)
        ranks = {n: self.rank(n) for n in names}
        r = Counter(ranks.values()).most_common(1)[0][0]
        a = Counter(self.alphas[n] for n in names).most_common(1)[0][0]
        return {"r": r, "lora_alpha": a, "target_modules": names, "lora_dropout": self.dropout,
                "use_dora": self.use_dora, "use_rslora": self.use_rslora,
                "rank_pattern": {f"^{re.escape(n)}$": k for n, k in ranks.items() if k != r},
                "alpha_pattern": {f"^{re.escape(n)}$": self.alphas[n] for n in names if self.alphas[n] != a}}


def combine_lora(parts: Sequence[LoraWeights]) -> LoraWeights:
    """One adapter whose update is the sum of ``parts``' updates: per module, the lora_A rows stacked and the
    lora_B columns stacked with each part's scale folded in (rank = the sum of ranks, alpha = rank, so the scale
    is 1). Adapters merged one after another (DreamSync's rounds) become one file this way; exact up to the
    rounding of folding the scales. DoRA adapters cannot be summed like this and raise."""
    parts = list(parts)
    if not parts:
        raise ValueError("combine_lora needs at least one adapter")
    if any(w.use_dora for w in parts):
        raise ValueError("DoRA adapters are not additive; they cannot be combined into one LoRA")
    names = sorted({n for w in parts for n in w.modules})
    modules, alphas = {}, {}
    for n in names:
        As, Bs = [], []
        for w in parts:
            if n in w.modules:
                As.append(w.modules[n]["lora_A"])
                Bs.append(w.modules[n]["lora_B"] * w.scale(n))
        modules[n] = {"lora_A": torch.cat(As, 0).contiguous(), "lora_B": torch.cat(Bs, 1).contiguous()}
        alphas[n] = float(modules[n]["lora_A"].shape[0])
    return LoraWeights(modules, alphas, use_rslora=False, use_dora=False, dropout=0.0)


# -----------------------------------------------------------------------------------------------
# safetensors I/O
# -----------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise LoraFileError(f"cannot read LoRA file {path}: truncated, corrupt or not a safetensors file "
                            f"({type(e).__name__}: {e})") from None
    return tensors, meta


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _key_format(keys) -> Optional[str]:
    keys = list(keys)
    if any(k.endswith(".lora_down.weight") for k in keys):
        return "kohya"
    if any(k.endswith(".lora_A.weight") for k in keys):
        return "diffusers"
    return None


def _keys_of(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001
        raise LoraFileError(f"cannot read LoRA file {path}: truncated, corrupt or not a safetensors file "
                            f"({type(e).__name__}: {e})") from None


def detect_format(path: Union[str, os.PathLike]) -> tuple[str, Path]:
    """``(format, weights file)`` of a LoRA folder or file: a folder with ``adapter_config.json`` is peft, one
    with ``pytorch_lora_weights.safetensors`` diffusers; a file is classified by its keys (``.lora_down.`` kohya,
    ``.lora_A.`` diffusers; ``adapter_model.safetensors`` next to ``adapter_config.json`` peft)."""
    p = Path(path)
    if p.is_dir():
        if (p / PEFT_CONFIG).exists():
            if not (p / PEFT_WEIGHTS).exists():
                raise LoraFileError(f"peft folder {p} has {PEFT_CONFIG} but no {PEFT_WEIGHTS} (only safetensors "
                                    f"weights are read)")
            return "peft", p / PEFT_WEIGHTS
        if (p / DIFFUSERS_WEIGHTS).exists():
            return "diffusers", p / DIFFUSERS_WEIGHTS
        files = sorted(p.glob("*.safetensors"))
        if len(files) != 1:
            raise LoraFileError(f"no LoRA found in folder {p}: expected {PEFT_CONFIG} + {PEFT_WEIGHTS}, "
                                f"{DIFFUSERS_WEIGHTS} or exactly one .safetensors file (found {len(files)})")
        p = files[0]
    if not p.is_file():
        raise FileNotFoundError(f"LoRA file or folder not found: {p}")
    if p.name == PEFT_WEIGHTS and (p.parent / PEFT_CONFIG).exists():
        return "peft", p
    fmt = _key_format(_keys_of(p))
    if fmt is None:
        raise LoraFileError(f"{p} holds no LoRA tensors (no '.lora_A.weight' or '.lora_down.weight' keys)")
    return fmt, p


# -----------------------------------------------------------------------------------------------
# readers
# -----------------------------------------------------------------------------------------------
def _component_prefix(module: nn.Module) -> str:
    from .targets import _is_dream

    if _is_dream(module):
        return "dream"
    return "transformer" if "Transformer" in type(module).__name__ else "unet"


def _kohya_prefix(module: nn.Module) -> str:
    from .targets import _is_dream

    return "lora_dream_" if _is_dream(module) else "lora_unet_"


def _split_peft_keys(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``<module><suffix>`` keys -> module -> {lora_A, lora_B, magnitude}; any other key raises naming it."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for k, v in tensors.items():
        for part, suf in _SUFFIXES.items():
            if k.endswith(suf):
                out.setdefault(k[: -len(suf)], {})[part] = v
                break
        else:
            bad.append(k)
    if bad:
        raise LoraFileError(f"{path}: unexpected keys (not lora_A / lora_B / lora_magnitude_vector): {bad[:8]}"
                            + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    return out


def _pattern_value(name: str, default, patterns: dict):
    """peft's rule: the first pattern that matches the end of the module name at a ``.`` boundary wins."""
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", name):
            return val
    return default


def _from_config(modules: dict, cfg: dict, path: Path, fmt: str, meta: dict) -> LoraWeights:
    """Per-module alphas and declared ranks from a LoraConfig dict (``r`` / ``lora_alpha`` and their patterns)."""
    r = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", r))
    alphas = {n: float(_pattern_value(n, alpha, cfg.get("alpha_pattern"))) for n in modules}
    ranks = {n: int(_pattern_value(n, r, cfg.get("rank_pattern"))) for n in modules}
    return LoraWeights(modules, alphas, bool(cfg.get("use_rslora", False)), bool(cfg.get("use_dora", False)),
                       float(cfg.get("lora_dropout", 0.0) or 0.0), meta, str(path), fmt, ranks)


def _dream_meta(meta: dict[str, str], path: Path) -> dict:
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(f"{path}: the '{META_KEY}' header entry is not valid JSON") from None


def _check_arch(meta: dict, module: nn.Module, path) -> None:
    arch = meta.get("arch")
    if arch and arch != type(module).__name__:
        raise LoraFileError(f"{path} is a LoRA for a {arch}; this model is a {type(module).__name__}")


def _read_peft(weights: Path) -> LoraWeights:
    folder = weights.parent
    try:
        cfg = json.loads((folder / PEFT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraFileError(f"cannot read {folder / PEFT_CONFIG}: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraFileError(f"{folder} holds a {cfg.get('peft_type')} adapter, not a LoRA")
    tensors, meta = _read_safetensors(weights)
    tensors = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}
    return _from_config(_split_peft_keys(tensors, weights), cfg, folder, "peft", _dream_meta(meta, weights))


def _read_diffusers(weights: Path, module: nn.Module) -> LoraWeights:
    tensors, meta = _read_safetensors(weights)
    _check_arch(_dream_meta(meta, weights), module, weights)
    prefix = _component_prefix(module)
    mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    others = sorted({k.split(".", 1)[0] for k in tensors if not k.startswith(prefix + ".")})
    if not mine:
        raise LoraFileError(f"{weights} has no '{prefix}.*' LoRA keys for this {type(module).__name__} "
                            f"(it holds: {', '.join(others)}): a file for another model?")
    if others:
        warnings.warn(f"{weights}: ignoring the LoRA keys of {', '.join(others)} (only '{prefix}.*' applies "
                      f"to a {type(module).__name__})", stacklevel=3)
    cfg: dict = {}
    raw = meta.get(DIFFUSERS_META_KEY)
    if raw:
        try:
            packed = json.loads(raw)
        except json.JSONDecodeError:
            raise LoraFileError(f"{weights}: the '{DIFFUSERS_META_KEY}' header entry is not valid JSON") from None
        cfg = {k[len(prefix) + 1:]: v for k, v in packed.items() if k.startswith(prefix + ".")}
    modules = _split_peft_keys(mine, weights)
    if not cfg:  # diffusers' convention without metadata: alpha = rank (scale 1)
        w = LoraWeights(modules, {}, source=str(weights), format="diffusers", meta=_dream_meta(meta, weights))
        w.alphas = {n: float(w.rank(n)) for n in modules}
        return w
    return _from_config(modules, cfg, weights, "diffusers", _dream_meta(meta, weights))


def _read_kohya(weights: Path, module: nn.Module) -> LoraWeights:
    tensors, meta = _read_safetensors(weights)
    _check_arch(_dream_meta(meta, weights), module, weights)
    prefix = _kohya_prefix(module)
    flat = {n.replace(".", "_"): n for n in adaptable_modules(module)}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown, ignored, dora = [], set(), []
    for k, v in tensors.items():
        stem, _, suffix = k.partition(".")
        if not stem.startswith(prefix):
            ignored.add("_".join(stem.split("_")[:2]) + "_")
            continue
        name = flat.get(stem[len(prefix):])
        if name is None:
            unknown.append(k)
            continue
        if suffix == "lora_down.weight":
            modules.setdefault(name, {})["lora_A"] = v
        elif suffix == "lora_up.weight":
            modules.setdefault(name, {})["lora_B"] = v
        elif suffix == "alpha":
            alphas[name] = float(v.float().item())
        elif suffix == "dora_scale":
            dora.append(k)
        else:
            unknown.append(k)
    if dora:
        raise LoraFileError(f"{weights}: kohya DoRA keys ({dora[:3]}...) are not supported; save DoRA as peft")
    if unknown:
        raise LoraFileError(f"{weights}: {len(unknown)} key(s) match no layer of this {type(module).__name__} "
                            f"(a file for another architecture?): {unknown[:8]}")
    if not modules:
        raise LoraFileError(f"{weights} has no '{prefix}*' LoRA keys for a {type(module).__name__} "
                            f"(prefixes found: {sorted(ignored)})")
    if ignored:
        warnings.warn(f"{weights}: ignoring LoRA keys with prefixes {sorted(ignored)} (only '{prefix}*' applies "
                      f"to a {type(module).__name__})", stacklevel=3)
    for name, parts in modules.items():
        if "lora_A" in parts and name not in alphas:      # kohya: a missing alpha means alpha = rank
            alphas[name] = float(parts["lora_A"].shape[0])
    return LoraWeights(modules, alphas, source=str(weights), format="kohya", meta=_dream_meta(meta, weights))


def read_lora_file(path: Union[str, os.PathLike], module: nn.Module) -> LoraWeights:
    """Read a LoRA in any of :data:`FORMATS` (detected) for ``module`` (diffusers and kohya keys are relative to
    the model: the prefix and, for kohya, the ``_``-joined names are resolved against ``module``'s layers)."""
    fmt, weights = detect_format(path)
    if fmt == "peft":
        return _read_peft(weights)
    if fmt == "diffusers":
        return _read_diffusers(weights, module)
    return _read_kohya(weights, module)


# -----------------------------------------------------------------------------------------------
# validation
# -----------------------------------------------------------------------------------------------
def _expected_shapes(layer: nn.Module, r: int) -> tuple[tuple, tuple, tuple]:
    if isinstance(layer, nn.Conv2d):
        a = (r, layer.in_channels // layer.groups, *layer.kernel_size)
        return a, (layer.out_channels, r, 1, 1), (layer.out_channels,)
    return (r, layer.in_features), (layer.out_features, r), (layer.out_features,)


def check_against(weights: LoraWeights, module: nn.Module) -> None:
    """Raise :class:`LoraFileError` unless every module of ``weights`` is an adaptable layer of ``module`` with
    both A and B of the right shapes (and a magnitude exactly when DoRA); names every offending key."""
    src = weights.source
    _check_arch(weights.meta, module, src)
    layers = adaptable_modules(module)
    missing_layers = [n for n in weights.modules if n not in layers]
    if missing_layers:
        raise LoraFileError(f"{src}: {len(missing_layers)} adapted module(s) do not exist in this "
                            f"{type(module).__name__} (a file for another architecture?): {missing_layers[:8]}")
    problems = []
    for name, parts in weights.modules.items():
        for part in ("lora_A", "lora_B"):
            if part not in parts:
                problems.append(f"{name}{_SUFFIXES[part]} missing")
        if "lora_A" not in parts or "lora_B" not in parts:
            continue
        if parts["lora_A"].dim() < 2 or parts["lora_B"].dim() < 2:
            problems.append(f"{name}: lora_A / lora_B must be matrices, got shapes {tuple(parts['lora_A'].shape)} "
                            f"and {tuple(parts['lora_B'].shape)}")
            continue
        r = weights.rank(name)
        a, b, m = _expected_shapes(layers[name], r)
        if tuple(parts["lora_A"].shape) != a:
            problems.append(f"{name}.lora_A: shape {tuple(parts['lora_A'].shape)}, expected {a}")
        if tuple(parts["lora_B"].shape) != b:
            problems.append(f"{name}.lora_B: shape {tuple(parts['lora_B'].shape)}, expected {b} "
                            f"(rank {parts['lora_B'].shape[1] if parts['lora_B'].dim() > 1 else '?'} vs {r})")
        if weights.use_dora != ("magnitude" in parts):
            problems.append(f"{name}.lora_magnitude_vector " + ("missing (DoRA)" if weights.use_dora else
                                                                "present but the config is not DoRA"))
        elif "magnitude" in parts and parts["magnitude"].numel() != m[0]:
            problems.append(f"{name}.lora_magnitude_vector: {parts['magnitude'].numel()} values, expected {m[0]}")
        if not all(t.is_floating_point() for t in parts.values()):
            problems.append(f"{name}: non-floating-point tensors")
        declared = weights.declared_ranks.get(name)
        if declared is not None and declared != r:
            problems.append(f"{name}: rank {r} in the tensors but the file's config says r={declared}")
    if problems:
        raise LoraFileError(f"{src} does not fit this {type(module).__name__}: " + "; ".join(problems[:10])
                            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else ""))


# -----------------------------------------------------------------------------------------------
# writers
# -----------------------------------------------------------------------------------------------
def _header(weights: LoraWeights, module: nn.Module, fmt: str) -> dict[str, str]:
    from dream.version import __version__

    kw = weights.config_kwargs()
    meta = {"arch": type(module).__name__, "format": fmt, "format_version": FORMAT_VERSION, "dream": __version__,
            "r": kw["r"], "lora_alpha": kw["lora_alpha"], "rank_pattern": kw["rank_pattern"],
            "use_dora": weights.use_dora, "use_rslora": weights.use_rslora, "targets": sorted(weights.modules)}
    return {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}


def _lora_config_dict(weights: LoraWeights, base_name: Optional[str]) -> dict:
    from peft import LoraConfig

    cfg = LoraConfig(base_model_name_or_path=base_name, **weights.config_kwargs()).to_dict()
    out = {}
    for k, v in cfg.items():
        if isinstance(v, set):
            v = sorted(v)
        elif hasattr(v, "value"):           # enums (peft_type, task_type)
            v = v.value
        out[k] = v
    return out


def _file_target(path: Path, default_name: str) -> Path:
    return path if path.suffix == ".safetensors" else path / default_name


def write_lora_file(weights: LoraWeights, module: nn.Module, path: Union[str, os.PathLike], fmt: str) -> Path:
    """Write ``weights`` in format ``fmt``; returns the folder (peft) or the file (diffusers, kohya; a path not
    ending in ``.safetensors`` is a folder that gets ``pytorch_lora_weights.safetensors`` / ``lora.safetensors``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r} ({' | '.join(FORMATS)})")
    path = Path(path)
    header = _header(weights, module, fmt)
    if fmt == "peft":
        if path.suffix == ".safetensors":
            raise ValueError(f"the peft format is a folder ({PEFT_WEIGHTS} + {PEFT_CONFIG}), got a file path {path}")
        tensors = {}
        for name, parts in weights.modules.items():
            for part, t in parts.items():
                tensors[PEFT_PREFIX + name + _SUFFIXES[part]] = t
        _write_safetensors(tensors, path / PEFT_WEIGHTS, header)
        cfg = _lora_config_dict(weights, f"dream:{type(module).__name__}")
        tmp = path / (PEFT_CONFIG + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, path / PEFT_CONFIG)
        return path
    if fmt == "diffusers":
        prefix = _component_prefix(module)
        tensors = {f"{prefix}.{name}{_SUFFIXES[part]}": t for name, parts in weights.modules.items()
                   for part, t in parts.items()}
        cfg = _lora_config_dict(weights, None)
        header[DIFFUSERS_META_KEY] = json.dumps({f"{prefix}.{k}": v for k, v in cfg.items()}, indent=2,
                                                sort_keys=True)
        out = _file_target(path, DIFFUSERS_WEIGHTS)
        _write_safetensors(tensors, out, header)
        return out
    if weights.use_dora:
        raise ValueError("DoRA adapters cannot be written in the kohya format here (no agreed layout for the "
                         "magnitude); save them as peft or diffusers")
    prefix = _kohya_prefix(module)
    tensors = {}
    for name, parts in weights.modules.items():
        stem = prefix + name.replace(".", "_")
        r = weights.rank(name)
        alpha = weights.alphas[name] * (math.sqrt(r) if weights.use_rslora else 1.0)   # same alpha / r scale
        tensors[f"{stem}.lora_down.weight"] = parts["lora_A"]
        tensors[f"{stem}.lora_up.weight"] = parts["lora_B"]
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    out = _file_target(path, KOHYA_WEIGHTS)
    _write_safetensors(tensors, out, header)
    return out
