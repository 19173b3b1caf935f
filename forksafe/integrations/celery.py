"""Celery: fresh forksafe pools (and Django connections) in every prefork pool process.

Import it where the Celery app is defined::

    import forksafe.integrations.celery  # noqa: F401

Importing connects :func:`reset_worker_process` to Celery's ``worker_process_init``
signal, which the prefork pool sends in each child process right after it starts, before
the child runs a task. Celery's prefork children are made with :func:`os.fork`, so the
pools' own fork hooks run too; the signal also covers Django connections opened in the
parent, and a pool whose first use in the child would otherwise do the reset. Connecting
twice is harmless: the receiver is registered under one ``dispatch_uid``.

Imported where Celery is not installed it raises ImportError, like any Celery code.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_process_init

from forksafe.integrations import reset_after_fork

__all__ = ["reset_worker_process"]

log = logging.getLogger("forksafe.integrations.celery")


def reset_worker_process(**kwargs: Any) -> None:
    """The ``worker_process_init`` receiver: reset what this pool process inherited."""
    reset_after_fork()
    log.debug("forksafe: reset in Celery worker process %d", os.getpid())


worker_process_init.connect(
    reset_worker_process, weak=False, dispatch_uid="forksafe.integrations.celery"
)
