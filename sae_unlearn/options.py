"""Check option values against a config dataclass's field types, before anything slow runs; parse
`--set KEY=VALUE` pairs (`parse_options`, for the CLI and the scripts alike).

Options reach configs from `--set KEY=VALUE` (strings, or JSON-parsed scalars/lists) and from TOML
experiment files (typed values). `coerce_options` turns each into the field's declared type or raises
a one-line UserError naming the option and the type it needs ("lr must be a number").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from typing import Any

from sae_unlearn.errors import UserError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class _BadValue(Exception):
    def __init__(self, needs: str) -> None:
        super().__init__(needs)
        self.needs = needs


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def field_names(cls: type) -> set[str]:
    return set(_field_types(cls))


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_describe(a) for a in inner)
        return f"{text} or none" if len(inner) < len(args) else text
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict:
        return "a table of options"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for inner in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, inner)
            except _BadValue:
                continue
        raise _BadValue(_describe(tp))
    if origin is typing.Literal:
        if value in args:
            return value
        raise _BadValue(_describe(tp))
    if origin is list:
        if isinstance(value, str):
            text = value.strip()
            try:
                value = json.loads(text) if text.startswith("[") else [p for p in text.split(",") if p.strip()]
            except json.JSONDecodeError as e:
                raise _BadValue(_describe(tp)) from e
        if not isinstance(value, list | tuple):
            value = [value]
        try:
            return [_coerce(v, args[0]) if args else v for v in value]
        except _BadValue as e:
            raise _BadValue(_describe(tp)) from e
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise _BadValue(_describe(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise _BadValue(_describe(tp))
    if tp is int:
        if isinstance(value, bool):
            raise _BadValue(_describe(tp))
        if isinstance(value, int):
            return value
        number = _number(value)
        if number is not None and number.is_integer():
            return int(number)
        raise _BadValue(_describe(tp))
    if tp is float:
        number = _number(value)
        if number is None:
            raise _BadValue(_describe(tp))
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # `--set name=123` arrives JSON-parsed as a number
        raise _BadValue(_describe(tp))
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def coerce_options(cls: type, options: dict[str, Any], *, owner: str, prefix: str = "") -> dict[str, Any]:
    """`options` with every value converted to its field's type in dataclass `cls`.

    Unknown keys and values of the wrong type raise UserError; `owner` names what the options
    belong to ("method crisp") and `prefix` is how the user spelled the key's prefix ("crisp.").
    """
    types_by_name = _field_types(cls)
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in types_by_name:
            raise UserError(f"{owner} has no option {prefix}{key}", f"its options: {', '.join(sorted(types_by_name))}")
        try:
            out[key] = _coerce(value, types_by_name[key])
        except _BadValue as e:
            raise UserError(f"{prefix}{key} must be {e.needs}", f"got {value!r}") from None
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """--set key=value pairs (values parsed as JSON when they can be: 3, 0.5, true, [3,4])."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise UserError(f"--set {pair!r} is not KEY=VALUE", "e.g. --set steps=100 --set lora_r=8")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out
