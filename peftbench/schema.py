"""Typed validation of plain YAML data into dataclasses (with pydantic), with key paths in every error.

Unknown keys and wrong types are errors that name the key path (``methods[1].params.r``) and, where the data
came from a file (a :class:`Located` mapping), the file and line: ``c.yaml:12: train.lr: expected a number,
got 'fast'``. The dataclasses stay plain dataclasses; pydantic checks them and returns their instances.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from typing import Any, Union

import pydantic
import typing_extensions
from pydantic_core import SchemaValidator, core_schema

from .errors import ConfigError


class Located(dict):
    """A dict that remembers the source line of each key (filled by :func:`peftbench.config.load_yaml`).
    A key set by ``--set`` has the assignment (``"--set train.lr"``) instead of a line."""

    lines: dict[Any, int | str]
    source: str | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lines = {}
        self.source = None


def where(data: Any, key: Any = None) -> str:
    """``file:line: `` of ``key`` inside a :class:`Located` mapping, ``file: `` when the line is unknown, or
    ``""`` when the mapping did not come from a file."""
    if not isinstance(data, Located):
        return ""
    line = data.lines.get(key) if key is not None else None
    if isinstance(line, str):
        return f"{line}: "
    if not data.source:
        return ""
    return f"{data.source}:{line}: " if line else f"{data.source}: "


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=3)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data from (nested) dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type, data: Any, path: str = "", ctx: str = "") -> Any:
    """Build dataclass ``cls`` from mapping ``data``. Every error names ``path`` (the key path of ``data``)
    and the file and line of the key (from :class:`Located` data), else ``ctx`` (e.g. ``"c.yaml: "``)."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    try:
        return _validator(cls).validate_python(data)
    except pydantic.ValidationError as exc:
        raise ConfigError(explain(exc, cls, data, path, ctx)) from None
    except TypeError as exc:  # a __post_init__ that fails on a type pydantic let through
        raise ConfigError(f"{where(data) or ctx}{path or '<root>'}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# pydantic glue: strict leaves with the YAML leniencies configs rely on
# ---------------------------------------------------------------------------------------------------------


def _yaml_float(value: Any) -> Any:
    if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _whole_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number_as_str(value: Any) -> Any:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


#: pydantic's lax mode reads ``true`` as 1 and ``"yes"`` as true; these leaves are strict instead, after
#: accepting what configs write: ``1e-3`` for a float, ``2.0`` for an int, ``name: 2024`` for a string
_LENIENT = {"float": _yaml_float, "int": _whole_int, "str": _number_as_str, "bool": None}


def _tighten(node: Any) -> Any:
    """A copy of pydantic core schema ``node``: strict leaves (see :data:`_LENIENT`), no NaN or inf, and
    unknown keys refused in every dataclass and typed dict."""
    if isinstance(node, list):
        return [_tighten(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in ("default", "metadata", "cls", "expected") else _tighten(v) for k, v in node.items()}
    kind = node.get("type")
    if kind in ("dataclass-args", "typed-dict"):
        node["extra_behavior"] = "forbid"
    if kind in _LENIENT:
        node["strict"] = True
        if kind == "float":
            node["allow_inf_nan"] = False
        if _LENIENT[kind] is not None:
            node = core_schema.no_info_before_validator_function(_LENIENT[kind], node)
    return node


@functools.cache
def _validator(tp: Any):
    return SchemaValidator(_tighten(pydantic.TypeAdapter(tp).core_schema))


# ---------------------------------------------------------------------------------------------------------
# pydantic errors as file:line: key.path: message
# ---------------------------------------------------------------------------------------------------------

_EXPECTED = {
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "string_type": "a string", "list_type": "a list",
    "dict_type": "a mapping", "dataclass_type": "a mapping", "dataclass_exact_type": "a mapping",
}


def explain(exc: pydantic.ValidationError, tp: Any, data: Any, path: str = "", ctx: str = "") -> str:
    """One ``file:line: key.path: message`` line per error of ``exc`` (raised validating ``data`` as
    ``tp``); type errors at one key (the members of a union) are merged into one line."""
    merged: dict[tuple[str, str], list[str]] = {}
    for error in exc.errors():
        here, steps, node = _walk(data, error["loc"], ctx)
        kind = error["type"]
        if kind in ("missing", "missing_argument"):
            steps = [*steps, error["loc"][len(steps)]]
        message = _message(error, tp, steps)
        if kind in ("value_error", "assertion_error"):  # a __post_init__ check: point at the key it names
            named = re.match(r"(\w+)[ :]", message)
            if named and isinstance(node, dict) and named[1] in node:
                here = _line(node, named[1]) or here
                if not steps and message.startswith(f"{named[1]}:"):  # "seeds: repeated seed(s) [3]"
                    merged.setdefault((here, ""), []).append(message)
                    continue
        key = (here, key_path(path, steps) or "<root>")
        merged.setdefault(key, []).append(message)
    lines = [f"{here}{f'{key}: ' if key else ''}{_merge(messages)}" for (here, key), messages in merged.items()]
    return "\n".join(sorted(lines, key=lambda line: int(m[1]) if (m := re.match(r"[^:]*:(\d+): ", line)) else 1e9))


def locate(data: Any, steps: tuple | list, ctx: str = "") -> str:
    """``file:line: `` of the innermost key of ``steps`` inside ``data`` whose line is known, else ``ctx``."""
    return _walk(data, steps, ctx)[0]


def key_path(path: str, steps: tuple | list) -> str:
    """``key_path("methods", [1, "params", "r"])`` → ``methods[1].params.r``."""
    for step in steps:
        path = f"{path}[{step}]" if isinstance(step, int) else f"{path}.{step}" if path else str(step)
    return path


def _walk(data: Any, loc: tuple, ctx: str) -> tuple[str, list, Any]:
    """Follow ``loc`` into ``data`` as far as it goes: the innermost known ``file:line: ``, the steps taken
    (a union's member names, which are not in the data, end the walk) and the value reached."""
    here, steps, node = where(data) or ctx, [], data
    for step in loc:
        if isinstance(node, dict) and step in node:
            here = _line(node, step) or here
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node):
            node = node[step]
        else:
            break
        steps.append(step)
    return here, steps, node


def _line(node: Any, key: Any) -> str | None:
    return where(node, key) if isinstance(node, Located) and key in node.lines else None


def _message(error: dict, tp: Any, steps: list) -> str:
    kind, value = error["type"], error.get("input")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown key{suggest(steps[-1], _keys(_type_at(tp, steps[:-1])))}"
    if kind in ("missing", "missing_argument"):
        return "missing required key"
    if kind in ("value_error", "assertion_error"):
        return str(error["ctx"]["error"])
    if kind in _BOUNDS:  # a bound of the field's type (peftbench.fields): both ends, as declared
        return f"must be {_bounds_text(_type_at(tp, steps, extras=True), error.get('ctx', {}))}, got {value!r}"
    if kind == "too_short":
        return f"must not be empty, got {value!r}"
    if kind == "literal_error":
        choices = typing.get_args(_type_at(tp, steps)) or ()
        allowed = " | ".join(repr(c) for c in choices) or error["ctx"]["expected"]
        return f"expected one of {allowed}, got {value!r}{suggest(value, choices)}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {value!r}"
    return f"{error['msg']}, got {value!r}"


_BOUNDS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}


