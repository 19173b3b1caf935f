"""Broker URLs for tests that run against every broker: SQLite, PostgreSQL and MariaDB.

``broker_url(kind, tmp_path, request)`` gives a URL to an empty queue: a new SQLite
file, or the xdist worker's database on the shared server with the queue tables
dropped. ``table_rows(url, sql)`` runs SQL on the queue's database, whatever it is;
``job(id)`` builds a job to submit. A :class:`Relay` stands between a broker and its
server, and ``cut()`` makes the server unreachable through it.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from workers.brokers import NewJob

KINDS = ("sqlite", "postgres", "mysql")
TABLES = ("forksafe_jobs", "forksafe_workers", "forksafe_schema")


def job(job_id: str, **options: object) -> NewJob:
    """A no-op ``add`` job with id ``job_id``; ``options`` override its fields."""
    fields: dict[str, object] = {
        "task": "add",
        "queue": "default",
        "payload": b'{"args":[],"kwargs":{}}',
        "serializer": "json",
    }
    fields.update(options)
    return NewJob(id=job_id, **fields)  # type: ignore[arg-type]


def drop_queue(database: Any) -> None:
    """Drop the queue tables in a harness database (``postgres`` / ``mysql`` fixture)."""
    con = database.connect()
    try:
        cursor = con.cursor()
        for table in TABLES:
            cursor.execute(f"DROP TABLE IF EXISTS {table}")
    finally:
        con.close()


def end_sessions(database: Any) -> None:
    """End every other session on a harness database: the brokers a test built (in this
    process or its fleet) must not outlive it, since later tests count the sessions."""
    con = database.connect()
    try:
        cursor = con.cursor()
        if database.kind == "postgres":
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        else:
            cursor.execute(
                "SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
            )
            for (thread_id,) in cursor.fetchall():
                with contextlib.suppress(Exception):  # gone meanwhile
                    cursor.execute(f"KILL CONNECTION {int(thread_id)}")
    finally:
        con.close()


def fresh_queue(request: pytest.FixtureRequest, database: Any) -> None:
    """Drop the queue tables now, and end the test's sessions when it is over."""
    drop_queue(database)
    request.addfinalizer(lambda: end_sessions(database))


def server_url(database: Any, **options: Any) -> str:
    """The broker URL of a harness database, with broker URL options added."""
    url = str(database.dsn)
    if options:
        extra = "&".join(f"{key}={value}" for key, value in options.items())
        url += ("&" if "?" in url else "?") + extra
    return url


def broker_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL to an empty queue of ``kind``."""
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'queue.db'}"
    database = request.getfixturevalue(kind)
    fresh_queue(request, database)
    return server_url(database)


def table_rows(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) run on the queue's database, committed."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url.split("///", 1)[1]) as con:
            return [tuple(row) for row in con.execute(sql, params)]
    from workers.brokers import create_broker

    broker: Any = create_broker(url)
    con = broker._connect()
    try:
        cursor = con.cursor()
        cursor.execute(sql.replace("?", "%s"), params)
        rows = [
            tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in (cursor.fetchall() if cursor.description else [])
        ]
        con.commit()
        return rows
    finally:
        con.close()


class Relay:
    """A TCP relay from a port of its own on 127.0.0.1 to a harness database's server.

    ``url`` reaches the database through it; :meth:`cut` makes the server unreachable
    there, as if it went away: open connections are closed and new ones refused.
    """

    def __init__(self, database: Any) -> None:
        kwargs = database.kwargs
        host, port = str(kwargs.get("host") or ""), kwargs.get("port")
        if not port or host.startswith("/") or kwargs.get("unix_socket"):
            pytest.skip(f"{database!r} is reached through a Unix socket, not TCP")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        relayed = dict(kwargs, host="127.0.0.1", port=self._listener.getsockname()[1])
        self.url = str(type(database)(database.kind, database.name, relayed, None).dsn)
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                server = socket.create_connection(self._target, timeout=5)
            except OSError:
                return  # cut
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Refuse new connections and close the open ones."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
