"""DBUtils-compatible module path: ``from forksafe.persistent_db import PersistentDB``."""

from forksafe.errors import NotSupportedError, PersistentDBError
from forksafe.persistent import PersistentDB

__all__ = ["NotSupportedError", "PersistentDB", "PersistentDBError"]
