"""Real PostgreSQL and MariaDB servers for the test suite, as a pytest plugin.

Where a server comes from:

- ``FORKSAFE_TEST_POSTGRES`` / ``FORKSAFE_TEST_MYSQL`` name one to use as it is, as a URL
  (``postgresql://root@127.0.0.1:5432/test``, ``mysql://root@127.0.0.1:3306/test``);
- otherwise a throwaway instance is started in a temporary directory on a free port, from the
  binaries installed here: ``/usr/lib/postgresql/*/bin`` (or ``initdb`` on PATH) and
  ``mariadbd``. ``FORKSAFE_TEST_POSTGRES_BIN`` / ``FORKSAFE_TEST_MARIADB_BIN`` point at another
  installation's bin directory instead.

The servers refuse to run as root, so under root they run as the ``postgres`` / ``mysql``
user. ``initdb`` and ``mariadb-install-db`` are the slow part, so each runs at most once per
session, into a template data directory that every instance of that kind copies.

One shared instance per kind serves the session. Under pytest-xdist the controller starts both
before the workers spawn and hands their details to each worker in ``workerinput``; without
xdist they start on first use. Each worker works in its own database (``test_gw0``,
``test_gw1``, ..., ``test_main`` without xdist), dropped and created afresh on first use.

Fixtures (each yields a :class:`Database`):

``postgres``, ``mysql`` (session)
    this worker's database on the shared server. Its ``.server`` refuses ``stop()``: every
    worker depends on it.
``owned_postgres``, ``owned_mysql`` (module)
    a throwaway server of the module's own (even when a URL is set), whose ``.server`` can
    ``stop()``, ``start()``, ``restart()`` and ``terminate_backends()``.

When no server can be had, the tests that need one are skipped and the run ends with a
summary line naming what was missing; with ``CI=true`` they fail instead. Everything started is
stopped at the end: by fixture teardown, ``pytest_unconfigure``, ``atexit``, a SIGTERM/SIGHUP
handler, and, should the process that started a server be killed outright, by the server
receiving SIGKILL with its parent (``PR_SET_PDEATHSIG``) and by the controller's final sweep.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import glob
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, NoReturn
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pymysql
import pytest

log = logging.getLogger("tests.servers")

KINDS = ("postgres", "mysql")
LABELS = {"postgres": "PostgreSQL", "mysql": "MariaDB"}
URL_VARIABLES = {"postgres": "FORKSAFE_TEST_POSTGRES", "mysql": "FORKSAFE_TEST_MYSQL"}
# Temporary directories carry this prefix, and PostgreSQL's process titles this cluster name,
# so that a leftover server of ours can be told apart from the machine's own.
MARKER = "forksafe-servers"
SUMMARY_PREFIX = "forksafe test servers:"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
TERMINATE_TIMEOUT = 10.0
PR_SET_PDEATHSIG = 1


class ServerUnavailable(Exception):
    """No server of this kind can be had here: no URL is set and no binaries are installed."""


class ServerStartError(RuntimeError):
    """A server could not be prepared, started or reached; the message ends with its log."""


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def _wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        # A zombie is as good as gone: it only waits for its parent to reap it.
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


# --- accounts and processes -----------------------------------------------------------------


def server_account(preferred: str) -> pwd.struct_passwd | None:
    """The account a server runs as: ``None`` (this process's own) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in (preferred, "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise ServerUnavailable(f"running as root, and there is no {preferred!r} or 'nobody' user")


def _hand_over(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is not None:
        os.chown(path, account.pw_uid, account.pw_gid)


def _check_reachable(path: Path, account: pwd.struct_passwd | None) -> None:
    """Raise ServerStartError if ``account`` cannot reach ``path`` (a 0700 TMPDIR, say)."""
    if account is None:
        return
    for directory in path.parents:
        st = directory.stat()
        if st.st_uid == account.pw_uid or st.st_mode & stat.S_IXOTH:
            continue
        if st.st_gid == account.pw_gid and st.st_mode & stat.S_IXGRP:
            continue
        raise ServerStartError(
            f"user {account.pw_name} cannot enter {directory} (mode {st.st_mode & 0o777:o}), "
            f"so it cannot run a server under {path}; chmod o+x it or set TMPDIR elsewhere"
        )


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: should the process that started the server be
    # killed outright, the kernel kills the server too instead of leaving it behind.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _as_account(account: pwd.struct_passwd | None) -> dict[str, Any]:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _run(argv: list[str], account: pwd.struct_passwd | None, tmpdir: Path) -> None:
    """Run a preparation step (initdb, cp) to completion; ServerStartError with its output."""
    env = {**os.environ, "TMPDIR": str(tmpdir), "LC_ALL": "C"}
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        timeout=300,
        check=False,
        **_as_account(account),
    )
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace")[-3000:]
        raise ServerStartError(f"{' '.join(argv)} exited with {done.returncode}:\n{output}")


# --- throwaway servers ----------------------------------------------------------------------


class ThrowawayServer:
    """A server of our own in a directory of our own, which the harness starts and stops.

    ``home`` holds ``data/`` (a copy of the template data directory), ``run/`` (the Unix
    socket), ``tmp/`` and ``server.log``. The first ``start()`` picks a free port; later starts
    reuse it, so clients can reconnect with the same parameters.
    """

    kind: ClassVar[str]
    label: ClassVar[str]
    account_name: ClassVar[str]
    initializer: ClassVar[str]
    stop_signal: ClassVar[signal.Signals]
    _binaries: ClassVar[dict[str, dict[str, str]]] = {}

    def __init__(self, home: Path, template: Path, account: pwd.struct_passwd | None) -> None:
        self.home = home
        self.template = template
        self.account = account
        self.datadir = home / "data"
        self.run_dir = home / "run"
        self.log_path = home / "server.log"
        self.host = "127.0.0.1"
        self.port = 0
        self.version = ""
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state} in {self.home}>"

    # Per kind: where the binaries are, how to make a data directory, how to run and reach it.

    @classmethod
    def find_binaries(cls) -> dict[str, str]:
        raise NotImplementedError

    @classmethod
    def initialize(cls, datadir: Path, account: pwd.struct_passwd | None, tmpdir: Path) -> None:
        raise NotImplementedError

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def admin_kwargs(self) -> dict[str, Any]:
        """Connection parameters for the superuser, without a database."""
        raise NotImplementedError

    def _accepts_connections(self) -> bool:
        raise NotImplementedError

    def _fetch_version(self) -> str:
        raise NotImplementedError

    def terminate_backends(self) -> int:
        """Kill every client session except the one this call uses, and wait until they are
        gone (at most TERMINATE_TIMEOUT seconds). Returns how many were killed."""
        raise NotImplementedError

    @classmethod
    def binaries(cls) -> dict[str, str]:
        """The programs this kind needs, found once; ServerUnavailable names what is missing."""
        if cls.kind not in cls._binaries:
            cls._binaries[cls.kind] = cls.find_binaries()
        return cls._binaries[cls.kind]

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the server and wait until it accepts connections.

        A fresh instance copies the template data directory and picks a free port (and another
        one if that was taken meanwhile). Raises ServerStartError, with the end of the server's
        log, if it exits or is not ready within START_TIMEOUT seconds. Does nothing if running.
        """
        if self.running:
            return
        began = time.monotonic()
        if not self.datadir.exists():
            _run(["cp", "-a", str(self.template), str(self.datadir)], self.account, self.home)
            for directory in (self.run_dir, self.home / "tmp"):
                directory.mkdir()
                _hand_over(directory, self.account)
            self.log_path.touch()  # mariadbd reopens it itself, as its own user
            _hand_over(self.log_path, self.account)
        fixed_port = bool(self.port)
        for _attempt in range(1 if fixed_port else 3):
            if not fixed_port:
                self.port = _free_port()
            if self._launch():
                break
            if fixed_port or "already in use" not in _tail(self.log_path).lower():
                raise ServerStartError(
                    f"{self.label} in {self.home} exited while starting; its log ends:\n"
                    f"{_tail(self.log_path)}"
                )
        else:
            raise ServerStartError(f"{self.label} found no free port; log:\n{_tail(self.log_path)}")
        self.version = self._fetch_version()
        self.startup_seconds = time.monotonic() - began
        log.info("%s %s ready on %s:%d", self.label, self.version, self.host, self.port)

    def _launch(self) -> bool:
        """Start the process and poll until it answers: True; False if it exited meanwhile."""
        with self.log_path.open("ab") as server_log:
            self._process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=server_log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TMPDIR": str(self.home / "tmp"), "LC_ALL": "C"},
                # Its own session: a Ctrl-C in the terminal reaches pytest, which stops it.
                start_new_session=True,
                # The death signal follows the *thread* that forked, so only the main one.
                preexec_fn=(
                    _die_with_parent
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
                **_as_account(self.account),
            )
        (self.home / "launched.pid").write_text(str(self._process.pid))
        process = self._process
        if _wait_until(
            lambda: process.poll() is not None or self._accepts_connections(),
            START_TIMEOUT,
            interval=0.02,
        ):
            return process.poll() is None
        self.stop()
        raise ServerStartError(
            f"{self.label} in {self.home} did not accept connections within {START_TIMEOUT:.0f} s;"
            f" its log ends:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Shut the server down and wait for it to exit; its clients get an error on their next
        use. Kills it if it takes longer than STOP_TIMEOUT seconds. Does nothing if stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(self.stop_signal)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s in %s ignored %s; killing it", self.label, self.home, self.stop_signal.name
                )
                process.kill()
                process.wait()
        with contextlib.suppress(FileNotFoundError):
            (self.home / "launched.pid").unlink()

    def restart(self) -> None:
        """Stop the server and start it again on the same port: sessions opened before get an
        error, new ones connect as before."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


