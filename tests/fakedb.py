"""A fake DB-API 2 module that counts what a pool does to it.

Pass the module itself as a pool's creator (``PooledDB(fakedb)``) or wrap ``fakedb.connect``
in a function.  Everything a pool can do to a connection is counted in ``fakedb.counts``:
connects, closes, pings, commits, rollbacks, cursors and executed statements.  Every query
answers one row holding the number of the connection that ran it, so a test can tell which
raw connection a pool handed out without looking at the pool's internals.

Faults are injected from the test:

- ``fail_next(2, "execute")`` makes the next two executes raise ``OperationalError``
  (or the error class given), on whichever connection they happen;
- ``conn.die()`` (or ``kill_all()``) makes a connection behave like one whose server has
  gone away: ping, cursor, execute, commit and rollback raise ``OperationalError``.

Call ``reset()`` before each test; it clears the counts and the planned faults and restores
``threadsafety`` and ``reports_transaction_status``.  The module's state is global, which
suits the pools under test: they reach the module through ``creator.connect`` just as they
would reach a real driver.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

apilevel = "2.0"
threadsafety = 2
paramstyle = "qmark"

reports_transaction_status = True
"""Whether connections tell ``in_transaction``; set it to False for a driver that cannot."""


class Warning(Exception):  # shadows the builtin because DB-API 2 requires the name
    """Important warnings, as DB-API 2 defines them."""


class Error(Exception):
    """Base class of all errors of this module."""


class InterfaceError(Error):
    """The module or the connection object was misused (e.g. used after close)."""


class DatabaseError(Error):
    """Errors reported by the (fake) database."""


class DataError(DatabaseError):
    pass


class OperationalError(DatabaseError):
    """The connection was lost or the server could not do what was asked."""


class IntegrityError(DatabaseError):
    pass


class InternalError(DatabaseError):
    pass


class ProgrammingError(DatabaseError):
    pass


class NotSupportedError(DatabaseError):
    pass


@dataclass
class Counts:
    """What has been done to the fake database since the last ``reset()``."""

    connects: int = 0
    closes: int = 0
    pings: int = 0
    commits: int = 0
    rollbacks: int = 0
    cursors: int = 0
    executes: int = 0
    statements: list[str] = field(default_factory=list)


counts = Counts()
connections: list[Connection] = []
"""Every connection opened since the last ``reset()``, in the order they were opened."""

_lock = threading.Lock()
_planned_faults: dict[str, deque[type[Exception]]] = {}
_generation = 0


def reset() -> None:
    """Forget all counts, connections and planned faults; restore the module defaults.

    Connections opened before the reset are no longer counted, so a pool of an earlier test
    that is garbage-collected late cannot disturb the counts of the next one.
    """
    global threadsafety, reports_transaction_status, _generation
    with _lock:
        vars(counts).update(vars(Counts()))
        connections.clear()
        _planned_faults.clear()
        _generation += 1
    threadsafety = 2
    reports_transaction_status = True


def fail_next(
    times: int = 1, operation: str = "execute", error: type[Exception] = OperationalError
) -> None:
    """Make the next ``times`` calls of ``operation`` raise ``error``.

    ``operation`` is one of "connect", "ping", "cursor", "execute", "commit", "rollback".
    """
    with _lock:
        _planned_faults.setdefault(operation, deque()).extend([error] * times)


def kill_all() -> None:
    """Let every open connection die, as if the server had been restarted."""
    for conn in list(connections):
        if not conn.closed:
            conn.die()


def open_connections() -> list[Connection]:
    """The connections that have been opened and not yet closed."""
    return [conn for conn in connections if not conn.closed]


def _count(generation: int, name: str, statement: str | None = None) -> None:
    with _lock:
        if generation != _generation:
            return
        setattr(counts, name, getattr(counts, name) + 1)
        if statement is not None:
            counts.statements.append(statement)


def _raise_planned_fault(operation: str) -> None:
    with _lock:
        planned = _planned_faults.get(operation)
        error = planned.popleft() if planned else None
    if error is not None:
        raise error(f"injected fault in {operation}")


def connect(*args: Any, **kwargs: Any) -> Connection:
    """Open a new fake connection; the arguments are only recorded."""
    _raise_planned_fault("connect")
    conn = Connection(args, kwargs)
    with _lock:
        counts.connects += 1
        conn.number = counts.connects
        conn.generation = _generation
        connections.append(conn)
    return conn


class Connection:
    """A fake connection: counts its use and fails as it is told to."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.number = 0
        self.generation = 0
        self.args = args
        self.kwargs = kwargs
        self.closed = False
        self.dead = False
        self.transaction_open = False  # the truth, whatever ``in_transaction`` reports
        self.statements: list[str] = []
        self.cursors: list[Cursor] = []

    @property
    def in_transaction(self) -> bool | None:
        """What the driver reports (like sqlite3's attribute); None when it cannot tell."""
        return self.transaction_open if reports_transaction_status else None

    def die(self) -> None:
        """From now on, behave like a connection whose server has gone away."""
        self.dead = True

    def _check_usable(self, operation: str) -> None:
        if self.closed:
            raise InterfaceError(f"connection {self.number} is already closed")
        if self.dead:
            raise OperationalError(f"server closed connection {self.number} unexpectedly")
        if self.generation == _generation:
            _raise_planned_fault(operation)

    def close(self) -> None:
        """Close the connection; closing it again is counted, then refused like PyMySQL does."""
        _count(self.generation, "closes")
        if self.closed:
            raise InterfaceError(f"connection {self.number} is already closed")
        self.closed = True
        self.transaction_open = False

    def ping(self, reconnect: bool = False) -> bool:
        """Check the connection like PyMySQL does: raise if it is gone, never reconnect."""
        _count(self.generation, "pings")
        self._check_usable("ping")
        return True

    def commit(self) -> None:
        _count(self.generation, "commits")
        self._check_usable("commit")
        self.transaction_open = False

    def rollback(self) -> None:
        _count(self.generation, "rollbacks")
        self._check_usable("rollback")
        self.transaction_open = False

    def cursor(self) -> Cursor:
        _count(self.generation, "cursors")
        self._check_usable("cursor")
        cursor = Cursor(self)
        self.cursors.append(cursor)
        return cursor


