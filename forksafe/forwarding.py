"""Attribute forwarding without ``__getattr__``.

DBUtils' wrappers (a pool's proxy, a steady cursor) forward the attributes they do not
have to the object they wrap, with ``__getattr__``. On CPython a class that defines
``__getattr__`` sends every attribute access on its instances down the interpreter's
slow, unspecialised path, its own methods included, and a pool cycle is mostly such
accesses. Where the names to forward are known in advance, a descriptor per name does
the same job and leaves the wrapper's own attributes fast.

A wrapper using this module has a ``_live(name)`` method that returns the wrapped object,
or raises the wrapper's own error (returned connection, closed cursor) naming ``name``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

__all__ = ["Forward", "forward"]


class Wrapper(Protocol):
    def _live(self, name: str) -> Any: ...


class Forward:
    """A non-data descriptor: reading ``wrapper.<name>`` reads ``<name>`` of the wrapped
    object. Being non-data, an attribute set on the wrapper itself shadows it, as with
    ``__getattr__``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, wrapper: Wrapper | None, owner: type | None = None) -> Any:
        if wrapper is None:
            return self
        return getattr(wrapper._live(self.name), self.name)

    def __repr__(self) -> str:
        return f"Forward({self.name!r})"


def forward(cls: type, names: Iterable[str], make: Callable[[str], Forward] = Forward) -> None:
    """Give ``cls`` a ``make(name)`` descriptor for each non-dunder name it lacks."""
    own = set(dir(cls))
    for name in sorted(set(names) - own):
        if not (name.startswith("__") and name.endswith("__")):
            setattr(cls, name, make(name))