class PostgresServer(ThrowawayServer):
    kind = "postgres"
    label = "PostgreSQL"
    account_name = "postgres"
    initializer = "initdb"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint, exit
    superuser = "postgres"

    @classmethod
    def find_binaries(cls) -> dict[str, str]:
        chosen = os.environ.get("FORKSAFE_TEST_POSTGRES_BIN")
        if chosen:
            candidates = [chosen]
        else:
            found = glob.glob("/usr/lib/postgresql/*/bin")
            found.sort(key=lambda d: [int(n) for n in re.findall(r"\d+", d)], reverse=True)
            on_path = shutil.which("initdb")
            candidates = found + ([str(Path(on_path).parent)] if on_path else [])
        for bindir in candidates:
            programs = {name: str(Path(bindir) / name) for name in ("initdb", "postgres")}
            if all(os.access(path, os.X_OK) for path in programs.values()):
                return programs
        where = chosen or "/usr/lib/postgresql/*/bin or on PATH"
        raise ServerUnavailable(f"no initdb and postgres in {where} (Debian package: postgresql)")

    @classmethod
    def initialize(cls, datadir: Path, account: pwd.struct_passwd | None, tmpdir: Path) -> None:
        _run(
            [
                cls.binaries()["initdb"],
                "--pgdata",
                str(datadir),
                "--username",
                cls.superuser,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            account,
            tmpdir,
        )

    def _argv(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": str(self.run_dir),
            "cluster_name": MARKER,
            "max_connections": "300",
            "shared_buffers": "32MB",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        argv = [self.binaries()["postgres"], "-D", str(self.datadir), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def admin_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.superuser}

    def _connect_admin(self, timeout: int = 5) -> Any:
        conn = psycopg2.connect(**self.admin_kwargs(), dbname="postgres", connect_timeout=timeout)
        conn.autocommit = True
        return conn

    def _accepts_connections(self) -> bool:
        try:
            self._connect_admin(timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def _fetch_version(self) -> str:
        conn = self._connect_admin()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                return str(cur.fetchone()[0])
        finally:
            conn.close()

    def terminate_backends(self) -> int:
        """Kill every client session except the one this call uses (``pg_terminate_backend``),
        and wait until they are gone (at most TERMINATE_TIMEOUT seconds). Returns how many."""
        conn = self._connect_admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pid FROM pg_stat_activity"
                    " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
                )
                pids = [row[0] for row in cur.fetchall()]
                for pid in pids:
                    cur.execute("SELECT pg_terminate_backend(%s)", (pid,))

                def gone() -> bool:
                    cur.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)
                    )
                    return bool(cur.fetchone()[0] == 0)

                if not _wait_until(gone, TERMINATE_TIMEOUT):
                    raise RuntimeError(f"PostgreSQL backends {pids} outlived pg_terminate_backend")
        finally:
            conn.close()
        return len(pids)