class Cursor:
    """A fake cursor: every query returns one row, ``(number of its connection,)``."""

    arraysize = 1

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.closed = False
        self.description: tuple[tuple[Any, ...], ...] | None = None
        self.rowcount = -1
        self._rows: list[tuple[Any, ...]] = []
        self.sizes: list[tuple[Any, ...]] = []  # setinputsizes/setoutputsize calls

    def execute(self, operation: str, parameters: Sequence[Any] | None = None) -> None:
        if self.closed:
            raise InterfaceError("cursor is already closed")
        self.connection._check_usable("execute")
        self.connection.transaction_open = True
        self.connection.statements.append(operation)
        _count(self.connection.generation, "executes", operation)
        self.description = (("number", None, None, None, None, None, None),)
        self._rows = [(self.connection.number,)]
        self.rowcount = 1

    def executemany(self, operation: str, seq_of_parameters: Sequence[Sequence[Any]]) -> None:
        for parameters in seq_of_parameters:
            self.execute(operation, parameters)

    def callproc(self, procname: str, parameters: Sequence[Any] = ()) -> Sequence[Any]:
        self.execute(f"call {procname}", parameters)
        return parameters

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._rows.pop(0) if self._rows else None

    def fetchmany(self, size: int | None = None) -> list[tuple[Any, ...]]:
        size = self.arraysize if size is None else size
        rows, self._rows = self._rows[:size], self._rows[size:]
        return rows

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows, self._rows = self._rows, []
        return rows

    def setinputsizes(self, sizes: Any) -> None:
        self.sizes.append(("input", sizes))

    def setoutputsize(self, size: int, column: int | None = None) -> None:
        self.sizes.append(("output", size, column))

    def close(self) -> None:
        self.closed = True
