"""gunicorn: a ``post_fork`` server hook that resets forksafe pools in each new worker.

In ``gunicorn.conf.py``::

    from forksafe.integrations.gunicorn import post_fork  # noqa: F401

or, when the config already has a ``post_fork``, call :func:`post_fork` from it first.

gunicorn forks with :func:`os.fork`, so Python's fork hooks already reset the pools in
every worker; this hook is the belt to those braces. It also detaches the Django
connections a ``preload_app = True`` master opened, which have no fork hook of their own.
It runs in the worker, after the fork and before the worker serves anything.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from forksafe.integrations import reset_after_fork

__all__ = ["post_fork"]

log = logging.getLogger("forksafe.integrations.gunicorn")


def post_fork(server: Any, worker: Any) -> None:
    """gunicorn's ``post_fork(server, worker)`` hook: reset what the worker inherited.

    Never raises for a pool that cannot be reset; that is logged by forksafe and the pool
    resets itself at first use instead.
    """
    reset_after_fork()
    log.debug("forksafe: reset after gunicorn fork in worker pid %d", os.getpid())
