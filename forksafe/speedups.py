"""C versions of the pools' hot paths, used when the extension module was built.

``forksafe._speedups`` replaces, on the classes, the methods listed in :data:`HOT` with C
functions that run each method's common case (an idle connection ready in this process,
a cursor without arguments, a statement that succeeds, a return that only rolls back)
and hand everything else to the Python method they replaced, kept on the class as
``_py_<name>``, before changing anything. They read the fields the classes keep in
``__slots__``. The Python methods are the reference: the behaviour is the same either
way, and the test suite runs against both. PyMySQL's quiet probe (see
:func:`forksafe.drivers.quiet_probe`) has a C version too, which polls without letting
go of the GIL.

Without a C compiler at install time the extension is not built and the Python methods
run. ``FORKSAFE_PURE_PYTHON=1`` in the environment, read at import, keeps them too, and so
does every interpreter of a process but the first to import forksafe (sub-interpreters).
"""

from __future__ import annotations

import os
import queue
from types import ModuleType

from forksafe import drivers, fork
from forksafe.pooled import PooledDB, PooledDedicatedDBConnection, _PooledProxy
from forksafe.steady import SteadyDBConnection, SteadyDBCursor

__all__ = ["HOT", "active", "install"]

#: The methods the C functions replace, by class.
HOT: tuple[tuple[type, tuple[str, ...]], ...] = (
    (PooledDB, ("connection",)),
    (_PooledProxy, ("cursor",)),
    (PooledDedicatedDBConnection, ("close", "__del__")),
    (SteadyDBConnection, ("cursor",)),
    (SteadyDBCursor, ("execute", "fetchone", "close")),
)

#: Whether the C functions are in use.
active = False


def _extension() -> ModuleType | None:
    if os.environ.get("FORKSAFE_PURE_PYTHON"):
        return None
    try:
        from forksafe import _speedups
    except ImportError:
        return None
    return _speedups


def install() -> bool:
    """Put the C functions on the classes (once); whether they are in use."""
    global active
    extension = _extension()
    if active or extension is None:
        return active
    python = [(cls, name, cls.__dict__[name]) for cls, names in HOT for name in names]
    try:
        extension.install(
            PooledDB,
            _PooledProxy,
            PooledDedicatedDBConnection,
            SteadyDBConnection,
            SteadyDBCursor,
            fork.page,
            fork.armed,
            fork,
            queue.Empty,
        )
    except ImportError:  # a second interpreter of the process: the Python methods run
        return active
    for cls, name, method in python:  # where the C functions hand what they do not do
        setattr(cls, f"_py_{name}", method)
    drivers.native_quiet = getattr(extension, "Quiet", None)
    active = True
    return active
