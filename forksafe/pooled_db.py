"""DBUtils-compatible module path, as ``dbutils.pooled_db``: change the import, keep the code.

The same names as :mod:`forksafe.pooled` (PooledDB and its errors).
"""

from forksafe.pooled import *  # noqa: F403
from forksafe.pooled import __all__ as __all__
