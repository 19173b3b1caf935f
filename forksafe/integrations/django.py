"""Django: detach inherited connections after fork; close a thread's connections when done.

**Fork.** Django has no fork handling of its own. A prefork server that imports the
project in its master (uWSGI without ``lazy-apps``, gunicorn with ``preload_app``, Celery)
and runs a query there (a check, a cache warm-up, a query at import time) leaves every
worker holding the master's database session in ``django.db.connections``. The usual
advice, ``connections.close_all()`` in the child, sends the server a goodbye on the
shared socket and ends the *master's* session. :func:`detach_connections` drops the
child's copy instead (see :func:`forksafe.drivers.discard`): no byte reaches the server,
and Django opens a new connection at the child's next query.

Importing this module registers :func:`detach_connections` with
:func:`os.register_at_fork`, so every :func:`os.fork` (gunicorn, Celery prefork,
``multiprocessing`` with fork) detaches by itself; uWSGI forks from C and needs
:mod:`forksafe.integrations.uwsgi`, which calls it when Django is loaded.

Only the connections of the thread that forked are reachable (Django keeps one set per
thread); they are the only ones a child can use, since it has no other thread.

**Threads.** Django opens one connection per thread and closes it only at the end of a
request (``request_finished``). Work in your own threads (``threading.Thread``,
``ThreadPoolExecutor``) leaves a session open on the server for as long as the thread's
connection object lives: :func:`closing_connections` (a context manager and decorator) and
:class:`ThreadPoolExecutor` (closes after each task) end them when the work ends.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.db import connections
from django.db.backends.signals import connection_created

from forksafe import drivers

__all__ = ["ThreadPoolExecutor", "closing_connections", "detach_connections"]

log = logging.getLogger("forksafe.integrations.django")

P = ParamSpec("P")
R = TypeVar("R")

# Where this module was imported; with no better clue, connections are assumed to belong to
# this process.
_import_pid = os.getpid()


def detach_connections(just_forked: bool = False) -> int:
    """Detach every Django connection this thread inherited from a parent process.

    Each such connection in ``django.db.connections`` has its socket pointed at /dev/null
    and is dropped without a goodbye to the server; the wrapper is left as if it had never
    connected, so the next query opens a connection of this process's own. Returns how many
    were detached. Never raises for a driver it does not know (see
    :func:`forksafe.drivers.discard`).

    Connections opened after this module was imported carry the pid that opened them and
    are detached only in another process. For older ones the origin is unknown: they are
    detached when this module was imported in another process, or when ``just_forked`` is
    true (the fork hooks pass it: right after fork, every open connection is inherited).
    Calling it again in the same process is a no-op.
    """
    if not settings.configured:
        return 0  # settings never loaded: no connection can have been opened
    pid = os.getpid()
    detached = 0
    for wrapper in connections.all(initialized_only=True):
        raw = wrapper.connection
        if raw is None:
            continue
        owner = getattr(wrapper, "_forksafe_pid", None)
        if owner == pid or (owner is None and not just_forked and _import_pid == pid):
            continue
        drivers.discard(raw)
        _forget(wrapper)
        detached += 1
    if detached:
        log.debug("forksafe: detached %d inherited Django connection(s) in %d", detached, pid)
    return detached


def _mark_owner(sender: Any, connection: Any, **kwargs: Any) -> None:
    connection._forksafe_pid = os.getpid()
    # In forksafe's socket table, a forked child's hook points the socket at /dev/null
    # and detach_connections() then closes it: kept open in the child instead, it would
    # keep the parent's session alive on the server after the parent died.
    drivers.track(connection.connection, until_freed=True)


def _forget(wrapper: Any) -> None:
    """Put a DatabaseWrapper back to its never-connected state (connect() resets the rest)."""
    wrapper.connection = None
    wrapper.run_on_commit = []
    wrapper.in_atomic_block = False
    wrapper.savepoint_ids = []
    wrapper.atomic_blocks = []
    wrapper.needs_rollback = False
    wrapper.closed_in_transaction = False
    wrapper.close_at = None


def _detach_in_child() -> None:
    try:
        detach_connections(just_forked=True)
    except Exception:
        log.exception("forksafe: detaching Django connections after fork failed")


class closing_connections(contextlib.ContextDecorator):
    """Close this thread's Django connections when the block or decorated call ends.

    ::

        @closing_connections()
        def work():
            Thing.objects.count()

        threading.Thread(target=work).start()

    Closing is Django's ordinary ``close()``: the session ends on the server. Use it in
    threads you start, never around code in a forked child that still holds a parent's
    connection (that is what :func:`detach_connections` is for). Exceptions from the block
    propagate; an error while closing is logged, not raised over them.
    """

    def __enter__(self) -> closing_connections:
        return self

    def __exit__(self, *exc: object) -> None:
        for wrapper in connections.all(initialized_only=True):
            try:
                wrapper.close()
            except Exception:
                log.exception("forksafe: closing Django connection %r failed", wrapper.alias)


class ThreadPoolExecutor(concurrent.futures.ThreadPoolExecutor):
    """A :class:`concurrent.futures.ThreadPoolExecutor` whose tasks close their Django
    connections when they finish, so idle pool threads hold no database session."""

    def submit(
        self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs
    ) -> concurrent.futures.Future[R]:
        return super().submit(closing_connections()(fn), *args, **kwargs)


connection_created.connect(_mark_owner, weak=False, dispatch_uid="forksafe.integrations.django")
os.register_at_fork(after_in_child=_detach_in_child)
