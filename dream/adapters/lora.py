"""LoRA on any ``nn.Module`` (DREAM, diffusers' UNet / SD3 transformer, plain modules), with peft underneath.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds ``(alpha / r) B A`` to a frozen weight; DoRA (Liu et al. 2024,
arXiv 2402.09353) also learns a per-output magnitude; rsLoRA (Kalajdzievski 2023, arXiv 2312.03732) scales by
``alpha / sqrt(r)``. The layers, their init, scaling, merging and several named adapters are peft's
(``peft.inject_adapter_in_model``; diffusers models through their own ``add_adapter``, which is the same
injection plus diffusers' bookkeeping, so ``unet.set_adapters`` / ``fuse_lora`` keep working). What is ours:

* target presets and a guard against entries that match nothing (:mod:`dream.adapters.targets`);
* files in the peft, diffusers and kohya layouts, correct when alpha != rank (:mod:`dream.adapters.formats`);
* atomic loading: the file is read and checked against the model (keys, shapes, ranks, architecture) before
  anything is injected, and any failure afterwards removes what was added and restores the previous adapter
  state, so a failed :func:`load_lora` leaves the model exactly as it was;
* stacking: each :func:`load_lora` adds a named adapter and keeps the earlier ones active with their weights;
  :func:`set_adapters` chooses adapters and weights (a weight multiplies the adapter's ``alpha / r``);
* :func:`merge_lora` / :func:`unmerge_lora` (peft's merge, ``unload=True`` also drops the wrappers for the
  fused, zero-overhead path) and :func:`lora_parameters` for optimisers.

``requires_grad``: :func:`add_lora` freezes every other parameter and makes only the new adapter trainable;
:func:`load_lora` and :func:`set_adapters` leave every existing flag as it was (loaded adapters are frozen).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn

from .formats import FORMATS, LoraWeights, check_against, read_lora_file, write_lora_file
from .runtime import is_lora_layer
from .targets import resolve_targets

__all__ = ["add_lora", "save_lora", "load_lora", "merge_lora", "unmerge_lora", "set_adapters", "lora_parameters",
           "list_adapters", "active_adapters", "adapter_state_dict", "load_adapter_state_dict", "base_fingerprint"]

_ADAPTER_DICTS = ("lora_A", "lora_B", "lora_magnitude_vector")


def require_peft():
    """Import peft or raise an ImportError that names the extra to install."""
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA adapters need peft (and, for Stable Diffusion, diffusers + transformers): "
                          "pip install 'dream[align]'") from e
    return peft


def _layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if is_lora_layer(m)]


def list_adapters(module: nn.Module) -> list[str]:
    """Names of the adapters present in ``module`` (in the order they were added)."""
    cfg = getattr(module, "peft_config", None)
    if isinstance(cfg, dict):
        return list(cfg)
    seen: dict[str, None] = {}
    for _, m in _layers(module):
        seen.update(dict.fromkeys(m.lora_A.keys()))
    return list(seen)


def _weights_now(module: nn.Module) -> dict[str, float]:
    """Active adapter -> its current weight (``scaling / (alpha / r)``, read from the first layer holding it)."""
    out: dict[str, float] = {}
    for _, m in _layers(module):
        for a in m.active_adapters:
            if a in m.lora_A and a not in out:
                base = m.lora_alpha[a] / (m.r[a] ** 0.5 if m.use_rslora.get(a, False) else m.r[a])
                out[a] = float(m.scaling[a] / base)
    return out


def active_adapters(module: nn.Module) -> dict[str, float]:
    """Active adapters and their weights."""
    return _weights_now(module)


def lora_parameters(module: nn.Module, name: Optional[str] = None) -> list[nn.Parameter]:
    """The adapter tensors (A, B and DoRA magnitudes) of adapter ``name`` (all adapters when None)."""
    out = []
    for _, m in _layers(module):
        for attr in _ADAPTER_DICTS:
            for key, sub in getattr(m, attr, {}).items():
                if name is None or key == name:
                    out.extend(sub.parameters())
    return out


def _check_unmerged(module: nn.Module, what: str) -> None:
    merged = [n for n, m in _layers(module) if m.merged_adapters]
    if merged:
        raise RuntimeError(f"{what}: {len(merged)} layer(s) hold merged adapters (e.g. {merged[0]}); call "
                           f"unmerge_lora(model) first (a merged layer ignores its unmerged adapters)")


def _bump_versions(layer: nn.Module) -> None:
    """peft merges through ``.data``, which leaves version counters alone; bump them so weight caches keyed on
    ``(id(p), p._version)`` (the diffusion sampler's) see the change."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    with torch.no_grad():
        for p in layer.get_base_layer().parameters(recurse=False):
            if inc is not None:
                inc(p)
            else:
                p.mul_(1)


def _activate(module: nn.Module, weights: dict[str, float]) -> None:
    """Make exactly ``weights``' adapters active with those weights, on every layer (requires_grad untouched)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for _, m in _layers(module):
        m.set_adapter(list(weights))
        for a, w in weights.items():
            m.set_scale(a, float(w))
    for p, f in flags:
        p.requires_grad_(f)


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        yield


def _inject(module: nn.Module, config, name: str) -> None:
    from peft import inject_adapter_in_model

    with _quiet_peft():
        if hasattr(module, "add_adapter") and hasattr(module, "load_lora_adapter"):   # a diffusers model
            module.add_adapter(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, module, adapter_name=name)
    for _, m in _layers(module):        # new wrappers / dropouts start in train mode: follow the wrapped layer
        m.train(m.get_base_layer().training)


def _layer_adapters(m: nn.Module) -> set:
    return {k for attr in _ADAPTER_DICTS + ("r",) for k in getattr(m, attr, {})}


def _remove(module: nn.Module, name: str, keep_wrappers: Optional[set] = None) -> None:
    """Delete adapter ``name`` from every layer; unwrap layers left without adapters (all of them, or those not
    in ``keep_wrappers`` (ids)); drop its config entry."""
    for lname, m in _layers(module):
        if name in _layer_adapters(m):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m.delete_adapter(name)
        empty = not _layer_adapters(m)
        if (keep_wrappers is None and empty) or (keep_wrappers is not None and id(m) not in keep_wrappers):
            parent, _, child = lname.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
    cfg = getattr(module, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(name, None)


class _Snapshot:
    """Everything adding an adapter may change, to put back after a failure."""

    def __init__(self, module: nn.Module):
        self.wrappers = {id(m) for _, m in _layers(module)}
        self.layer_state = {id(m): (list(m.active_adapters), dict(m.scaling)) for _, m in _layers(module)}
        self.flags = [(p, p.requires_grad) for p in module.parameters()]
        self.has_cfg = "peft_config" in module.__dict__
        self.cfg_keys = list(module.peft_config) if self.has_cfg else []
        self.hf_flag = module.__dict__.get("_hf_peft_config_loaded", None)
        self.training = [(m, m.training) for m in module.modules()]

    def restore(self, module: nn.Module, name: str) -> None:
        _remove(module, name, keep_wrappers=self.wrappers)
        for _, m in _layers(module):
            active, scaling = self.layer_state.get(id(m), ([], {}))
            m.set_adapter(active)
            m.scaling.clear()
            m.scaling.update(scaling)
        for p, f in self.flags:
            p.requires_grad_(f)
        if not self.has_cfg:
            module.__dict__.pop("peft_config", None)
        else:
            for k in [k for k in module.peft_config if k not in self.cfg_keys]:
                module.peft_config.pop(k)
        if self.hf_flag is None:
            module.__dict__.pop("_hf_peft_config_loaded", None)
        else:
            module.__dict__["_hf_peft_config_loaded"] = self.hf_flag
        for m, t in self.training:
            m.training = t


@contextlib.contextmanager
def _atomic(module: nn.Module, name: str) -> Iterator[None]:
    snap = _Snapshot(module)
    try:
        yield
    except BaseException:
        snap.restore(module, name)
        raise


def _check_name(module: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"adapter name must be an identifier without dots (it becomes part of parameter names), "
                         f"got {name!r}")
    if name in list_adapters(module):
        raise ValueError(f"an adapter named {name!r} already exists in this {type(module).__name__} "
                         f"(adapters: {list_adapters(module)}); pass another name")


# -----------------------------------------------------------------------------------------------
# public API
# -----------------------------------------------------------------------------------------------
def add_lora(module: nn.Module, rank: int, alpha: Optional[float] = None,
             targets: Union[None, str, Sequence[str]] = None, name: str = "default", dropout: float = 0.0,
             use_dora: bool = False, use_rslora: bool = False) -> nn.Module:
    """Add a trainable LoRA adapter ``name`` to ``module`` and freeze everything else.

    Args:
        rank: r; alpha: scale numerator (default ``rank``: scale 1).
        targets: None (DREAM: ``decoder_attn``; diffusers UNet / SD3: ``attn``), a preset, ``"a+b"``, or a list of
            presets, module names / suffixes and regexes (see :mod:`dream.adapters.targets`); an entry that
            matches no Linear/Conv2d layer raises.
        dropout: dropout on the adapter's input (peft's ``lora_dropout``). use_dora / use_rslora: peft's variants.
    Returns:
        ``module`` (changed in place). At init B = 0, so the adapted model computes exactly the base model.
    """
    peft = require_peft()
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    _check_name(module, name)
    _check_unmerged(module, "add_lora")
    names = resolve_targets(module, targets)
    before = _weights_now(module)
    with _atomic(module, name):
        config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=float(dropout),
                                 use_dora=bool(use_dora), use_rslora=bool(use_rslora), init_lora_weights=True)
        _inject(module, config, name)
        _activate(module, {**before, name: 1.0})
        module.requires_grad_(False)
        for p in lora_parameters(module, name):
            p.requires_grad_(True)
    return module


def _extract(module: nn.Module, name: str) -> LoraWeights:
    modules, alphas = {}, {}
    rslora, dora, dropout = set(), set(), 0.0
    for lname, m in _layers(module):
        if name not in m.lora_A:
            continue
        parts = {"lora_A": m.lora_A[name].weight.detach(), "lora_B": m.lora_B[name].weight.detach()}
        mag = getattr(m, "lora_magnitude_vector", {})
        if name in mag:
            parts["magnitude"] = mag[name].weight.detach()
        modules[lname] = parts
        alphas[lname] = float(m.lora_alpha[name])
        rslora.add(bool(m.use_rslora.get(name, False)))
        dora.add("magnitude" in parts)
        drop = m.lora_dropout[name]
        dropout = float(drop.p) if isinstance(drop, nn.Dropout) else 0.0
    if not modules:
        raise KeyError(f"no adapter named {name!r} in this {type(module).__name__} (adapters: "
                       f"{list_adapters(module) or 'none'})")
    if len(rslora) > 1 or len(dora) > 1:
        raise ValueError(f"adapter {name!r} mixes rsLoRA/DoRA settings across layers; cannot be saved as one config")
    return LoraWeights(modules, alphas, rslora.pop(), dora.pop(), dropout)


def save_lora(module: nn.Module, path: Union[str, os.PathLike], format: str = "peft",
              name: str = "default") -> Path:
    """Save adapter ``name`` as ``peft`` (a folder), ``diffusers`` or ``kohya`` (a ``.safetensors`` file, or a
    folder that gets the format's default file name). Returns the folder (peft) or the file written."""
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r} ({' | '.join(FORMATS)})")
    require_peft()
    return write_lora_file(_extract(module, name), module, path, format)


