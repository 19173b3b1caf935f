"""The supervisor with real `forksafe run` processes: signals, limits, recycling, crashes."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from test_workers_harness import (
    alive,
    burst,
    load_tasks,
    queue_rows,
    queue_url,
    wait_until,
    write_tasks,
)

from workers import states
from workers.errors import SoftTimeLimitExceeded, TimeLimitExceeded

pytest_plugins = ["test_workers_harness"]  # the run_workers and any_broker fixtures
pytestmark = pytest.mark.usefixtures("any_broker")  # every test, on every broker

TASKS = """
import os, time
from workers import SoftTimeLimitExceeded

@app.task
def record(i, path):
    with open(path, "a") as log:
        log.write(f"{i} {os.getpid()}\\n")
    return i

@app.task
def record_then_nap(i, path, seconds):
    record(i, path)
    time.sleep(seconds)
    return i

@app.task
def nap(seconds, marker=None):
    if marker:
        open(marker, "w").close()
    time.sleep(seconds)
    return os.getpid()

@app.task(time_limit=1)
def hang(marker):
    open(marker, "w").close()
    time.sleep(600)

@app.task(soft_time_limit=0.3, time_limit=10)
def cleans_up():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "cleaned up"

@app.task(soft_time_limit=0.3, time_limit=10)
def ignores_soft_limit():
    time.sleep(10)

@app.task
def version():
    return 1

HOARD = []

@app.task
def hog(mib):
    HOARD.append(bytearray(mib * 2**20))
    HOARD[-1][::4096] = b"x" * len(HOARD[-1][::4096])  # touch every page
    return os.getpid()

@app.task
def pid():
    return os.getpid()

@app.task(time_limit=0.5, max_retries=1)
def hang_then_pass(marker):
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(600)
    return "second attempt"
