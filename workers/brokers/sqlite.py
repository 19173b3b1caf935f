"""The embedded SQLite broker: a durable queue in one file, for one machine.

``sqlite:///jobs.db`` (relative to the current directory) or
``sqlite:////var/lib/app/jobs.db`` (absolute). URL options:

* ``timeout`` — seconds a writer waits for the lock (busy timeout), default 30.
* ``synchronous`` — ``NORMAL`` (default: durable across process crashes, the last
  transactions may be lost on power failure) or ``FULL``.

The database runs in WAL mode so readers (result polling, ``forksafe status``) never
block writers. Every write that must be atomic (claims, outcomes, submissions)
runs in a ``BEGIN IMMEDIATE`` transaction, which takes the write lock up front so
two claimers can never both read the same due job. Connections come from a
forksafe ``PersistentDB`` pool (one per thread), so a broker built in the
supervisor before ``fork()`` opens fresh connections in each worker.

Beside ``jobs.db`` (and its ``-wal``/``-shm`` files) the broker keeps ``jobs.db-wake/``,
the marker files of the doorbell that wakes idle workers (:mod:`workers.brokers.doorbell`).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from forksafe import PersistentDB
from workers import states
from workers.brokers.base import (
    FINAL_STATES_SQL,
    Broker,
    BrokerURL,
    ClaimedJob,
    JobRecord,
    NewJob,
    Outcome,
    WorkerInfo,
    worker_lost_error,
)
from workers.brokers.doorbell import SUPPORTED as DOORBELL_SUPPORTED
from workers.brokers.doorbell import Doorbell
from workers.errors import BrokerError, BrokerURLError

log = logging.getLogger("workers.brokers.sqlite")

SCHEMA_VERSION = 1

RECORD_CHUNK = 500
"""Outcomes written per statement (8 parameters each, well below SQLite's limit)."""

AUTOCHECKPOINT_PAGES = 20000
"""WAL pages (about 80 MB) after which any committer checkpoints, if no sweep has."""

SAFETY_POLL = 0.05
"""Seconds between database checks of a waiter that relies on the doorbell."""

BUSY_POLL = 0.0005
"""Seconds between change checks in :meth:`SQLiteBroker.wait` while the queue is busy."""
IDLE_POLL = 0.005
"""... and once nothing has changed for ``BUSY_WINDOW`` seconds."""
BUSY_WINDOW = 2.0

# version -> statements that bring the schema from version-1 to version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE forksafe_jobs (
            id TEXT PRIMARY KEY,
            task TEXT NOT NULL,
            queue TEXT NOT NULL,
            state TEXT NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            payload BLOB NOT NULL,
            serializer TEXT NOT NULL,
            eta REAL NOT NULL,
            expires_at REAL,
            retries INTEGER NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 0,
            worker TEXT,
            lease TEXT,
            lease_until REAL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            result BLOB,
            error TEXT,
            traceback TEXT
        )""",
        # Claims walk this index in order and stop at LIMIT.
        """CREATE INDEX forksafe_jobs_due ON forksafe_jobs (queue, priority DESC, eta)
            WHERE state IN ('PENDING', 'SCHEDULED', 'RETRY')""",
        """CREATE INDEX forksafe_jobs_held ON forksafe_jobs (worker, lease_until)
            WHERE state = 'STARTED'""",
        "CREATE INDEX forksafe_jobs_state ON forksafe_jobs (state, finished_at)",
        # The sweep finds waiting jobs past their expiry without scanning finished ones.
        """CREATE INDEX forksafe_jobs_expiring ON forksafe_jobs (expires_at)
            WHERE expires_at IS NOT NULL AND state IN ('PENDING', 'SCHEDULED', 'RETRY')""",
        """CREATE TABLE forksafe_workers (
            id TEXT PRIMARY KEY,
            hostname TEXT NOT NULL,
            pid INTEGER NOT NULL,
            supervisor_pid INTEGER NOT NULL,
            queues TEXT NOT NULL,
            started_at REAL NOT NULL,
            heartbeat_at REAL NOT NULL,
            jobs_done INTEGER NOT NULL,
            current_job TEXT,
            stats TEXT NOT NULL
        )""",
    ),
}

_WAITING = "('PENDING', 'SCHEDULED', 'RETRY')"
_JOB_COLUMNS = (
    "id, task, queue, state, priority, payload, serializer, eta, expires_at, retries, "
    "deliveries, worker, created_at, started_at, finished_at, result, error, traceback"
)


class SQLiteBroker(Broker):
    """The :class:`~workers.brokers.base.Broker` interface over one SQLite file."""

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        if url.host:
            raise BrokerURLError(
                f"SQLite broker URL {url.masked()!r} names a host {url.host!r}; use "
                f"'sqlite:///relative/path.db' or 'sqlite:////absolute/path.db'"
            )
        if not url.database or url.database == ":memory:":
            raise BrokerURLError(
                f"SQLite broker URL {url.masked()!r} needs a file (workers are separate "
                f"processes, so an in-memory database cannot be shared); use e.g. "
                f"'sqlite:///forksafe.db'"
            )
        self.path = os.path.abspath(url.database)
        try:
            self.busy_timeout = float(url.query.get("timeout", "30"))
        except ValueError:
            raise BrokerURLError(
                f"timeout={url.query['timeout']!r} in {url.masked()!r} is not a number of "
                f"seconds; use e.g. ?timeout=30"
            ) from None
        synchronous = url.query.get("synchronous", "NORMAL").upper()
        if synchronous not in ("NORMAL", "FULL", "EXTRA", "OFF"):
            raise BrokerURLError(
                f"synchronous={synchronous!r} in {url.masked()!r}; use NORMAL or FULL"
            )
        directory = os.path.dirname(self.path)
        if not os.path.isdir(directory):
            raise BrokerURLError(
                f"SQLite broker directory {directory!r} does not exist; create it or fix "
                f"the path in {url.masked()!r}"
            )
        self._local = threading.local()
        self._doorbell = Doorbell(self.path + "-wake") if DOORBELL_SUPPORTED else None
        # SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, which caps a
        # contended queue at a few hundred transactions a second; waits are done here
        # instead (see _begin), so the connections do not wait at all. "database is
        # locked" is therefore not a reason to reconnect (failures=).
        self._pool = PersistentDB(
            self._connect,
            setsession=[
                f"PRAGMA synchronous={synchronous}",
                # Checkpoints (which fsync) run in the supervisor's sweep, off the path of
                # claims and outcomes; this is only the backstop when no supervisor runs.
                f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}",
            ],
            failures=(sqlite3.InterfaceError, sqlite3.InternalError),
        )

    # -- plumbing -----------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """A new connection to the file, in WAL mode."""
        con = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            # Switching a new file to WAL takes its lock, and while other connections
            # switch too SQLite may refuse at once, without waiting: retried here.
            self._retry_busy(con.cursor(), "PRAGMA journal_mode=WAL")
        except BaseException:
            con.close()
            raise
        return con

    def _connection(self) -> Any:
        return self._pool.connection()

    @contextmanager
    def _write(self, ring: bool = False) -> Iterator[Any]:
        """A cursor inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on error).

        With ``ring``, local waiters are woken after the commit.
        """
        cursor = self._connection().cursor()
        self._retry_busy(cursor, "BEGIN IMMEDIATE")
        try:
            yield cursor
        except BaseException:
            cursor.execute("ROLLBACK")
            raise
        self._retry_busy(cursor, "COMMIT")
        if ring:
            self._ring()

    def _ring(self) -> None:
        """Tell local waiters that something they may wait for was committed."""
        if self._doorbell is not None:
            self._doorbell.ring()

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cursor = self._connection().cursor()
        self._retry_busy(cursor, sql, params)
        return list(cursor.fetchall())

    def _retry_busy(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> None:
        """Execute, retrying while another connection holds the lock, up to ``timeout`` s.

        Waits start at 50 microseconds and double up to 2 ms: a writer holds the lock
        for well under a millisecond, so short waits keep the queue fast under
        contention. Raises :class:`BrokerError` naming the file after ``timeout``.
        """
        pause = 0.00005
        deadline = 0.0
        while True:
            try:
                cursor.execute(sql, tuple(params))
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.busy_timeout
                elif now > deadline:
                    raise BrokerError(
                        f"the queue in {self.path!r} stayed locked for {self.busy_timeout:g} s; "
                        f"another process holds a long write transaction, or raise ?timeout="
                    ) from exc
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    # -- schema -------------------------------------------------------------------

    def setup(self) -> None:
        with self._write() as cursor:
            cursor.execute("CREATE TABLE IF NOT EXISTS forksafe_schema (version INTEGER NOT NULL)")
            cursor.execute("SELECT max(version) FROM forksafe_schema")
            current = cursor.fetchone()[0] or 0
            if current > SCHEMA_VERSION:
                raise BrokerError(
                    f"the queue in {self.path!r} has schema version {current}, newer than "
                    f"this workers version understands ({SCHEMA_VERSION}); upgrade forksafe"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    cursor.execute(statement)
                cursor.execute("DELETE FROM forksafe_schema")
                cursor.execute("INSERT INTO forksafe_schema (version) VALUES (?)", (version,))
                log.info("queue schema in %s migrated to version %d", self.path, version)

    # -- jobs ---------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob], now: float) -> list[bool]:
        created: list[bool] = []
        with self._write(ring=True) as cursor:
            for job in jobs:
                eta = now if job.eta is None else job.eta
                cursor.execute(
                    "INSERT INTO forksafe_jobs (id, task, queue, state, priority, payload,"
                    " serializer, eta, expires_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (id) DO NOTHING",
                    (
                        job.id,
                        job.task,
                        job.queue,
                        states.SCHEDULED if eta > now else states.PENDING,
                        job.priority,
                        job.payload,
                        job.serializer,
                        eta,
                        job.expires_at,
                        now,
                    ),
                )
                created.append(cursor.rowcount == 1)
        return created

    def claim(
        self, worker: str, queues: Sequence[str], limit: int, lease_seconds: float, now: float
    ) -> list[ClaimedJob]:
        marks = ",".join("?" * len(queues))
        # Cheap read first: an idle worker must not take the write lock on every poll.
        due = self._read(
            f"SELECT 1 FROM forksafe_jobs WHERE state IN {_WAITING} AND queue IN ({marks})"
            " AND eta <= ? LIMIT 1",
            [*queues, now],
        )
        if not due:
            return []
        lease = os.urandom(12).hex()
        with self._write() as cursor:
            cursor.execute(
                "UPDATE forksafe_jobs SET state = 'STARTED', worker = ?, lease = ?,"
                " lease_until = ?, started_at = ?, deliveries = deliveries + 1"
                " WHERE rowid IN (SELECT rowid FROM forksafe_jobs"
                f"  WHERE state IN {_WAITING} AND queue IN ({marks}) AND eta <= ?"
                "   AND (expires_at IS NULL OR expires_at > ?)"
                "  ORDER BY priority DESC, eta LIMIT ?)"
                " RETURNING id, task, queue, payload, serializer, priority, retries, deliveries",
                (worker, lease, now + lease_seconds, now, *queues, now, now, limit),
            )
            rows = cursor.fetchall()
        jobs = [ClaimedJob.from_row(row, lease) for row in rows]
        jobs.sort(key=lambda job: -job.priority)
        return jobs

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[bool]:
        # One statement per chunk of outcomes rather than one each. RETURNING names only
        # job ids, so outcomes for the same job (stale and current lease) go one by one.
        unique = len({outcome.job_id for outcome in outcomes}) == len(outcomes)
        size = RECORD_CHUNK if unique else 1
        stored: list[bool] = []
        with self._write(ring=True) as cursor:
            for start in range(0, len(outcomes), size):
                chunk = outcomes[start : start + size]
                params: list[Any] = []
                for outcome in chunk:
                    params += [
                        outcome.job_id,
                        outcome.lease,
                        outcome.state,
                        outcome.result,
                        json.dumps(outcome.error) if outcome.error is not None else None,
                        outcome.traceback,
                        outcome.retry_at,
                        now,
                    ]
                rows = ",".join(["(?,?,?,?,?,?,?,?)"] * len(chunk))
                cursor.execute(
                    f"WITH v (jid, jlease, jstate, jresult, jerror, jtraceback, jeta, jnow) AS"
                    f" (VALUES {rows})"
                    " UPDATE forksafe_jobs SET state = v.jstate, result = v.jresult,"
                    " error = v.jerror, traceback = v.jtraceback, lease = NULL,"
                    " lease_until = NULL,"
                    " finished_at = CASE WHEN v.jstate = 'RETRY' THEN NULL ELSE v.jnow END,"
                    " eta = CASE WHEN v.jstate = 'RETRY' THEN v.jeta ELSE forksafe_jobs.eta END,"
                    " retries = forksafe_jobs.retries + (v.jstate = 'RETRY')"
                    " FROM v WHERE forksafe_jobs.id = v.jid AND forksafe_jobs.lease = v.jlease"
                    " AND forksafe_jobs.state = 'STARTED'"
                    " RETURNING forksafe_jobs.id",
                    params,
                )
                kept = {row[0] for row in cursor.fetchall()}
                stored += [outcome.job_id in kept for outcome in chunk]
        return stored

    def extend_leases(self, worker: str, lease_seconds: float, now: float) -> int:
        with self._write() as cursor:
            cursor.execute(
                "UPDATE forksafe_jobs SET lease_until = ? WHERE worker = ? AND state = 'STARTED'",
                (now + lease_seconds, worker),
            )
            return int(cursor.rowcount)

    def release(self, worker: str, job_ids: Sequence[str], now: float) -> int:
        if not job_ids:
            return 0
        marks = ",".join("?" * len(job_ids))
        with self._write(ring=True) as cursor:
            return self._give_back(cursor, f"worker = ? AND id IN ({marks})", (worker, *job_ids))

    def release_lost(
        self,
        worker: str,
        max_deliveries: int,
        now: float,
        *,
        running: str | None,
        others_started: bool = False,
    ) -> int:
        with self._write(ring=True) as cursor:
            if others_started:
                return self._release_where(cursor, "worker = ?", (worker,), max_deliveries, now)
            if running is None:
                return self._give_back(cursor, "worker = ?", (worker,))
            changed = self._give_back(cursor, "worker = ? AND id <> ?", (worker, running))
            return changed + self._release_where(
                cursor, "worker = ? AND id = ?", (worker, running), max_deliveries, now
            )

    def _give_back(self, cursor: Any, where: str, params: tuple[Any, ...]) -> int:
        """Put the held jobs matching ``where`` back in their queue, their delivery
        not counted: they never started."""
        cursor.execute(
            "UPDATE forksafe_jobs SET state = 'PENDING', lease = NULL, lease_until = NULL,"
            f" deliveries = max(deliveries - 1, 0) WHERE state = 'STARTED' AND {where}",
            params,
        )
        return int(cursor.rowcount)

    def sweep(self, max_deliveries: int, now: float) -> int:
        with self._write() as cursor:
            changed = self._release_where(cursor, "lease_until < ?", (now,), max_deliveries, now)
            cursor.execute(
                "UPDATE forksafe_jobs SET state = 'EXPIRED', finished_at = ?"
                f" WHERE expires_at IS NOT NULL AND state IN {_WAITING} AND expires_at <= ?",
                (now, now),
            )
            changed += int(cursor.rowcount)
        if changed:
            self._ring()
        # Copy the WAL back into the database now, in the supervisor, rather than in
        # whichever claim or outcome commits past the autocheckpoint threshold.
        self._retry_busy(self._connection().cursor(), "PRAGMA wal_checkpoint(PASSIVE)")
        return changed

    def _release_where(
        self, cursor: Any, where: str, params: tuple[Any, ...], max_deliveries: int, now: float
    ) -> int:
        lost = worker_lost_error(max_deliveries)
        cursor.execute(
            "UPDATE forksafe_jobs SET lease = NULL, lease_until = NULL,"
            " state = CASE WHEN deliveries >= ? THEN 'FAILURE' ELSE 'PENDING' END,"
            " error = CASE WHEN deliveries >= ? THEN ? ELSE error END,"
            " finished_at = CASE WHEN deliveries >= ? THEN ? ELSE NULL END"
            f" WHERE state = 'STARTED' AND {where}",
            (max_deliveries, max_deliveries, lost, max_deliveries, now, *params),
        )
        return int(cursor.rowcount)

    def fetch(self, job_id: str) -> JobRecord | None:
        rows = self._read(f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE id = ?", (job_id,))
        return JobRecord.from_row(rows[0]) if rows else None

    def fetch_finished(self, job_id: str, others: Sequence[str]) -> list[JobRecord]:
        if not others:
            return super().fetch_finished(job_id, others)
        marks = ", ".join("?" * len(others))
        rows = self._read(
            f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs"
            f" WHERE id = ? OR (id IN ({marks}) AND state IN {FINAL_STATES_SQL})",
            (job_id, *others),
        )
        return [JobRecord.from_row(row) for row in rows]

    def revoke(self, job_id: str, now: float) -> bool:
        with self._write(ring=True) as cursor:
            cursor.execute(
                "UPDATE forksafe_jobs SET state = 'REVOKED', finished_at = ?, lease = NULL,"
                " lease_until = NULL"
                " WHERE id = ? AND state IN ('PENDING', 'SCHEDULED', 'RETRY', 'STARTED')",
                (now, job_id),
            )
            return bool(cursor.rowcount == 1)

    def retry(self, job_id: str, now: float) -> bool:
        with self._write(ring=True) as cursor:
            cursor.execute(
                "UPDATE forksafe_jobs SET state = 'PENDING', eta = ?, expires_at = NULL,"
                " finished_at = NULL, deliveries = 0, retries = 0, error = NULL,"
                " traceback = NULL, result = NULL"
                " WHERE id = ? AND state IN ('FAILURE', 'REVOKED', 'EXPIRED')",
                (now, job_id),
            )
            return bool(cursor.rowcount == 1)

    def jobs(self, state_filter: Sequence[str] | None, limit: int) -> list[JobRecord]:
        if state_filter:
            marks = ",".join("?" * len(state_filter))
            rows = self._read(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE state IN ({marks})"
                " ORDER BY rowid DESC LIMIT ?",
                [*state_filter, limit],
            )
        else:
            rows = self._read(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs ORDER BY rowid DESC LIMIT ?", [limit]
            )
        return [JobRecord.from_row(row) for row in rows]

    def counts(self, now: float) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for queue, state, number in self._read(
            "SELECT queue, state, count(*) FROM forksafe_jobs GROUP BY queue, state"
        ):
            result.setdefault(queue, {})[state] = number
        return result

    def outstanding(self, queues: Sequence[str], now: float) -> int:
        marks = ",".join("?" * len(queues))
        rows = self._read(
            f"SELECT count(*) FROM forksafe_jobs WHERE queue IN ({marks}) AND"
            f" (state = 'STARTED' OR (state IN {_WAITING} AND (eta <= ? OR state = 'RETRY')))",
            [*queues, now],
        )
        return int(rows[0][0])

    def purge(self, state_filter: Sequence[str], finished_before: float | None) -> int:
        if not state_filter:
            return 0
        marks = ",".join("?" * len(state_filter))
        sql = f"DELETE FROM forksafe_jobs WHERE state IN ({marks})"
        params: list[Any] = list(state_filter)
        if finished_before is not None:
            sql += " AND finished_at < ?"
            params.append(finished_before)
        with self._write() as cursor:
            cursor.execute(sql, params)
            return int(cursor.rowcount)

    # -- workers ------------------------------------------------------------------

    def report_worker(self, info: WorkerInfo) -> None:
        with self._write() as cursor:
            cursor.execute(
                f"INSERT INTO forksafe_workers ({WorkerInfo.COLUMNS})"
                " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT (id) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at, jobs_done = excluded.jobs_done,"
                " current_job = excluded.current_job, stats = excluded.stats",
                info.to_row(),
            )

    def remove_worker(self, worker: str) -> None:
        with self._write() as cursor:
            cursor.execute("DELETE FROM forksafe_workers WHERE id = ?", (worker,))

    def workers(self) -> list[WorkerInfo]:
        rows = self._read(f"SELECT {WorkerInfo.COLUMNS} FROM forksafe_workers ORDER BY started_at")
        return [WorkerInfo.from_row(row) for row in rows]

    # -- waiting ------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Return soon after another connection commits, or after ``timeout`` seconds.

        SQLite has no notifications. Local committers ring a doorbell
        (:mod:`workers.brokers.doorbell`) that wakes this thread at once; as a safety
        net, ``PRAGMA data_version`` (which changes whenever another connection
        commits, and costs microseconds to read) is checked every ``SAFETY_POLL``
        seconds. Without a doorbell it is polled every 0.5 ms while the queue is busy
        (a commit seen in the last two seconds), then every 5 ms.
        """
        now = time.monotonic()
        deadline = now + timeout
        doorbell = self._doorbell
        if doorbell is not None:
            doorbell.arm()
        cursor = self._connection().cursor()
        local = self._local
        last = getattr(local, "data_version", None)
        last_change = getattr(local, "last_change", 0.0)
        while True:
            cursor.execute("PRAGMA data_version")
            version = cursor.fetchone()[0]
            local.data_version = version
            if last is not None and version != last:
                local.last_change = time.monotonic()
                return
            last = version
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return
            if doorbell is not None:
                if doorbell.wait(min(SAFETY_POLL, remaining)):
                    return
                continue
            pause = BUSY_POLL if now - last_change < BUSY_WINDOW else IDLE_POLL
            time.sleep(min(pause, remaining))

    def stats(self) -> dict[str, Any]:
        stats = getattr(self._pool, "stats", None)
        return dict(stats()) if callable(stats) else {}

    def close(self) -> None:
        close = getattr(self._pool, "close", None)
        if callable(close):
            close()
