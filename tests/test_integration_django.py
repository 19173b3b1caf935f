"""Django: under the real uWSGI with CONN_MAX_AGE and a query at import, and in-process
(fork detach, and the thread helpers that close a thread's connections)."""

from __future__ import annotations

import concurrent.futures
import gc
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forking import fork_child
from test_integration_support import (
    ROOT,
    fire,
    free_port,
    running,
    server_sessions,
    sessions_left,
    uwsgi_binary,
    uwsgi_env,
    wait_until,
)

__all__ = ["uwsgi_binary"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(180)

SITE = ROOT / "examples" / "django_site"


def start_django_uwsgi(binary: Path, db: Any, tmp_path: Path, hook: bool = True) -> Any:
    port = free_port()
    argv = [str(binary), "--ini", str(ROOT / "uwsgi.ini"), "--wsgi-file", str(SITE / "wsgi.py")]
    env = {**uwsgi_env(), "FORKSAFE_APP_DSN": db.dsn, "FORKSAFE_HTTP": f"127.0.0.1:{port}"}
    if not hook:
        env["FORKSAFE_APP_HOOK"] = "0"
    return running(argv, env, tmp_path / "uwsgi.log", f"http://127.0.0.1:{port}")


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_django_under_uwsgi_detaches_the_masters_connection_in_every_worker(
    kind: str, uwsgi_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue(kind)
    before = server_sessions(db)
    with start_django_uwsgi(uwsgi_binary, db, tmp_path) as server:
        master = server.get("/master")
        load = fire(server.base, count=400, concurrency=32)
        load.check(forbidden_sessions={master["session"]})
        assert len(load.pids) == 4, load.sessions_by_pid()
        assert len(load.sessions) == 4
        assert load.sessions | {master["session"]} <= server_sessions(db)
        print(f"django uwsgi {kind}: 400 requests in {load.seconds:.2f}s", file=sys.stderr)
    assert not sessions_left(db, before)


def test_django_under_uwsgi_without_the_hook_every_worker_uses_the_masters_session(
    postgres: Any, uwsgi_binary: Path, tmp_path: Path
) -> None:
    # Why the hook exists: Django has no pid check. One request at a time, so the shared
    # socket is not yet corrupted; under concurrency the workers read each other's answers.
    with start_django_uwsgi(uwsgi_binary, postgres, tmp_path, hook=False) as server:
        master = server.get("/master")
        load = fire(server.base, count=40, concurrency=1)
        assert not load.errors
        assert load.sessions == {master["session"]}
        assert len(load.pids) > 1


# --- in-process Django ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def django_db(postgres: Any) -> Iterator[Any]:
    """Django configured in this process on this worker's PostgreSQL database."""
    import django
    from django.conf import settings

    if not settings.configured:
        kwargs = postgres.kwargs
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": kwargs["dbname"],
                    "USER": kwargs.get("user", ""),
                    "PASSWORD": kwargs.get("password", ""),
                    "HOST": kwargs.get("host", ""),
                    "PORT": str(kwargs.get("port", "")),
                    "CONN_MAX_AGE": 600,
                }
            },
            USE_TZ=True,
        )
        django.setup()
    from django.db import connections

    import forksafe.integrations.django  # noqa: F401  (its fork hook)

    yield postgres
    connections.close_all()


def sessions_before(db: Any) -> set[int]:
    """Close this thread's Django connection, then list the sessions already there."""
    from django.db import connections

    connections.close_all()
    return server_sessions(db)


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return int(cursor.fetchone()[0])


@pytest.mark.parametrize("how", ["os.fork", "fork without Python hooks"])
def test_django_child_gets_its_own_session_and_parent_keeps_its_own(
    django_db: Any, how: str
) -> None:
    from django.db import connection

    from forksafe.integrations import reset_after_fork

    parent = backend_pid()
    socket_inode = os.fstat(connection.connection.fileno()).st_ino

    def child() -> tuple[int, int]:
        from django.db import connections

        if how != "os.fork":
            reset_after_fork()  # what the uWSGI/gunicorn/Celery hooks call
        # The parent's socket is closed here, not merely left unused: open in a child,
        # it would keep the parent's session alive on the server past the parent's death.
        still_open = sum(1 for fd in os.listdir("/proc/self/fd") if _inode(int(fd)) == socket_inode)
        session = backend_pid()
        connections.close_all()  # closes the child's own session only
        gc.collect()
        return session, still_open

    # (os._exit: under pytest, sys.exit in a forked child would unwind into pytest itself.)
    child_session, still_open = fork_child(child, raw=how != "os.fork")
    assert still_open == 0
    assert child_session != parent
    assert backend_pid() == parent
    assert parent in server_sessions(django_db)


def test_django_closing_connections_in_a_child_kills_the_parents_session(
    django_db: Any,
) -> None:
    # The usual advice, for the record: close_all() in the child sends the server a goodbye
    # on the shared socket. (The fork hook of forksafe.integrations.django is undone here by
    # a raw fork, which skips it.)
    from django.db import connections

    parent = backend_pid()
    fork_child(lambda: connections.close_all(), raw=True)
    assert wait_until(lambda: parent not in server_sessions(django_db), 10)
    connections.close_all()  # the parent's wrapper still holds the dead connection


def test_django_closing_connections_leaves_no_session_after_50_short_threads(
    django_db: Any,
) -> None:
    from forksafe.integrations.django import closing_connections

    before = sessions_before(django_db)
    seen: list[int] = []

    @closing_connections()
    def work() -> None:
        seen.append(backend_pid())

    threads = [threading.Thread(target=work) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(seen) == 50
    # A closed session leaves the server's list when its backend has exited: a moment
    # later (the same goes for the listing connection of the previous check).
    assert wait_until(lambda: not server_sessions(django_db) - before, 10)


def test_django_thread_pool_executor_idle_threads_hold_no_session(django_db: Any) -> None:
    from forksafe.integrations.django import ThreadPoolExecutor

    before = sessions_before(django_db)
    with ThreadPoolExecutor(8) as pool:
        sessions = list(pool.map(lambda _: backend_pid(), range(50)))
        assert len(sessions) == 50
        # The 8 threads are alive and idle: with the plain executor each would hold one
        # for as long as it lives, so waiting for the closed ones to leave proves nothing
        # is held.
        assert wait_until(lambda: not server_sessions(django_db) - before, 10)


def test_django_plain_thread_pool_executor_leaves_idle_threads_holding_sessions(
    django_db: Any,
) -> None:
    # The leak the helper exists for, measured on the same server.
    before = sessions_before(django_db)
    barrier = threading.Barrier(4)

    def work(_: int) -> int:
        pid = backend_pid()
        barrier.wait(10)  # every thread connects once
        return pid

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        used = set(pool.map(work, range(4)))
        assert wait_until(lambda: server_sessions(django_db) - before == used, 10)
        list(pool.map(lambda _: _close_this_threads_connections(barrier), range(4)))
    gc.collect()
    assert wait_until(lambda: not server_sessions(django_db) - before, 10)


def _close_this_threads_connections(barrier: threading.Barrier) -> None:
    from django.db import connections

    connections.close_all()
    barrier.wait(10)