"""


@pytest.fixture
def tasks_path(tmp_path: Path) -> Path:
    return write_tasks(tmp_path, TASKS)


@pytest.fixture
def tasks(tasks_path: Path) -> Any:
    return load_tasks(tasks_path)


def executions(path: Path) -> list[tuple[int, int]]:
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]  # type: ignore[misc]


def state_counts(tmp_path: Path) -> dict[str, int]:
    return dict(queue_rows(tmp_path, "SELECT state, count(*) FROM forksafe_jobs GROUP BY state"))


@pytest.mark.timeout(120)
def test_2000_jobs_through_3_workers_each_succeed_exactly_once(tasks: Any, tmp_path: Path) -> None:
    out = tmp_path / "runs.txt"
    results = tasks.record.starmap([(i, str(out)) for i in range(2000)])
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "3", "--log-level", "warning")
    assert state_counts(tmp_path) == {states.SUCCESS: 2000}
    ran = executions(out)
    assert sorted(i for i, _ in ran) == list(range(2000))  # each ran exactly once
    assert len({pid for _, pid in ran}) == 3
    assert [r.get(timeout=1) for r in results[:5]] == [0, 1, 2, 3, 4]


@pytest.mark.timeout(60)
def test_a_short_lease_stays_with_the_worker_running_its_job(tmp_path: Path, run_workers) -> None:  # type: ignore[no-untyped-def]
    # Heartbeats once a second would let a 0.5 s lease lapse between them; a sweep then
    # (here the test's, as another supervisor's would) puts the running job back in the
    # queue and the other worker runs it too.
    path = write_tasks(tmp_path, TASKS + "\napp.lease_seconds = 0.5\n", name="short_lease.py")
    tasks = load_tasks(path)
    out = tmp_path / "runs.txt"
    job = tasks.record_then_nap.delay(7, str(out), 2)
    run_workers(path, "--workers", "2")
    wait_until(out.exists, 20, "the job to start")
    while not job.ready():
        tasks.app.broker.sweep(tasks.app.max_deliveries, time.time())
        time.sleep(0.05)  # sweeping often: any lapse of the lease is seen
    assert job.get(timeout=5) == 7
    assert [i for i, _ in executions(out)] == [7]  # once


@pytest.mark.timeout(60)
def test_an_outcome_is_recorded_while_a_slow_job_of_its_batch_runs(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    quick, slow = tasks.app.submit_many(
        [tasks.pid.s().with_options(priority=1), tasks.nap.s(60, str(marker))]
    )
    run_workers(tmp_path / "tasks.py", "--workers", "1")  # claims both in one batch
    wait_until(marker.exists, 20, "the slow job to start")
    finished = time.monotonic()
    wait_until(lambda: quick.state == states.SUCCESS, 2, "the quick job's outcome")
    assert time.monotonic() - finished < 1  # written within about OUTCOME_FLUSH_SECONDS
    assert slow.state == states.STARTED


@pytest.mark.timeout(60)
def test_graceful_term_lets_running_jobs_finish(tasks: Any, tmp_path: Path, run_workers) -> None:  # type: ignore[no-untyped-def]
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    jobs = [tasks.nap.delay(1.0, str(m)) for m in markers]
    run = run_workers(tmp_path / "tasks.py", "--workers", "2")
    wait_until(lambda: all(m.exists() for m in markers), 20, "both jobs to start")
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 0
    assert [job.state for job in jobs] == [states.SUCCESS, states.SUCCESS]
    assert not run.workers()


@pytest.mark.timeout(60)
def test_a_job_running_through_a_graceful_stop_keeps_its_lease(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    # The heartbeat goes on until the job ends: a lapsed lease would let a sweep (here
    # the test's, as another supervisor's would) take the job and drop its outcome.
    path = write_tasks(tmp_path, TASKS + "\napp.lease_seconds = 0.5\n", name="short_lease.py")
    tasks = load_tasks(path)
    out = tmp_path / "runs.txt"
    job = tasks.record_then_nap.delay(7, str(out), 2)
    run = run_workers(path, "--workers", "1")
    wait_until(out.exists, 20, "the job to start")
    run.signal(signal.SIGTERM)
    while run.process.poll() is None:
        tasks.app.broker.sweep(tasks.app.max_deliveries, time.time())
        time.sleep(0.05)
    assert run.wait(5) == 0
    assert job.get(timeout=5) == 7
    assert [i for i, _ in executions(out)] == [7]


@pytest.mark.timeout(60)
def test_a_stop_signal_a_worker_gets_before_its_handlers_is_not_lost(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    # The first worker is sent SIGTERM by itself right after the fork (an at-fork hook
    # of the tasks file), before it installs its handlers: it must still stop.
    first = tmp_path / "first-worker"
    path = write_tasks(
        tmp_path,
        TASKS
        + f"""
import signal
def _stop_the_first_worker():
    if not os.path.exists({str(first)!r}):
        with open({str(first)!r}, "w") as marker:
            marker.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGTERM)
