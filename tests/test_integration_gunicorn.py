"""The real gunicorn (4 sync workers, preload_app) with examples/gunicorn.conf.py over HTTP."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest
from test_integration_support import (
    ROOT,
    fire,
    free_port,
    running,
    server_sessions,
    sessions_left,
    wait_until,
)

from forksafe.integrations.gunicorn import post_fork

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_gunicorn_workers_each_get_their_own_session_and_survive_a_reload(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue(kind)
    before = server_sessions(db)
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "examples" / "gunicorn.conf.py")]
    env = {
        "FORKSAFE_APP_DSN": db.dsn,
        "FORKSAFE_HTTP": f"127.0.0.1:{port}",
        "FORKSAFE_BROKER": f"sqlite:///{tmp_path / 'broker.db'}",
    }
    with running(argv, env, tmp_path / "gunicorn.log", f"http://127.0.0.1:{port}") as server:
        master = server.get("/master")
        assert master["pid"] == server.process.pid
        load = fire(server.base, count=400, concurrency=32)
        load.check(forbidden_sessions={master["session"]})
        assert len(load.pids) == 4, load.sessions_by_pid()
        assert load.sessions | {master["session"]} <= server_sessions(db)
        print(f"gunicorn {kind}: 400 requests in {load.seconds:.2f}s", file=sys.stderr)

        # SIGHUP: with preload_app the master keeps its app and forks 4 new workers from it.
        server.signal(signal.SIGHUP)
        during = fire(server.base, count=400, concurrency=32)
        assert not during.errors, during.errors[:3]
        assert wait_until(lambda: not fire(server.base, 40, 8).pids & load.pids, 30, 0.2)
        after = fire(server.base, count=400, concurrency=32)
        after.check(forbidden_sessions={master["session"]} | load.sessions)
        assert master["session"] in server_sessions(db), "the master's session was killed"
        assert server.get("/master") == master
    assert not sessions_left(db, before)


def test_gunicorn_post_fork_hook_leaves_the_parent_pool_alone(postgres: Any) -> None:
    # In the process that owns its pools (no fork happened), the hook changes nothing.
    import psycopg2

    from forksafe import PooledDB

    pool = PooledDB(psycopg2, **postgres.kwargs)
    try:
        with pool.connection() as db:
            cur = db.cursor()
            cur.execute("SELECT pg_backend_pid()")
            before = cur.fetchone()[0]
        post_fork(server=None, worker=None)
        with pool.connection() as db:
            cur = db.cursor()
            cur.execute("SELECT pg_backend_pid()")
            assert cur.fetchone()[0] == before
    finally:
        pool.close()
