"""Settings as data: the one place where a setting's type and range are declared and checked.

Every component owns a dataclass of its own settings (the memory layer's, a learning component's,
the NaN guard's); :mod:`neatlm.config` composes them into the TOML tree. Each field is declared
with :func:`setting` (default, one-line help, rules ``choices``/``min``/``max``), and
:func:`check_settings` checks a whole dataclass. Every failure is a :class:`ConfigError` whose
message is one line naming the key, the value and what is allowed, so the same object fails the
same way whether it came from a TOML file, ``--set`` or Python.

This module imports nothing of the package: components import it, never the other way round.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Any

from .errors import NeatError


class ConfigError(NeatError, ValueError):
    """A user-facing configuration problem; the message is a single line."""


def setting(default: Any, help: str = "", **rules: Any) -> Any:
    """A dataclass field with a default, a one-line help and validation rules
    (``choices``, ``min``, ``max`` inclusive, ``above``, ``below`` exclusive; for tuples the rules apply to each element)."""
    if isinstance(default, (list, dict, set)):  # pragma: no cover - a programming error
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"help": help, **rules})


_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def field_type(obj: Any, name: str) -> Any:
    """The resolved annotation of ``obj.name`` (annotations are strings under postponed evaluation)."""
    return typing.get_type_hints(type(obj))[name]


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args == (str, Ellipsis):
            return "a list of strings"
        return f"a list of {len(args)} numbers"
    return _NAMES[tp]


def coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the field type: ints are accepted for floats, lists for tuples
    (a single string for a tuple of strings). Raises :class:`ConfigError` otherwise."""
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args == (str, Ellipsis):
            value = [value]
        if isinstance(value, (list, tuple)):
            types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
            if len(types) == len(value):
                try:
                    return tuple(coerce(key, v, t) for v, t in zip(value, types))
                except ConfigError:
                    pass
        raise ConfigError(f"{key} = {value!r}: expected {type_name(tp)}")
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} = {value!r}: expected {type_name(tp)}")


def check_rules(key: str, value: Any, rules: dict[str, Any]) -> None:
    """Range and choice rules of one value (each element of a tuple)."""
    if isinstance(value, tuple):
        for v in value:
            check_rules(key, v, rules)
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} = {value!r}: must be a finite number")
    if "choices" in rules and value not in rules["choices"]:
        raise ConfigError(f"{key} = {value!r}: allowed values are {', '.join(map(repr, rules['choices']))}")
    if "min" in rules and value < rules["min"]:
        raise ConfigError(f"{key} = {value!r}: must be >= {rules['min']}")
    if "max" in rules and value > rules["max"]:
        raise ConfigError(f"{key} = {value!r}: must be <= {rules['max']}")
    if "above" in rules and value <= rules["above"]:
        raise ConfigError(f"{key} = {value!r}: must be > {rules['above']}")
    if "below" in rules and value >= rules["below"]:
        raise ConfigError(f"{key} = {value!r}: must be < {rules['below']}")


def check_settings(section: str, obj: Any) -> None:
    """Check (and normalise: ints to floats, lists to tuples) every field of a settings dataclass;
    keys in messages read ``section.field``."""
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        key = f"{section}.{f.name}"
        value = coerce(key, getattr(obj, f.name), field_type(obj, f.name))
        check_rules(key, value, f.metadata)
        object.__setattr__(obj, f.name, value)


def setting_names(obj_or_cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj_or_cls) if f.init]
