"""Typed validation of plain YAML data into dataclasses, with key paths in every error.

A tiny, dependency-free subset of what pydantic does, tuned for config files: unknown keys and wrong types
are errors that name the key path (``methods[1].params.r``) and, where known, the file and line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union

from .errors import ConfigError


class Located(dict):
    """A dict that remembers the source line of each key (filled by :func:`peftbench.config.load_yaml`)."""

    lines: dict[str, int]
    source: str | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines = {}
        self.source = None


def where(data: Any, key: str | None = None) -> str:
    """``file:line`` of ``key`` inside a :class:`Located` mapping, or ``""`` when unknown."""
    if isinstance(data, Located) and data.source:
        line = data.lines.get(key) if key is not None else None
        return f"{data.source}:{line}: " if line else f"{data.source}: "
    return ""


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, path: str, ctx: str = "") -> Any:
    """Return ``value`` checked (and minimally converted, int -> float) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, path, ctx)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{ctx}{path}: expected {' or '.join(_type_name(o) for o in options)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(
                f"{ctx}{path}: expected one of {_type_name(tp)}, got {value!r}{suggest(value, typing.get_args(tp))}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{ctx}{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, f"{path}[{i}]", ctx) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{ctx}{path}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (Any, Any)
        return {str(k): coerce(v, val_tp, f"{path}.{k}", where(value, k) or ctx) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path, ctx)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "5e-4" (no dot) as a string: accept numeric strings for floats.
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ConfigError(f"{ctx}{path}: expected a number, got {value!r}") from None
                return coerce(value, tp, path, ctx)
            raise ConfigError(f"{ctx}{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{ctx}{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{ctx}{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{ctx}{path}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{ctx}{path}: expected a string, got {value!r}")
        return str(value)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{ctx}{path}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: Any, path: str = "", ctx: str = "") -> Any:
    """Build dataclass ``cls`` from mapping ``data``; every error names ``path`` (and file:line if known)."""
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where(data) or ctx}{path or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{where(data, key) or ctx}{key_path}: unknown key{suggest(key, fields)}")
        kwargs[key] = coerce(value, hints[key], key_path, where(data, key) or ctx)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where(data) or ctx}{path or '<root>'}: missing required key(s) {', '.join(missing)}")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation: point at the key it names, if any
        named = next((k for k in data if str(exc).startswith(f"{k} ")), None)
        location = where(data, named) if named is not None else ""
        raise ConfigError(f"{location or ctx or where(data)}{path or '<root>'}: {exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data from (nested) dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
