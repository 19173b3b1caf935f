"""Shared helpers for the workers tests: tasks files, `forksafe run` processes, polling.

Imported by the other ``test_workers_*`` modules; its own tests check the helpers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokers import KINDS as BROKER_KINDS
from brokers import broker_url, table_rows

FORKSAFE = [sys.executable, "-m", "workers.cli"]


def wait_until(
    predicate: Callable[[], Any], timeout: float = 20.0, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {message}")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


_queue: dict[str, str] = {}


def queue_url(tmp_path: Path) -> str:
    """The broker URL of this test's queue: the ``any_broker`` one, else SQLite in tmp_path."""
    return _queue.get("url") or f"sqlite:///{tmp_path / 'queue.db'}"


def queue_rows(tmp_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (``?`` placeholders) run on this test's queue database, committed."""
    return table_rows(queue_url(tmp_path), sql, params)


@pytest.fixture(params=BROKER_KINDS)
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Run the test once per broker (SQLite, PostgreSQL, MariaDB): ``write_tasks``,
    ``queue_url`` and ``queue_rows`` use that broker's empty queue."""
    _queue["url"] = broker_url(request.param, tmp_path, request)
    try:
        yield _queue["url"]
    finally:
        _queue.clear()


def write_tasks(tmp_path: Path, body: str, name: str = "tasks.py") -> Path:
    """A tasks module whose App uses this test's queue (see ``queue_url``)."""
    path = tmp_path / name
    header = f"from workers import App\napp = App({queue_url(tmp_path)!r})\n"
    path.write_text(header + textwrap.dedent(body))
    return path


def load_tasks(path: Path) -> Any:
    """Import a tasks file in this (test) process, freshly, to submit jobs through it."""
    from workers.loader import load_app

    _, module = load_app(str(path), reload=True)
    return module


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def process_state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (``Z`` for a zombie), or ``None`` if gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state != "Z"


class Run:
    """A ``forksafe run`` subprocess whose log goes to a file the test can read."""

    def __init__(
        self, tmp_path: Path, target: Path | str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        self.log_path = tmp_path / f"run-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.process = subprocess.Popen(
            [*FORKSAFE, "run", str(target), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=tmp_path,
            start_new_session=True,
        )
        self.pid = self.process.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return sorted(pid for pid in children_of(self.pid) if alive(pid))

    def wait_for_workers(self, count: int, timeout: float = 20.0) -> list[int]:
        def exactly() -> list[int] | None:
            pids = self.workers()
            return pids if len(pids) == count else None

        return list(wait_until(exactly, timeout, f"{count} workers; log:\n{self.log}"))

    def wait_for_log(self, text: str, timeout: float = 20.0) -> None:
        wait_until(lambda: text in self.log, timeout, f"{text!r} in the log:\n{self.log}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"forksafe run did not exit within {timeout} s; log:\n{self.log}")

    def stop(self) -> None:
        """Kill the whole process group (orphaned workers too) and wait until it is gone,
        so that no session of it outlives the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.wait(10)
        deadline = time.monotonic() + 10
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._log.close()


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids in process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


@pytest.fixture
def run_workers(tmp_path: Path) -> Iterator[Callable[..., Run]]:
    """Start ``forksafe run`` processes; each is killed (whole group) after the test."""
    runs: list[Run] = []

    def start(target: Path | str, *args: str, env: dict[str, str] | None = None) -> Run:
        run = Run(tmp_path, target, *args, env=env)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop()


def burst(tmp_path: Path, target: Path, *args: str, timeout: float = 60.0) -> str:
    """Run ``forksafe run TARGET --burst``; return its log, failing the test on exit != 0."""
    result = subprocess.run(
        [*FORKSAFE, "run", str(target), "--burst", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stderr


def test_wait_until_returns_the_truthy_value() -> None:
    assert wait_until(lambda: 42, 1) == 42


def test_children_of_finds_a_child_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert child.pid in children_of(os.getpid())
    finally:
        child.kill()
        child.wait()