class MysqlServer(ThrowawayServer):
    kind = "mysql"
    label = "MariaDB"
    account_name = "mysql"
    initializer = "mariadb-install-db"
    stop_signal = signal.SIGTERM  # normal shutdown: kill client threads, flush, exit
    superuser = "root"
    # Shared by mariadb-install-db and mariadbd, so the data directory fits the server.
    options = (
        "--no-defaults",
        "--skip-log-bin",
        "--skip-name-resolve",
        "--character-set-server=utf8mb4",
        "--collation-server=utf8mb4_unicode_ci",
        "--innodb-buffer-pool-size=32M",
        "--innodb-log-file-size=16M",
        "--innodb-flush-log-at-trx-commit=0",
        "--innodb-doublewrite=0",
    )

    @classmethod
    def find_binaries(cls) -> dict[str, str]:
        chosen = os.environ.get("FORKSAFE_TEST_MARIADB_BIN")
        path = chosen or os.pathsep.join(
            [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/libexec"]
        )
        server = shutil.which("mariadbd", path=path)
        install = shutil.which("mariadb-install-db", path=path) or shutil.which(
            "mysql_install_db", path=path
        )
        if server and install:
            return {"mariadbd": server, "install-db": install}
        missing = " and ".join(
            name
            for name, found in (("mariadbd", server), ("mariadb-install-db", install))
            if not found
        )
        where = chosen or "PATH, /usr/sbin, /usr/local/sbin or /usr/libexec"
        raise ServerUnavailable(f"no {missing} in {where} (Debian package: mariadb-server)")

    @classmethod
    def initialize(cls, datadir: Path, account: pwd.struct_passwd | None, tmpdir: Path) -> None:
        _run(
            [
                cls.binaries()["install-db"],
                *cls.options,
                f"--datadir={datadir}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ],
            account,
            tmpdir,
        )

    @property
    def unix_socket(self) -> Path:
        return self.run_dir / "mysqld.sock"

    def _argv(self) -> list[str]:
        return [
            self.binaries()["mariadbd"],
            *self.options,
            f"--datadir={self.datadir}",
            f"--socket={self.unix_socket}",
            f"--pid-file={self.run_dir / 'mariadbd.pid'}",
            f"--tmpdir={self.home / 'tmp'}",
            f"--log-error={self.log_path}",
            f"--bind-address={self.host}",
            f"--port={self.port}",
            "--max-connections=500",
        ]

    def admin_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.superuser, "password": ""}

    def _connect_admin(self, timeout: int = 5) -> Any:
        return pymysql.connect(**self.admin_kwargs(), connect_timeout=timeout, autocommit=True)

    def _accepts_connections(self) -> bool:
        try:
            self._connect_admin(timeout=2).close()
        except pymysql.err.OperationalError:
            return False
        return True

    def _fetch_version(self) -> str:
        conn = self._connect_admin()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                return str(cur.fetchone()[0])
        finally:
            conn.close()

    def terminate_backends(self) -> int:
        """Kill every client session except the one this call uses (``KILL CONNECTION``), and
        wait until they are gone (at most TERMINATE_TIMEOUT seconds). Returns how many."""
        conn = self._connect_admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
                    " AND COMMAND <> 'Daemon' AND USER NOT IN ('system user', 'event_scheduler')"
                )
                ids = [row[0] for row in cur.fetchall()]
                for thread_id in ids:
                    with contextlib.suppress(
                        pymysql.err.OperationalError, pymysql.err.InternalError
                    ):
                        cur.execute(f"KILL CONNECTION {int(thread_id)}")

                def gone() -> bool:
                    if not ids:
                        return True
                    marks = ", ".join(["%s"] * len(ids))
                    cur.execute(
                        "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                        f" WHERE ID IN ({marks})",
                        ids,
                    )
                    return bool(cur.fetchone()[0] == 0)

                if not _wait_until(gone, TERMINATE_TIMEOUT):
                    raise RuntimeError(f"MariaDB connections {ids} outlived KILL CONNECTION")
        finally:
            conn.close()
        return len(ids)


