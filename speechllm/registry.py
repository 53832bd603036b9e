"""Named entries of one kind (encoder kinds, source formats), and builders imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """A dict of named entries; ``register`` refuses a second, different entry under a taken name."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def register(self, name: str, entry: T) -> T:
        if name in self and self[name] != entry:
            raise ValueError(f"{self.what} {name!r} is already registered")
        self[name] = entry
        return entry


def imported(target: str) -> Callable[..., Any]:
    """A callable that imports ``"module:attribute"`` on its first call and calls it: a registry can name
    what transformers' or datasets' slow imports would build, and reading it pays for none of them."""
    module, name = target.split(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__qualname__ = target
    return call
