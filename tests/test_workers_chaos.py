"""Nothing is lost: killed workers, bad rows, unknown tasks, tasks that raise."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest
from test_workers_harness import (
    burst,
    load_tasks,
    process_state,
    queue_rows,
    wait_until,
    write_tasks,
)

from workers import states

pytest_plugins = ["test_workers_harness"]  # the run_workers and any_broker fixtures
pytestmark = pytest.mark.usefixtures("any_broker")  # every test, on every broker

TASKS = """
import os, time

@app.task
def record(i, path):
    time.sleep(0.005)  # long enough for kills to land mid-job
    with open(path, "a") as log:
        log.write(f"{i} {os.getpid()}\\n")
    return i * 2

@app.task
def add(x, y):
    return x + y
"""


def rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    return queue_rows(tmp_path, sql)


@pytest.mark.timeout(180)
def test_sigkill_a_random_worker_every_200ms_loses_nothing_and_records_each_job_once(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    tasks = load_tasks(write_tasks(tmp_path, TASKS))
    out = tmp_path / "runs.txt"
    results = tasks.record.starmap([(i, str(out)) for i in range(2000)])
    run = run_workers(
        tmp_path / "tasks.py", "--workers", "3", "--prefetch", "5", "--log-level", "warning"
    )
    run.wait_for_workers(3)
    killed: set[int] = set()
    deadline = time.monotonic() + 150
    rng = random.Random(7)
    while time.monotonic() < deadline:
        done = rows(tmp_path, "SELECT count(*) FROM forksafe_jobs WHERE state = 'SUCCESS'")
        if done[0][0] == 2000:
            break
        pids = run.workers()
        if pids:
            victim = rng.choice(pids)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        time.sleep(0.2)  # the kill rhythm is the point of this test
    assert rows(tmp_path, "SELECT state, count(*) FROM forksafe_jobs GROUP BY state") == [
        (states.SUCCESS, 2000)
    ]
    assert [r.get(timeout=1) for r in results] == [i * 2 for i in range(2000)]
    ran = [int(line.split()[0]) for line in out.read_text().splitlines()]
    assert set(ran) == set(range(2000))  # at least once each; recorded once (one row each)
    assert len(killed) >= 8
    new_workers = run.wait_for_workers(3)
    assert not set(new_workers) & killed  # replaced
    wait_until(lambda: not [p for p in killed if process_state(p) == "Z"], 5, "no zombie workers")
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 0


def test_unknown_task_and_corrupt_payload_fail_their_job_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    tasks = load_tasks(write_tasks(tmp_path, TASKS))
    before = tasks.add.delay(1, 1)
    tasks.app.send("no_such_task", (1,), job_id="unknown")
    tasks.app.send("add", (1, 2), job_id="corrupt")
    tasks.app.send("add", (1, 2), job_id="wrong-shape")
    queue_rows(
        tmp_path, "UPDATE forksafe_jobs SET payload = ? WHERE id = 'corrupt'", (b"\x00\xff",)
    )
    queue_rows(
        tmp_path, "UPDATE forksafe_jobs SET payload = ? WHERE id = 'wrong-shape'", (b"[1, 2]",)
    )
    after = tasks.add.delay(2, 2)
    log = burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    assert before.get(timeout=1) == 2 and after.get(timeout=1) == 4
    unknown = tasks.app.AsyncResult("unknown")
    assert unknown.state == states.FAILURE
    assert "no task named 'no_such_task' in this App (known: add, record)" in str(unknown.result)
    for job_id, message in [("corrupt", "not valid JSON"), ("wrong-shape", "payload is not")]:
        result = tasks.app.AsyncResult(job_id)
        assert result.state == states.FAILURE
        assert result.info is not None and result.info["type"].endswith("CorruptPayloadError")
        assert message in str(result.info["message"])
    assert "UnknownTaskError" in log


@pytest.mark.parametrize("when", ["running", "serialising its result"])
def test_a_job_that_keeps_killing_its_worker_fails_after_max_deliveries(
    tmp_path: Path, when: str
) -> None:
    # Serialising the result comes after the job ends (the worker's slot no longer names
    # it) and before its outcome is written: it must count a delivery all the same.
    body = "os._exit(9)" if when == "running" else "return Bomb(a=1)"
    path = write_tasks(
        tmp_path,
        f"""
import os

app.max_deliveries = 3

class Bomb(dict):
    def items(self):  # what the JSON encoder calls on a dict subclass
        os._exit(9)

@app.task
def die():
    {body}

@app.task
def add(x, y):
    return x + y
""",
    )
    tasks = load_tasks(path)
    poison = tasks.die.delay()
    fine = tasks.add.delay(1, 2)
    burst(tmp_path, path, "--workers", "1", "--prefetch", "1")
    assert fine.get(timeout=1) == 3
    assert poison.state == states.FAILURE
    assert poison.info is not None and "died 3 times" in poison.info["message"]


def test_a_task_raising_a_base_exception_fails_its_job_and_its_batch_is_recorded(
    tmp_path: Path,
) -> None:
    path = write_tasks(
        tmp_path,
        """
import asyncio

@app.task
def record(i, path):
    with open(path, "a") as log:
        log.write(f"{i}\\n")
    return i

@app.task
def interrupted():
    raise KeyboardInterrupt("raised by the task")

@app.task
def cancelled():
    async def request():
        raise asyncio.CancelledError("request cancelled")
    asyncio.run(request())
""",
    )
    tasks = load_tasks(path)
    out = tmp_path / "runs.txt"
    before, interrupted, cancelled, after = tasks.app.submit_many(
        [
            tasks.record.s(0, str(out)).with_options(priority=3),
            tasks.interrupted.s().with_options(priority=2),
            tasks.cancelled.s().with_options(priority=1),
            tasks.record.s(1, str(out)),
        ]
    )
    burst(tmp_path, path, "--workers", "1")  # one batch; no worker crashes
    assert (before.get(timeout=1), after.get(timeout=1)) == (0, 1)
    assert out.read_text().split() == ["0", "1"]  # each ran once
    for result, error_type in [
        (interrupted, "KeyboardInterrupt"),
        (cancelled, "asyncio.exceptions.CancelledError"),
    ]:
        record = tasks.app.broker.fetch(result.id)
        assert (record.state, record.deliveries) == (states.FAILURE, 1)
        assert record.error["type"] == error_type