SERVER_CLASSES: dict[str, type[ThrowawayServer]] = {
    "postgres": PostgresServer,
    "mysql": MysqlServer,
}


# --- what tests get -------------------------------------------------------------------------


class SharedServer:
    """The session's shared server, as tests see it: every worker uses it, so it is not theirs
    to stop (use ``owned_postgres`` / ``owned_mysql`` for that)."""

    def __init__(self, kind: str, info: dict[str, Any]) -> None:
        self.kind = kind
        self.label = LABELS[kind]
        self.source: str = info["source"]  # "throwaway" or "external"
        self.version: str = info["version"]
        self.host: str | None = info["admin"].get("host")
        self.port: int | None = info["admin"].get("port")

    def __repr__(self) -> str:
        return f"<SharedServer {self.label} {self.version} ({self.source}) {self.host}:{self.port}>"

    def stop(self) -> None:
        """Always raises: stopping the shared server would break every other test."""
        fixture = f"owned_{self.kind}"
        raise RuntimeError(
            f"the shared {self.label} server serves every test in the session; "
            f"use the {fixture} fixture for a server a test may stop"
        )


class Database:
    """One worker's database on a server: everything a test needs to reach it.

    ``kwargs`` (a fresh dict on every access) suit ``psycopg2.connect`` and ``psycopg.connect``
    (host, port, user, dbname) or ``pymysql.connect`` (host, port, user, password, database);
    ``dsn`` is the same as a ``postgresql://`` or ``mysql://`` URL; ``connect()`` opens a new
    autocommit connection (psycopg2 or PyMySQL) for looking at the server's side of things.
    """

    def __init__(self, kind: str, name: str, kwargs: dict[str, Any], server: Any) -> None:
        self.kind = kind
        self.name = name
        self.server = server
        self._kwargs = kwargs

    def __repr__(self) -> str:
        return f"<Database {self.kind} {self.name!r} on {self.server!r}>"

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self._kwargs)

    @property
    def dsn(self) -> str:
        params = dict(self._kwargs)
        scheme = "postgresql" if self.kind == "postgres" else "mysql"
        user = quote(str(params.pop("user", "")), safe="")
        password = params.pop("password", None)
        credentials = f"{user}:{quote(str(password), safe='')}" if password else user
        host = str(params.pop("host", ""))
        port = params.pop("port", None)
        name = params.pop("dbname" if self.kind == "postgres" else "database")
        if host.startswith("/"):  # a Unix socket directory goes in the query
            params.update(host=host, port=port)
            host, port = "", None
        netloc = f"{credentials}@{host}" + (f":{port}" if port else "")
        query = urlencode({k: v for k, v in params.items() if v is not None})
        return f"{scheme}://{netloc}/{quote(name, safe='')}" + (f"?{query}" if query else "")

    def connect(self) -> Any:
        if self.kind == "postgres":
            conn = psycopg2.connect(**self._kwargs)
            conn.autocommit = True
            return conn
        return pymysql.connect(**self._kwargs, autocommit=True)


