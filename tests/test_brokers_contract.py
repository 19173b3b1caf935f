"""The broker contract, the same tests for every broker: SQLite, PostgreSQL and MariaDB.

Submission is idempotent, claims honour priority, eta and queues and never hand one job
to two claimers, only the current lease holder records an outcome, leases are kept
alive by heartbeats and lapse without them, and housekeeping expires and purges.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from brokers import KINDS, broker_url, job

from workers import states
from workers.brokers import Broker, Outcome, WorkerInfo, create_broker
from workers.errors import WorkerLostError
from workers.failures import rebuild


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return broker_url(request.param, tmp_path, request)


@pytest.fixture
def broker(url: str) -> Broker:
    made = create_broker(url)
    made.setup()
    return made


def test_setup_is_idempotent_and_concurrent_setups_agree(url: str) -> None:
    errors: list[BaseException] = []

    def set_up() -> None:
        try:
            create_broker(url).setup()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=set_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    broker = create_broker(url)
    broker.setup()
    assert broker.enqueue([job("a")], time.time()) == [True]


def test_same_job_id_twice_is_one_job(broker: Broker) -> None:
    now = time.time()
    assert broker.enqueue([job("a"), job("b"), job("a")], now) == [True, True, False]
    assert broker.enqueue([job("b")], now) == [False]
    assert broker.counts(now) == {"default": {states.PENDING: 2}}


def test_payloads_and_results_come_back_byte_for_byte(broker: Broker) -> None:
    now = time.time()
    payload = bytes(range(256)) * 40
    broker.enqueue([job("bin", payload=payload, serializer="pickle")], now)
    (claimed,) = broker.claim("w", ["default"], 1, 30, now)
    assert claimed.payload == payload and claimed.serializer == "pickle"
    broker.record([Outcome("bin", claimed.lease, states.SUCCESS, result=payload[::-1])], now)
    record = broker.fetch("bin")
    assert record is not None and record.result == payload[::-1] and record.payload == payload


def test_fetch_finished_reads_one_job_and_only_the_finished_others(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job(name) for name in ("mine", "done", "failed", "waiting", "running")], now)
    claimed = {c.id: c for c in broker.claim("w", ["default"], 5, 30, now)}
    broker.record(
        [
            Outcome("done", claimed["done"].lease, states.SUCCESS, result=b"42"),
            Outcome("failed", claimed["failed"].lease, states.FAILURE, error={"type": "E"}),
        ],
        now,
    )
    broker.release("w", ["waiting"], now)
    others = ["done", "failed", "waiting", "running", "unknown"]
    records = {r.id: r for r in broker.fetch_finished("mine", others)}
    assert {i: r.state for i, r in records.items()} == {
        "mine": states.STARTED,  # the asked-for job comes back in any state
        "done": states.SUCCESS,
        "failed": states.FAILURE,
    }
    assert records["done"].result == b"42" and records["failed"].error == {"type": "E"}
    assert broker.fetch_finished("unknown", []) == []
    assert [r.id for r in broker.fetch_finished("done", [])] == ["done"]


def test_claims_take_priority_then_age_and_respect_eta_and_queues(broker: Broker) -> None:
    now = time.time()
    broker.enqueue(
        [
            job("old", eta=now - 10),
            job("new"),
            job("urgent", priority=5),
            job("later", eta=now + 60),
            job("elsewhere", queue="other"),
        ],
        now,
    )
    assert broker.counts(now)["default"][states.SCHEDULED] == 1
    claimed = broker.claim("w1", ["default"], 10, 30, now)
    assert [j.id for j in claimed] == ["urgent", "old", "new"]
    assert {j.lease for j in claimed} == {claimed[0].lease}
    assert broker.claim("w2", ["default"], 10, 30, now) == []
    assert [j.id for j in broker.claim("w2", ["default"], 10, 30, now + 61)] == ["later"]
    assert [j.id for j in broker.claim("w2", ["other", "x"], 10, 30, now)] == ["elsewhere"]


def test_a_claim_takes_at_most_limit_jobs(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job(f"j{i}") for i in range(25)], now)
    assert len(broker.claim("w", ["default"], 10, 30, now)) == 10
    assert len(broker.claim("w", ["default"], 10, 30, now)) == 10
    assert len(broker.claim("w", ["default"], 10, 30, now)) == 5


def _claim_all(url: str, worker: str, out: Any) -> None:
    broker = create_broker(url)
    got: list[str] = []
    while batch := broker.claim(worker, ["default"], 7, 30, time.time()):
        got.extend(j.id for j in batch)
    out.put(got)


@pytest.mark.timeout(60)
def test_concurrent_claimers_in_separate_processes_never_share_a_job(
    broker: Broker, url: str
) -> None:
    broker.enqueue([job(f"j{i}") for i in range(600)], time.time())
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, f"w{i}", out)) for i in range(4)]
    for proc in procs:
        proc.start()
    claimed = [out.get(timeout=50) for _ in procs]
    for proc in procs:
        proc.join(10)
    every = [job_id for batch in claimed for job_id in batch]
    assert len(every) == 600 and len(set(every)) == 600


def test_only_the_current_lease_holder_records_the_outcome(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("j")], now)
    (first,) = broker.claim("slow", ["default"], 1, 5, now)
    assert broker.sweep(10, now + 6) == 1
    (second,) = broker.claim("fast", ["default"], 1, 5, now + 6)
    assert second.deliveries == 2 and second.lease != first.lease
    done = Outcome(second.id, second.lease, states.SUCCESS, result=b"2")
    late = Outcome(first.id, first.lease, states.SUCCESS, result=b"1")
    assert broker.record([done, late], now + 7) == [True, False]
    assert broker.record([done], now + 8) == [False]  # recorded exactly once
    record = broker.fetch("j")
    assert record is not None and record.result == b"2" and record.state == states.SUCCESS


def test_a_batch_of_outcomes_is_recorded_in_one_call(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job(f"j{i}") for i in range(50)], now)
    claimed = broker.claim("w", ["default"], 50, 30, now)
    outcomes = [Outcome(j.id, j.lease, states.SUCCESS, result=j.id.encode()) for j in claimed]
    outcomes.append(Outcome("j0", "stale-lease", states.SUCCESS, result=b"x"))
    assert broker.record(outcomes, now) == [True] * 50 + [False]
    assert broker.counts(now) == {"default": {states.SUCCESS: 50}}
    record = broker.fetch("j7")
    assert record is not None and record.result == b"j7" and record.finished_at == now


def test_outcomes_and_the_next_claim_go_together(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("a"), job("b", priority=1), job("c")], now)
    (first,) = broker.claim("w", ["default"], 1, 30, now)
    assert first.id == "b"
    done = Outcome(first.id, first.lease, states.SUCCESS, result=b"1")
    stale = Outcome("a", "stale-lease", states.SUCCESS, result=b"x")
    stored, claimed = broker.record_and_claim([done, stale], "w", ["default"], 5, 30, now)
    assert stored == [True, False]
    assert sorted(j.id for j in claimed) == ["a", "c"] and len({j.lease for j in claimed}) == 1
    record = broker.fetch("b")
    assert record is not None and record.state == states.SUCCESS and record.result == b"1"
    outcomes = [Outcome(j.id, j.lease, states.SUCCESS, result=b"2") for j in claimed]
    stored, claimed = broker.record_and_claim(outcomes, "w", ["default", "other"], 5, 30, now)
    assert stored == [True, True] and claimed == []  # recorded even when nothing is left
    assert broker.counts(now) == {"default": {states.SUCCESS: 3}}
    assert broker.record_and_claim([], "w", ["default"], 5, 30, now) == ([], [])


def test_heartbeats_keep_a_lease_alive(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("j")], now)
    broker.claim("w", ["default"], 1, 5, now)
    assert broker.extend_leases("w", 5, now + 4) == 1
    assert broker.sweep(10, now + 6) == 0
    assert broker.sweep(10, now + 10) == 1


def test_a_lost_worker_gives_its_jobs_back_until_max_deliveries(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("poison")], now)
    for delivery in range(1, 4):
        (claimed,) = broker.claim("w", ["default"], 1, 30, now)
        assert claimed.deliveries == delivery
        assert broker.release_lost("w", 3, now, running="poison") == 1
    record = broker.fetch("poison")
    assert record is not None and record.state == states.FAILURE
    assert record.error is not None and record.error["type"].endswith("WorkerLostError")
    exc = rebuild(record.error, record.traceback)  # with its message, as raised by get()
    assert isinstance(exc, WorkerLostError)
    assert str(exc) == "the worker running this job died 3 times"


def test_a_lost_worker_counts_a_delivery_only_for_the_job_it_was_running(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("running", priority=1), job("prefetched")], now)
    for _ in range(3):
        claimed = broker.claim("w", ["default"], 2, 30, now)
        assert [(j.id, j.deliveries) for j in claimed][1] == ("prefetched", 1)
        assert broker.release_lost("w", 3, now, running="running") == 2
    failed, waiting = broker.fetch("running"), broker.fetch("prefetched")
    assert failed is not None and failed.state == states.FAILURE and failed.deliveries == 3
    assert waiting is not None and waiting.state == states.PENDING and waiting.deliveries == 0


def test_a_lost_worker_that_may_have_left_an_outcome_unwritten_counts_every_job(
    broker: Broker,
) -> None:
    """A job that finished but whose outcome died with its worker (a crash while its
    result was serialised) must count, or it would come back forever; with nothing
    running and nothing unwritten, its jobs never started and count nothing."""
    now = time.time()
    broker.enqueue([job("finished-unwritten")], now)
    for delivery in range(1, 4):
        (claimed,) = broker.claim("w", ["default"], 1, 30, now)
        assert claimed.deliveries == delivery
        assert broker.release_lost("w", 3, now, running=None, others_started=True) == 1
    record = broker.fetch("finished-unwritten")
    assert record is not None and record.state == states.FAILURE and record.deliveries == 3
    broker.enqueue([job("prefetched")], now)
    broker.claim("w", ["default"], 1, 30, now)
    assert broker.release_lost("w", 3, now, running=None) == 1  # between jobs, all written
    waiting = broker.fetch("prefetched")
    assert waiting is not None and waiting.state == states.PENDING and waiting.deliveries == 0


def test_released_unstarted_jobs_do_not_count_a_delivery(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("a"), job("b")], now)
    claimed = broker.claim("w", ["default"], 2, 30, now)
    assert broker.release("w", [j.id for j in claimed], now) == 2
    assert {j.deliveries for j in broker.claim("w", ["default"], 2, 30, now)} == {1}


def test_retry_outcome_waits_for_its_eta_and_counts(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("r")], now)
    (claimed,) = broker.claim("w", ["default"], 1, 30, now)
    error = {"type": "ValueError", "message": "x", "args": ["x"]}
    assert broker.record(
        [Outcome("r", claimed.lease, states.RETRY, error=error, traceback="tb", retry_at=now + 2)],
        now,
    ) == [True]
    record = broker.fetch("r")
    assert record is not None and record.state == states.RETRY and record.error == error
    assert broker.claim("w", ["default"], 1, 30, now + 1) == []
    (again,) = broker.claim("w", ["default"], 1, 30, now + 2)
    assert again.retries == 1


def test_revoke_retry_purge_and_result_expiry(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("x"), job("y"), job("z", expires_at=now + 1)], now)
    assert broker.revoke("x", now)
    (y,) = broker.claim("w", ["default"], 1, 30, now)
    broker.record([Outcome("y", y.lease, states.SUCCESS, result=b"1")], now)
    assert broker.sweep(10, now + 2) == 1
    assert broker.fetch("z").state == states.EXPIRED  # type: ignore[union-attr]
    assert broker.retry("x", now + 3)
    assert not broker.retry("x", now + 3)
    assert broker.fetch("x").state == states.PENDING  # type: ignore[union-attr]
    assert broker.purge([states.SUCCESS, states.EXPIRED], finished_before=now + 1) == 1
    assert broker.purge([states.SUCCESS, states.EXPIRED], finished_before=None) == 1
    assert [j.id for j in broker.jobs(None, 10)] == ["x"]
    assert [j.id for j in broker.jobs([states.PENDING], 10)] == ["x"]
    assert broker.jobs([states.FAILURE], 10) == []
    assert broker.outstanding(["default"], now + 3) == 1


def test_expired_jobs_are_not_claimed(broker: Broker) -> None:
    now = time.time()
    broker.enqueue([job("stale", expires_at=now + 1), job("fresh")], now)
    assert [j.id for j in broker.claim("w", ["default"], 5, 30, now + 2)] == ["fresh"]


def test_worker_rows_are_reported_listed_and_removed(broker: Broker) -> None:
    now = time.time()
    info = WorkerInfo(
        id="host-a:1:x",
        hostname="host-a",
        pid=1,
        supervisor_pid=0,
        queues=("default", "fast"),
        started_at=now,
        heartbeat_at=now,
        jobs_done=0,
        stats={"broker": {"in_use": 1}},
    )
    broker.report_worker(info)
    broker.report_worker(
        WorkerInfo(**{**info.__dict__, "jobs_done": 7, "current_job": "add[j]", "id": info.id})
    )
    (row,) = broker.workers()
    assert (row.hostname, row.queues, row.jobs_done, row.current_job) == (
        "host-a",
        ("default", "fast"),
        7,
        "add[j]",
    )
    assert row.stats == {"broker": {"in_use": 1}}
    broker.remove_worker(info.id)
    assert broker.workers() == []


@pytest.mark.timeout(30)
def test_wait_returns_soon_after_another_process_submits(broker: Broker, url: str) -> None:
    broker.wait(0.01)  # start listening
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_enqueue_one, args=(url,))
    started = time.monotonic()
    proc.start()
    broker.wait(20)
    proc.join(10)
    assert time.monotonic() - started < 15
    assert broker.counts(time.time()) == {"default": {states.PENDING: 1}}


def _enqueue_one(url: str) -> None:
    create_broker(url).enqueue([job("late")], time.time())
