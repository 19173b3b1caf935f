"""The MySQL/MariaDB broker's own promises: servers without SKIP LOCKED are refused, claims
read the due index in order, polling backs off when idle, and the fleet keeps its budget."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from brokers import drop_queue, fresh_queue, server_url, table_rows
from test_brokers_fleet import submit, write_fleet_tasks
from test_workers_harness import load_tasks, wait_until

from workers import states
from workers.brokers import NewJob, Outcome, create_broker
from workers.brokers.mysql import MySQLBroker, check_server_version
from workers.errors import BrokerError

pytest_plugins = ["test_workers_harness"]  # the run_workers fixture


@pytest.fixture
def queue(mysql: Any, request: pytest.FixtureRequest) -> str:
    fresh_queue(request, mysql)
    return server_url(mysql)


@pytest.mark.parametrize(
    "version",
    ["8.0.1", "8.4.3", "9.1.0", "10.6.0-MariaDB", "10.11.19-MariaDB-0+deb12u1", "11.4.2-MariaDB"],
)
def test_servers_with_skip_locked_are_accepted(version: str) -> None:
    check_server_version(version)


@pytest.mark.parametrize(
    ("version", "needed"),
    [
        ("5.7.44-log", "MySQL 8.0.1"),
        ("8.0.0-dmr", "MySQL 8.0.1"),
        ("10.5.22-MariaDB", "MariaDB 10.6"),
    ],
)
def test_a_server_too_old_for_skip_locked_is_refused_naming_the_fix(
    version: str, needed: str
) -> None:
    with pytest.raises(BrokerError, match=f"runs {version}.*added in {needed}.*MariaDB 10.6"):
        check_server_version(version)


def test_the_claim_reads_the_due_index_in_order(queue: str, mysql: Any) -> None:
    broker = create_broker(queue)
    assert isinstance(broker, MySQLBroker)
    broker.setup()
    now = time.time()
    broker.enqueue(
        [
            NewJob(f"j{i}", "add", "default", b"{}", "json", priority=i % 3, eta=now - i)
            for i in range(5000)
        ],
        now,
    )
    con = mysql.connect()
    try:
        cursor = con.cursor()
        cursor.execute(
            "UPDATE forksafe_jobs SET state = 'SUCCESS', rank_key = 2147483648"
            " WHERE id NOT LIKE 'j1%%'"
        )
        cursor.execute("ANALYZE TABLE forksafe_jobs")
        cursor.fetchall()
        cursor.execute(
            "EXPLAIN SELECT seq FROM forksafe_jobs WHERE queue = 'default'"
            " AND rank_key < 2147483648 AND run_at <= %s"
            " AND state IN ('PENDING', 'SCHEDULED', 'RETRY')"
            " AND (expires_at IS NULL OR expires_at > %s)"
            " ORDER BY rank_key, run_at LIMIT 10 FOR UPDATE SKIP LOCKED",
            (now, now),
        )
        names = [d[0] for d in cursor.description]
        plan = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    finally:
        con.close()
    print(plan)
    (step,) = plan
    assert step["key"] == "forksafe_jobs_due" and step["type"] in ("ref", "range")
    assert "filesort" not in (step["Extra"] or "")
    assert [j.priority for j in broker.claim("w", ["default"], 10, 30, now)] == [2] * 10


def test_an_outcome_is_stored_while_a_heartbeat_moves_its_lease_past_the_reader(
    queue: str, mysql: Any
) -> None:
    """record() finds a job still STARTED under its lease although, while it waits for
    another worker's lock, a heartbeat moves that job's lease_until: a reader that took
    the state test from an index on (state, lease_until) passed over the moved entry,
    dropped the outcome, and the job stayed STARTED while the heartbeat kept its lease."""
    broker = create_broker(queue)
    broker.setup()
    con = mysql.connect()
    other = mysql.connect()
    try:
        cursor = con.cursor()
        # As in a queue created moments ago: the statistics are those of the empty table.
        cursor.execute("ALTER TABLE forksafe_jobs STATS_AUTO_RECALC = 0")
        now = time.time()
        broker.enqueue(
            [NewJob(f"j{i}", "add", "default", b"{}", "json") for i in range(3000)], now - 100
        )
        (theirs,) = broker.claim("w2", ["default"], 1, 60, now - 30)
        ours = broker.claim("w1", ["default"], 5, 60, now)
        locker = other.cursor()
        locker.execute("BEGIN")  # another worker's transaction holds its job's row
        locker.execute("SELECT id FROM forksafe_jobs WHERE id = %s FOR UPDATE", (theirs.id,))
        outcomes = [Outcome(job.id, job.lease, states.SUCCESS, result=b"1") for job in ours]
        stored: list[list[bool]] = []
        recording = threading.Thread(target=lambda: stored.append(broker.record(outcomes, now)))
        recording.start()

        def lock_waits() -> int:
            # Lock waits of this database's sessions only: the server is shared with other
            # tests, whose waits would let the heartbeat run before record() waits.
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.INNODB_TRX t"
                " JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id"
                " WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()"
            )
            return int(cursor.fetchone()[0])

        wait_until(
            lambda: lock_waits() > 0 or not recording.is_alive(),
            10,
            "the outcomes to be written or to wait for a lock",
        )
        # A heartbeat that read the clock before the claim: our leases move below theirs.
        # It runs beside the test: when the plan record() took locked our rows before it
        # waited, the heartbeat queues behind them, and only the other worker's rollback
        # (which this thread holds) lets both go on.
        heartbeat = threading.Thread(target=lambda: broker.extend_leases("w1", 0.0, now))
        heartbeat.start()
        wait_until(
            lambda: not heartbeat.is_alive() or lock_waits() > 1,
            10,
            "the heartbeat to move the leases or to wait for record()'s locks",
        )
        locker.execute("ROLLBACK")
        heartbeat.join(30)
        recording.join(30)
        assert not heartbeat.is_alive() and not recording.is_alive()
    finally:
        other.close()
        con.close()
        broker.close()
    assert stored == [[True] * 5]
    assert table_rows(
        queue, "SELECT state, COUNT(*) FROM forksafe_jobs WHERE worker = 'w1' GROUP BY state"
    ) == [(states.SUCCESS, 5)]


def test_an_idle_waiter_backs_off_to_poll_max_and_work_resets_it(queue: str) -> None:
    broker = create_broker(queue + "?poll_max=0.02")
    assert isinstance(broker, MySQLBroker)
    broker.setup()
    pauses = []
    for _ in range(8):
        began = time.monotonic()
        broker.wait(1.0)
        pauses.append(time.monotonic() - began)
    assert pauses[0] < 0.05 and 0.015 < pauses[-1] < 0.5  # generous: busy test machines
    broker.enqueue([NewJob("x", "add", "default", b"{}", "json")], time.time())
    began = time.monotonic()
    broker.wait(1.0)
    assert time.monotonic() - began < 0.05


@pytest.mark.timeout(180)
def test_db_connections_caps_the_fleet_connections_under_load(  # type: ignore[no-untyped-def]
    owned_mysql: Any, tmp_path: Path, run_workers
) -> None:
    # Its own server: the processlist then holds only the fleet and this test.
    drop_queue(owned_mysql)
    url = server_url(owned_mysql)
    tasks = load_tasks(write_fleet_tasks(tmp_path, url))
    submit(tasks, 2000, tmp_path / "runs.txt")
    peak = 0
    stop = threading.Event()
    watcher = owned_mysql.connect()
    watcher_id = watcher.thread_id()

    def watch() -> None:
        nonlocal peak
        cursor = watcher.cursor()
        while not stop.is_set():
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                " WHERE DB = DATABASE() AND ID <> %s",
                (watcher_id,),
            )
            peak = max(peak, cursor.fetchone()[0])
            time.sleep(0.005)

    run = run_workers(
        tmp_path / "tasks.py", "--workers", "4", "--db-connections", "6", "--prefetch", "5"
    )
    run.wait_for_workers(4, timeout=30)
    thread = threading.Thread(target=watch)
    thread.start()
    try:
        wait_until(
            lambda: (
                int(
                    watcher_count(
                        owned_mysql, "SELECT COUNT(*) FROM forksafe_jobs WHERE state = %s"
                    )
                )
                == 2000
            ),
            120,
            "2000 jobs done",
        )
    finally:
        stop.set()
        thread.join(10)
        watcher.close()
    assert 2 <= peak <= 6, peak
    assert create_broker(url).counts(time.time()) == {"default": {states.SUCCESS: 2000}}


def watcher_count(database: Any, sql: str) -> int:
    con = database.connect()
    try:
        cursor = con.cursor()
        cursor.execute(sql, (states.SUCCESS,))
        return int(cursor.fetchone()[0])
    finally:
        con.close()
