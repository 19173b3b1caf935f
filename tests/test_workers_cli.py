"""The `forksafe` command line: run, submit, status, jobs, retry, purge and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_workers_harness import FORKSAFE, burst, load_tasks, queue_url, write_tasks

from workers import states
from workers.brokers import mask_url

pytest_plugins = ["test_workers_harness"]  # the run_workers and any_broker fixtures
pytestmark = pytest.mark.usefixtures("any_broker")  # every test, on every broker

TASKS = """
@app.task
def add(x, y):
    return x + y

@app.task
def fail(message):
    raise ValueError(message)
"""


def forksafe(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["FORKSAFE_BROKER"] = queue_url(tmp_path)
    full_env.update(env or {})
    return subprocess.run(
        [*FORKSAFE, *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=full_env,
        timeout=timeout,
    )


@pytest.fixture
def tasks_path(tmp_path: Path) -> Path:
    return write_tasks(tmp_path, TASKS)


@pytest.mark.timeout(60)
def test_submit_wait_prints_the_result(tmp_path: Path, tasks_path: Path, run_workers) -> None:  # type: ignore[no-untyped-def]
    run = run_workers(tasks_path, "--workers", "1")
    done = forksafe(tmp_path, "submit", "tasks.py", "add", "2", "3", "--wait", "--timeout", "20")
    assert done.returncode == 0, done.stderr + run.log
    assert done.stdout == "5\n"
    failed = forksafe(tmp_path, "submit", "tasks.py", "fail", "boom", "--wait", "--timeout", "20")
    assert failed.returncode == 1
    assert "FAILURE" in failed.stderr and "ValueError: boom" in failed.stderr


def test_submit_wait_that_times_out_exits_4_naming_the_job(
    tmp_path: Path, tasks_path: Path
) -> None:
    late = forksafe(tmp_path, "submit", "tasks.py", "add", "2", "3", "--wait", "--timeout", "0.2")
    assert late.returncode == 4, late.stderr  # not 2, bad input: no worker ran it in time
    (job,) = load_tasks(tasks_path).app.broker.jobs(None, 10)
    assert f"ResultTimeout: job {job.id} is still PENDING after 0.2 s" in late.stderr


def test_submit_without_wait_prints_the_job_id_and_kwargs_are_json(
    tmp_path: Path, tasks_path: Path
) -> None:
    done = forksafe(
        tmp_path,
        "submit",
        "tasks.py",
        "add",
        "-k",
        "x=[1]",
        "-k",
        "y=[2]",
        "--job-id",
        "mine",
        "--priority",
        "4",
        "--queue",
        "q2",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "mine"
    record = load_tasks(tasks_path).app.broker.fetch("mine")
    assert record.payload == b'{"args":[],"kwargs":{"x":[1],"y":[2]}}'
    assert (record.priority, record.queue) == (4, "q2")


@pytest.mark.timeout(60)
def test_run_logs_a_banner_and_one_line_per_job(tmp_path: Path, tasks_path: Path) -> None:
    tasks = load_tasks(tasks_path)
    ok = tasks.add.delay(1, 2)
    tasks.fail.delay("nope")
    log = burst(tmp_path, tasks_path, "--workers", "2", "--queues", "default,other")
    assert f"broker:  {mask_url(queue_url(tmp_path))}" in log
    assert "workers: 2" in log and "queues:  default, other" in log
    assert "tasks:   add, fail" in log
    assert f"add[{ok.id}] SUCCESS in" in log
    assert "FAILURE in" in log and "ValueError: nope" in log


@pytest.mark.timeout(60)
def test_json_log_format_has_task_id_outcome_and_duration(tmp_path: Path, tasks_path: Path) -> None:
    job = load_tasks(tasks_path).add.delay(1, 2)
    result = forksafe(
        tmp_path, "--log-format", "json", "run", "tasks.py", "--burst", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    (entry,) = [line for line in lines if line.get("job_id") == job.id]
    assert entry["task"] == "add" and entry["outcome"] == states.SUCCESS
    assert entry["duration_ms"] >= 0 and entry["pid"] != lines[0]["pid"]


def test_status_jobs_retry_and_purge(tmp_path: Path, tasks_path: Path) -> None:
    tasks = load_tasks(tasks_path)
    tasks.add.delay(1, 2)
    failed = tasks.fail.delay("bad input")
    tasks.add.apply_async((1, 1), countdown=600)
    burst(tmp_path, tasks_path, "--workers", "1")

    status = forksafe(tmp_path, "status")
    assert status.returncode == 0, status.stderr
    assert "default: SCHEDULED 1, SUCCESS 1, FAILURE 1" in status.stdout
    as_json = json.loads(forksafe(tmp_path, "status", "--json").stdout)
    assert as_json["queues"]["default"][states.FAILURE] == 1

    jobs = forksafe(tmp_path, "jobs", "--failed", "--traceback")
    assert failed.id in jobs.stdout and "ValueError: bad input" in jobs.stdout
    assert "raise ValueError(message)" in jobs.stdout

    assert forksafe(tmp_path, "retry", failed.id).stdout == f"{failed.id} requeued\n"
    assert failed.state == states.PENDING
    again = forksafe(tmp_path, "retry", failed.id)
    assert again.returncode == 1 and "is PENDING" in again.stderr
    missing = forksafe(tmp_path, "retry", "nope")
    assert missing.returncode == 1 and "no job 'nope'" in missing.stderr

    purged = forksafe(tmp_path, "purge")
    assert purged.stdout.startswith("purged 1 job(s)")
    assert forksafe(tmp_path, "purge", "--all").stdout.startswith("purged 2 job(s)")


@pytest.mark.timeout(60)
def test_status_shows_live_workers_with_pid_jobs_and_pool_stats(  # type: ignore[no-untyped-def]
    tmp_path: Path, tasks_path: Path, run_workers
) -> None:
    run = run_workers(tasks_path, "--workers", "2")
    pids = run.wait_for_workers(2)
    load_tasks(tasks_path).add.delay(1, 2).get(timeout=20)

    def listed() -> dict[str, object] | None:
        status = json.loads(forksafe(tmp_path, "status", "--json").stdout)
        return status if sorted(w["pid"] for w in status["workers"]) == pids else None

    from test_workers_harness import wait_until

    status = wait_until(listed, 20, "both workers in status")
    assert sum(w["jobs_done"] for w in status["workers"]) >= 0
    assert all("broker" in w["stats"] and w["heartbeat_age"] < 10 for w in status["workers"])
    text = forksafe(tmp_path, "status").stdout
    assert "workers: 2" in text and "pool stats:" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.py"], "tasks file 'missing.py' does not exist"),
        (["run", "no.such.module"], "no module named 'no.such.module'"),
        (["run", "noapp.py"], "defines no workers.App"),
        (["run", "broken.py"], "ZeroDivisionError: division by zero"),
        (["run", "tasks.py:nothing"], "has no App named 'nothing'"),
        (["run", "tasks.py", "--broker", "sqlit:///x.db"], "did you mean 'sqlite'"),
        (["submit", "tasks.py", "nope"], "no task named 'nope' in tasks.py (known: add, fail)"),
        (["submit", "tasks.py", "add", "-k", "oops"], "must look like NAME=VALUE"),
        (
            ["submit", "tasks.py", "add", "1", "2", "--wait", "--timeout", "-1"],
            "argument --timeout: -1 must be 0 or more seconds",
        ),
        (
            ["run", "tasks.py", "--burst", "--graceful-timeout", "-5"],
            "argument --graceful-timeout: -5 must be 0 or more seconds",
        ),
        (
            ["run", "tasks.py", "--burst", "--max-memory-per-child", "-1"],
            "argument --max-memory-per-child: -1 must be above 0",
        ),
        (
            ["run", "tasks.py", "--burst", "--max-memory-per-child", "nan"],
            "argument --max-memory-per-child: nan must be above 0",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, tasks_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "noapp.py").write_text("x = 1\n")
    (tmp_path / "broken.py").write_text("from workers import App\napp = App()\n1 / 0\n")
    result = forksafe(tmp_path, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr or "broken.py" in result.stderr


def test_broker_password_is_masked_in_errors(tmp_path: Path, tasks_path: Path) -> None:
    result = forksafe(tmp_path, "status", "--broker", "postgress://app:hunter2@localhost/q")
    assert result.returncode == 2
    assert "did you mean 'postgres'" in result.stderr
    assert "hunter2" not in result.stderr and "app:***@localhost" in result.stderr


def test_help_lists_every_command() -> None:
    result = subprocess.run([*FORKSAFE, "--help"], capture_output=True, text=True)
    for command in ("run", "submit", "status", "jobs", "retry", "purge"):
        assert command in result.stdout


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("forksafe")
    assert script.exists()
    result = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True)
    assert "--burst" in result.stdout and "--max-tasks-per-child" in result.stdout
