"""The MySQL / MariaDB broker: one queue shared by workers on many machines (PyMySQL).

``mysql://user:password@host:3306/database`` (also ``mariadb://``). Needs MySQL 8.0+
or MariaDB 10.6+ (``SKIP LOCKED``); an older server is refused with a clear error.
URL options: ``unix_socket``, ``charset``, ``connect_timeout``, and the broker's own:

* ``retry_for`` — seconds an operation keeps retrying while the server is
  unreachable (default 60); see :mod:`workers.brokers.server`.
* ``max_connections`` — connections each process may open (default: as many as
  its threads need; ``forksafe run --db-connections`` sets a fleet-wide budget).
* ``poll_max`` — the longest pause, in seconds, between two looks of an idle
  waiter at the queue (default 0.05).

How it works:

* **Claims** run in one ``READ COMMITTED`` transaction: ``SELECT ... ORDER BY
  rank_key, run_at LIMIT n FOR UPDATE SKIP LOCKED``, then ``UPDATE`` of exactly those
  rows (MySQL has no ``UPDATE ... RETURNING``). ``rank_key`` is ``-priority`` while a
  job waits and a sentinel above every priority otherwise, so the index
  ``(queue, rank_key, run_at)`` holds the waiting jobs first, in claim order, and
  a claim reads only the rows it takes (MySQL has no partial indexes).
* **Waiting** is adaptive polling (no ``LISTEN/NOTIFY`` here): an idle waiter looks
  again after 1 ms, then 2, 4, ... up to ``poll_max``; any work found or submitted
  by this process resets it to 1 ms. Waiters on the same machine are also woken at
  once by the committer's doorbell (:mod:`workers.brokers.doorbell`, one per
  server and database), so only other machines' submissions wait for a poll.
* **Schema** changes run under ``GET_LOCK('forksafe_schema')``, so supervisors
  starting together migrate once.
* Outcomes are written only for leases still current (``SELECT ... FOR UPDATE`` of
  the rows by id, then one ``UPDATE`` joined to the outcomes), all in one transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import pymysql
import pymysql.constants.CLIENT

from workers import states
from workers.brokers.base import (
    FINAL_STATES_SQL,
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
from workers.brokers.server import ServerBroker, url_number
from workers.errors import BrokerError

log = logging.getLogger("workers.brokers.mysql")

SCHEMA_VERSION = 1
DONE = 2**31
"""``rank_key`` of a job that is not waiting: sorts after every waiting job."""
POLL_MIN = 0.001
OWN_OPTIONS = ("retry_for", "max_connections", "poll_max")
DRIVER_OPTIONS = {"unix_socket": str, "charset": str, "connect_timeout": int}
WORKER_ROW_TTL = 600.0
"""Seconds after its last heartbeat that the sweep forgets a worker row (a dead host's)."""

# Client errors and server errors that mean the session or the server is gone.
DISCONNECTS = frozenset({1040, 1053, 1077, 1152, 1927, 2003, 2006, 2013, 2014, 2055, 4031})

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS forksafe_jobs (
            seq BIGINT NOT NULL AUTO_INCREMENT,
            id VARCHAR(191) NOT NULL,
            task VARCHAR(255) NOT NULL,
            queue VARCHAR(191) NOT NULL,
            state VARCHAR(16) NOT NULL,
            priority INT NOT NULL DEFAULT 0,
            rank_key BIGINT NOT NULL,
            payload LONGBLOB NOT NULL,
            serializer VARCHAR(32) NOT NULL,
            run_at DOUBLE NOT NULL,
            expires_at DOUBLE NULL,
            retries INT NOT NULL DEFAULT 0,
            deliveries INT NOT NULL DEFAULT 0,
            worker VARCHAR(255) NULL,
            lease VARCHAR(64) NULL,
            lease_until DOUBLE NULL,
            created_at DOUBLE NOT NULL,
            started_at DOUBLE NULL,
            finished_at DOUBLE NULL,
            result LONGBLOB NULL,
            error LONGTEXT NULL,
            traceback LONGTEXT NULL,
            PRIMARY KEY (seq),
            UNIQUE KEY forksafe_jobs_id (id),
            KEY forksafe_jobs_due (queue, rank_key, run_at),
            KEY forksafe_jobs_held (worker, state),
            KEY forksafe_jobs_lapsing (state, lease_until),
            KEY forksafe_jobs_finished (state, finished_at),
            KEY forksafe_jobs_expiring (state, expires_at)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
        """CREATE TABLE IF NOT EXISTS forksafe_workers (
            id VARCHAR(191) NOT NULL PRIMARY KEY,
            hostname VARCHAR(255) NOT NULL,
            pid INT NOT NULL,
            supervisor_pid INT NOT NULL,
            queues TEXT NOT NULL,
            started_at DOUBLE NOT NULL,
            heartbeat_at DOUBLE NOT NULL,
            jobs_done BIGINT NOT NULL,
            current_job TEXT NULL,
            stats LONGTEXT NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin""",
    ),
}