os.register_at_fork(after_in_child=_stop_the_first_worker)
""",
        name="stopped_early.py",
    )
    run = run_workers(path, "--workers", "1")
    wait_until(first.exists, 20, "the first worker to start")
    wait_until(lambda: first.read_text().strip() != "", 5, "the first worker's pid")
    pid = int(first.read_text())
    wait_until(lambda: not alive(pid), 10, "the first worker to act on its SIGTERM")
    assert run.process.poll() is None  # the supervisor carries on (and replaces it)


@pytest.mark.timeout(60)
def test_jobs_past_the_graceful_timeout_are_killed_and_requeued(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    job = tasks.nap.delay(60, str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "1", "--graceful-timeout", "0.5")
    wait_until(marker.exists, 20, "the job to start")
    started = time.monotonic()
    run.signal(signal.SIGTERM)
    assert run.wait(20) == 0
    assert time.monotonic() - started < 10
    assert job.state == states.PENDING  # back in the queue, not lost
    assert "went back to the queue" in run.log


@pytest.mark.timeout(60)
def test_quit_stops_at_once_and_requeues_running_jobs(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    job = tasks.nap.delay(60, str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "2")
    wait_until(marker.exists, 20, "the job to start")
    run.signal(signal.SIGQUIT)
    assert run.wait(10) == 0
    assert job.state == states.PENDING


@pytest.mark.timeout(60)
def test_hup_reloads_changed_code_and_replaces_every_worker(  # type: ignore[no-untyped-def]
    tasks: Any, tasks_path: Path, tmp_path: Path, run_workers
) -> None:
    run = run_workers(tasks_path, "--workers", "2")
    old = set(run.wait_for_workers(2))
    assert tasks.version.delay().get(timeout=20) == 1
    tasks_path.write_text(tasks_path.read_text().replace("return 1", "return 2"))
    run.signal(signal.SIGHUP)
    wait_until(
        lambda: len(set(run.workers()) - old) == 2 and not set(run.workers()) & old,
        20,
        "two new workers and no old one",
    )
    assert tasks.version.delay().get(timeout=20) == 2


@pytest.mark.timeout(60)
def test_hup_keeps_the_broker_given_on_the_command_line(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    path = write_tasks(tmp_path, TASKS)
    tasks = load_tasks(path)  # submits to this test's queue
    url = queue_url(tmp_path)
    path.write_text(path.read_text().replace(repr(url), repr(f"sqlite:///{tmp_path}/other.db")))
    run = run_workers(path, "--workers", "1", "--broker", url)
    old = run.wait_for_workers(1)
    assert tasks.version.delay().get(timeout=20) == 1
    run.signal(signal.SIGHUP)
    wait_until(lambda: run.workers() and not set(run.workers()) & set(old), 20, "a new worker")
    assert tasks.version.delay().get(timeout=10) == 1


@pytest.mark.timeout(60)
def test_hup_with_broken_code_keeps_the_old_workers(  # type: ignore[no-untyped-def]
    tasks: Any, tasks_path: Path, tmp_path: Path, run_workers
) -> None:
    run = run_workers(tasks_path, "--workers", "1")
    old = run.wait_for_workers(1)
    tasks_path.write_text(tasks_path.read_text() + "\ndef broken(:\n")
    run.signal(signal.SIGHUP)
    run.wait_for_log("reload failed")
    assert "SyntaxError" in run.log
    assert run.workers() == old
    assert tasks.version.delay().get(timeout=20) == 1


@pytest.mark.timeout(60)
def test_ttin_and_ttou_scale_by_one(tasks_path: Path, run_workers) -> None:  # type: ignore[no-untyped-def]
    run = run_workers(tasks_path, "--workers", "2")
    run.wait_for_workers(2)
    run.signal(signal.SIGTTIN)
    run.wait_for_workers(3)
    run.signal(signal.SIGTTOU)
    run.wait_for_workers(2)
    run.signal(signal.SIGTTOU)
    run.wait_for_workers(1)
    run.signal(signal.SIGTTOU)  # never below one
    run.wait_for_log("SIGTTOU: 1 workers")
    assert len(run.wait_for_workers(1)) == 1


@pytest.mark.timeout(60)
def test_a_crash_loop_stops_the_supervisor_with_the_error_shown_once(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    path = write_tasks(
        tmp_path,
        """
@app.on_worker_init
def connect():
    raise RuntimeError("database unreachable")