def parse_url(kind: str, url: str) -> dict[str, Any]:
    """Admin connection parameters from a FORKSAFE_TEST_* URL (its database is where the
    harness connects to create the workers' databases)."""
    variable = URL_VARIABLES[kind]
    if kind == "postgres":
        try:
            params: dict[str, Any] = psycopg2.extensions.parse_dsn(url)
        except psycopg2.ProgrammingError as exc:
            raise pytest.UsageError(f"{variable} is not a libpq URL: {exc}") from None
        if "port" in params:
            params["port"] = int(params["port"])
        params.setdefault("dbname", "postgres")
        return params
    parts = urlsplit(url)
    if parts.scheme not in {"mysql", "mariadb"}:
        raise pytest.UsageError(f"{variable} must look like mysql://user[:password]@host:port/db")
    params = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 3306,
        "user": unquote(parts.username or "root"),
        "password": unquote(parts.password or ""),
    }
    for name, value in parse_qsl(parts.query):
        if name not in {"unix_socket", "charset"}:
            raise pytest.UsageError(f"{variable}: unsupported parameter {name!r}")
        params[name] = value
    return params


def create_database(kind: str, admin: dict[str, Any], name: str) -> dict[str, Any]:
    """Drop ``name`` if it exists and create it afresh; return the kwargs that reach it."""
    if kind == "postgres":
        conn = psycopg2.connect(**admin, connect_timeout=10)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cur.execute(f'CREATE DATABASE "{name}"')
        except psycopg2.errors.ObjectInUse as exc:
            raise ServerStartError(
                f"database {name} is in use, by another test run against the same server? {exc}"
            ) from None
        finally:
            conn.close()
        return {**{k: v for k, v in admin.items() if k != "dbname"}, "dbname": name}
    conn = pymysql.connect(**admin, connect_timeout=10, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION lock_wait_timeout = 10")
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        conn.close()
    return {**admin, "database": name}


# --- this process's side of the harness -----------------------------------------------------


class Supply:
    """What this pytest process knows about the servers and what it has started.

    The controller (or the lone process without xdist) owns the workspace directory and the
    shared servers; workers get their details in ``workerinput`` and start only the owned
    servers their modules ask for. Whoever started a server stops it.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        workerinput = getattr(config, "workerinput", None)
        self.is_worker = workerinput is not None
        self.worker = workerinput["workerid"] if workerinput else "main"
        self.shared: dict[str, dict[str, Any]] = {}
        self.workspace: Path | None = None
        self.owns_workspace = False
        self.started: list[ThrowawayServer] = []
        self.template_seconds: dict[str, float] = {}
        self.databases: dict[str, Database] = {}
        self.owned_startups: list[tuple[str, float]] = []
        self._cleaned = False
        self._lock = threading.RLock()
        self._pid = os.getpid()
        if workerinput is not None:
            handed = json.loads(workerinput["forksafe_servers"])
            self.workspace = Path(handed["workspace"])
            self.shared = handed["shared"]

    # Workspace and templates.

    def ensure_workspace(self) -> Path:
        """The session's directory for templates and servers, made on first use."""
        with self._lock:
            return self._ensure_workspace()

    def _ensure_workspace(self) -> Path:
        if self.workspace is None:
            base = tempfile.gettempdir()
            if len(base) > 40:  # a Unix socket path must stay under 108 bytes
                base = "/tmp"
            self.workspace = Path(tempfile.mkdtemp(prefix=f"{MARKER}-", dir=base))
            self.workspace.chmod(0o755)
            (self.workspace / "owner.pid").write_text(str(os.getpid()))
            (self.workspace / "templates").mkdir(mode=0o755)
            self.owns_workspace = True
        return self.workspace

    def template(self, kind: str) -> Path:
        """The template data directory for ``kind``, made by whichever process asks first."""
        cls = SERVER_CLASSES[kind]
        account = server_account(cls.account_name)
        templates = self.ensure_workspace() / "templates"
        _check_reachable(templates, account)
        final = templates / kind
        if final.exists():
            return final / "data"
        with (templates / f"{kind}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not final.exists():
                began = time.monotonic()
                partial = templates / f"{kind}.partial-{os.getpid()}"
                partial.mkdir()
                _hand_over(partial, account)
                cls.initialize(partial / "data", account, partial)
                partial.rename(final)
                self.template_seconds[kind] = time.monotonic() - began
        return final / "data"

    def throwaway(self, kind: str) -> ThrowawayServer:
        """A new, started throwaway server. ServerUnavailable if there are no binaries."""
        cls = SERVER_CLASSES[kind]
        cls.binaries()
        account = server_account(cls.account_name)
        template = self.template(kind)
        home = Path(tempfile.mkdtemp(prefix=f"{kind}-{self.worker}-", dir=self.ensure_workspace()))
        home.chmod(0o755)
        _hand_over(home, account)
        server = cls(home, template, account)
        with self._lock:
            self.started.append(server)
        try:
            server.start()
        except BaseException:
            server.destroy()
            raise
        return server

    # Shared servers.

    def provide(self, kind: str) -> dict[str, Any]:
        """The shared server's details, starting it if this process is the one to."""
        if kind in self.shared:
            return self.shared[kind]
        if self.is_worker:
            return {"status": "error", "reason": "the xdist controller sent no server details"}
        url = os.environ.get(URL_VARIABLES[kind])
        info: dict[str, Any]
        try:
            if url:
                admin = parse_url(kind, url)
                info = {
                    "status": "ok",
                    "source": "external",
                    "admin": admin,
                    "version": self._external_version(kind, admin),
                }
            else:
                server = self.throwaway(kind)
                admin = server.admin_kwargs()
                if kind == "postgres":
                    admin["dbname"] = "postgres"
                info = {
                    "status": "ok",
                    "source": "throwaway",
                    "admin": admin,
                    "version": server.version,
                    "home": str(server.home),
                    "startup": server.startup_seconds,
                }
        except ServerUnavailable as exc:
            info = {"status": "unavailable", "reason": str(exc)}
        except (ServerStartError, psycopg2.Error, pymysql.err.MySQLError, OSError) as exc:
            where = f"{URL_VARIABLES[kind]} is set but" if url else "a throwaway server"
            info = {"status": "error", "reason": f"{where} failed: {exc}"}
        self.shared[kind] = info
        return info

    @staticmethod
    def _external_version(kind: str, admin: dict[str, Any]) -> str:
        if kind == "postgres":
            pg = psycopg2.connect(**admin, connect_timeout=10)
            try:
                return str(pg.info.parameter_status("server_version"))
            finally:
                pg.close()
        my = pymysql.connect(**admin, connect_timeout=10)
        try:
            with my.cursor() as cur:  # not get_server_info(): that has a "5.5.5-" prefix
                cur.execute("SELECT VERSION()")
                return str(cur.fetchone()[0])
        finally:
            my.close()

    def provide_all(self) -> None:
        """Start both shared servers at once (the xdist controller, before workers spawn).
        initdb and mariadb-install-db, the slow part, run side by side."""
        wanted = [kind for kind in KINDS if not os.environ.get(URL_VARIABLES[kind])]

        def prepare(kind: str) -> None:
            with contextlib.suppress(Exception):  # provide() reports it properly below
                SERVER_CLASSES[kind].binaries()
                self.template(kind)

        self.ensure_workspace()
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(prepare, wanted))
        for kind in KINDS:
            self.provide(kind)

    def export(self) -> str:
        return json.dumps({"workspace": str(self.ensure_workspace()), "shared": self.shared})

    def database(self, kind: str) -> Database:
        """This worker's database on the shared server, created afresh on first use."""
        if kind not in self.databases:
            info = self.provide(kind)
            if info["status"] == "unavailable":
                self.missing(kind, info["reason"])
            if info["status"] != "ok":
                raise ServerStartError(f"{LABELS[kind]}: {info['reason']}")
            name = f"test_{self.worker}"
            kwargs = create_database(kind, info["admin"], name)
            self.databases[kind] = Database(kind, name, kwargs, SharedServer(kind, info))
        return self.databases[kind]

    def missing(self, kind: str, reason: str) -> NoReturn:
        """Skip the test (fail it under CI=true): no server of this kind can be had."""
        message = f"{SUMMARY_PREFIX} no {LABELS[kind]}: {reason}"
        if in_ci():
            pytest.fail(f"{message} (CI=true, so a missing server fails the run)", pytrace=False)
        pytest.skip(message)

    @contextlib.contextmanager
    def owned(self, kind: str) -> Iterator[Database]:
        try:
            server = self.throwaway(kind)
        except ServerUnavailable as exc:
            self.missing(kind, str(exc))
        self.owned_startups.append((kind, server.startup_seconds))
        workeroutput = getattr(self.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput["forksafe_owned"] = self.owned_startups
        try:
            admin = server.admin_kwargs()
            if kind == "postgres":
                admin["dbname"] = "postgres"
            name = f"test_{self.worker}"
            yield Database(kind, name, create_database(kind, admin, name), server)
        finally:
            server.destroy()
            with self._lock:
                self.started.remove(server)

    # Cleaning up.

    def cleanup(self) -> None:
        """Stop what this process started; the workspace owner also kills whatever a worker
        left running in it and removes it. Safe to call more than once, and a no-op in a
        child forked by a test: its atexit handlers must not stop the session's servers."""
        if self._cleaned or os.getpid() != self._pid:
            return
        self._cleaned = True
        with self._lock:
            servers = list(self.started)
        for server in servers:
            try:
                server.destroy()
            except Exception:
                log.exception("could not stop %r", server)
        if self.owns_workspace and self.workspace is not None:
            sweep(self.workspace)
            shutil.rmtree(self.workspace, ignore_errors=True)


def sweep(workspace: Path) -> None:
    """Kill every server still running from ``workspace`` (its process was recorded in
    ``launched.pid`` and its command line names the directory)."""
    victims = []
    for record in workspace.glob("*/launched.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(record.read_text())
            if str(record.parent) in _cmdline(pid):
                victims.append(pid)
                log.warning("killing leftover server %d from %s", pid, record.parent)
                os.kill(pid, signal.SIGKILL)
    _wait_until(lambda: not any(_pid_alive(pid) for pid in victims), STOP_TIMEOUT)


def sweep_stale_workspaces() -> None:
    """Remove workspaces of ours whose owning pytest died without cleaning up."""
    pattern = os.path.join(glob.escape(tempfile.gettempdir()), f"{MARKER}-*")
    for path in {*glob.glob(pattern), *glob.glob(f"/tmp/{MARKER}-*")}:
        workspace = Path(path)
        try:
            if workspace.stat().st_uid != os.geteuid():
                continue
            owner = int((workspace / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(owner):
            sweep(workspace)
            shutil.rmtree(workspace, ignore_errors=True)


# --- hooks ----------------------------------------------------------------------------------

supply_key = pytest.StashKey[Supply]()


def _supply(config: pytest.Config) -> Supply:
    return config.stash[supply_key]


def pytest_configure(config: pytest.Config) -> None:
    for kind in KINDS:
        config.addinivalue_line("markers", f"{kind}: needs a {LABELS[kind]} server")
    supply = Supply(config)
    config.stash[supply_key] = supply
    atexit.register(supply.cleanup)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                handler = _cleanup_then_die(supply)
                signal.signal(signum, handler)
                _our_handlers[signum] = handler
        if not _our_handlers_reset_at_fork:
            os.register_at_fork(after_in_child=_restore_default_handlers)
            _our_handlers_reset_at_fork.append(True)
    if not supply.is_worker:
        sweep_stale_workspaces()


_our_handlers: dict[int, Callable[[int, Any], None]] = {}
_our_handlers_reset_at_fork: list[bool] = []


def _cleanup_then_die(supply: Supply) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        supply.cleanup()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    return handler


def _restore_default_handlers() -> None:
    # A child forked by a test must die of SIGTERM as usual, even while stuck in C code where
    # no Python handler can run: multiprocessing's Pool.terminate(), for one, counts on it.
    for signum, handler in _our_handlers.items():
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is handler:
                signal.signal(signum, signal.SIG_DFL)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    # xdist's own sessionstart (trylast) spawns the workers; they need the servers by then.
    if config.pluginmanager.getplugin("dsession") is not None:
        _supply(config).provide_all()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    node.workerinput["forksafe_servers"] = _supply(node.config).export()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    owned = getattr(node, "workeroutput", {}).get("forksafe_owned", [])
    _supply(node.config).owned_startups.extend((kind, seconds) for kind, seconds in owned)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in KINDS:
            if {kind, f"owned_{kind}"} & set(getattr(item, "fixturenames", ())):
                item.add_marker(getattr(pytest.mark, kind))


# Tests skipped (or, under CI=true, failed) for want of a server, by kind. The report hook
# has no config at hand, hence a module-level tally.
_missed: Counter[str] = Counter()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not (report.skipped or report.failed) or report.longrepr is None:
        return
    text = str(report.longrepr[2] if isinstance(report.longrepr, tuple | list) else report.longrepr)
    if SUMMARY_PREFIX in text:
        for kind in KINDS:
            if f"no {LABELS[kind]}:" in text:
                _missed[kind] += 1


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    supply = _supply(config)
    write = terminalreporter.write_line
    for kind in KINDS:
        info = supply.shared.get(kind)
        if info is None:
            continue
        label = LABELS[kind]
        if info["status"] == "ok":
            where = f"{info['admin'].get('host')}:{info['admin'].get('port')}"
            line = f"{SUMMARY_PREFIX} {label} {info['version']} ({info['source']}) at {where}"
            if info["source"] == "throwaway":
                line += f", ready in {info['startup']:.2f} s"
                if kind in supply.template_seconds:
                    initializer = SERVER_CLASSES[kind].initializer
                    line += f" after {initializer} took {supply.template_seconds[kind]:.2f} s"
            write(line)
        elif info["status"] == "unavailable":
            outcome = "FAILED (CI=true)" if in_ci() else "SKIPPED"
            terminalreporter.write_sep(
                "!",
                f"{SUMMARY_PREFIX} {_missed[kind]} test(s) {outcome} for want of {label}: "
                f"{info['reason']}",
                red=in_ci(),
                yellow=not in_ci(),
                bold=True,
            )
        else:
            terminalreporter.write_sep(
                "!", f"{SUMMARY_PREFIX} {label}: {info['reason']}", red=True, bold=True
            )
    if supply.owned_startups:
        parts = []
        for kind in KINDS:
            times = [seconds for k, seconds in supply.owned_startups if k == kind]
            if times:
                mean = sum(times) / len(times)
                parts.append(f"{len(times)} {LABELS[kind]} (ready in {mean:.2f} s on average)")
        write(f"{SUMMARY_PREFIX} owned servers started: {', '.join(parts)}")


def pytest_unconfigure(config: pytest.Config) -> None:
    supply = config.stash.get(supply_key, None)
    if supply is not None:
        supply.cleanup()


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres(pytestconfig: pytest.Config) -> Database:
    """This worker's database (``test_gw0``, ... or ``test_main``) on the shared PostgreSQL."""
    return _supply(pytestconfig).database("postgres")


@pytest.fixture(scope="session")
def mysql(pytestconfig: pytest.Config) -> Database:
    """This worker's database (``test_gw0``, ... or ``test_main``) on the shared MariaDB."""
    return _supply(pytestconfig).database("mysql")


@pytest.fixture(scope="module")
def owned_postgres(pytestconfig: pytest.Config) -> Iterator[Database]:
    """A throwaway PostgreSQL for this module alone; ``.server`` can be stopped, restarted and
    stripped of its sessions. Destroyed after the module."""
    with _supply(pytestconfig).owned("postgres") as database:
        yield database


@pytest.fixture(scope="module")
def owned_mysql(pytestconfig: pytest.Config) -> Iterator[Database]:
    """A throwaway MariaDB for this module alone; ``.server`` can be stopped, restarted and
    stripped of its sessions. Destroyed after the module."""
    with _supply(pytestconfig).owned("mysql") as database:
        yield database
