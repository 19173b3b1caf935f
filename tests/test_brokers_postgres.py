"""The PostgreSQL broker's own promises: index-scan claims, LISTEN/NOTIFY wake-ups within
milliseconds, and a connection budget the whole fleet keeps."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.errors
import pytest
from brokers import end_sessions, fresh_queue, job, server_url
from test_brokers_fleet import submit, write_fleet_tasks
from test_workers_harness import FORKSAFE, load_tasks, wait_until

from workers import states
from workers.brokers import NewJob, Outcome, create_broker
from workers.brokers.postgres import (
    CLAIM_ONE_QUEUE,
    FETCH,
    IDLE_KEY,
    RECORD_AND_CLAIM_ONE_QUEUE,
    PostgresBroker,
)

pytest_plugins = ["test_workers_harness"]  # the run_workers fixture

CLAIM_PLAN = (
    "EXPLAIN SELECT id FROM forksafe_jobs WHERE state IN ('PENDING', 'SCHEDULED', 'RETRY')"
    " AND queue = 'default' AND run_at <= %s AND (expires_at IS NULL OR expires_at > %s)"
    " ORDER BY priority DESC, run_at LIMIT 10 FOR UPDATE SKIP LOCKED"
)


@pytest.fixture
def queue(postgres: Any, request: pytest.FixtureRequest) -> str:
    fresh_queue(request, postgres)
    return server_url(postgres)


def test_the_claim_query_is_an_index_scan_of_the_due_index(queue: str, postgres: Any) -> None:
    broker = create_broker(queue)
    assert isinstance(broker, PostgresBroker)
    broker.setup()
    now = time.time()
    jobs = [
        NewJob(f"j{i}", "add", "default", b"{}", "json", priority=i % 3, eta=now - i)
        for i in range(20000)
    ]
    broker.enqueue(jobs, now)
    con = postgres.connect()
    try:
        cursor = con.cursor()
        # Most jobs are finished, as in a queue that has been running for a while.
        cursor.execute("UPDATE forksafe_jobs SET state = 'SUCCESS' WHERE id NOT LIKE 'j1%'")
        cursor.execute("ANALYZE forksafe_jobs")
        cursor.execute(CLAIM_PLAN, (now, now))
        plan = "\n".join(row[0] for row in cursor.fetchall())
    finally:
        con.close()
    print(plan)
    assert "Index Scan using forksafe_jobs_due on forksafe_jobs" in plan
    assert "Seq Scan" not in plan and "Sort" not in plan
    claimed = broker.claim("w", ["default"], 10, 30, now)
    assert [j.priority for j in claimed] == [2] * 10


@pytest.mark.parametrize("statement", [CLAIM_ONE_QUEUE, RECORD_AND_CLAIM_ONE_QUEUE, FETCH])
def test_a_prepared_plan_made_on_an_empty_table_still_uses_an_index_when_it_is_large(
    statement: Any, queue: str
) -> None:
    """PostgreSQL soon keeps one plan for a prepared statement, made for any parameter
    values; it is not remade as the table grows. On the broker's sessions, a plan
    made while the queue was empty must not scan the whole table once it is large."""
    broker: Any = create_broker(queue)
    broker.setup()
    now = time.time()
    claim = ("w", "lease", now + 30, now, "default", 10)
    outcomes = (["x"], ["y"], ["SUCCESS"], [None], [None], [None], [None], now)
    params = {
        CLAIM_ONE_QUEUE: claim,
        RECORD_AND_CLAIM_ONE_QUEUE: (*outcomes, *claim),
        FETCH: ("j1",),
    }[statement]
    con = broker._connect()  # a session as the broker sets it up
    try:
        cursor = con.cursor()
        cursor.execute("SET plan_cache_mode = force_generic_plan")
        cursor.execute(statement.prepare)
        cursor.execute("EXPLAIN " + statement.execute, params)  # plan kept from here
        jobs = [NewJob(f"j{i}", "add", "default", b"{}", "json", eta=now - i) for i in range(20000)]
        broker.enqueue(jobs, now)
        cursor.execute("EXPLAIN " + statement.execute, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    finally:
        con.close()
    print(plan)
    assert "Seq Scan on forksafe_jobs" not in plan and "Sort" not in plan
    assert "Index Scan using forksafe_jobs_pkey" in plan or "Tid Scan" in plan


def _heard(listener: Any) -> int:
    """Notifications ``listener`` has received for transactions committed so far.

    A listening session is signalled before the notifying commit returns; it sends
    what it heard before its next query's reply, or, if busy, right after it."""
    cursor = listener.cursor()
    for _ in range(2):
        cursor.execute("SELECT 1")
    count = len(listener.notifies)
    listener.notifies.clear()
    return count