""",
    )
    run = run_workers(path, "--workers", "3")
    assert run.wait(30) == 3
    log = run.log
    assert log.count("RuntimeError: database unreachable") == 1
    assert "crashed 5 times in a row right after starting" in log
    assert log.count("same error as before") >= 3
    assert not run.workers()


@pytest.mark.timeout(60)
def test_max_tasks_per_child_recycles_workers(tasks: Any, tmp_path: Path) -> None:
    out = tmp_path / "runs.txt"
    tasks.record.starmap([(i, str(out)) for i in range(40)])
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "2", "--max-tasks-per-child", "5")
    ran = executions(out)
    assert sorted(i for i, _ in ran) == list(range(40))
    per_pid: dict[int, int] = {}
    for _, pid in ran:
        per_pid[pid] = per_pid.get(pid, 0) + 1
    assert len(per_pid) >= 8 and max(per_pid.values()) <= 5


@pytest.mark.timeout(60)
def test_hard_time_limit_kills_the_worker_and_records_the_failure(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    job = tasks.hang.delay(str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "1")
    (first,) = run.wait_for_workers(1)
    with pytest.raises(TimeLimitExceeded, match="time_limit of 1 s"):
        job.get(timeout=20)
    wait_until(lambda: not alive(first), 10, "the stuck worker to be killed")
    assert tasks.version.delay().get(timeout=20) == 1  # a new worker carries on
    assert run.workers() != [first]


@pytest.mark.timeout(60)
def test_jobs_prefetched_by_a_worker_killed_for_its_time_limit_go_back_uncounted(  # type: ignore[no-untyped-def]
    tmp_path: Path, run_workers
) -> None:
    path = write_tasks(tmp_path, TASKS + "\napp.max_deliveries = 1\n")
    tasks = load_tasks(path)
    hung, waiting = tasks.app.submit_many(
        [tasks.hang.s(str(tmp_path / "started")).with_options(priority=1), tasks.version.s()]
    )
    run_workers(path, "--workers", "1")  # claims both in one batch
    with pytest.raises(TimeLimitExceeded):
        hung.get(timeout=20)
    assert waiting.get(timeout=20) == 1  # not failed as if it had killed a worker
    record = tasks.app.broker.fetch(waiting.id)
    assert record.deliveries == 1 and tasks.app.broker.fetch(hung.id).deliveries == 1


@pytest.mark.timeout(60)
def test_soft_time_limit_raises_inside_the_task(tasks: Any, tmp_path: Path) -> None:
    caught = tasks.cleans_up.delay()
    uncaught = tasks.ignores_soft_limit.delay()
    started = time.monotonic()
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "2")
    assert time.monotonic() - started < 8
    assert caught.get(timeout=1) == "cleaned up"
    with pytest.raises(SoftTimeLimitExceeded, match="soft_time_limit"):
        uncaught.get(timeout=1)


@pytest.mark.timeout(60)
def test_sigkill_of_the_supervisor_leaves_no_worker_alive(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    job = tasks.nap.delay(600, str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "3")
    pids = run.wait_for_workers(3)
    wait_until(marker.exists, 20, "the job to start")
    run.signal(signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not any(alive(pid) for pid in pids), 5, f"workers {pids} to exit")
    assert time.monotonic() - killed < 5
    assert job.state == states.PENDING  # the orphan gave its job back


@pytest.mark.timeout(60)
def test_max_memory_per_child_recycles_a_bloated_worker(tasks: Any, tmp_path: Path) -> None:
    bloated = tasks.hog.delay(100)
    after = tasks.pid.delay()
    log = burst(
        tmp_path,
        tmp_path / "tasks.py",
        "--workers",
        "1",
        "--prefetch",
        "1",
        "--max-memory-per-child",
        "60",
    )
    assert "max_memory_per_child" in log
    assert bloated.get(timeout=1) != after.get(timeout=1)


@pytest.mark.timeout(60)
def test_a_job_killed_by_its_time_limit_is_retried_when_it_has_retries_left(
    tasks: Any, tmp_path: Path
) -> None:
    job = tasks.hang_then_pass.delay(str(tmp_path / "first-attempt"))
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    assert job.get(timeout=1) == "second attempt"
    record = tasks.app.broker.fetch(job.id)
    assert record.retries == 1 and record.deliveries == 2


@pytest.mark.timeout(60)
def test_a_second_int_during_a_graceful_stop_stops_at_once(  # type: ignore[no-untyped-def]
    tasks: Any, tmp_path: Path, run_workers
) -> None:
    marker = tmp_path / "started"
    job = tasks.nap.delay(60, str(marker))
    run = run_workers(tmp_path / "tasks.py", "--workers", "1")
    wait_until(marker.exists, 20, "the job to start")
    run.signal(signal.SIGINT)
    run.wait_for_log("stopping 1 worker(s)")
    run.signal(signal.SIGINT)
    assert run.wait(10) == 0
    assert "second stop signal" in run.log
    assert job.state == states.PENDING
