"""Typed validation of plain dicts (from YAML) into dataclasses.

``from_dict(Cls, data, where="recipe.yaml: stages[0]")`` checks every field's type,
rejects unknown keys (suggesting the closest known one), fills defaults, and raises
``ConfigError`` naming the exact field and what to write instead.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from workflows.core.errors import ConfigError

_MISSING = dataclasses.MISSING


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    origin = get_origin(tp)
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(where, f"got {value!r}", f"use one of {_type_name(tp)}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        candidates = [a for a in args if a is not type(None)]
        for arg in candidates:
            try:
                return _convert(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(candidates) == 1 and dataclasses.is_dataclass(candidates[0]) and isinstance(value, dict):
            raise errors[0]  # the mapping was meant as that dataclass: report its own bad field
        raise ConfigError(where, f"got {value!r}", f"expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"got {type(value).__name__} {value!r}", f"expected {_type_name(tp)}")
        (arg,) = get_args(tp)[:1] or (Any,)
        items = [_convert(arg, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"got {type(value).__name__}", "expected a mapping")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(where, f"got {value!r}", "expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(where, f"got {value!r}", "expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(where, f"got {value!r}", "expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(where, f"got {type(value).__name__} {value!r}", "expected a string (quote it in YAML)")
    return value


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from ``data`` (a mapping), validating every field."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(where, f"got {type(data).__name__} {data!r}", f"expected a mapping of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(fields)}"
        raise ConfigError(f"{where}.{key}", "unknown field", hint)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f"{where}.{name}")
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"{where}.{name}", "missing required field", f"add `{name}: <{_type_name(hints[name])}>`")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict (for YAML dumps and config hashes)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_fields(obj: Any, where: str, checks: list[tuple[str, bool, str]]) -> None:
    """``validate`` helper: ``ConfigError`` for the first ``(dotted field, failed, fix)`` that failed,
    naming the field and its value."""
    for name, failed, fix in checks:
        if failed:
            value = obj
            for part in name.split("."):
                value = getattr(value, part, None)
            raise ConfigError(f"{where}.{name}", f"got {value!r}", fix)
