"""What the integration tests share: the uWSGI binary, real server processes, HTTP load, and
the database server's own view of its sessions. (No tests here.)"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
UWSGI_VERSION = "2.0.31"
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


# --- the uWSGI binary -----------------------------------------------------------------------


def find_uwsgi(bindir: Path | None = None) -> Path:
    """The ``uwsgi`` binary: the venv's (``pip install -e '.[test]'`` installs it), else one
    built once into a shared cache directory, under a file lock so xdist workers build it once.
    Building compiles uWSGI (about two minutes). ``FORKSAFE_TEST_UWSGI`` names another binary."""
    named = os.environ.get("FORKSAFE_TEST_UWSGI")
    if named:
        return Path(named)
    beside = (bindir or Path(sys.executable).parent) / "uwsgi"
    if beside.exists():
        return beside
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forksafe-tests"
    prefix = cache / f"uwsgi-{UWSGI_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    binary = prefix / "bin" / "uwsgi"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / "uwsgi.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not binary.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--ignore-installed",
                    "--no-deps",
                    "--prefix",
                    str(prefix),
                    f"uwsgi=={UWSGI_VERSION}",
                ],
                check=True,
                timeout=900,
            )
    if not binary.exists():
        raise FileNotFoundError(f"pip installed uwsgi {UWSGI_VERSION}, but not at {binary}")
    return binary


def uwsgi_env() -> dict[str, str]:
    """Environment for a test's uWSGI: its Python home is this interpreter's (a binary from
    the cache directory would not find the venv's packages on its own)."""
    return {"UWSGI_HOME": sys.prefix}


@pytest.fixture(scope="session")
def uwsgi_binary() -> Path:
    try:
        return find_uwsgi()
    except (OSError, subprocess.SubprocessError) as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no uwsgi binary and building one failed: {exc}")


# --- server processes -----------------------------------------------------------------------


def _die_with_parent() -> None:
    # Should pytest be killed outright, the server's master dies with it.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Server:
    """A server process (and its process group) started by a test, with its log file."""

    process: subprocess.Popen[bytes]
    log: Path
    base: str

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def get(self, path: str, timeout: float = 10.0) -> Any:
        status, body = http_request("GET", self.base + path, timeout)
        if status != 200:
            raise AssertionError(f"GET {path}: HTTP {status} {body!r}\n{self.log_tail()}")
        return json.loads(body)


def http_request(method: str, url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    assert url.startswith("http://127.0.0.1:"), url
    hostport, _, path = url.removeprefix("http://").partition("/")
    host, _, port = hostport.partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, "/" + path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _answers(base: str, path: str) -> bool:
    try:
        status, _ = http_request("GET", base + path, timeout=2.0)
    except OSError:
        return False
    return status == 200


@contextlib.contextmanager
def running(
    argv: list[str],
    env: dict[str, str],
    log: Path,
    base: str,
    ready_path: str | None = "/master",
    cwd: Path = ROOT,
    start_timeout: float = 60.0,
) -> Iterator[Server]:
    """Start ``argv`` in a process group of its own; wait until ``base + ready_path`` answers.

    On exit (also on failure) SIGTERM the group's leader, wait, then SIGKILL the whole group,
    so no master, worker or pool child outlives the test.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    server = Server(process, log, base)
    try:
        if ready_path is not None:
            ready = wait_until(
                lambda: process.poll() is not None or _answers(base, ready_path),
                start_timeout,
                0.1,
            )
            if not ready or process.poll() is not None:
                raise AssertionError(
                    f"{argv[0]} did not come up (exit {process.poll()}):\n{server.log_tail()}"
                )
        yield server
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    # Whatever is left of the group (workers the master could not reap) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    wait_until(lambda: not _group_alive(process.pid), 10)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- HTTP load ------------------------------------------------------------------------------


@dataclass
class Load:
    """What a burst of ``/session`` requests saw: answers by worker pid, and every failure."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def sessions(self) -> set[int]:
        return {a["session"] for a in self.answers}

    @property
    def pids(self) -> set[int]:
        return {a["pid"] for a in self.answers}

    def sessions_by_pid(self) -> dict[int, set[int]]:
        seen: dict[int, set[int]] = {}
        for a in self.answers:
            seen.setdefault(a["pid"], set()).add(a["session"])
        return seen

    def check(self, forbidden_sessions: set[int] | None = None) -> None:
        """0 errors; each worker pid kept one session; no session served two pids."""
        assert not self.errors, f"{len(self.errors)} errors, e.g. {self.errors[:3]}"
        by_pid = self.sessions_by_pid()
        assert all(len(s) == 1 for s in by_pid.values()), by_pid
        owners: dict[int, int] = {}
        for pid, sessions in by_pid.items():
            for session in sessions:
                assert owners.setdefault(session, pid) == pid, f"session {session} shared"
        assert not self.sessions & (forbidden_sessions or set()), (
            self.sessions,
            forbidden_sessions,
        )


def fire(base: str, count: int = 400, concurrency: int = 32, path: str = "/session") -> Load:
    """``count`` GETs of ``path?token=<uuid>`` from ``concurrency`` threads; checks each echo."""
    load = Load()

    def one(_: int) -> None:
        token = uuid.uuid4().hex
        try:
            status, body = http_request("GET", f"{base}{path}?token={token}", timeout=30)
        except Exception as exc:
            load.errors.append(f"{type(exc).__name__}: {exc}")
            return
        if status != 200:
            load.errors.append(f"HTTP {status}: {body[:200]!r}")
            return
        answer = json.loads(body)
        if answer.get("token") != token:
            load.errors.append(f"sent token {token}, got back {answer.get('token')!r}")
            return
        load.answers.append(answer)

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(count)))
    load.seconds = time.monotonic() - started
    return load


# --- the database server's view -------------------------------------------------------------


def server_sessions(db: Any) -> set[int]:
    """Session ids connected to ``db``'s database, as the server lists them (not our own)."""
    conn = db.connect()
    try:
        cur = conn.cursor()
        if db.kind == "postgres":
            cur.execute(
                "SELECT pid FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        else:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST"
                " WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
            )
        return {int(row[0]) for row in cur.fetchall()}
    finally:
        conn.close()


def sessions_left(db: Any, before: set[int], timeout: float = 15.0) -> set[int]:
    """Wait until every session on ``db``'s database that was not in ``before`` is gone;
    return those still there. (Other tests of this xdist worker share the database, so only
    sessions opened since ``before`` count.)"""
    left: set[int] = set()

    def gone() -> bool:
        nonlocal left
        left = server_sessions(db) - before
        return not left

    wait_until(gone, timeout, 0.1)
    return left
