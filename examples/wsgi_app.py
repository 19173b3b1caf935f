"""A small WSGI app on a forksafe pool, loaded before the fork: ``uwsgi --ini uwsgi.ini``.

It is written the way that breaks ordinary pools under a prefork server: the pool is built
at import, in the uWSGI master (no ``lazy-apps``), and has already run a query there, so
every worker inherits the master's open connection. forksafe discards that copy in each
worker without a byte to the server, and each worker opens a session of its own.

Environment:
  FORKSAFE_APP_DSN   the database: ``postgresql://user@host:port/db`` or
                     ``mysql://user:password@host:port/db`` (``?unix_socket=`` allowed)
  FORKSAFE_APP_HOOK  ``0`` leaves out ``forksafe.integrations.uwsgi``; the pools' pid
                     check alone then keeps every worker on its own session
  FORKSAFE_BROKER    the workers queue ``POST /jobs`` submits to (sqlite:///forksafe.db)

Routes (all answer JSON):
  GET  /session?token=T  this worker's pid, its database session id (``pg_backend_pid()``
                         or ``CONNECTION_ID()``), T echoed back through the database, and
                         how often the uWSGI postfork hook ran in this worker
  GET  /master           the pid and session id of the process that loaded the app
  POST /jobs?token=T     submit ``echo_session(T)`` to the workers queue; answers the job id
  GET  /jobs/<id>        the job's state and, once done, its result
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlsplit

import psycopg2
import pymysql

from forksafe import PooledDB
from workers import App

if os.environ.get("FORKSAFE_APP_HOOK", "1") != "0":
    import forksafe.integrations.uwsgi  # noqa: F401  (resets pools in each uWSGI worker)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def connect_args(dsn: str) -> tuple[ModuleType, dict[str, Any], str]:
    """The driver, its connect() arguments and the session-id SQL for a database URL."""
    parts = urlsplit(dsn)
    if parts.scheme in {"postgres", "postgresql"}:
        return psycopg2, {"dsn": dsn}, "SELECT pg_backend_pid(), %s"
    if parts.scheme in {"mysql", "mariadb"}:
        kwargs: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or 3306,
            "user": unquote(parts.username or "root"),
            "password": unquote(parts.password or ""),
            "database": unquote(parts.path.lstrip("/")),
            "autocommit": True,
        }
        kwargs.update(parse_qsl(parts.query))
        return pymysql, kwargs, "SELECT CONNECTION_ID(), %s"
    raise ValueError(
        f"FORKSAFE_APP_DSN has scheme {parts.scheme!r}; use postgresql://... or mysql://..."
    )


def _dsn() -> str:
    dsn = os.environ.get("FORKSAFE_APP_DSN")
    if not dsn:
        raise RuntimeError("set FORKSAFE_APP_DSN to a postgresql:// or mysql:// URL")
    return dsn


driver, driver_kwargs, SESSION_SQL = connect_args(_dsn())
pool = PooledDB(driver, maxconnections=4, blocking=True, maxwait=10, **driver_kwargs)


def session_and_echo(token: str) -> tuple[int, str]:
    """One round trip: this process's database session id, and ``token`` read back."""
    with pool.connection() as db:
        cursor = db.cursor()
        cursor.execute(SESSION_SQL, (token,))
        session, echoed = cursor.fetchone()
        cursor.close()
        db.commit()
    return int(session), str(echoed)


# The query in the master, before the fork: its connection stays idle in the pool.
MASTER = {"pid": os.getpid(), "session": session_and_echo("master")[0]}

tasks = App()


@tasks.task
def echo_session(token: str) -> dict[str, Any]:
    session, echoed = session_and_echo(token)
    return {"pid": os.getpid(), "session": session, "token": echoed}


def _json(start_response: StartResponse, body: Any, status: str = "200 OK") -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def application(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO", "")
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if method == "GET" and path == "/session":
        session, echoed = session_and_echo(query.get("token", ""))
        hook = sys.modules.get("forksafe.integrations.uwsgi")
        body = {
            "pid": os.getpid(),
            "session": session,
            "token": echoed,
            "postfork_runs": getattr(hook, "postfork_runs", 0),
        }
        return _json(start_response, body)
    if method == "GET" and path == "/master":
        return _json(start_response, MASTER)
    if method == "POST" and path == "/jobs":
        job = echo_session.delay(query.get("token", ""))
        return _json(start_response, {"job": job.id}, "202 Accepted")
    if method == "GET" and path.startswith("/jobs/"):
        result = tasks.AsyncResult(path.removeprefix("/jobs/"))
        body = {"state": result.state, "result": result.result if result.ready() else None}
        return _json(start_response, body)
    return _json(start_response, {"error": f"no route for {method} {path}"}, "404 Not Found")
