"""PersistentDB: one steady connection per thread, closed when the thread ends, safe across fork.

Compatible with DBUtils' ``PersistentDB`` (same parameters, positional order, defaults
and errors). Each thread that asks for a connection gets its own steady connection and
keeps it for its lifetime; ``close()`` on it is ignored unless ``closeable`` is set.
What differs from DBUtils, and why:

* **Thread end.** A thread's connection is closed as soon as the thread ends (the
  thread-local slot is released), in the process that opened it.
* **Never idle in transaction.** Calling ``close()`` on a non-closeable connection rolls
  back whenever the driver reports an open transaction (psycopg2, psycopg 3, sqlite3;
  PyMySQL when it can tell), not only after ``begin()``: a connection kept for the
  thread must not hold locks and snapshots while the thread does other work.
* **Fork.** In a forked child the inherited connections (the forking thread's, and the
  other threads' whose thread-local slots the interpreter clears in the child) are
  discarded without a word to the server; the child opens its own on first use.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from forksafe import drivers, fork
from forksafe.errors import NotSupportedError, PersistentDBError
from forksafe.pooled import _threadsafety
from forksafe.steady import Recipe, SteadyDBConnection

__all__ = ["NotSupportedError", "PersistentDB", "PersistentDBError"]

# Read by the inlined pid check on the hot path; see fork.getpid().
_page = fork.page


class PersistentDB(fork.ProcessBound):
    """Hand each thread its own persistent steady connection; see the module docstring.

    creator: a DB-API 2 module or a callable returning new connections.
    maxusage: reopen the connection after this many operations (0/None: never).
    setsession: SQL statements run on every new connection.
    failures: exception class(es) that trigger a reconnect.
    ping: when to check the connection: 0 never, 1 when handed out (default), 2 at
        cursor(), 4 at execute(), 7 always; or an SQL string / callable / (flags, check).
    closeable: if true, ``close()`` really closes (the next ``connection()`` reopens).
    threadlocal: a class used instead of :class:`threading.local` for the per-thread slot.
    isfatal: called with a matching failure; False means it does not break the connection.
    args, kwargs: passed to the creator.

    Raises ``TypeError`` for an unusable creator and :class:`NotSupportedError` for a
    driver that is not thread-safe. Opens no connection.
    """

    def __init__(
        self,
        creator: Any,
        maxusage: int | None = None,
        setsession: Sequence[str] | None = None,
        failures: type[Exception] | tuple[type[Exception], ...] | None = None,
        ping: Any = 1,
        closeable: bool = False,
        threadlocal: Callable[[], Any] | None = None,
        isfatal: Callable[[Exception], bool] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        if not _threadsafety(creator):
            raise NotSupportedError(
                f"{getattr(creator, '__name__', creator)!r} has threadsafety=0: its"
                " connections cannot be used outside the thread that made them"
            )
        self._recipe = Recipe(creator, maxusage, setsession, failures, ping, isfatal, args, kwargs)
        self._closeable = closeable
        self._threadlocal = threadlocal or threading.local
        self._opened: weakref.WeakSet[SteadyDBConnection] = weakref.WeakSet()
        self._pid = fork.getpid()
        self.thread = self._threadlocal()
        fork.register(self)

    def steady_connection(self) -> SteadyDBConnection:
        """Open a new steady connection that is not tied to the thread."""
        return self._recipe.connect(self._closeable)

    def connection(self, shareable: bool = False) -> SteadyDBConnection:
        """Return this thread's connection, opening it on first use in this thread.

        ``shareable`` exists for compatibility with PooledDB; persistent connections are
        never shared. Connect errors from the driver propagate.
        """
        if not _page[0] or self._pid != fork.cached_pid:  # fork.getpid(), inlined
            self._checkpid()
        con: SteadyDBConnection | None = getattr(self.thread, "connection", None)
        if con is None or con._closed:
            con = self.steady_connection()
            if not con.threadsafety():
                con._close()
                raise NotSupportedError(
                    "the driver's connections are not thread-safe (threadsafety=0)"
                )
            # Only the thread-local slot holds it: when the thread ends, the interpreter
            # releases the slot and SteadyDBConnection.__del__ closes the connection.
            self.thread.connection = con
            self._opened.add(con)
        if con._ping & 1:
            con._ping_check()
        return con

    def dedicated_connection(self) -> SteadyDBConnection:
        """Alias for :meth:`connection`."""
        return self.connection()

    def stats(self) -> dict[str, int]:
        """Named counters: ``connections_open`` is the number of threads holding one."""
        self._checkpid()
        return {"connections_open": sum(1 for con in list(self._opened) if not con._closed)}

    # -- fork -----------------------------------------------------------------------

    def _fork_child(self) -> None:
        """Forget the inherited connections: discarded, never closed."""
        drivers.discard(*(con._detach() for con in list(self._opened)))
        self._opened = weakref.WeakSet()
        self.thread = self._threadlocal()
        self._pid = fork.getpid()