def _default_name(module: nn.Module, path: Union[str, os.PathLike]) -> str:
    p = Path(path)
    stem = p.name if p.is_dir() else p.stem
    base = re.sub(r"[^A-Za-z0-9_]", "_", stem) or "lora"
    if base[0].isdigit():
        base = "lora_" + base
    have = set(list_adapters(module))
    if base not in have:
        return base
    k = 1
    while f"{base}_{k}" in have:
        k += 1
    return f"{base}_{k}"


def load_lora(module: nn.Module, path: Union[str, os.PathLike], name: Optional[str] = None,
              weight: float = 1.0) -> str:
    """Load a LoRA file or folder (peft, diffusers or kohya: detected) into ``module`` as adapter ``name``
    (default: from the file name) with ``weight``; earlier adapters stay active with their weights.

    All-or-nothing: an unreadable or truncated file, a file for another architecture, unknown or missing keys,
    a rank or shape mismatch raise :class:`~dream.adapters.formats.LoraFileError` naming the keys, before the
    model is touched; any later failure restores the model exactly. Returns the adapter name."""
    peft = require_peft()
    weights = read_lora_file(path, module)
    check_against(weights, module)
    name = _default_name(module, path) if name is None else name
    _check_name(module, name)
    _check_unmerged(module, "load_lora")
    before = _weights_now(module)
    with _atomic(module, name), torch.random.fork_rng(devices=[]):   # peft's init draws: keep the global RNG
        config = peft.LoraConfig(init_lora_weights=True, **weights.config_kwargs())
        _inject(module, config, name)
        got = {n for n, m in _layers(module) if name in m.lora_A}
        if got != set(weights.modules):
            raise RuntimeError(f"peft adapted {sorted(got ^ set(weights.modules))[:5]} differently from the file "
                               f"{weights.source}")
        with torch.no_grad():
            for lname, parts in weights.modules.items():
                m = module.get_submodule(lname)
                m.lora_A[name].weight.copy_(parts["lora_A"])
                m.lora_B[name].weight.copy_(parts["lora_B"])
                if "magnitude" in parts:
                    mag = m.lora_magnitude_vector[name].weight
                    mag.copy_(parts["magnitude"].reshape(mag.shape))
        _activate(module, {**before, name: float(weight)})
        for p in lora_parameters(module, name):
            p.requires_grad_(False)
    return name


