"""The PostgreSQL broker: one queue shared by workers on many machines (psycopg2).

``postgresql://user:password@host:5432/database`` (also ``postgres://``). URL options
are passed to libpq (``sslmode``, ``connect_timeout``, ``application_name``, ...),
except the broker's own:

* ``retry_for`` — seconds an operation keeps retrying while the server is
  unreachable (default 60); see :mod:`workers.brokers.server`.
* ``max_connections`` — connections each process may open (default: as many as
  its threads need; ``forksafe run --db-connections`` sets a fleet-wide budget).

How it works:

* **Claims** are one statement: ``UPDATE ... WHERE id IN (SELECT ... ORDER BY
  priority DESC, run_at LIMIT n FOR UPDATE SKIP LOCKED) RETURNING ...``. Claimers
  never wait for each other; each takes a batch. The inner query walks the partial
  index ``forksafe_jobs_due (queue, priority DESC, run_at) WHERE state IN
  ('PENDING','SCHEDULED','RETRY')`` in order and stops at ``LIMIT``, so its cost does
  not grow with the number of finished jobs (``tests/test_brokers_postgres.py``
  shows the ``EXPLAIN``).
* **Wake-ups.** Submissions ``NOTIFY forksafe_jobs`` and outcomes ``NOTIFY
  forksafe_done`` in the same statement that writes them. A connection a worker waits
  on listens to the first, one ``AsyncResult.get()`` waits on to the second, so
  an idle worker (or a result reader) wakes within a millisecond of the commit
  instead of polling, and no other session is woken.
* Connections run in autocommit mode: almost every operation is a single statement,
  one round trip. Statements that write are never silently retried on a new
  connection (a lost reply could hide a commit); see :mod:`workers.brokers.server`.
* **Schema** changes run under ``pg_advisory_xact_lock`` in one transaction, so
  supervisors starting together migrate once.
"""

from __future__ import annotations

import json
import logging
import os
import select
import time
from collections.abc import Sequence
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

from workers import states
from workers.brokers.base import (
    BrokerURL,
    ClaimedJob,
    JobRecord,
    NewJob,
    Outcome,
    WorkerInfo,
    worker_lost_error,
)
from workers.brokers.server import ServerBroker

log = logging.getLogger("workers.brokers.postgres")

