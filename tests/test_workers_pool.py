"""A forksafe pool defined at import in the tasks module: every worker has its own connections."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_workers_harness import load_tasks, wait_until, write_tasks

pytest_plugins = ["test_workers_harness"]  # the run_workers fixture

SQLITE_TASKS = """
import os, sqlite3, time
from forksafe import PooledDB

class Tagged(sqlite3.Connection):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.opened_by = os.getpid()

pool = app.track_pool("data", PooledDB(
    sqlite3, maxconnections=2, database=DATA, factory=Tagged, check_same_thread=False))

with pool.connection() as db:  # used in the supervisor, before the fork
    db.cursor().execute("CREATE TABLE IF NOT EXISTS t (pid INTEGER)")
    db.commit()

@app.task
def who(pause):
    time.sleep(pause)
    with pool.connection() as db:
        cursor = db.cursor()
        cursor.execute("INSERT INTO t VALUES (?)", (os.getpid(),))
        db.commit()
        return [os.getpid(), cursor.connection.opened_by]
"""

POSTGRES_TASKS = """
import os, time
import psycopg2
from forksafe import PooledDB

pool = app.track_pool("pg", PooledDB(psycopg2, maxconnections=2, dsn=DSN))
with pool.connection() as db:  # a session of the supervisor's, opened before the fork
    cursor = db.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    SUPERVISOR_BACKEND = cursor.fetchone()[0]
    db.commit()

@app.task
def backend(pause):
    time.sleep(pause)
    with pool.connection() as db:
        cursor = db.cursor()
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
        db.commit()
    return [os.getpid(), pid, SUPERVISOR_BACKEND]
"""


def spread(tasks: Any, task_name: str, workers: list[int]) -> list[list[int]]:
    """Submit slow jobs until every worker has run at least one; return their results."""
    results = [getattr(tasks, task_name).delay(0.3) for _ in range(len(workers) * 3)]
    values = [r.get(timeout=30) for r in results]
    assert {v[0] for v in values} == set(workers), values
    return values


@pytest.mark.timeout(90)
def test_sqlite_pool_built_before_the_fork_gives_each_worker_its_own_connection(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    path = write_tasks(tmp_path, f"DATA = {str(tmp_path / 'data.db')!r}\n" + SQLITE_TASKS)
    tasks = load_tasks(path)
    run = run_workers(path, "--workers", "3", "--prefetch", "1")
    workers = run.wait_for_workers(3)
    values = spread(tasks, "who", workers)
    for worker_pid, opened_by in values:
        assert opened_by == worker_pid  # never the supervisor's (or a sibling's) connection
    assert run.pid not in {opened_by for _, opened_by in values}


@pytest.mark.timeout(120)
def test_postgres_pool_built_before_the_fork_gives_each_worker_its_own_session(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers, request: pytest.FixtureRequest
) -> None:
    try:
        postgres = request.getfixturevalue("postgres")
    except pytest.FixtureLookupError:
        pytest.skip("no postgres fixture in this test harness")
    path = write_tasks(tmp_path, f"DSN = {postgres.dsn!r}\n" + POSTGRES_TASKS)
    tasks = load_tasks(path)
    run = run_workers(path, "--workers", "3", "--prefetch", "1")
    workers = run.wait_for_workers(3)
    values = spread(tasks, "backend", workers)
    by_worker: dict[int, set[int]] = {}
    for worker_pid, backend, _ in values:
        by_worker.setdefault(worker_pid, set()).add(backend)
    supervisor_backend = values[0][2]
    backends = [b for found in by_worker.values() for b in found]
    assert len(backends) == len(set(backends))  # no two workers share a session
    assert supervisor_backend not in backends

    # From the server's side: every session is alive, each with its own client socket,
    # and the supervisor's session survived its children.
    server = postgres.connect()
    try:
        cursor = server.cursor()

        def sessions() -> dict[int, Any] | None:
            cursor.execute(
                "SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database()"
            )
            found = dict(cursor.fetchall())
            wanted = {supervisor_backend, *backends}
            return found if wanted <= set(found) else None

        found = wait_until(sessions, 10, "the worker and supervisor sessions")
        ports = [found[b] for b in [supervisor_backend, *backends]]
        assert len(set(ports)) == len(ports)
    finally:
        server.close()
