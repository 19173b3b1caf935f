"""``python -m workers`` is the ``forksafe`` command."""

import sys

from workers.cli import main

sys.exit(main())