def test_outcomes_notify_only_while_a_result_reader_listens(queue: str, postgres: Any) -> None:
    broker = create_broker(queue)
    broker.setup()
    now = time.time()
    broker.enqueue([job("a"), job("b")], now)
    listener = postgres.connect()  # hears forksafe_done, but is not a result reader
    try:
        listener.cursor().execute("LISTEN forksafe_done")
        (first,) = broker.claim("w", ["default"], 1, 30, now)
        assert broker.record([Outcome(first.id, first.lease, states.SUCCESS)], now) == [True]
        assert _heard(listener) == 0
        reader = create_broker(queue)
        assert reader.fetch("b") is not None
        reader.wait(5)  # returns at once: it has just started to listen
        (second,) = broker.claim("w", ["default"], 1, 30, now)
        assert broker.record([Outcome(second.id, second.lease, states.SUCCESS)], now) == [True]
        assert _heard(listener) == 1
        reader.wait(5)  # woken by that notification
        record = reader.fetch("b")
        assert record is not None and record.state == states.SUCCESS
        reader.close()
    finally:
        listener.close()


def test_submissions_notify_only_while_a_session_waits_for_jobs(queue: str, postgres: Any) -> None:
    producer = create_broker(queue)
    producer.setup()
    now = time.time()
    listener = postgres.connect()  # hears forksafe_jobs, but does not wait for jobs
    worker = create_broker(queue)
    try:
        listener.cursor().execute("LISTEN forksafe_jobs")
        producer.enqueue([job("a")], now)
        assert _heard(listener) == 0  # nobody waits: nobody is woken
        with worker.hold_connection():
            assert worker.claim("w", ["default"], 5, 30, now)  # busy
            producer.enqueue([job("b")], now)
            assert _heard(listener) == 0
            assert worker.claim("w", ["default"], 5, 30, now)  # takes b
            assert worker.claim("w", ["default"], 5, 30, now) == []
            worker.wait(5)  # returns at once: now it waits for jobs, so look again
            assert worker.claim("w", ["default"], 5, 30, now) == []
            producer.enqueue([job("c")], now)
            assert _heard(listener) == 1
            started = time.monotonic()
            worker.wait(5)  # woken by it
            assert time.monotonic() - started < 2
            assert [j.id for j in worker.claim("w", ["default"], 5, 30, now)] == ["c"]
            producer.enqueue([job("d")], now)  # still counted as waiting
            assert _heard(listener) == 1
            assert [j.id for j in worker.claim("w", ["default"], 5, 30, now)] == ["d"]
            producer.enqueue([job("e")], now)  # that claim found jobs: busy again
            assert _heard(listener) == 0
    finally:
        listener.close()
        worker.close()
        producer.close()


def test_a_session_starting_to_wait_waits_for_a_submission_that_saw_no_waiter(
    queue: str, postgres: Any
) -> None:
    broker = create_broker(queue)
    broker.setup()
    submitter = postgres.connect()
    try:
        # What a submission does before it commits: it found no session waiting.
        submitter.autocommit = False
        cursor = submitter.cursor()
        cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", (IDLE_KEY,))
        assert cursor.fetchone()[0]
        cursor.execute(
            "INSERT INTO forksafe_jobs (id, task, queue, state, priority, payload,"
            " serializer, run_at, created_at) VALUES ('late', 't', 'default', 'PENDING',"
            " 0, '', 'json', 0, 0)"
        )
        waited = threading.Thread(target=broker.wait, args=(10,))
        waited.start()  # takes the waiters' lock, then returns (it was not waiting)
        waited.join(0.5)
        assert waited.is_alive()  # not before that submission commits
        submitter.commit()
        waited.join(5)
        assert not waited.is_alive()
        assert [j.id for j in broker.claim("w", ["default"], 5, 30, time.time())] == ["late"]
    finally:
        submitter.close()
        broker.close()


