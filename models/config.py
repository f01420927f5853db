"""Config dataclasses that map 1:1 onto YAML mappings and reject what they do not know.

``from_dict(cls, mapping)`` builds a (frozen) dataclass from a mapping such as a parsed YAML
section: an unknown key, a value of the wrong type or a value out of range raises
:class:`ConfigError` naming the key by its full dotted path (``model.n_heads``). Nothing is
ignored silently. Range checks live in each dataclass's ``__post_init__`` via :func:`check`.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Optim:
...     lr: float = 1e-3
...     betas: tuple[float, ...] = (0.9, 0.99)
...     def __post_init__(self):
...         check(self.lr > 0, "lr", "must be positive", self.lr)
>>> from_dict(Optim, {"lr": 3e-4, "betas": [0.9, 0.95]})
Optim(lr=0.0003, betas=(0.9, 0.95))
>>> from_dict(Optim, {"learning_rate": 1.0}, where="optim")
Traceback (most recent call last):
...
models.config.ConfigError: optim.learning_rate: unknown key (known: betas, lr)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

__all__ = ["ConfigError", "check", "check_types", "from_dict", "to_dict"]


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type, or out of range."""


def check(condition: bool, name: str, message: str, value: Any = None) -> None:
    """Raise :class:`ConfigError` ``"name: message (got value)"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{name}: {message} (got {value!r})")


def from_dict(cls, values: Mapping[str, Any] | None, *, where: str = "",
              aliases: Mapping[str, str] | None = None):
    """Build the dataclass ``cls`` from ``values``, checking every key against its fields.

    Args:
        cls: a dataclass type; field annotations drive the type checks (``int``, ``float``,
            ``bool``, ``str``, ``Literal[...]``, ``X | None``, ``tuple[X, ...]``, ``dict[K, V]``, nested
            dataclasses).
        values: the mapping (``None`` means empty). Lists become tuples.
        where: dotted prefix used in error messages (``"model"``).
        aliases: other names accepted for a field (``{"n_sync_steps": "steps"}``); giving a
            field under two names is an error.

    Raises:
        ConfigError: naming the offending key.
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    aliases = dict(aliases or {})
    kwargs: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in values.items():
        name = aliases.get(key, key)
        path = _join(where, key)
        if name not in fields:
            known = ", ".join(sorted(set(fields) | set(aliases)))
            raise ConfigError(f"{path}: unknown key (known: {known})")
        if name in given_as:
            raise ConfigError(f"{path}: given twice, also as {_join(where, given_as[name])}")
        given_as[name] = key
        kwargs[name] = _convert(value, hints[name], path)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # add the prefix to range errors raised in __post_init__
        message = str(err)
        name, sep, rest = message.partition(":")
        if sep and given_as.get(name, name) != name:  # the key as given (an alias), not the field's name
            message = f"{given_as[name]}{sep}{rest}"
        raise ConfigError(_join(where, message)) from None


def check_types(config) -> None:
    """Check the field types of a config dataclass made directly in Python, as :func:`from_dict`
    does for a mapping (``GPTConfig(n_layers=True)`` or ``bias="no"`` would otherwise pass), and
    normalise the values the same way (lists to tuples, ints to floats). For ``__post_init__``."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if f.init:
            object.__setattr__(config, f.name, _convert(getattr(config, f.name), hints[f.name], f.name))


def to_dict(config) -> dict[str, Any]:
    """The dataclass as plain YAML/JSON-friendly data (tuples become lists)."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return plain(dataclasses.asdict(config))


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def numbers_as_written(value: Any) -> Any:
    """``value`` with every string that spells a number in exponent form (``"1e-3"``, ``"2.5e2"``: PyYAML, YAML 1.1,
    reads them as strings; it wants a point and a signed exponent) made a float, inside lists, tuples and mappings
    too: for settings typed ``Any``, as a float setting reads it."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) and "e" in value.lower():
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(numbers_as_written(v) for v in value)
    if isinstance(value, dict):
        return {k: numbers_as_written(v) for k, v in value.items()}
    return value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: expected {_describe(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is dict:  # keys and values converted by the hint's arguments (Any: as they are)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_hint, value_hint = args or (Any, Any)
        return {_convert(k, key_hint, path): _convert(v, value_hint, _join(path, str(k))) for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, where=path)
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)  # "3e-4": PyYAML (YAML 1.1) reads it as a string
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond float's range (its repr may be too long to print)
            raise ConfigError(f"{path}: expected a finite number, got an integer too large for a float") from None
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if not -2**63 <= value < 2**63:  # torch's sizes and seeds are int64: beyond, a bare error from inside torch
            raise ConfigError(f"{path}: expected an integer within int64 (-2**63 to 2**63 - 1), got {value}")
        return int(value)
    if hint in (bool, str):
        if not isinstance(value, hint):
            raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r}")
        return value
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise ConfigError(f"{path}: expected {_describe(hint)}, got {value!r}")


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
