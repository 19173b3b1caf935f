"""multiprocessing needs no integration: forked children get fresh pools from the fork hook;
spawn and forkserver children import the module again and build their own."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import pickle
import time
from typing import Any

import pytest
from test_integration_support import server_sessions

from forksafe import PooledDB

pytestmark = [
    pytest.mark.timeout(120),
    # Each test builds (and closes) its own pool for the same database, on purpose.
    pytest.mark.filterwarnings("ignore::forksafe.ManyPoolsWarning"),
]

SESSION_SQL = {"psycopg2": "SELECT pg_backend_pid()", "pymysql": "SELECT CONNECTION_ID()"}

# Module-level pools, one per target: in a forked child this dict (and each pool's idle
# connection) is the parent's; in a spawned one it starts empty.
POOLS: dict[str, PooledDB] = {}


def pool_for(target: str) -> PooledDB:
    if target not in POOLS:
        driver, kwargs = json.loads(target)
        POOLS[target] = PooledDB(importlib.import_module(driver), maxconnections=2, **kwargs)
    return POOLS[target]


def session_of_this_process(target: str) -> tuple[int, int]:
    """(pid, database session id) through the module-level pool for ``target``."""
    time.sleep(0.01)
    with pool_for(target).connection() as db:
        cursor = db.cursor()
        cursor.execute(SESSION_SQL[json.loads(target)[0]])
        session = int(cursor.fetchone()[0])
        db.commit()
    return os.getpid(), session


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_multiprocessing_children_get_their_own_sessions_without_any_hook(
    kind: str, method: str, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue(kind)
    target = json.dumps(["psycopg2" if kind == "postgres" else "pymysql", db.kwargs])
    parent_pid, parent_session = session_of_this_process(target)  # open before the fork
    try:
        context = multiprocessing.get_context(method)
        with context.Pool(4) as workers:
            answers = workers.map(session_of_this_process, [target] * 40, chunksize=1)
        by_pid: dict[int, set[int]] = {}
        for pid, session in answers:
            by_pid.setdefault(pid, set()).add(session)
        assert parent_pid not in by_pid
        assert all(len(s) == 1 for s in by_pid.values()), by_pid
        sessions = [next(iter(s)) for s in by_pid.values()]
        assert len(set(sessions)) == len(sessions), by_pid
        assert parent_session not in sessions
        # The children are gone (os._exit and garbage collection alike); the parent's
        # session is still the one it had, and still works.
        assert session_of_this_process(target) == (parent_pid, parent_session)
        assert parent_session in server_sessions(db)
    finally:
        POOLS.pop(target).close()


def test_multiprocessing_a_pool_cannot_be_handed_to_a_spawned_child(postgres: Any) -> None:
    import psycopg2

    pool = PooledDB(psycopg2, **postgres.kwargs)
    try:
        with pytest.raises(TypeError):
            pickle.dumps(pool)
    finally:
        pool.close()
