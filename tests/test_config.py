"""models.config.from_dict: every key used or rejected by name; types and ranges checked."""

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from models.config import ConfigError, check, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    steps: int = 10
    mode: Literal["a", "b"] = "a"

    def __post_init__(self):
        check(self.steps >= 1, "steps", "must be at least 1", self.steps)


@dataclass(frozen=True)
class Outer:
    lr: float = 1e-3
    layers: tuple[int, ...] = ()
    name: str | None = None
    flag: bool = False
    inner: Inner = field(default_factory=Inner)


def test_builds_nested_and_converts_lists():
    cfg = from_dict(Outer, {"lr": 1, "layers": [2, 3], "inner": {"steps": 4, "mode": "b"}})
    assert cfg == Outer(lr=1.0, layers=(2, 3), inner=Inner(steps=4, mode="b"))
    assert isinstance(cfg.lr, float)
    assert to_dict(cfg) == {"lr": 1.0, "layers": [2, 3], "name": None, "flag": False,
                            "inner": {"steps": 4, "mode": "b"}}
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert from_dict(Outer, {"lr": "3e-4"}).lr == 3e-4  # YAML 1.1 (PyYAML) leaves 3e-4 a string
    assert from_dict(Outer, {"lr": ".5e3"}).lr == 500.0  # ... and .5e3 (its floats need a signed exponent)
    assert from_dict(Outer, {"inner": Inner(steps=4)}).inner == Inner(steps=4)  # a section built already


@dataclass(frozen=True)
class Mapped:
    weights: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] | None = None  # as model.coupling_options: keyword arguments of a class
    size: int | str = 1                      # as fabric.devices: a union without None
    derived: int = field(default=0, init=False)


def test_mappings_unions_and_fields_outside_init_are_checked_by_the_hint():
    cfg = from_dict(Mapped, {"weights": {"a": 1, "b": "2e-1"}, "options": {"k": [1, "x"]}})
    assert cfg.weights == {"a": 1.0, "b": 0.2} and all(type(v) is float for v in cfg.weights.values())
    assert cfg.options == {"k": [1, "x"]}  # Any: as given
    for values, message in (({"weights": {"a": "x"}}, "cfg.weights.a: expected a number"),
                            ({"weights": [1.0]}, "cfg.weights: expected a mapping"),
                            ({"options": {1: 2}}, "cfg.options: expected str, got 1"),  # no keyword argument
                            ({"size": None}, r"cfg.size: expected int \| str, got None"),
                            ({"derived": 1}, "cfg.derived: unknown key")):  # not an argument of the class
        with pytest.raises(ConfigError, match=message):
            from_dict(Mapped, values, where="cfg")


@pytest.mark.parametrize("values, message", [
    ({"lrr": 1.0}, "cfg.lrr: unknown key"),
    ({"inner": {"stepz": 1}}, "cfg.inner.stepz: unknown key"),
    ({"lr": "fast"}, "cfg.lr: expected a number"),
    ({"lr": True}, "cfg.lr: expected a number"),
    ({"lr": float("inf")}, "cfg.lr: expected a finite number"),
    ({"lr": "nan"}, "cfg.lr: expected a number"),
    ({"layers": [1, 2.5]}, "cfg.layers[1]: expected an integer"),
    ({"layers": 3}, "cfg.layers: expected a list"),
    ({"flag": 1}, "cfg.flag: expected bool"),
    ({"name": 3}, "cfg.name: expected str"),
    ({"inner": {"mode": "c"}}, "cfg.inner.mode: expected one of 'a', 'b'"),
    ({"inner": {"steps": 0}}, "cfg.inner.steps: must be at least 1"),
    ({"inner": 5}, "cfg.inner: expected a mapping"),
    ({"layers": [2**63]}, "cfg.layers[0]: expected an integer within int64 (-2**63 to 2**63 - 1), got "
                          "9223372036854775808"),
    ({"layers": [-2**63 - 1]}, "cfg.layers[0]: expected an integer within int64"),
])
def test_rejects_with_the_key_named(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from_dict(Outer, values, where="cfg")


def test_the_int64_bounds_themselves_are_integers_it_takes():
    assert from_dict(Outer, {"layers": [2**63 - 1, -2**63]}).layers == (2**63 - 1, -2**63)


def test_aliases_map_onto_fields_and_conflicts_are_errors():
    assert from_dict(Inner, {"n_sync_steps": 3}, aliases={"n_sync_steps": "steps"}).steps == 3
    with pytest.raises(ConfigError, match="n_sync_steps: given twice, also as steps"):
        from_dict(Inner, {"steps": 3, "n_sync_steps": 3}, aliases={"n_sync_steps": "steps"})