def _bounds_text(tp: Any, failed: dict) -> str:
    """``in [0, 1)``, ``>= 1`` or ``> 0 (or null)``: the bounds declared on ``tp`` (``Annotated`` with
    ``annotated_types`` or ``pydantic.Field`` constraints), else the one that failed (pydantic's ``ctx``)."""
    bounds, nullable = {}, False
    for member in typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,):
        nullable |= member is type(None)
        for meta in getattr(member, "__metadata__", ()):
            for constraint in [meta, *getattr(meta, "metadata", ())]:  # a FieldInfo holds its constraints
                bounds.update({k: getattr(constraint, k) for k in _BOUNDS.values()
                               if getattr(constraint, k, None) is not None})
    bounds = bounds or {k: v for k, v in failed.items() if k in _BOUNDS.values()}
    low = f"[{bounds['ge']}" if "ge" in bounds else f"({bounds['gt']}" if "gt" in bounds else None
    high = f"{bounds['le']}]" if "le" in bounds else f"{bounds['lt']})" if "lt" in bounds else None
    if low and high:
        text = f"in {low}, {high}"
    else:
        text = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}[next(iter(bounds))] + f" {next(iter(bounds.values()))}"
    return f"{text} (or null)" if nullable else text


def _merge(messages: list[str]) -> str:
    """``expected a list, got 5`` and ``expected a string, got 5`` → ``expected a list or a string, got 5``."""
    parts = [re.fullmatch(r"expected (.*), got (.*)", m, re.S) for m in messages]
    if len(messages) > 1 and all(parts) and len({p[2] for p in parts}) == 1:
        return f"expected {' or '.join(dict.fromkeys(p[1] for p in parts))}, got {parts[0][2]}"
    return "; ".join(dict.fromkeys(messages))


def _type_at(tp: Any, steps: list, extras: bool = False) -> Any:
    """The annotation of the value at ``steps`` inside a value annotated ``tp`` (``None``: unknown), its
    ``Annotated`` constraints kept with ``extras``."""
    for step in steps:
        if tp is None:
            return None
        tp = _child(_plain(tp), step)
    return tp if extras else _plain(tp)


def _plain(tp: Any) -> Any:
    """``tp`` without ``Annotated`` constraints."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _child(tp: Any, step: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return next((c for c in (_child(_plain(a), step) for a in args) if c is not None), None)
    if dataclasses.is_dataclass(tp) or typing_extensions.is_typeddict(tp):
        return typing.get_type_hints(tp, include_extras=True).get(step)
    if origin in (list, tuple) and isinstance(step, int):
        return args[0] if args else Any
    if origin is dict:
        return args[1] if args else Any
    return None


def _keys(tp: Any) -> list[str]:
    if dataclasses.is_dataclass(tp):
        return [f.name for f in dataclasses.fields(tp) if f.init]
    if typing_extensions.is_typeddict(tp):
        return list(typing.get_type_hints(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [k for a in typing.get_args(tp) for k in _keys(a)]
    return []


__all__ = ["Located", "where", "suggest", "to_dict", "from_dict", "explain", "locate", "key_path"]
