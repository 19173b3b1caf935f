"""The exceptions forksafe raises, with DBUtils' names so existing ``except`` clauses keep working.

DBUtils defines its errors per module; here they live in one hierarchy and the
``steady_db``, ``pooled_db`` and ``persistent_db`` modules re-export them by the same
names. Everything derives from :class:`ForksafeError`.
"""

from __future__ import annotations

__all__ = [
    "ForkedConnectionError",
    "ForksafeError",
    "InvalidConnection",
    "InvalidConnectionError",
    "InvalidCursor",
    "InvalidCursorError",
    "NotSupportedError",
    "PersistentDBError",
    "PoolTimeoutError",
    "PooledDBError",
    "SteadyDBError",
    "TooManyConnections",
    "TooManyConnectionsError",
]


class ForksafeError(Exception):
    """Base class of every error forksafe raises."""


class SteadyDBError(ForksafeError):
    """General SteadyDB error."""


class InvalidCursorError(SteadyDBError):
    """The cursor was closed, or its connection is no longer usable."""


class PooledDBError(ForksafeError):
    """General PooledDB error."""


class PersistentDBError(ForksafeError):
    """General PersistentDB error."""


class InvalidConnectionError(PooledDBError, PersistentDBError, SteadyDBError):
    """The connection was returned to its pool, closed, or belongs to another process."""


class ForkedConnectionError(InvalidConnectionError):
    """The connection was opened by another process and was inherited through fork().

    It is inert here: using it would interleave this process's queries with the
    parent's on one socket. Get a new connection from the pool instead.
    """


class NotSupportedError(PooledDBError, PersistentDBError):
    """The DB-API module cannot be used this way (for example it is not thread-safe)."""


class TooManyConnectionsError(PooledDBError):
    """``maxconnections`` was reached and the pool was not allowed to wait."""


class PoolTimeoutError(TooManyConnectionsError):
    """A blocking pool waited ``maxwait`` seconds without a connection becoming free."""


InvalidCursor = InvalidCursorError
InvalidConnection = InvalidConnectionError
TooManyConnections = TooManyConnectionsError
