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


# Names whose use in a method means it may set attributes no STORE_ATTR shows.
_DYNAMIC = frozenset({"setattr", "__dict__", "__setattr__", "vars"})


def names_of(kind: type) -> set[str] | None:
    """The attribute names instances of ``kind`` can have: ``dir(kind)`` and every name
    the Python methods of ``kind`` and its bases assign to (PyMySQL's cursors set
    ``lastrowid`` at their first ``execute()``), decorated methods' included. None if they
    cannot be listed: instances have a ``__dict__`` and a method sets attributes by
    ``setattr()`` or through ``__dict__``. (Without a ``__dict__``, every attribute an
    instance can have is a slot or a descriptor of the type, so ``dir(kind)`` lists it.)"""
    names = set(dir(kind))
    open_ended = kind.__dictoffset__ != 0
    for klass in kind.__mro__:
        for value in vars(klass).values():
            for code in _codes(value):
                if open_ended and _DYNAMIC.intersection(code.co_names):
                    return None
                names.update(
                    op.argval for op in dis.get_instructions(code) if op.opname == "STORE_ATTR"
                )
    return names


def _codes(value: Any) -> Iterator[types.CodeType]:
    """The code objects of a function, static/class method or property: nested code,
    and the functions a decorator wrapped (``__wrapped__`` or held in its closure)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    parts = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
    functions = [part for part in parts if isinstance(part, types.FunctionType)]
    seen: set[int] = set()
    while functions:
        function = functions.pop()
        if id(function) in seen:
            continue
        seen.add(id(function))
        wrapped = getattr(function, "__wrapped__", None)
        cells = [cell.cell_contents for cell in function.__closure__ or () if _filled(cell)]
        functions += [f for f in [wrapped, *cells] if isinstance(f, types.FunctionType)]
        stack = [function.__code__]
        while stack:
            code = stack.pop()
            yield code
            stack += [const for const in code.co_consts if isinstance(const, types.CodeType)]


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
