"""The SQLite broker on its own: schema, claims, leases, outcomes, housekeeping."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from brokers import job

from workers import states
from workers.brokers import Outcome, create_broker, mask_url, parse_url
from workers.brokers.base import BROKER_CLASSES
from workers.brokers.doorbell import SUPPORTED as DOORBELL_SUPPORTED
from workers.brokers.doorbell import Doorbell
from workers.brokers.sqlite import SCHEMA_VERSION, SQLiteBroker
from workers.errors import BrokerError, BrokerURLError


def make_broker(tmp_path: Path) -> SQLiteBroker:
    broker = create_broker(f"sqlite:///{tmp_path / 'queue.db'}")
    assert isinstance(broker, SQLiteBroker)
    broker.setup()
    return broker


def test_schema_is_created_once_and_its_version_recorded(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    broker.setup()  # idempotent
    with sqlite3.connect(broker.path) as con:
        assert list(con.execute("SELECT version FROM forksafe_schema")) == [(SCHEMA_VERSION,)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_newer_schema_is_refused_with_the_fix(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    with sqlite3.connect(broker.path) as con:
        con.execute("UPDATE forksafe_schema SET version = 99")
    other = create_broker(f"sqlite:///{broker.path}")
    with pytest.raises(BrokerError, match=r"schema version 99, newer .* upgrade forksafe"):
        other.setup()


def test_a_writer_waits_for_the_lock_up_to_the_url_timeout(tmp_path: Path) -> None:
    broker = create_broker(f"sqlite:///{tmp_path / 'q.db'}?timeout=0.3&synchronous=full")
    assert isinstance(broker, SQLiteBroker) and broker.busy_timeout == 0.3
    broker.setup()
    holder = sqlite3.connect(broker.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.1, holder.execute, ("COMMIT",))
    release.start()
    started = time.monotonic()
    assert broker.enqueue([job("waited")], time.time()) == [True]
    assert 0.05 < time.monotonic() - started < 0.3
    release.join()
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(BrokerError, match=r"stayed locked for 0.3 s"):
        broker.enqueue([job("gave-up")], time.time())
    holder.execute("ROLLBACK")
    holder.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/x.db", "names a host"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///no/such/dir/x.db", "does not exist"),
        ("sqlite:///x.db?timeout=soon", "not a number"),
        ("rabbit://localhost", "unknown broker scheme 'rabbit'"),
        ("forksafe.db", "has no scheme"),
    ],
)
def test_bad_urls_are_named_errors(url: str, message: str) -> None:
    with pytest.raises(BrokerURLError, match=message):
        create_broker(url)


def test_passwords_are_masked_in_every_display() -> None:
    url = parse_url("postgresql://bob:p%40ss@db.example:5433/jobs?sslmode=require")
    assert url.password == "p@ss" and url.port == 5433 and url.database == "jobs"
    assert "p@ss" not in repr(url) and "p%40ss" not in repr(url) and "***" in str(url)
    assert url.masked() == "postgresql://bob:***@db.example:5433/jobs?sslmode=require"
    assert "p%40ss" in url.unmasked()
    assert mask_url("bogus://u:secret@h/x") == "bogus://u:***@h/x"


def test_a_scheme_without_its_broker_module_is_a_named_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(BROKER_CLASSES, "fake", "workers.brokers.not_written_yet:FakeBroker")
    with pytest.raises(BrokerURLError, match="not available in this version") as caught:
        create_broker("fake://bob:secret@localhost/jobs")
    assert "secret" not in str(caught.value) and "bob:***@localhost" in str(caught.value)


def test_same_job_id_twice_is_one_job(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    assert broker.enqueue([job("a"), job("b"), job("a")], now) == [True, True, False]
    assert broker.enqueue([job("b")], now) == [False]
    assert broker.counts(now) == {"default": {states.PENDING: 2}}


def test_claims_take_priority_then_age_and_respect_eta_and_queues(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
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
    claimed = broker.claim("w1", ["default"], 10, 30, now)
    assert [j.id for j in claimed] == ["urgent", "old", "new"]
    assert {j.lease for j in claimed} == {claimed[0].lease}
    assert broker.claim("w2", ["default"], 10, 30, now) == []
    assert [j.id for j in broker.claim("w2", ["default"], 10, 30, now + 61)] == ["later"]
    assert [j.id for j in broker.claim("w2", ["other", "x"], 10, 30, now)] == ["elsewhere"]


def test_claim_walks_the_due_index(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    with sqlite3.connect(broker.path) as con:
        plan = con.execute(
            "EXPLAIN QUERY PLAN SELECT rowid FROM forksafe_jobs"
            " WHERE state IN ('PENDING', 'SCHEDULED', 'RETRY') AND queue IN ('default')"
            " AND eta <= 1 AND (expires_at IS NULL OR expires_at > 1)"
            " ORDER BY priority DESC, eta LIMIT 10"
        ).fetchall()
    assert "forksafe_jobs_due" in str(plan)


def _claim_all(path: str, worker: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    broker = create_broker(f"sqlite:///{path}")
    got: list[str] = []
    while batch := broker.claim(worker, ["default"], 7, 30, time.time()):
        got.extend(j.id for j in batch)
    out.put(got)


@pytest.mark.timeout(60)
def test_concurrent_claimers_in_separate_processes_never_share_a_job(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    broker.enqueue([job(f"j{i}") for i in range(600)], time.time())
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()  # type: ignore[type-arg]
    procs = [ctx.Process(target=_claim_all, args=(broker.path, f"w{i}", out)) for i in range(4)]
    for proc in procs:
        proc.start()
    claimed = [out.get(timeout=50) for _ in procs]
    for proc in procs:
        proc.join(10)
    every = [job_id for batch in claimed for job_id in batch]
    assert len(every) == 600 and len(set(every)) == 600


def test_only_the_current_lease_holder_records_the_outcome(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    broker.enqueue([job("j")], now)
    (first,) = broker.claim("slow", ["default"], 1, 5, now)
    # The slow worker's lease runs out; the sweep puts the job back; another takes it.
    assert broker.sweep(10, now + 6) == 1
    (second,) = broker.claim("fast", ["default"], 1, 5, now + 6)
    assert second.deliveries == 2 and second.lease != first.lease
    done = Outcome(second.id, second.lease, states.SUCCESS, result=b"2")
    late = Outcome(first.id, first.lease, states.SUCCESS, result=b"1")
    assert broker.record([done, late], now + 7) == [True, False]
    assert broker.record([done], now + 8) == [False]  # recorded exactly once
    record = broker.fetch("j")
    assert record is not None and record.result == b"2" and record.state == states.SUCCESS


def test_heartbeats_keep_a_lease_alive(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    broker.enqueue([job("j")], now)
    broker.claim("w", ["default"], 1, 5, now)
    assert broker.extend_leases("w", 5, now + 4) == 1
    assert broker.sweep(10, now + 6) == 0
    assert broker.sweep(10, now + 10) == 1


def test_a_lost_worker_gives_its_jobs_back_until_max_deliveries(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    broker.enqueue([job("poison")], now)
    for delivery in range(1, 4):
        (claimed,) = broker.claim("w", ["default"], 1, 30, now)
        assert claimed.deliveries == delivery
        assert broker.release_lost("w", 3, now, running="poison") == 1
    record = broker.fetch("poison")
    assert record is not None and record.state == states.FAILURE
    assert record.error is not None and record.error["type"].endswith("WorkerLostError")


def test_released_unstarted_jobs_do_not_count_a_delivery(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    broker.enqueue([job("a"), job("b")], now)
    claimed = broker.claim("w", ["default"], 2, 30, now)
    assert broker.release("w", [j.id for j in claimed], now) == 2
    assert {j.deliveries for j in broker.claim("w", ["default"], 2, 30, now)} == {1}


def test_retry_outcome_waits_for_its_eta_and_counts(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    now = time.time()
    broker.enqueue([job("r")], now)
    (claimed,) = broker.claim("w", ["default"], 1, 30, now)
    error = {"type": "ValueError", "message": "x", "args": ["x"]}
    assert broker.record(
        [Outcome("r", claimed.lease, states.RETRY, error=error, traceback="tb", retry_at=now + 2)],
        now,
    ) == [True]
    assert broker.fetch("r").state == states.RETRY  # type: ignore[union-attr]
    assert broker.claim("w", ["default"], 1, 30, now + 1) == []
    (again,) = broker.claim("w", ["default"], 1, 30, now + 2)
    assert again.retries == 1


def test_revoke_retry_purge_and_result_expiry(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
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
    assert broker.outstanding(["default"], now + 3) == 1


@pytest.mark.skipif(not DOORBELL_SUPPORTED, reason="needs Linux abstract sockets")
def test_the_doorbell_wakes_a_waiter_and_clears_markers_of_dead_waiters(tmp_path: Path) -> None:
    directory = str(tmp_path / "queue.db-wake")
    waiter, ringer = Doorbell(directory), Doorbell(directory)
    assert not waiter.wait(0.01)  # arms, nobody rang
    stale = tmp_path / "queue.db-wake" / "forksafe-999999-1-dead"
    stale.write_text("")
    result: list[bool] = []
    armed = threading.Event()

    def wait_for_a_ring() -> None:
        waiter.arm()  # each thread has its own socket
        armed.set()
        result.append(waiter.wait(10))

    thread = threading.Thread(target=wait_for_a_ring)
    thread.start()
    armed.wait(10)
    started = time.monotonic()
    ringer.ring()
    thread.join(10)
    assert result == [True] and time.monotonic() - started < 5
    assert not stale.exists()


@pytest.mark.timeout(30)
def test_wait_returns_when_another_process_commits(tmp_path: Path) -> None:
    broker = make_broker(tmp_path)
    broker.wait(0.01)  # start listening
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_enqueue_one, args=(broker.path,))
    started = time.monotonic()
    proc.start()
    broker.wait(20)
    proc.join(10)
    assert time.monotonic() - started < 15
    assert broker.counts(time.time()) == {"default": {states.PENDING: 1}}


def _enqueue_one(path: str) -> None:
    create_broker(f"sqlite:///{path}").enqueue([job("late")], time.time())