SCHEMA_VERSION = 1
LOCK_KEY = 0x666F726B73616665  # "forksafe"
JOBS_CHANNEL = "forksafe_jobs"
DONE_CHANNEL = "forksafe_done"
CHANNELS = frozenset({JOBS_CHANNEL, DONE_CHANNEL})
OWN_OPTIONS = ("retry_for", "max_connections")

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE forksafe_jobs (
            id text PRIMARY KEY,
            seq bigint GENERATED ALWAYS AS IDENTITY,
            task text NOT NULL,
            queue text NOT NULL,
            state text NOT NULL,
            priority integer NOT NULL DEFAULT 0,
            payload bytea NOT NULL,
            serializer text NOT NULL,
            run_at double precision NOT NULL,
            expires_at double precision,
            retries integer NOT NULL DEFAULT 0,
            deliveries integer NOT NULL DEFAULT 0,
            worker text,
            lease text,
            lease_until double precision,
            created_at double precision NOT NULL,
            started_at double precision,
            finished_at double precision,
            result bytea,
            error text,
            traceback text
        ) WITH (fillfactor = 80)""",
        # Claims walk this index in order and stop at LIMIT.
        """CREATE INDEX forksafe_jobs_due ON forksafe_jobs (queue, priority DESC, run_at)
            WHERE state IN ('PENDING', 'SCHEDULED', 'RETRY')""",
        "CREATE INDEX forksafe_jobs_held ON forksafe_jobs (worker) WHERE state = 'STARTED'",
        """CREATE INDEX forksafe_jobs_lapsing ON forksafe_jobs (lease_until)
            WHERE state = 'STARTED'""",
        """CREATE INDEX forksafe_jobs_expiring ON forksafe_jobs (expires_at)
            WHERE expires_at IS NOT NULL AND state IN ('PENDING', 'SCHEDULED', 'RETRY')""",
        "CREATE INDEX forksafe_jobs_finished ON forksafe_jobs (state, finished_at)",
        "CREATE INDEX forksafe_jobs_seq ON forksafe_jobs (seq)",
        """CREATE TABLE forksafe_workers (
            id text PRIMARY KEY,
            hostname text NOT NULL,
            pid integer NOT NULL,
            supervisor_pid integer NOT NULL,
            queues text NOT NULL,
            started_at double precision NOT NULL,
            heartbeat_at double precision NOT NULL,
            jobs_done bigint NOT NULL,
            current_job text,
            stats text NOT NULL
        )""",
    ),
}

_WAITING = "('PENDING', 'SCHEDULED', 'RETRY')"
_JOB_COLUMNS = (
    "id, task, queue, state, priority, payload, serializer, run_at, expires_at, retries, "
    "deliveries, worker, created_at, started_at, finished_at, result, error, traceback"
)


def _notify(channel: str, where: str = "TRUE", name: str = "notified") -> str:
    """A CTE to append after a data-modifying CTE ``changed``: ``NOTIFY channel`` once,
    in the same statement (so in the same commit), if a changed row matches ``where``."""
    return (
        f", {name} AS MATERIALIZED (SELECT pg_notify('{channel}', '')"
        f" FROM (SELECT 1 FROM changed WHERE {where} LIMIT 1) one)"
    )


VALUES_ROWS = 50
"""Up to this many rows are sent as VALUES lists; more as arrays through unnest()."""
WORKER_ROW_TTL = 600.0
"""Seconds after its last heartbeat that the sweep forgets a worker row (a dead host's)."""


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that knows which channels it listens to."""

    listening: frozenset[str] = frozenset()


def _disconnected(exc: BaseException) -> bool:
    code = getattr(exc, "pgcode", None)
    if isinstance(exc, psycopg2.InterfaceError) or code is None:
        return True
    return str(code)[:2] in ("08", "57", "53")  # connection, operator intervention, resources


class PostgresBroker(ServerBroker):
    """The :class:`~workers.brokers.base.Broker` interface on a PostgreSQL database."""

    transient = (psycopg2.OperationalError, psycopg2.InterfaceError)
    failures = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.InternalError)
    label = "PostgreSQL"

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        params: dict[str, Any] = {
            key: value for key, value in url.query.items() if key not in OWN_OPTIONS
        }
        for key, value in (
            ("host", url.host),
            ("port", url.port),
            ("user", url.user),
            ("password", url.password),
            ("dbname", url.database or None),
        ):
            if value is not None:
                params.setdefault(key, value)
        params.setdefault("application_name", "forksafe")
        self._params = params
        self._changed = False  # a notification arrived while this process ran a query
        self._wants: tuple[int, set[str]] = (0, set())  # (pid, channels its waits are for)

    def _connect(self) -> Any:
        con = psycopg2.connect(**self._params, connection_factory=_Connection)
        try:
            con.autocommit = True
        except BaseException:
            con.close()
            raise
        return con

    def _want(self, channel: str) -> None:
        """Note that this process's waits are for ``channel`` (claimers: new jobs,
        result readers: outcomes), so its connections listen to what it needs only."""
        pid, channels = self._wants
        if pid != os.getpid():
            self._wants = (os.getpid(), {channel})
        elif channel not in channels:
            channels.add(channel)

    def _is_disconnect(self, exc: BaseException) -> bool:
        return _disconnected(exc)

    def _run(self, sql: str, params: Sequence[Any] = (), retry: bool = True) -> list[Any]:
        """One statement, never re-sent on a new connection by the pool; its rows."""

        def work(con: Any) -> list[Any]:
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    cursor.execute(sql, tuple(params))
                rows = list(cursor.fetchall()) if cursor.description is not None else []
                count = cursor.rowcount
            finally:
                cursor.close()
            self._note_notifies(con)
            return rows if rows or cursor.description is not None else [count]

        return self._attempt(work, retry, [])

    def _note_notifies(self, con: Any) -> None:
        notifies = con.dbapi_connection.notifies
        if notifies:
            notifies.clear()
            self._changed = True

    # -- schema -------------------------------------------------------------------

    def _schema_version(self, cursor: Any) -> int:
        cursor.execute("SELECT to_regclass('forksafe_schema') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return 0
        cursor.execute("SELECT max(version) FROM forksafe_schema")
        return int(cursor.fetchone()[0] or 0)

    def setup(self) -> None:
        if self._schema_ok:
            return

        def work(con: Any) -> None:
            cursor = con.cursor()
            with cursor.no_failover():
                if self._schema_version(cursor) == SCHEMA_VERSION:
                    return
                cursor.execute("BEGIN")
                try:
                    cursor.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
                    cursor.execute(
                        "CREATE TABLE IF NOT EXISTS forksafe_schema (version integer NOT NULL)"
                    )
                    current = self._schema_version(cursor)
                    self._migrate(cursor, current, SCHEMA_VERSION, MIGRATIONS, log)
                    cursor.execute("COMMIT")
                except BaseException:
                    if not con.dbapi_connection.closed:
                        cursor.execute("ROLLBACK")
                    raise

        self._attempt(work, True, None, None if self._reached else 0.0)
        self._schema_ok = True

    # -- jobs ---------------------------------------------------------------------

    def enqueue(self, jobs: Sequence[NewJob], now: float) -> list[bool]:
        if not jobs:
            return []
        columns: list[list[Any]] = [[] for _ in range(10)]
        for job in jobs:
            eta = now if job.eta is None else job.eta
            row = (
                job.id,
                job.task,
                job.queue,
                states.SCHEDULED if eta > now else states.PENDING,
                job.priority,
                psycopg2.Binary(job.payload),
                job.serializer,
                eta,
                job.expires_at,
                now,
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        if len(jobs) == 1:  # the common delay(): plain VALUES plan faster than unnest
            source = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            params = [column[0] for column in columns]
        else:
            source = (
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[],"
                " %s::integer[], %s::bytea[], %s::text[], %s::float8[], %s::float8[],"
                " %s::float8[])"
            )
            params = list(columns)
        rows = self._run(
            "WITH changed AS (INSERT INTO forksafe_jobs (id, task, queue, state, priority,"
            f" payload, serializer, run_at, expires_at, created_at) {source}"
            " ON CONFLICT (id) DO NOTHING RETURNING id, run_at)"
            + _notify(JOBS_CHANNEL, "run_at <= %s")
            + " SELECT id FROM changed LEFT JOIN notified ON true",
            [*params, now],
        )
        new = {row[0] for row in rows}
        created: list[bool] = []
        for job in jobs:
            created.append(job.id in new)
            new.discard(job.id)
        return created

    def claim(
        self, worker: str, queues: Sequence[str], limit: int, lease_seconds: float, now: float
    ) -> list[ClaimedJob]:
        self._want(JOBS_CHANNEL)
        doubts = self._take_doubts()
        if doubts:
            self._give_back_doubts(doubts, now)
        lease = os.urandom(12).hex()
        queue_test = "queue = %s" if len(queues) == 1 else "queue = ANY(%s)"
        queue_param: Any = queues[0] if len(queues) == 1 else list(queues)
        sql = (
            "UPDATE forksafe_jobs SET state = 'STARTED', worker = %s, lease = %s,"
            " lease_until = %s, started_at = %s, deliveries = deliveries + 1"
            " WHERE id IN (SELECT id FROM forksafe_jobs"
            f"  WHERE state IN {_WAITING} AND {queue_test} AND run_at <= %s"
            "   AND (expires_at IS NULL OR expires_at > %s)"
            "  ORDER BY priority DESC, run_at LIMIT %s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, task, queue, payload, serializer, priority, retries, deliveries,"
            " run_at"
        )
        params = (worker, lease, now + lease_seconds, now, queue_param, now, now, limit)

        def work(con: Any) -> list[Any]:
            cursor = con.cursor()
            try:
                with cursor.no_failover():
                    cursor.execute(sql, params)
                    rows = list(cursor.fetchall())
            except self.transient:
                self._doubt(worker, lease)
                raise
            finally:
                cursor.close()
            self._note_notifies(con)
            return rows

        rows: list[Any] = self._attempt(work, False, [])
        rows.sort(key=lambda row: (-row[5], row[8]))
        return [
            ClaimedJob(
                id=row[0],
                task=row[1],
                queue=row[2],
                payload=bytes(row[3]),
                serializer=row[4],
                priority=row[5],
                retries=row[6],
                deliveries=row[7],
                lease=lease,
            )
            for row in rows
        ]

    def _give_back_doubts(self, doubts: list[tuple[str, str]], now: float) -> None:
        leases = [lease for _, lease in doubts]
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET state = 'PENDING', lease = NULL,"
            " lease_until = NULL, deliveries = greatest(deliveries - 1, 0)"
            " WHERE state = 'STARTED' AND lease = ANY(%s) RETURNING id)"
            + _notify(JOBS_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            (leases,),
            retry=False,
        )
        if not rows:  # still unreachable: keep them in doubt
            self._unsure.extend(doubts)
        elif rows[0][0]:
            log.info("gave back %d job(s) of a claim whose reply was lost", rows[0][0])

    def record(self, outcomes: Sequence[Outcome], now: float) -> list[bool]:
        if not outcomes:
            return []
        # Outcomes for the same job (a stale and a current lease) go one by one, so
        # "kept" can be told per outcome from the returned (id, lease) pairs.
        if len({outcome.job_id for outcome in outcomes}) != len(outcomes):
            return [stored for outcome in outcomes for stored in self.record([outcome], now)]
        columns: list[list[Any]] = [[] for _ in range(7)]
        for outcome in outcomes:
            row = (
                outcome.job_id,
                outcome.lease,
                outcome.state,
                None if outcome.result is None else psycopg2.Binary(outcome.result),
                json.dumps(outcome.error) if outcome.error is not None else None,
                outcome.traceback,
                outcome.retry_at,
            )
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        if len(outcomes) <= VALUES_ROWS:  # a worker's batch: VALUES plan faster than unnest
            row_marks = "(%s::text, %s::text, %s::text, %s::bytea, %s::text, %s::text, %s::float8)"
            source = "VALUES " + ", ".join([row_marks] * len(outcomes))
            params: list[Any] = [column[k] for k in range(len(outcomes)) for column in columns]
        else:
            source = (
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::bytea[],"
                " %s::text[], %s::text[], %s::float8[])"
            )
            params = list(columns)
        rows = self._run(
            f"WITH v (jid, jlease, jstate, jresult, jerror, jtraceback, jeta) AS ({source}),"
            " changed AS (UPDATE forksafe_jobs j SET state = v.jstate, result = v.jresult,"
            " error = v.jerror, traceback = v.jtraceback, lease = NULL, lease_until = NULL,"
            " finished_at = CASE WHEN v.jstate = 'RETRY' THEN NULL ELSE %s END,"
            " run_at = CASE WHEN v.jstate = 'RETRY' THEN v.jeta ELSE j.run_at END,"
            " retries = j.retries + (v.jstate = 'RETRY')::integer"
            " FROM v WHERE j.id = v.jid AND j.lease = v.jlease AND j.state = 'STARTED'"
            " RETURNING j.id, j.state)"
            + _notify(DONE_CHANNEL)
            + _notify(JOBS_CHANNEL, "state = 'RETRY'", "requeued")
            + " SELECT id FROM changed LEFT JOIN notified ON true LEFT JOIN requeued ON true",
            (*params, now),
        )
        kept = {row[0] for row in rows}
        return [outcome.job_id in kept for outcome in outcomes]

    def release(self, worker: str, job_ids: Sequence[str], now: float) -> int:
        if not job_ids:
            return 0
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET state = 'PENDING', lease = NULL,"
            " lease_until = NULL, deliveries = greatest(deliveries - 1, 0)"
            " WHERE worker = %s AND state = 'STARTED' AND id = ANY(%s) RETURNING id)"
            + _notify(JOBS_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            (worker, list(job_ids)),
            retry=False,
        )
        return int(rows[0][0]) if rows else 0

    def release_lost(self, worker: str, max_deliveries: int, now: float) -> int:
        return self._release_where("worker = %s", (worker,), max_deliveries, now)

    def sweep(self, max_deliveries: int, now: float) -> int:
        changed = self._release_where("lease_until < %s", (now,), max_deliveries, now)
        changed += self._count(
            "UPDATE forksafe_jobs SET state = 'EXPIRED', finished_at = %s"
            f" WHERE expires_at IS NOT NULL AND state IN {_WAITING} AND expires_at <= %s",
            (now, now),
            retry=False,
        )
        self._run(
            "DELETE FROM forksafe_workers WHERE heartbeat_at < %s",
            (now - WORKER_ROW_TTL,),
            retry=False,
        )
        return changed

    def _release_where(
        self, where: str, params: tuple[Any, ...], max_deliveries: int, now: float
    ) -> int:
        lost = worker_lost_error(max_deliveries)
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET lease = NULL, lease_until = NULL,"
            " state = CASE WHEN deliveries >= %s THEN 'FAILURE' ELSE 'PENDING' END,"
            " error = CASE WHEN deliveries >= %s THEN %s ELSE error END,"
            " finished_at = CASE WHEN deliveries >= %s THEN %s ELSE NULL END"
            f" WHERE state = 'STARTED' AND {where} RETURNING id)"
            + _notify(JOBS_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            (max_deliveries, max_deliveries, lost, max_deliveries, now, *params),
            retry=False,
        )
        return int(rows[0][0]) if rows else 0

    def fetch(self, job_id: str) -> JobRecord | None:
        self._want(DONE_CHANNEL)
        rows = self._run(f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE id = %s", (job_id,))
        return JobRecord.from_row(rows[0], copy_blobs=True) if rows else None

    def revoke(self, job_id: str, now: float) -> bool:
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET state = 'REVOKED', finished_at = %s,"
            " lease = NULL, lease_until = NULL"
            " WHERE id = %s AND state IN ('PENDING', 'SCHEDULED', 'RETRY', 'STARTED')"
            " RETURNING id)"
            + _notify(DONE_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            (now, job_id),
        )
        return bool(rows and rows[0][0] == 1)

    def retry(self, job_id: str, now: float) -> bool:
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET state = 'PENDING', run_at = %s,"
            " expires_at = NULL, finished_at = NULL, deliveries = 0, retries = 0, error = NULL,"
            " traceback = NULL, result = NULL"
            " WHERE id = %s AND state IN ('FAILURE', 'REVOKED', 'EXPIRED') RETURNING id)"
            + _notify(JOBS_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            (now, job_id),
        )
        return bool(rows and rows[0][0] == 1)

    def jobs(self, state_filter: Sequence[str] | None, limit: int) -> list[JobRecord]:
        if state_filter:
            rows = self._run(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE state = ANY(%s)"
                " ORDER BY seq DESC LIMIT %s",
                (list(state_filter), limit),
            )
        else:
            rows = self._run(
                f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs ORDER BY seq DESC LIMIT %s", (limit,)
            )
        return [JobRecord.from_row(row, copy_blobs=True) for row in rows]

    def outstanding(self, queues: Sequence[str], now: float) -> int:
        rows = self._run(
            "SELECT count(*) FROM forksafe_jobs WHERE queue = ANY(%s) AND"
            f" (state = 'STARTED' OR (state IN {_WAITING} AND (run_at <= %s OR state = 'RETRY')))",
            (list(queues), now),
        )
        return int(rows[0][0])

    def purge(self, state_filter: Sequence[str], finished_before: float | None) -> int:
        if not state_filter:
            return 0
        sql = "DELETE FROM forksafe_jobs WHERE state = ANY(%s)"
        params: list[Any] = [list(state_filter)]
        if finished_before is not None:
            sql += " AND finished_at < %s"
            params.append(finished_before)
        return self._count(sql, params, retry=True)

    # -- workers ------------------------------------------------------------------

    def report_worker(self, info: WorkerInfo) -> None:
        self._run(
            f"INSERT INTO forksafe_workers ({WorkerInfo.COLUMNS})"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (id) DO UPDATE SET"
            " heartbeat_at = excluded.heartbeat_at, jobs_done = excluded.jobs_done,"
            " current_job = excluded.current_job, stats = excluded.stats",
            info.to_row(),
            retry=False,
        )

    # -- waiting ------------------------------------------------------------------

    def wait(self, timeout: float) -> None:
        """Return when a ``NOTIFY`` arrives (a submission, an outcome...) or after ``timeout``.

        A connection used for waiting starts listening to what this process waits for
        (new jobs once it has claimed, outcomes once it has read a job, both before
        either) and keeps listening, so a notification that arrives while it runs
        other queries ends the next wait at once. The wait that adds a channel returns
        at once: what was committed before the ``LISTEN`` must be looked for again.
        Connections never used for waiting listen to nothing, so a ``NOTIFY`` wakes only
        the sessions that care.
        """
        if self._changed:
            self._changed = False
            return
        deadline = time.monotonic() + timeout
        pid, channels = self._wants
        wanted = frozenset(channels) if pid == os.getpid() and channels else CHANNELS

        def work(con: Any) -> None:
            raw = con.dbapi_connection
            missing = wanted - raw.listening
            if missing:
                cursor = con.cursor()
                try:
                    cursor.execute("; ".join(f"LISTEN {name}" for name in sorted(missing)))
                finally:
                    cursor.close()
                raw.listening = raw.listening | missing
                return
            while True:
                raw.poll()
                if raw.notifies:
                    raw.notifies.clear()
                    return
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                select.select([raw], [], [], remaining)

        start = time.monotonic()
        self._attempt(work, False, None)
        if self._outage_since is not None:  # unreachable: do not spin
            time.sleep(max(0.0, timeout - (time.monotonic() - start)))
        self._changed = False