def test_a_held_connection_the_server_ends_is_replaced(queue: str, postgres: Any) -> None:
    broker = create_broker(queue)
    broker.setup()
    now = time.time()
    broker.enqueue([job("a", priority=1), job("b")], now)
    with broker.hold_connection():
        assert [j.id for j in broker.claim("w", ["default"], 1, 30, now)] == ["a"]
        end_sessions(postgres)
        claimed = broker.claim("w", ["default"], 1, 30, now)
        if not claimed:  # the claim that met the dead session gave up quietly
            claimed = broker.claim("w", ["default"], 1, 30, now)
        assert [j.id for j in claimed] == ["b"]


@pytest.mark.timeout(120)
def test_a_job_submitted_to_an_idle_fleet_starts_within_50_ms(  # type: ignore[no-untyped-def]
    queue: str, tmp_path: Path, run_workers
) -> None:
    tasks = load_tasks(write_fleet_tasks(tmp_path, queue))
    run = run_workers(tmp_path / "tasks.py", "--workers", "2")
    run.wait_for_workers(2, timeout=30)
    tasks.started_at.delay().get(timeout=30)  # both workers are up and idle
    time.sleep(0.5)  # idle for longer than any polling interval would be
    delays = []
    for _ in range(20):
        submitted = time.time()
        started = tasks.started_at.delay().get(timeout=10)
        delays.append(started - submitted)
        time.sleep(0.05)  # a trickle: the fleet is idle before each job
    delays.sort()
    assert statistics.median(delays) < 0.05, delays
    assert delays[int(len(delays) * 0.9)] < 0.05, delays


@pytest.mark.timeout(60)
def test_get_wakes_on_the_outcome_not_on_a_poll(queue: str, tmp_path: Path, run_workers) -> None:  # type: ignore[no-untyped-def]
    tasks = load_tasks(write_fleet_tasks(tmp_path, queue))
    run = run_workers(tmp_path / "tasks.py", "--workers", "1")
    run.wait_for_workers(1, timeout=30)
    tasks.started_at.delay().get(timeout=30)
    broker = tasks.app.broker
    waits = 0
    real_wait = broker.wait

    def counting_wait(timeout: float) -> None:
        nonlocal waits
        waits += 1
        real_wait(timeout)

    broker.wait = counting_wait
    began = time.monotonic()
    tasks.record.apply_async((1, str(tmp_path / "runs.txt"))).get(timeout=10, interval=5.0)
    assert time.monotonic() - began < 1.0
    assert waits <= 12  # woken by NOTIFY, not by many short polls


