"""Example tasks: ``forksafe run examples/tasks.py`` (see examples/README.md).

The pools below are built at import, in the supervisor, before it forks its
workers. That is the situation that corrupts connections with ordinary pools;
forksafe pools open nothing until first use and never hand a child its parent's
connection, so each worker gets its own.

Environment:
  FORKSAFE_BROKER            the queue (default sqlite:///forksafe.db)
  FORKSAFE_EXAMPLE_DB        the SQLite file the visit counter writes (default examples.db)
  FORKSAFE_EXAMPLE_POSTGRES  a PostgreSQL URL; when set, the pg_backend task is defined
"""

from __future__ import annotations

import os
import sqlite3
import time

from forksafe import PooledDB
from workers import App

app = App()

# A pool made before the fork. Each worker opens (at most two) connections of its own.
sqlite_pool = app.track_pool(
    "sqlite",
    PooledDB(
        sqlite3,
        maxconnections=2,
        database=os.environ.get("FORKSAFE_EXAMPLE_DB", "examples.db"),
        timeout=30,
        check_same_thread=False,
    ),
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task(max_retries=3, retry_backoff=True)
def word_count(text: str) -> int:
    return len(text.split())


@app.task(time_limit=10, soft_time_limit=5)
def slow_square(x: int, seconds: float = 0.2) -> int:
    time.sleep(seconds)
    return x * x


@app.task
def record_visit(page: str) -> int:
    """Count a visit in SQLite through the module-level pool; return the page's count."""
    with sqlite_pool.connection() as db:
        cursor = db.cursor()
        cursor.execute("CREATE TABLE IF NOT EXISTS visits (page TEXT, pid INTEGER)")
        cursor.execute("INSERT INTO visits VALUES (?, ?)", (page, os.getpid()))
        db.commit()
        cursor.execute("SELECT count(*) FROM visits WHERE page = ?", (page,))
        (count,) = cursor.fetchone()
    return int(count)


if os.environ.get("FORKSAFE_EXAMPLE_POSTGRES"):
    import psycopg2

    postgres_pool = app.track_pool(
        "postgres",
        PooledDB(psycopg2, maxconnections=2, dsn=os.environ["FORKSAFE_EXAMPLE_POSTGRES"]),
    )

    @app.task
    def pg_backend() -> dict[str, int]:
        """The PostgreSQL backend serving this worker: a different one in every worker."""
        with postgres_pool.connection() as db:
            cursor = db.cursor()
            cursor.execute("SELECT pg_backend_pid()")
            (backend,) = cursor.fetchone()
        return {"pid": os.getpid(), "backend_pid": backend}