def set_adapters(module: nn.Module, names: Union[str, Sequence[str]],
                 weights: Union[None, float, Sequence[float]] = None) -> None:
    """Use exactly the adapters ``names`` with ``weights`` (one float for all, a list, or None = 1.0 each)."""
    names = [names] if isinstance(names, str) else list(names)
    have = list_adapters(module)
    unknown = [n for n in names if n not in have]
    if unknown:
        raise KeyError(f"unknown adapter(s) {unknown} (adapters: {have or 'none'})")
    if weights is None or isinstance(weights, (int, float)):
        ws = [1.0 if weights is None else float(weights)] * len(names)
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(ws)} weights")
    _check_unmerged(module, "set_adapters")
    _activate(module, dict(zip(names, ws)))


def merge_lora(module: nn.Module, unload: bool = False) -> nn.Module:
    """Merge the active adapters (with their weights) into the base weights (peft's ``merge``): W += dW.

    ``unload=False`` keeps the wrappers (:func:`unmerge_lora` can undo it); ``unload=True`` replaces every LoRA
    layer by its merged base layer and drops all adapters: plain modules, no per-call wrapper overhead."""
    for _, m in _layers(module):
        todo = [a for a in m.active_adapters if a in m.lora_A and a not in m.merged_adapters]
        if todo and not m.disable_adapters:
            m.merge(adapter_names=todo)
            _bump_versions(m)
    if unload:
        for lname, m in _layers(module):
            parent, _, child = lname.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, m.get_base_layer())
        module.__dict__.pop("peft_config", None)
        if "_hf_peft_config_loaded" in module.__dict__:
            module.__dict__["_hf_peft_config_loaded"] = False
    return module


def unmerge_lora(module: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (without ``unload``): subtract the merged adapters again."""
    for _, m in _layers(module):
        if m.merged_adapters:
            m.unmerge()
            _bump_versions(m)
    return module


# -----------------------------------------------------------------------------------------------
# training support
# -----------------------------------------------------------------------------------------------
def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor by its full parameter name (adapter names included): a LoRA run's model state."""
    keep = {id(p) for p in lora_parameters(module)}
    return {n: p.detach() for n, p in module.named_parameters() if id(p) in keep}


def load_adapter_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`adapter_state_dict`) into the adapters; keys and shapes must match exactly."""
    own = adapter_state_dict(module)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise KeyError(f"adapter state does not match the model: missing {missing[:5]}, unexpected "
                       f"{unexpected[:5]}, shape mismatch {bad[:5]}")
    params = dict(module.named_parameters())
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def base_fingerprint(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every non-adapter parameter and buffer: what a LoRA
    checkpoint (which holds only the adapter) must be resumed on."""
    import hashlib

    adapter = {id(p) for p in lora_parameters(module)}
    h = hashlib.sha256()
    for n, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) in adapter:
            continue
        n = n.replace(".base_layer.", ".")
        h.update(f"{n}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
