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

import dis
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

__all__ = ["Forward", "forward", "names_of"]


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


def names_of(kind: type) -> set[str]:
    """The attribute names instances of ``kind`` can have, as far as they can be listed:
    ``dir(kind)`` and every name its Python methods (and those of its bases) assign to,
    so that an instance attribute first set by a method (PyMySQL's cursors set
    ``lastrowid`` at their first ``execute()``) is among them."""
    names = set(dir(kind))
    for klass in kind.__mro__:
        for value in vars(klass).values():
            for code in _codes(value):
                names.update(
                    op.argval for op in dis.get_instructions(code) if op.opname == "STORE_ATTR"
                )
    return names


def _codes(value: Any) -> Iterator[types.CodeType]:
    """The code objects of a function, static/class method or property, nested ones too."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    parts = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
    stack = [part.__code__ for part in parts if isinstance(part, types.FunctionType)]
    while stack:
        code = stack.pop()
        yield code
        stack.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
