"""The real uWSGI, with the repository's uwsgi.ini, serving examples/wsgi_app.py over HTTP.

The app loads in the master with a forksafe pool that has already run a query, then 4
workers are forked from C (no Python fork hooks). Every request reports the database's own
session id and echoes a token through the database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_integration_support import (
    ROOT,
    Server,
    fire,
    free_port,
    http_request,
    running,
    server_sessions,
    sessions_left,
    uwsgi_binary,
    uwsgi_env,
    wait_until,
)

import forksafe.integrations.uwsgi

__all__ = ["uwsgi_binary"]  # the fixture, re-exported for pytest

pytestmark = pytest.mark.timeout(240)

# The hook, the hook with Python's fork hooks also run, and no hook (the pid check alone).
MODES = {
    "postfork-hook": ([], {}),
    "postfork-and-python-fork-hooks": (["--py-call-uwsgi-fork-hooks"], {}),
    "pid-check-only": ([], {"FORKSAFE_APP_HOOK": "0"}),
}


def start_uwsgi(
    binary: Path,
    db: Any,
    tmp_path: Path,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    max_requests: int = 1000,
) -> Any:
    port = free_port()
    return running(
        [str(binary), "--ini", str(ROOT / "uwsgi.ini"), *(extra or [])],
        {
            **uwsgi_env(),
            "FORKSAFE_APP_DSN": db.dsn,
            "FORKSAFE_HTTP": f"127.0.0.1:{port}",
            "FORKSAFE_MAX_REQUESTS": str(max_requests),
            "FORKSAFE_BROKER": f"sqlite:///{tmp_path / 'broker.db'}",
            **(env or {}),
        },
        tmp_path / "uwsgi.log",
        f"http://127.0.0.1:{port}",
    )


def check_one_session_per_worker(server: Server, db: Any, hooked: bool) -> set[int]:
    """400 concurrent requests: 0 errors, 4 workers on 4 sessions of their own, master's
    session neither used by a worker nor disturbed; returns the workers' sessions."""
    master = server.get("/master")
    load = fire(server.base, count=400, concurrency=32)
    load.check(forbidden_sessions={master["session"]})
    assert len(load.pids) == 4, load.sessions_by_pid()
    assert len(load.sessions) == 4
    assert master["pid"] not in load.pids
    # The server's side: each worker's session and the master's are connected, all distinct.
    on_server = server_sessions(db)
    assert load.sessions | {master["session"]} <= on_server, (load.sessions, master, on_server)
    # Each worker was reset by the postfork hook exactly once, or (no hook) not at all.
    assert {a["postfork_runs"] for a in load.answers} == {1 if hooked else 0}
    print(f"uwsgi {db.kind}: 400 requests in {load.seconds:.2f}s", file=sys.stderr)
    return load.sessions


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_uwsgi_workers_each_get_their_own_session_and_survive_a_reload(
    kind: str, mode: str, uwsgi_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue(kind)
    before = server_sessions(db)
    extra, env = MODES[mode]
    with start_uwsgi(uwsgi_binary, db, tmp_path, extra, env) as server:
        first = check_one_session_per_worker(server, db, hooked=mode != "pid-check-only")

        # SIGHUP: graceful reload. The master re-executes itself, loads the app (and runs
        # the import-time query) again, and forks 4 new workers. Load keeps coming meanwhile.
        old_master = server.get("/master")
        server.signal(signal.SIGHUP)
        during = fire(server.base, count=400, concurrency=32)
        assert not during.errors, during.errors[:3]
        assert wait_until(lambda: server.get("/master") != old_master, 30, 0.2)
        assert not check_one_session_per_worker(server, db, hooked=mode != "pid-check-only") & (
            first
        )
    assert not sessions_left(db, before), "sessions left after uWSGI stopped"


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_uwsgi_workers_recycled_by_max_requests_never_share_a_session(
    kind: str, uwsgi_binary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = request.getfixturevalue(kind)
    before = server_sessions(db)
    # uWSGI lets a worker live min-worker-lifetime (10 s) before max-requests may recycle it.
    extra = ["--min-worker-lifetime", "0"]
    with start_uwsgi(uwsgi_binary, db, tmp_path, extra, max_requests=25) as server:
        master = server.get("/master")
        load = fire(server.base, count=400, concurrency=16)
        load.check(forbidden_sessions={master["session"]})
        # Every recycled worker is a new fork of the same master, with the same pool in it.
        assert len(load.pids) > 4, load.sessions_by_pid()
        assert master["session"] in server_sessions(db), "the master's session was killed"
        assert server.get("/master") == master
    assert not sessions_left(db, before)


@pytest.mark.timeout(180)
def test_uwsgi_app_submits_jobs_that_a_forksafe_worker_runs_on_its_own_session(
    postgres: Any, uwsgi_binary: Path, tmp_path: Path
) -> None:
    before = server_sessions(postgres)
    with start_uwsgi(uwsgi_binary, postgres, tmp_path) as server:
        master = server.get("/master")
        jobs = {}
        for n in range(8):
            status, body = http_request("POST", f"{server.base}/jobs?token=job-{n}")
            assert status == 202, body
            jobs[f"job-{n}"] = json.loads(body)["job"]
        assert {server.get(f"/jobs/{job}")["state"] for job in jobs.values()} == {"PENDING"}
        drained = subprocess.run(
            [sys.executable, "-m", "workers.cli", "run", "examples/wsgi_app.py", "--burst"],
            cwd=ROOT,
            env={
                **os.environ,
                "FORKSAFE_APP_DSN": postgres.dsn,
                "FORKSAFE_BROKER": f"sqlite:///{tmp_path / 'broker.db'}",
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert drained.returncode == 0, drained.stderr[-3000:]
        for token, job in jobs.items():
            answer = server.get(f"/jobs/{job}")
            assert answer["state"] == "SUCCESS", answer
            assert answer["result"]["token"] == token
            assert answer["result"]["session"] != master["session"]
    assert not sessions_left(postgres, before)


def test_uwsgi_hook_outside_uwsgi_is_a_no_op_that_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import importlib
    import logging

    with caplog.at_level(logging.DEBUG, logger="forksafe.integrations.uwsgi"):
        importlib.reload(forksafe.integrations.uwsgi)
    assert not forksafe.integrations.uwsgi.installed
    assert "not running under uWSGI" in caplog.text
