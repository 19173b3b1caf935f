"""Many machines, one queue: fleets of supervisors on PostgreSQL and MariaDB, and server faults.

Each test runs against a throwaway server this module owns (``owned_postgres`` /
``owned_mysql``), so it may restart it or kill its sessions. Hosts are simulated by
several ``forksafe run`` processes, each with its own ``--hostname``. A client cut off
from the shared servers by a :class:`~brokers.Relay` needs no server of its own.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from brokers import Relay, fresh_queue, server_url, table_rows
from test_workers_harness import FORKSAFE, alive, load_tasks, wait_until

from workers import App, states
from workers.brokers import create_broker
from workers.errors import ResultTimeout, TimeLimitExceeded

pytest_plugins = ["test_workers_harness"]  # the run_workers fixture

SERVER_KINDS = ("postgres", "mysql")

TASKS = """
import os, time

app.lease_seconds = 3  # a job of a killed or cut-off worker runs again within seconds

@app.task
def record(i, path):
    time.sleep(0.004)  # long enough for kills and outages to land mid-job
    with open(path, "a") as log:
        log.write(f"{i} {os.getpid()}\\n")
    return i * 2

@app.task
def started_at():
    return time.time()

@app.task(time_limit=1)
def hang(marker):
    open(marker, "w").close()
    time.sleep(600)
"""


@pytest.fixture(params=SERVER_KINDS)
def server(request: pytest.FixtureRequest) -> Any:
    """This module's own server of each kind, with an empty queue."""
    database = request.getfixturevalue(f"owned_{request.param}")
    if not database.server.running:
        database.server.start()
    fresh_queue(request, database)
    return database


