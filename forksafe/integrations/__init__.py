"""Hooks that make prefork servers and frameworks reset forksafe pools at a known moment.

Pools already reset themselves at first use in a new process (the pid check) and through
``os.register_at_fork``; these modules only make the reset happen right after the fork,
where each server offers a place for it, and also detach Django's own connections:

:mod:`forksafe.integrations.uwsgi`
    ``import forksafe.integrations.uwsgi`` in the app: a ``postfork`` hook (uWSGI forks its
    workers from C, so Python's fork hooks do not run there).
:mod:`forksafe.integrations.gunicorn`
    ``from forksafe.integrations.gunicorn import post_fork`` in ``gunicorn.conf.py``.
:mod:`forksafe.integrations.celery`
    ``import forksafe.integrations.celery``: connects ``worker_process_init``.
:mod:`forksafe.integrations.django`
    detach (never close) inherited ``django.db.connections`` in a forked child, and close a
    thread's connections when its work ends.
:mod:`forksafe.integrations.multiprocessing`
    nothing to install: why, and what the spawn and forkserver start methods change.

Importing this package imports none of those frameworks.
"""

from __future__ import annotations

import logging
import sys

import forksafe

__all__ = ["reset_after_fork"]

log = logging.getLogger("forksafe.integrations")


def reset_after_fork() -> None:
    """Run the child-side reset: forksafe pools, and Django's connections if Django is loaded.

    For the hooks of prefork servers, which call it in a process they have just forked and
    before it runs any application code: every open Django connection is then taken to be
    the parent's. Calling it again in the same process finds nothing more to do. Never
    closes an inherited connection (that would end the parent's session): see
    :func:`forksafe.drivers.discard`.
    """
    forksafe.after_fork()
    if "django.db" in sys.modules:
        from forksafe.integrations import django

        django.detach_connections(just_forked=True)
