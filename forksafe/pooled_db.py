"""DBUtils-compatible module path: ``from forksafe.pooled_db import PooledDB``."""

from forksafe.errors import (
    InvalidConnection,
    InvalidConnectionError,
    NotSupportedError,
    PooledDBError,
    PoolTimeoutError,
    TooManyConnections,
    TooManyConnectionsError,
)
from forksafe.pooled import (
    ManyPoolsWarning,
    PooledDB,
    PooledDedicatedDBConnection,
    PooledSharedDBConnection,
    SharedDBConnection,
)

__all__ = [
    "InvalidConnection",
    "InvalidConnectionError",
    "ManyPoolsWarning",
    "NotSupportedError",
    "PoolTimeoutError",
    "PooledDB",
    "PooledDBError",
    "PooledDedicatedDBConnection",
    "PooledSharedDBConnection",
    "SharedDBConnection",
    "TooManyConnections",
    "TooManyConnectionsError",
]
