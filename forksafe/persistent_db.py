"""DBUtils-compatible module path, as ``dbutils.persistent_db``: change the import, keep the code.

The same names as :mod:`forksafe.persistent` (PersistentDB and its errors).
"""

from forksafe.persistent import *  # noqa: F403
from forksafe.persistent import __all__ as __all__
