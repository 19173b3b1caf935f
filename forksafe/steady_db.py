"""DBUtils-compatible module path: ``from forksafe.steady_db import connect``."""

from forksafe.errors import InvalidCursor, InvalidCursorError, SteadyDBError
from forksafe.steady import SteadyDBConnection, SteadyDBCursor, connect

__all__ = [
    "InvalidCursor",
    "InvalidCursorError",
    "SteadyDBConnection",
    "SteadyDBCursor",
    "SteadyDBError",
    "connect",
]
