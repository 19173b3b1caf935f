"""forksafe: DB-API 2 connection pools that survive ``fork()``.

DBUtils-compatible ``PooledDB``, ``PersistentDB`` and ``SteadyDB`` for any DB-API 2
driver. In a forked child, inherited connections are discarded without a byte sent to
the server, and the child opens its own on first use. See :mod:`forksafe.pooled`.
"""

from forksafe import speedups
from forksafe.errors import (
    ForkedConnectionError,
    ForksafeError,
    InvalidConnection,
    InvalidConnectionError,
    InvalidCursor,
    InvalidCursorError,
    NotSupportedError,
    PersistentDBError,
    PooledDBError,
    PoolTimeoutError,
    SteadyDBError,
    TooManyConnections,
    TooManyConnectionsError,
)
from forksafe.fork import after_fork
from forksafe.persistent import PersistentDB
from forksafe.pooled import ManyPoolsWarning, PooledDB
from forksafe.steady import SteadyDBConnection, SteadyDBCursor

speedups.install()

__all__ = [
    "ForkedConnectionError",
    "ForksafeError",
    "InvalidConnection",
    "InvalidConnectionError",
    "InvalidCursor",
    "InvalidCursorError",
    "ManyPoolsWarning",
    "NotSupportedError",
    "PersistentDB",
    "PersistentDBError",
    "PoolTimeoutError",
    "PooledDB",
    "PooledDBError",
    "SteadyDBConnection",
    "SteadyDBCursor",
    "SteadyDBError",
    "TooManyConnections",
    "TooManyConnectionsError",
    "after_fork",
]

__version__ = "0.1.0"