@pytest.mark.timeout(180)
def test_db_connections_caps_the_fleet_sessions_under_load(  # type: ignore[no-untyped-def]
    postgres: Any, tmp_path: Path, run_workers, request: pytest.FixtureRequest
) -> None:
    fresh_queue(request, postgres)
    url = server_url(postgres, application_name="fleet")
    tasks = load_tasks(write_fleet_tasks(tmp_path, url))
    submit(tasks, 3000, tmp_path / "runs.txt")
    peak = 0
    stop = threading.Event()
    watcher = postgres.connect()

    def watch() -> None:
        nonlocal peak
        cursor = watcher.cursor()
        while not stop.is_set():
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = 'fleet'"
            )
            peak = max(peak, cursor.fetchone()[0])
            time.sleep(0.005)

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        run = run_workers(
            tmp_path / "tasks.py", "--workers", "4", "--db-connections", "6", "--prefetch", "5"
        )
        run.wait_for_workers(4, timeout=30)
        observer = server_url(postgres, application_name="observer")  # not counted
        broker = create_broker(observer)

        def drained() -> bool:
            by_state = broker.counts(time.time()).get("default", {})
            return by_state.get(states.SUCCESS, 0) == 3000

        wait_until(drained, 120, "3000 jobs done")
        status = subprocess.run(
            [*FORKSAFE, "status", "--json", "--broker", observer],
            capture_output=True,
            text=True,
            timeout=30,
        )
        workers = json.loads(status.stdout)["workers"]
        text = subprocess.run(
            [*FORKSAFE, "status", "--broker", observer], capture_output=True, text=True, timeout=30
        ).stdout
        broker.close()
    finally:
        stop.set()
        thread.join(10)
        watcher.close()
    assert "db connections: at most 5 (supervisor 1, 1 per worker)" in run.log
    assert {w["stats"]["broker"]["fleet_budget"] for w in workers} == {6}
    assert {w["stats"]["broker"]["connection_limit"] for w in workers} == {1}
    assert 2 <= peak <= 6, peak
    assert '"fleet_budget": 6' in text and "at most 1 each; budget 6" in text


def test_a_budget_too_small_for_the_workers_is_refused(queue: str, tmp_path: Path) -> None:
    write_fleet_tasks(tmp_path, queue)
    result = subprocess.run(
        [*FORKSAFE, "run", "tasks.py", "--workers", "4", "--db-connections", "4", "--burst"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--db-connections 4 cannot give the supervisor and 4 workers" in result.stderr


@pytest.mark.timeout(60)
def test_ttin_adds_no_worker_beyond_the_connection_budget(  # type: ignore[no-untyped-def]
    queue: str, tmp_path: Path, run_workers
) -> None:
    write_fleet_tasks(tmp_path, queue)
    # Supervisor 1 + 2 workers x 2 = 5 of 6: no room for a third worker.
    run = run_workers(tmp_path / "tasks.py", "--workers", "2", "--db-connections", "6")
    run.wait_for_workers(2, timeout=30)
    run.signal(signal.SIGTTIN)
    run.wait_for_log("SIGTTIN ignored: the connection budget (--db-connections) has room for 2")
    run.signal(signal.SIGTTOU)
    run.wait_for_workers(1, timeout=30)
    run.signal(signal.SIGTTIN)
    run.wait_for_workers(2, timeout=30)
    assert "SIGTTIN: 2 workers" in run.log


def test_threads_of_a_process_share_one_pool(queue: str) -> None:
    broker = create_broker(queue)
    assert isinstance(broker, PostgresBroker)
    start = threading.Barrier(8)
    pools: list[object] = []

    def first_use() -> None:
        start.wait()
        pools.append(broker._process_pool())

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        sys.setswitchinterval(interval)
    assert len(pools) == 8 and len({id(pool) for pool in pools}) == 1


def test_a_claim_run_again_after_an_error_the_server_answered_keeps_its_jobs(
    queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = create_broker(queue)
    assert isinstance(broker, PostgresBroker)
    broker.setup()
    now = time.time()
    broker.enqueue([job("a")], now)
    real_execute = broker._execute
    failures = [psycopg2.errors.lookup("40P01")]  # deadlock_detected: rolled back

    def first_claim_fails(con: Any, sql: Any, params: Any) -> list[Any]:
        if failures and sql is CLAIM_ONE_QUEUE:
            raise failures.pop()("deadlock detected")
        return real_execute(con, sql, params)

    monkeypatch.setattr(broker, "_execute", first_claim_fails)
    monkeypatch.setattr(broker, "_is_disconnect", lambda exc: False)  # as for a real one
    (claimed,) = broker.claim("w", ["default"], 1, 30, now)  # run again by the broker
    assert failures == []
    # Its lease is not in doubt: the next call keeps the job and stores its outcome.
    stored, _ = broker.record_and_claim(
        [Outcome(claimed.id, claimed.lease, states.SUCCESS)], "w", ["default"], 1, 30, now
    )
    assert stored == [True]
    record = broker.fetch("a")
    assert record is not None and record.state == states.SUCCESS and record.deliveries == 1
