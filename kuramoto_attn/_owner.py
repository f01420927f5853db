"""Which module filled a decoding cache: :class:`OwnedCache`, the base of the library's and the models' caches."""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field
from typing import Callable


def _gone() -> None:
    """The owner of a cache that was pickled and loaded: like a dead weak reference, no module."""
    return None


@dataclass
class OwnedCache:
    """A decoding cache that remembers the module that filled it (``owner``, a weak reference), so that
    any other module refuses it, where it would continue the first module's tokens or states.

    A weak reference, not the module's ``id``: CPython gives a freed object's id to the next object of
    its size, so a model built again (``model = TPILM(config)`` run twice) took the previous model's
    cache as its own. Once its module is gone, a cache belongs to none.

    ``copy.copy`` and ``copy.deepcopy`` of a cache belong to the same module (branches of one model's
    cache), or the deep copy to the module's copy when the module was copied first in the same call
    (``copy.deepcopy((model, cache))``); a cache pickled and loaded belongs to no module (its module is
    not pickled along).
    """

    #: weak reference to the module that filled it (None until then); call it for the module
    owner: Callable[[], object | None] | None = field(default=None, kw_only=True, repr=False, compare=False)

    def _claim(self, module: object) -> None:
        self.owner = weakref.ref(module)

    def _filled_by_another(self, module: object) -> bool:
        return self.owner is not None and self.owner() is not module

    def __copy__(self):  # (else copy.copy would go through __getstate__ and lose the owner)
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = value if name == "owner" else copy.deepcopy(value, memo)
        module = self.owner() if self.owner is not None else None
        if module is not None and id(module) in memo:  # copied in this call, before the cache
            new.owner = weakref.ref(memo[id(module)])
        return new

    def __getstate__(self) -> dict:  # pickle (a weak reference cannot be pickled)
        state = dict(self.__dict__)
        if state.get("owner") is not None:
            state["owner"] = _gone
        return state