def write_fleet_tasks(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "tasks.py"
    path.write_text(f"from workers import App\napp = App({url!r})\n" + textwrap.dedent(TASKS))
    return path


def counts(url: str) -> dict[str, int]:
    broker = create_broker(url)
    try:
        return create_and_count(broker)
    finally:
        broker.close()


def create_and_count(broker: Any) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for by_state in broker.counts(time.time()).values():
        totals.update(by_state)
    return dict(totals)


def done(url: str, total: int) -> bool:
    return counts(url).get(states.SUCCESS, 0) >= total


def check_every_result(url: str, total: int, runs_file: Path) -> None:
    """Every job succeeded, once, with its own result; each ran at least once."""
    assert counts(url) == {states.SUCCESS: total}
    results = dict(table_rows(url, "SELECT id, result FROM forksafe_jobs"))
    assert len(results) == total
    ran = {int(line.split()[0]) for line in runs_file.read_text().splitlines()}
    assert ran == set(range(total))


def submit(tasks: Any, total: int, out: Path) -> list[Any]:
    results = tasks.record.starmap([(i, str(out)) for i in range(total)])
    tasks.app.broker.close()
    return list(results)


def recorded_outcomes(logs: list[str]) -> Counter[str]:
    """How many times each job's outcome was stored, from the workers' JSON log lines."""
    stored: Counter[str] = Counter()
    for text in logs:
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            entry = json.loads(line)
            if entry.get("recorded") is True:
                stored[entry["job_id"]] += 1
    return stored


@pytest.mark.timeout(240)
def test_three_supervisors_share_5000_jobs_under_random_sigkill_and_record_each_once(  # type: ignore[no-untyped-def]
    server: Any, tmp_path: Path, run_workers
) -> None:
    url = server_url(server)
    tasks = load_tasks(write_fleet_tasks(tmp_path, url))
    out = tmp_path / "runs.txt"
    fleet = [
        run_workers(
            tmp_path / "tasks.py",
            "--workers",
            "2",
            "--prefetch",
            "5",
            "--hostname",
            f"host-{n}",
            "--log-format",
            "json",
        )
        for n in range(3)
    ]
    for run in fleet:
        run.wait_for_workers(2, timeout=30)

    def every_host_listed() -> Any:
        status = subprocess.run(
            [*FORKSAFE, "status", "--json", "--broker", url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        hosts = Counter(w["hostname"] for w in json.loads(status.stdout)["workers"])
        return hosts if hosts == {"host-0": 2, "host-1": 2, "host-2": 2} else None

    wait_until(every_host_listed, 30, "every host's workers in forksafe status")
    handles = submit(tasks, 5000, out)  # now: the kills below land while the jobs run
    rng = random.Random(11)
    killed: set[int] = set()
    deadline = time.monotonic() + 180
    while not done(url, 5000) and time.monotonic() < deadline:
        victims = [pid for run in fleet for pid in run.workers()]
        if victims:
            victim = rng.choice(victims)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        time.sleep(0.2)  # the kill rhythm is the point of the test
    check_every_result(url, 5000, out)
    assert [h.get(timeout=5) for h in handles[:3]] == [0, 2, 4]
    # A worker killed between storing a batch and logging it leaves no line; none is
    # ever stored twice.
    stored = recorded_outcomes([run.log for run in fleet])
    assert max(stored.values()) == 1 and len(stored) > 4900
    assert len(killed) >= 5
    for run in fleet:
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0
    assert all("CrashLoopError" not in run.log for run in fleet)


def run_through_a_fault(
    server: Any, tmp_path: Path, run_workers: Any, fault: Any, total: int = 3000
) -> list[Any]:
    """Two supervisors drain ``total`` jobs while ``fault(server)`` strikes mid-run."""
    url = server_url(server)
    tasks = load_tasks(write_fleet_tasks(tmp_path, url))
    out = tmp_path / "runs.txt"
    submit(tasks, total, out)
    fleet = [
        run_workers(
            tmp_path / "tasks.py", "--workers", "2", "--hostname", f"host-{n}", "--prefetch", "5"
        )
        for n in range(2)
    ]
    for run in fleet:
        run.wait_for_workers(2, timeout=30)
    wait_until(lambda: counts(url).get(states.SUCCESS, 0) >= total // 5, 60, "a fifth done")
    assert counts(url).get(states.SUCCESS, 0) < total  # the fault strikes mid-run
    fault(server.server)
    wait_until(lambda: done(url, total), 120, f"all {total} jobs done after the fault")
    check_every_result(url, total, out)
    for run in fleet:
        run.signal(signal.SIGTERM)
        assert run.wait(30) == 0
    return fleet


def assert_logged_once(fleet: list[Any], faults: int = 1) -> None:
    """Each supervisor logs each outage once and its end once, and no traceback storm."""
    for run in fleet:
        log = run.log
        assert log.count("unreachable") <= faults, log
        assert log.count("reachable again") == log.count("unreachable"), log
        assert log.count("Traceback") <= 2, log
        assert "CrashLoopError" not in log


@pytest.mark.timeout(240)
def test_a_server_restart_mid_run_loses_no_job(  # type: ignore[no-untyped-def]
    server: Any, tmp_path: Path, run_workers
) -> None:
    fleet = run_through_a_fault(server, tmp_path, run_workers, lambda s: s.restart())
    assert_logged_once(fleet)


@pytest.mark.timeout(240)
def test_killing_every_session_mid_run_loses_no_job(  # type: ignore[no-untyped-def]
    server: Any, tmp_path: Path, run_workers
) -> None:
    def kill_sessions_three_times(server_: Any) -> None:
        for _ in range(3):
            assert server_.terminate_backends() > 0
            time.sleep(0.3)

    fleet = run_through_a_fault(server, tmp_path, run_workers, kill_sessions_three_times)
    assert_logged_once(fleet, faults=3)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_get_gives_up_at_its_timeout_while_the_server_is_unreachable(
    kind: str, request: pytest.FixtureRequest
) -> None:
    database = request.getfixturevalue(kind)
    fresh_queue(request, database)
    relay = Relay(database)
    request.addfinalizer(relay.cut)
    app = App(relay.url + ("&" if "?" in relay.url else "?") + "retry_for=5")
    result = app.send("add", queue="nobody")
    assert result.state == states.PENDING
    relay.cut()  # the server goes away while the caller waits
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match=f"job {result.id} could not be read within 1 s"):
        result.get(timeout=1)  # not after retry_for
    assert time.monotonic() - started < 2.5


@pytest.mark.timeout(120)
def test_a_time_limit_passed_during_an_outage_kills_the_worker_and_the_supervisor_carries_on(  # type: ignore[no-untyped-def]
    server: Any, tmp_path: Path, run_workers
) -> None:
    tasks = load_tasks(write_fleet_tasks(tmp_path, server_url(server, retry_for=1)))
    marker = tmp_path / "started"
    hung = tasks.hang.delay(str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "1")
    (worker,) = run.wait_for_workers(1, timeout=30)
    wait_until(marker.exists, 20, "the job to start")
    server.server.stop()
    try:
        wait_until(lambda: not alive(worker), 10, "the worker past its time limit to be killed")
        wait_until(
            lambda: "could not record the failure" in run.log or run.process.poll() is not None,
            20,
            "the supervisor to give up recording the failure",
        )
        assert run.process.poll() is None, run.log  # the supervisor carries on
    finally:
        server.server.start()
    # The job goes back once its lease lapses, and its second run is recorded.
    with pytest.raises(TimeLimitExceeded):
        hung.get(timeout=30)
    wait_until(lambda: run.log.count("killed by SIGKILL") == 2, 10, "the second worker reaped")
    assert run.log.count("time limit 1 s exceeded") == 2  # each kill logged (recorded) once
    assert run.process.poll() is None