_WAITING = "('PENDING', 'SCHEDULED', 'RETRY')"
_JOB_COLUMNS = (
    "id, task, queue, state, priority, payload, serializer, run_at, expires_at, retries, "
    "deliveries, worker, created_at, started_at, finished_at, result, error, traceback"
)


def check_server_version(version: str) -> None:
    """Raise :class:`BrokerError` unless ``version`` (``SELECT VERSION()``) has SKIP LOCKED."""
    numbers = [int(n) for n in re.findall(r"\d+", version)[:3]] + [0, 0, 0]
    major, minor, patch = numbers[:3]
    if "mariadb" in version.lower():
        if (major, minor) >= (10, 6):
            return
        needed = "MariaDB 10.6"
    else:
        if (major, minor, patch) >= (8, 0, 1):
            return
        needed = "MySQL 8.0.1"
    raise BrokerError(
        f"the server runs {version}, which has no SELECT ... FOR UPDATE SKIP LOCKED (added in "
        f"{needed}); the mysql broker needs MySQL 8.0+ or MariaDB 10.6+: upgrade the server, "
        f"or use a postgresql:// or sqlite:// broker"
    )


def _disconnected(exc: BaseException) -> bool:
    if isinstance(exc, (pymysql.err.InterfaceError, pymysql.err.InternalError)):
        return True
    code = exc.args[0] if exc.args else None
    return not isinstance(code, int) or code in DISCONNECTS


