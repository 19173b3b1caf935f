"""DBUtils-compatible module path, as ``dbutils.steady_db``: change the import, keep the code.

The same names as :mod:`forksafe.steady` (connect, SteadyDBConnection and their errors).
"""

from forksafe.steady import *  # noqa: F403
from forksafe.steady import __all__ as __all__
