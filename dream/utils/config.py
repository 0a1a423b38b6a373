"""``ConfigBase``: the one serialisation and validation layer of every frozen config dataclass in ``dream``.

A config is a ``@dataclass(frozen=True)`` that also derives from :class:`ConfigBase`::

    @dataclass(frozen=True)
    class SamplerConfig(ConfigBase):
        num_iter: int = 64
        cfg: float = 3.0

It then gets ``to_dict`` (JSON-friendly: tuples become lists), ``from_dict`` (unknown keys raise and are named),
``replace``, ``save`` (atomic JSON) and ``load`` (JSON or YAML; a broken file is named with its line), and every
field is type-checked on construction against its annotation: ``encoder_depth="four"`` raises
``DreamConfig.encoder_depth: expected int, got str 'four'`` instead of failing later inside a layer. Lists are
accepted (and stored as tuples) for tuple fields, ints for float fields (stored as float). A subclass with its
own ``__post_init__`` calls ``super().__post_init__()`` first.
"""
from __future__ import annotations

import collections.abc as cabc
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Union

__all__ = ["ConfigBase", "ConfigError", "read_config_file", "check_seed"]


class ConfigError(ValueError):
    """A config value, key or file is invalid; the message names the config, the field and the file."""


def read_config_file(path: Union[str, os.PathLike], what: str = "config") -> dict:
    """Parse a JSON or YAML (``.yaml``/``.yml``) file into a dict; any error names the file (and the line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} file {path}: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{what} file {path} is not valid YAML: {e}") from None
        data = {} if data is None else data
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{what} file {path} is not valid JSON (line {e.lineno}, column {e.colno}: "
                              f"{e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file {path} must hold a mapping of fields, got {type(data).__name__}")
    return data


def check_seed(seed: Any, name: str = "seed", bits: int = 64) -> int:
    """``seed`` if it is an int in ``[0, 2**bits)`` (``torch.Generator.manual_seed`` takes 64 bits), else a
    ValueError naming ``name``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << bits:
        raise ValueError(f"{name} must be an integer in [0, 2**{bits}), got {seed!r}")
    return seed


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _deep_tuple(v: Any) -> Any:
    return tuple(_deep_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


_MISMATCH = object()


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (light, structural): the value to store, or _MISMATCH."""
    if hint is Any or hint is object:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None:
            return None if type(None) in args else _MISMATCH
        for arm in args:                      # bool before str etc.: first arm that accepts the value wins
            if arm is type(None):
                continue
            out = _coerce(value, arm)
            if out is not _MISMATCH:
                return out
        return _MISMATCH
    if origin is typing.Literal:
        return value if value in typing.get_args(hint) else _MISMATCH
    if hint is bool:
        return value if isinstance(value, bool) else _MISMATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _MISMATCH
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return _MISMATCH
        return float(value)
    if hint is str:
        return value if isinstance(value, str) else _MISMATCH
    if hint is tuple or origin is tuple:
        return _deep_tuple(value) if isinstance(value, (list, tuple)) else _MISMATCH
    if hint is dict or origin in (dict, cabc.Mapping):
        return value if isinstance(value, cabc.Mapping) else _MISMATCH
    if hint is list or origin is list:
        return list(value) if isinstance(value, (list, tuple)) else _MISMATCH
    return value                               # other annotations (classes, callables): not checked


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


class ConfigBase:
    """Mixin for frozen config dataclasses (see the module docstring)."""

    # keys written next to the fields by ``save`` (or by other tools) that ``from_dict`` accepts and ignores
    _ignored_keys: ClassVar[frozenset] = frozenset()

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            hint = hints.get(f.name, Any)
            v = getattr(self, f.name)
            out = _coerce(v, hint)
            if out is _MISMATCH:
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected {_type_name(hint)}, "
                                  f"got {type(v).__name__} {v!r}")
            if isinstance(out, float) and not math.isfinite(out) and f.metadata.get("finite", True):
                raise ConfigError(f"{type(self).__name__}.{f.name}: must be finite, got {out!r}")
            if out is not v:
                object.__setattr__(self, f.name, out)

    # ---- dicts ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every field, JSON-friendly (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: Optional[str] = None):
        """Inverse of :meth:`to_dict`. Unknown keys raise a :class:`ConfigError` naming them (and ``source``)."""
        where = f" in {source}" if source else ""
        if not isinstance(d, cabc.Mapping):
            raise ConfigError(f"{cls.__name__}{where}: expected a mapping of fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k not in cls._ignored_keys}
        unknown = sorted(set(d) - names, key=str)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys{where}: {unknown} (known: {sorted(names)})")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            if source is None:
                raise
            raise ConfigError(f"{source}: {e}") from None

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated like a new config; unknown names raise)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ConfigError(f"unknown {type(self).__name__} keys: {unknown}")
        return dataclasses.replace(self, **changes)

    # ---- files ---------------------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike], extra: Optional[Mapping[str, Any]] = None) -> Path:
        """Write ``{**extra, **to_dict()}`` as JSON, atomically (a temp file renamed into place)."""
        path = Path(path)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps({**(extra or {}), **self.to_dict()}, indent=2))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]):
        """Read a JSON or YAML file written by :meth:`save` (or by hand)."""
        return cls.from_dict(read_config_file(path, cls.__name__), source=str(path))


_HINTS: dict = {}


def _hints(cls) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]