class MySQLBroker(ServerBroker):
    """The :class:`~workers.brokers.base.Broker` interface on a MySQL or MariaDB database."""

    transient = (
        pymysql.err.OperationalError,
        pymysql.err.InterfaceError,
        pymysql.err.InternalError,
    )
    failures = transient
    label = "MySQL"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        params: dict[str, Any] = {}
        for key, value in url.query.items():
            if key in DRIVER_OPTIONS:
                params[key] = DRIVER_OPTIONS[key](value)
        params.update(
            host=url.host or "localhost",
            port=url.port or 3306,
            user=url.user or "root",
            password=url.password or "",
            database=url.database or None,
            autocommit=True,
            client_flag=pymysql.constants.CLIENT.FOUND_ROWS,
        )
        params.setdefault("charset", "utf8mb4")
        self._params = params
        self.poll_max = url_number(url, "poll_max", 0.05, minimum=POLL_MIN)
        self._poll = threading.local()
        self._doorbell: Doorbell | None = None
        if DOORBELL_SUPPORTED:
            where = f"{params['host']}:{params['port']}:{params.get('unix_socket')}/{url.database}"
            digest = hashlib.sha256(where.encode()).hexdigest()[:16]
            self._doorbell = Doorbell(os.path.join(tempfile.gettempdir(), f"forksafe-{digest}"))

    def _connect(self) -> Any:
        con = pymysql.connect(**self._params)
        try:
            with con.cursor() as cursor:
                cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        except BaseException:
            con.close()
            raise
        return con

    def _is_disconnect(self, exc: BaseException) -> bool:
        return _disconnected(exc)

    def _run(self, sql: str, params: Sequence[Any] = (), retry: bool = True) -> list[Any]:
        """One statement in autocommit mode, never re-sent by the pool; rows, or [rowcount]."""

        def work(con: Any) -> list[Any]:
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    cursor.execute(sql, tuple(params))
                if cursor.description is not None:
                    return list(cursor.fetchall())
                return [int(cursor.rowcount)]
            finally:
                cursor.close()

        return self._attempt(work, retry, [])

    # -- schema -------------------------------------------------------------------

    def setup(self) -> None:
        if self._schema_ok:
            return

        def version(cursor: Any) -> int:
            cursor.execute(
                "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
                " AND TABLE_NAME = 'forksafe_schema'"
            )
            if not cursor.fetchone()[0]:
                return 0
            cursor.execute("SELECT MAX(version) FROM forksafe_schema")
            return int(cursor.fetchone()[0] or 0)

        def work(con: Any) -> None:
            cursor = con.cursor()
            with cursor.no_failover():
                cursor.execute("SELECT VERSION(), DATABASE()")
                server, database = cursor.fetchone()
                check_server_version(server)
                if database is None:
                    raise BrokerError(
                        f"broker URL {self.url.masked()!r} names no database; add one, like "
                        f"mysql://user@host/jobs"
                    )
                if version(cursor) == SCHEMA_VERSION:
                    return
                cursor.execute("SELECT GET_LOCK('forksafe_schema', 60)")
                if cursor.fetchone()[0] != 1:
                    raise BrokerError(
                        f"waited 60 s for another process migrating the queue schema in "
                        f"{self.url.masked()}; try again"
                    )
                try:
                    cursor.execute(
                        "CREATE TABLE IF NOT EXISTS forksafe_schema (version INT NOT NULL)"
                    )
                    current = version(cursor)
                    self._migrate(cursor, current, SCHEMA_VERSION, MIGRATIONS, log)
                finally:
                    cursor.execute("SELECT RELEASE_LOCK('forksafe_schema')")

        self._attempt(work, True, None, None if self._reached else 0.0)
        self._schema_ok = True

    # -- jobs ---------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob], now: float) -> list[bool]:
        if not jobs:
            return []
        self._busy()
        rows: list[tuple[Any, ...]] = []
        for job in jobs:
            eta = now if job.eta is None else job.eta
            state = states.SCHEDULED if eta > now else states.PENDING
            rows.append(
                (
                    job.id,
                    job.task,
                    job.queue,
                    state,
                    job.priority,
                    -job.priority,
                    job.payload,
                    job.serializer,
                    eta,
                    job.expires_at,
                    now,
                )
            )
        insert = (
            "INSERT IGNORE INTO forksafe_jobs (id, task, queue, state, priority, rank_key,"
            " payload, serializer, run_at, expires_at, created_at) VALUES "
        )
        marks = "(%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
        if len(jobs) == 1:
            created = self._count(insert + marks, rows[0], retry=True) == 1
            self._ring()
            return [created]

        def work(con: Any) -> list[bool]:
            con.begin()
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    ids = sorted({job.id for job in jobs})
                    existing: set[str] = set()
                    for start in range(0, len(ids), 1000):
                        chunk = ids[start : start + 1000]
                        cursor.execute(
                            "SELECT id FROM forksafe_jobs WHERE id IN ("
                            + ",".join(["%s"] * len(chunk))
                            + ")",
                            chunk,
                        )
                        existing.update(row[0] for row in cursor.fetchall())
                    created: list[bool] = []
                    fresh: list[tuple[Any, ...]] = []
                    seen = set(existing)
                    for job, row in zip(jobs, rows, strict=True):
                        created.append(job.id not in seen)
                        if job.id not in seen:
                            fresh.append(row)
                            seen.add(job.id)
                    for start in range(0, len(fresh), 500):
                        chunk_rows = fresh[start : start + 500]
                        cursor.execute(
                            insert + ",".join([marks] * len(chunk_rows)),
                            [value for row in chunk_rows for value in row],
                        )
                con.commit()
                return created
            finally:
                cursor.close()

        result: list[bool] = self._attempt(work, True, [])
        self._ring()
        return result

    def claim(
        self, worker: str, queues: Sequence[str], limit: int, lease_seconds: float, now: float
    ) -> list[ClaimedJob]:
        doubts = self._take_doubts()
        if doubts:
            self._give_back_doubts(doubts)
        lease = os.urandom(12).hex()
        marks = ",".join(["%s"] * len(queues))
        queue_test = "queue = %s" if len(queues) == 1 else f"queue IN ({marks})"
        select = (
            "SELECT seq, id, task, queue, payload, serializer, priority, retries, deliveries"
            f" FROM forksafe_jobs WHERE {queue_test} AND rank_key < {DONE} AND run_at <= %s"
            f" AND state IN {_WAITING} AND (expires_at IS NULL OR expires_at > %s)"
            " ORDER BY rank_key, run_at LIMIT %s FOR UPDATE SKIP LOCKED"
        )

        def work(con: Any) -> list[Any]:
            con.begin()
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    cursor.execute(select, (*queues, now, now, limit))
                    rows = list(cursor.fetchall())
                    if not rows:
                        con.commit()
                        return []
                    cursor.execute(
                        "UPDATE forksafe_jobs SET state = 'STARTED', rank_key = %s, worker = %s,"
                        " lease = %s, lease_until = %s, started_at = %s,"
                        " deliveries = deliveries + 1 WHERE seq IN ("
                        + ",".join(["%s"] * len(rows))
                        + ")",
                        (DONE, worker, lease, now + lease_seconds, now, *[row[0] for row in rows]),
                    )
                    con.commit()
                return rows
            except self.transient as exc:
                self._doubt(exc, worker, lease)
                raise
            finally:
                cursor.close()

        rows: list[Any] = self._attempt(work, False, [])
        if rows:
            self._busy()
        return [ClaimedJob.from_row((*row[1:8], row[8] + 1), lease) for row in rows]

    def _give_back_doubts(self, doubts: list[tuple[str, str]]) -> None:
        owners = sorted({worker for worker, _ in doubts})
        leases = [lease for _, lease in doubts]
        # Through (worker, state), whose keys a heartbeat does not change: scanning by
        # (state, lease_until), the update could pass over a row a heartbeat moves, and
        # that job would stay STARTED under a lease its worker keeps alive and never uses.
        rows = self._run(
            "UPDATE forksafe_jobs FORCE INDEX (forksafe_jobs_held) SET state = 'PENDING',"
            " rank_key = -priority, lease = NULL, lease_until = NULL,"
            " deliveries = GREATEST(deliveries - 1, 0)"
            " WHERE worker IN (" + ",".join(["%s"] * len(owners)) + ") AND state = 'STARTED'"
            " AND lease IN (" + ",".join(["%s"] * len(leases)) + ")",
            (*owners, *leases),
            retry=False,
        )
        if not rows:
            self._unsure.extend(doubts)
        elif rows[0]:
            log.info("gave back %d job(s) of a claim whose reply was lost", rows[0])

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[bool]:
        if not outcomes:
            return []
        ids = sorted({outcome.job_id for outcome in outcomes})

        def work(con: Any) -> list[bool]:
            con.begin()
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    # By id alone: with the state in the WHERE, the server may take it from
                    # an index on (state, lease_until), and a locking read there can pass over
                    # an entry a heartbeat moves meanwhile, dropping an outcome whose lease
                    # is current.
                    cursor.execute(
                        "SELECT id, state, lease FROM forksafe_jobs WHERE id IN ("
                        + ",".join(["%s"] * len(ids))
                        + ") FOR UPDATE",
                        ids,
                    )
                    current = {
                        job_id: lease
                        for job_id, state, lease in cursor.fetchall()
                        if state == states.STARTED
                    }
                    kept: list[bool] = []
                    chosen: list[Outcome] = []
                    for outcome in outcomes:
                        ok = current.get(outcome.job_id) == outcome.lease
                        kept.append(ok)
                        if ok:
                            chosen.append(outcome)
                            current.pop(outcome.job_id)  # one outcome per lease
                    if chosen:
                        self._write_outcomes(cursor, chosen, now)
                con.commit()
                return kept
            finally:
                cursor.close()

        stored: list[bool] = self._attempt(work, True, [])
        if any(stored):
            self._ring()
        return stored

    def _write_outcomes(self, cursor: Any, chosen: Sequence[Outcome], now: float) -> None:
        values: list[Any] = []
        selects: list[str] = []
        for outcome in chosen:
            selects.append(
                "SELECT %s AS jid, %s AS jstate, %s AS jresult, %s AS jerror,"
                " %s AS jtraceback, %s AS jeta"
            )
            values += [
                outcome.job_id,
                outcome.state,
                outcome.result,
                json.dumps(outcome.error) if outcome.error is not None else None,
                outcome.traceback,
                outcome.retry_at,
            ]
        cursor.execute(
            "UPDATE forksafe_jobs j JOIN (" + " UNION ALL ".join(selects) + ") v ON j.id = v.jid"
            " SET j.rank_key = CASE WHEN v.jstate IN ('PENDING', 'SCHEDULED', 'RETRY')"
            f" THEN -j.priority ELSE {DONE} END,"
            " j.run_at = CASE WHEN v.jstate = 'RETRY' THEN v.jeta ELSE j.run_at END,"
            " j.retries = j.retries + (v.jstate = 'RETRY'),"
            " j.finished_at = CASE WHEN v.jstate = 'RETRY' THEN NULL ELSE %s END,"
            " j.state = v.jstate, j.result = v.jresult, j.error = v.jerror,"
            " j.traceback = v.jtraceback, j.lease = NULL, j.lease_until = NULL",
            [*values, now],
        )

    def release(self, worker: str, job_ids: Sequence[str], now: float) -> int:
        if not job_ids:
            return 0
        marks = ",".join(["%s"] * len(job_ids))
        changed = self._give_back(f"worker = %s AND id IN ({marks})", (worker, *job_ids))
        if changed:
            self._ring()
        return changed

    def release_lost(
        self,
        worker: str,
        max_deliveries: int,
        now: float,
        *,
        running: str | None,
        others_started: bool = False,
    ) -> int:
        if others_started:
            changed = self._release_where("worker = %s", (worker,), max_deliveries, now)
        elif running is None:
            changed = self._give_back("worker = %s", (worker,))
        else:
            changed = self._give_back("worker = %s AND id <> %s", (worker, running))
            changed += self._release_where(
                "worker = %s AND id = %s", (worker, running), max_deliveries, now
            )
        if changed:
            self._ring()
        return changed

    def _give_back(self, where: str, params: tuple[Any, ...]) -> int:
        """Put the held jobs matching ``where`` back in their queue, their delivery
        not counted: they never started."""
        return self._count(
            "UPDATE forksafe_jobs SET state = 'PENDING', rank_key = -priority, lease = NULL,"
            " lease_until = NULL, deliveries = GREATEST(deliveries - 1, 0)"
            f" WHERE state = 'STARTED' AND {where}",
            params,
            retry=False,
        )

    def sweep(self, max_deliveries: int, now: float) -> int:
        changed = self._release_where("lease_until < %s", (now,), max_deliveries, now)
        changed += self._count(
            f"UPDATE forksafe_jobs SET state = 'EXPIRED', rank_key = {DONE}, finished_at = %s"
            f" WHERE state IN {_WAITING} AND expires_at IS NOT NULL AND expires_at <= %s",
            (now, now),
            retry=False,
        )
        self._run(
            "DELETE FROM forksafe_workers WHERE heartbeat_at < %s",
            (now - WORKER_ROW_TTL,),
            retry=False,
        )
        if changed:
            self._ring()
        return changed

    def _release_where(
        self, where: str, params: tuple[Any, ...], max_deliveries: int, now: float
    ) -> int:
        lost = worker_lost_error(max_deliveries)
        # Single-table UPDATE assigns left to right: deliveries is read before any change.
        return self._count(
            "UPDATE forksafe_jobs SET lease = NULL, lease_until = NULL,"
            f" rank_key = CASE WHEN deliveries >= %s THEN {DONE} ELSE -priority END,"
            " error = CASE WHEN deliveries >= %s THEN %s ELSE error END,"
            " finished_at = CASE WHEN deliveries >= %s THEN %s ELSE NULL END,"
            " state = CASE WHEN deliveries >= %s THEN 'FAILURE' ELSE 'PENDING' END"
            f" WHERE state = 'STARTED' AND {where}",
            (max_deliveries, max_deliveries, lost, max_deliveries, now, max_deliveries, *params),
            retry=False,
        )

    def fetch(self, job_id: str) -> JobRecord | None:
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE id = %s", (job_id,))
        return JobRecord.from_row(rows[0], copy_blobs=True) if rows else None

    def fetch_finished(self, job_id: str, others: Sequence[str]) -> list[JobRecord]:
        if not others:
            return super().fetch_finished(job_id, others)
        marks = ", ".join(["%s"] * len(others))
        rows = self._run(
            f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs"
            f" WHERE id = %s OR (id IN ({marks}) AND state IN {FINAL_STATES_SQL})",
            (job_id, *others),
        )
        return [JobRecord.from_row(row, copy_blobs=True) for row in rows]

    def revoke(self, job_id: str, now: float) -> bool:
        revoked = (
            self._count(
                f"UPDATE forksafe_jobs SET state = 'REVOKED', rank_key = {DONE}, finished_at = %s,"
                " lease = NULL, lease_until = NULL"
                " WHERE id = %s AND state IN ('PENDING', 'SCHEDULED', 'RETRY', 'STARTED')",
                (now, job_id),
                retry=True,
            )
            == 1
        )
        if revoked:
            self._ring()
        return revoked

    def retry(self, job_id: str, now: float) -> bool:
        changed = self._count(
            "UPDATE forksafe_jobs SET state = 'PENDING', rank_key = -priority, run_at = %s,"
            " expires_at = NULL, finished_at = NULL, deliveries = 0, retries = 0, error = NULL,"
            " traceback = NULL, result = NULL"
            " WHERE id = %s AND state IN ('FAILURE', 'REVOKED', 'EXPIRED')",
            (now, job_id),
            retry=True,
        )
        if changed:
            self._busy()
            self._ring()
        return changed == 1

    def jobs(self, state_filter: Sequence[str] | None, limit: int) -> list[JobRecord]:
        if state_filter:
            rows = self._run(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE state IN ("
                + ",".join(["%s"] * len(state_filter))
                + ") ORDER BY seq DESC LIMIT %s",
                (*state_filter, limit),
            )
        else:
            rows = self._run(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs ORDER BY seq DESC LIMIT %s", (limit,)
            )
        return [JobRecord.from_row(row, copy_blobs=True) for row in rows]

    def outstanding(self, queues: Sequence[str], now: float) -> int:
        rows = self._run(
            "SELECT COUNT(*) FROM forksafe_jobs WHERE queue IN ("
            + ",".join(["%s"] * len(queues))
            + f") AND (state = 'STARTED' OR (state IN {_WAITING}"
            " AND (run_at <= %s OR state = 'RETRY')))",
            (*queues, now),
        )
        return int(rows[0][0])

    def purge(self, state_filter: Sequence[str], finished_before: float | None) -> int:
        if not state_filter:
            return 0
        sql = (
            "DELETE FROM forksafe_jobs WHERE state IN ("
            + ",".join(["%s"] * len(state_filter))
            + ")"
        )
        params: list[Any] = list(state_filter)
        if finished_before is not None:
            sql += " AND finished_at < %s"
            params.append(finished_before)
        return self._count(sql, params, retry=True)

    # -- workers ------------------------------------------------------------------

    def report_worker(self, info: WorkerInfo) -> None:
        self._run(
            f"INSERT INTO forksafe_workers ({WorkerInfo.COLUMNS})"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON DUPLICATE KEY UPDATE"
            " heartbeat_at = VALUES(heartbeat_at), jobs_done = VALUES(jobs_done),"
            " current_job = VALUES(current_job), stats = VALUES(stats)",
            info.to_row(),
            retry=False,
        )

    # -- waiting ------------------------------------------------------------------

    def _busy(self) -> None:
        self._poll.pause = POLL_MIN

    def _ring(self) -> None:
        """Wake this machine's waiters after a commit they may care about."""
        if self._doorbell is not None:
            with contextlib.suppress(OSError):  # another user's doorbell: poll instead
                self._doorbell.ring()

    def wait(self, timeout: float) -> None:
        """Sleep before the next look at the queue: 1 ms after work was seen, doubling
        on every idle look up to ``poll_max`` seconds, never longer than ``timeout``;
        a ring of this machine's doorbell ends the sleep at once."""
        pause = max(0.0, min(getattr(self._poll, "pause", POLL_MIN), timeout))
        self._poll.pause = min(max(pause, POLL_MIN) * 2, self.poll_max)
        if self._doorbell is not None:
            try:
                self._doorbell.arm()
                if self._doorbell.wait(pause):
                    self._busy()
                return
            except OSError:
                self._doorbell = None  # cannot use it here: poll instead
        time.sleep(pause)
