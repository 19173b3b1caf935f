"""The PostgreSQL broker: one queue shared by workers on many machines (psycopg2).

``postgresql://user:password@host:5432/database`` (also ``postgres://``). URL options
are passed to libpq (``sslmode``, ``connect_timeout``, ``application_name``, ...),
except the broker's own:

* ``retry_for`` — seconds an operation keeps retrying while the server is
  unreachable (default 60); see :mod:`workers.brokers.server`.
* ``max_connections`` — connections each process may open (default: as many as
  its threads need; ``forksafe run --db-connections`` sets a fleet-wide budget).

How it works:

* **Claims** are one statement: ``UPDATE ... WHERE ctid = ANY(ARRAY(SELECT ctid ...
  ORDER BY priority DESC, run_at LIMIT n FOR UPDATE SKIP LOCKED)) RETURNING ...``.
  Claimers never wait for each other; each takes a batch. The inner query walks the partial
  index ``forksafe_jobs_due (queue, priority DESC, run_at) WHERE state IN
  ('PENDING','SCHEDULED','RETRY')`` in order and stops at ``LIMIT``, so its cost does
  not grow with the number of finished jobs (``tests/test_brokers_postgres.py``
  shows the ``EXPLAIN``).
* **Wake-ups.** Submissions ``NOTIFY forksafe_jobs`` and outcomes ``NOTIFY
  forksafe_done`` in the transaction that writes them. A connection a worker waits
  on listens to the first, one ``AsyncResult.get()`` waits on to the second, so
  an idle worker (or a result reader) wakes within a millisecond of the commit
  instead of polling. PostgreSQL wakes every listening session of the database for
  any ``NOTIFY``, so both notify only while a session would hear them: one that waits
  for jobs, or listens for outcomes, holds an advisory lock shared, and the writing
  statement tries it exclusively. Workers busy with a stream of jobs hold nothing,
  and are not woken by each submission.
* **Prepared statements.** The statements run once or more per job (submit, claim,
  record, record-and-claim, fetch) are prepared once per connection and then
  executed by name with one plan kept for all parameters (``plan_cache_mode =
  force_generic_plan``): parsing and planning them cost the server more than running
  them. A plan kept from when the table was small must not scan it whole later, so the
  broker's sessions run with ``enable_seqscan = off`` (every statement it runs often
  has an index to use).
* **Record and claim together.** A worker that finishes a batch writes its outcomes
  and takes its next batch in one statement, so a job that arrives alone costs the
  worker two round trips (claim, then record-and-claim), not three.
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
from dataclasses import dataclass, field
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions

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
from workers.brokers.server import ServerBroker

log = logging.getLogger("workers.brokers.postgres")

SCHEMA_VERSION = 1
LOCK_KEY = 0x666F726B73616665  # "forksafe"
READERS_KEY = LOCK_KEY + 1
"""Advisory lock held (shared) by every session that listens to ``DONE_CHANNEL``."""
IDLE_KEY = LOCK_KEY + 2
"""Advisory lock held (shared) by every session that waits for new jobs, from before the
claim that finds the queue empty until after one that finds jobs."""
JOBS_CHANNEL = "forksafe_jobs"
DONE_CHANNEL = "forksafe_done"
CHANNELS = frozenset({JOBS_CHANNEL, DONE_CHANNEL})
_HEARERS = {JOBS_CHANNEL: IDLE_KEY, DONE_CHANNEL: READERS_KEY}
"""The lock that sessions which would hear a channel hold shared."""


def _unheard(channel: str) -> str:
    """An SQL condition, true when no session would hear ``channel`` now.

    It takes the channel's lock exclusively until the transaction ends when it can, so
    a session that starts listening meanwhile waits for the commit, then sees it.
    """
    return f"pg_try_advisory_xact_lock({_HEARERS[channel]})"


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
    in the same statement (so in the same commit), if a changed row matches ``where``
    and a session would hear it (see :func:`_unheard`).
    """
    return (
        f", {name} AS MATERIALIZED (SELECT pg_notify('{channel}', '')"
        f" FROM (SELECT 1 FROM changed WHERE {where} LIMIT 1) one"
        f" WHERE NOT {_unheard(channel)})"
    )


WORKER_ROW_TTL = 600.0
"""Seconds after its last heartbeat that the sweep forgets a worker row (a dead host's)."""


class _Connection(psycopg2.extensions.connection):  # type: ignore[misc]
    """A psycopg2 connection that knows which channels it listens to and which
    statements it has prepared (both belong to its server session)."""

    def __init__(self, dsn: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(dsn, *args, **kwargs)
        self.listening: frozenset[str] = frozenset()
        self.prepared: set[str] = set()
        self.idle = False  # holds IDLE_KEY
        self.busy_again = False  # found jobs since: let IDLE_KEY go with the next statement


@dataclass(frozen=True)
class _Statement:
    """A statement run often enough to be worth preparing on each connection.

    ``text`` refers to its parameters as ``$1``, ``$2``... of the given ``types``;
    :meth:`PostgresBroker._run` runs :attr:`prepare` the first time a connection
    runs it, then :attr:`execute` with the parameters.
    """

    name: str
    types: tuple[str, ...]
    text: str
    notify: str | None = None
    """A channel to notify in the same transaction (the same query message), if a
    session would hear it."""
    prepare: str = field(init=False)
    execute: str = field(init=False)
    first: _Statement | None = field(init=False)
    """A statement without parameters that :attr:`execute` runs first (the notifying)."""

    def __post_init__(self) -> None:
        # Explicit casts: a list of NULLs would otherwise be text[], not bytea[].
        marks = ", ".join(f"%s::{kind}" for kind in self.types)
        types = f" ({', '.join(self.types)})" if self.types else ""
        prepare = f"PREPARE {self.name}{types} AS {self.text}"
        execute = f"EXECUTE {self.name} ({marks})" if self.types else f"EXECUTE {self.name}"
        first = None
        if self.notify is not None:  # first: the reply is the last statement's rows
            first = _Statement(
                f"{self.notify}_if_heard",
                (),
                f"SELECT pg_notify('{self.notify}', '') WHERE NOT {_unheard(self.notify)}",
            )
            execute = f"{first.execute}; {execute}"
        object.__setattr__(self, "prepare", prepare)
        object.__setattr__(self, "execute", execute)
        object.__setattr__(self, "first", first)


_NEW_JOB_COLUMNS = (
    "id, task, queue, state, priority, payload, serializer, run_at, expires_at, created_at"
)
_NEW_JOB_TYPES = ("text", "text", "text", "text", "integer", "bytea", "text") + ("float8",) * 3


def _insert_jobs(source: str, now: str) -> str:
    """Insert the jobs of ``source`` (rows of ``_NEW_JOB_COLUMNS``), skipping known ids;
    ``NOTIFY`` once if one is due at ``now``. Returns the ids inserted."""
    return (
        f"WITH changed AS (INSERT INTO forksafe_jobs ({_NEW_JOB_COLUMNS}) {source}"
        " ON CONFLICT (id) DO NOTHING RETURNING id, run_at)"
        + _notify(JOBS_CHANNEL, f"run_at <= {now}")
        + " SELECT id FROM changed LEFT JOIN notified ON true"
    )


# One job: a plain INSERT, with the NOTIFY as a statement of its own when the job is due
# (an INSERT in a CTE costs the server about a fifth more, on the path of every delay()).
_INSERT_ONE = (
    f"INSERT INTO forksafe_jobs ({_NEW_JOB_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (id) DO NOTHING RETURNING id"
)
ENQUEUE_ONE = _Statement("forksafe_enqueue_one", _NEW_JOB_TYPES, _INSERT_ONE)
ENQUEUE_ONE_DUE = _Statement(
    "forksafe_enqueue_one", _NEW_JOB_TYPES, _INSERT_ONE, notify=JOBS_CHANNEL
)
ENQUEUE_MANY = _Statement(
    "forksafe_enqueue_many",
    (*(f"{kind}[]" for kind in _NEW_JOB_TYPES), "float8"),
    _insert_jobs(
        "SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        "$11",
    ),
)


def _claim_jobs(first: int, queue_test: str) -> str:
    """An ``UPDATE`` that claims due jobs; its parameters, from ``$first`` on: worker,
    lease, lease_until, now, queue(s) (tested by ``queue_test``), limit.

    The jobs it locks are updated by their row address (``ctid``), so the plan has no
    join to get wrong: a plan kept for any parameters (prepared) and made while the
    table was nearly empty would otherwise scan the whole table once it is not.
    """
    worker, lease, until, now, queues, limit = (f"${first + k}" for k in range(6))
    return (
        f"UPDATE forksafe_jobs SET state = 'STARTED', worker = {worker}, lease = {lease},"
        f" lease_until = {until}, started_at = {now}, deliveries = deliveries + 1"
        " WHERE ctid = ANY(ARRAY(SELECT ctid FROM forksafe_jobs"
        f"  WHERE state IN {_WAITING} AND {queue_test.format(queues)} AND run_at <= {now}"
        f"   AND (expires_at IS NULL OR expires_at > {now})"
        f"  ORDER BY priority DESC, run_at LIMIT {limit} FOR UPDATE SKIP LOCKED))"
        " RETURNING id, task, queue, payload, serializer, priority, retries, deliveries,"
        " run_at"
    )


_CLAIM_TYPES = ("text", "text", "float8", "float8")
_ONE_QUEUE = "queue = {}"
_SOME_QUEUES = "queue = ANY({})"
CLAIM_ONE_QUEUE = _Statement(
    "forksafe_claim_one_queue",
    (*_CLAIM_TYPES, "text", "integer"),
    _claim_jobs(1, _ONE_QUEUE),
)
CLAIM_SOME_QUEUES = _Statement(
    "forksafe_claim_some_queues",
    (*_CLAIM_TYPES, "text[]", "integer"),
    _claim_jobs(1, _SOME_QUEUES),
)

_OUTCOME_TYPES = ("text[]", "text[]", "text[]", "bytea[]", "text[]", "text[]", "float8[]", "float8")
# Only a STARTED job has a lease (every other state change clears it), so the lease
# match is the state test. Testing state too would let the planner add a scan of a partial
# index over every started job, live or dead, to each outcome's primary key lookup.
_RECORD = (
    "WITH v (jid, jlease, jstate, jresult, jerror, jtraceback, jeta) AS"
    " (SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7)),"
    " changed AS (UPDATE forksafe_jobs j SET state = v.jstate, result = v.jresult,"
    " error = v.jerror, traceback = v.jtraceback, lease = NULL, lease_until = NULL,"
    " finished_at = CASE WHEN v.jstate = 'RETRY' THEN NULL ELSE $8 END,"
    " run_at = CASE WHEN v.jstate = 'RETRY' THEN v.jeta ELSE j.run_at END,"
    " retries = j.retries + (v.jstate = 'RETRY')::integer"
    " FROM v WHERE j.id = ANY($1) AND j.id = v.jid AND j.lease = v.jlease"
    " RETURNING j.id, j.state)"
    + _notify(DONE_CHANNEL)
    + _notify(JOBS_CHANNEL, "state = 'RETRY'", "requeued")
)
_KEPT = "SELECT id FROM changed LEFT JOIN notified ON true LEFT JOIN requeued ON true"
RECORD = _Statement("forksafe_record", _OUTCOME_TYPES, f"{_RECORD} {_KEPT}")


def _record_and_claim(queue_test: str) -> str:
    """Outcomes as in ``RECORD``, then a claim (parameters from ``$9``, as in
    ``_claim_jobs``). One row: the ids recorded (an array), then the columns of a
    claimed job; one more row per further claimed job, or NULLs if none was claimed."""
    return (
        f"{_RECORD}, claimed AS ({_claim_jobs(9, queue_test)})"
        f" SELECT kept.ids, claimed.* FROM (SELECT array_agg(id) AS ids FROM ({_KEPT}) k)"
        " kept LEFT JOIN claimed ON true"
    )


RECORD_AND_CLAIM_ONE_QUEUE = _Statement(
    "forksafe_record_and_claim_one_queue",
    (*_OUTCOME_TYPES, *_CLAIM_TYPES, "text", "integer"),
    _record_and_claim(_ONE_QUEUE),
)
RECORD_AND_CLAIM_SOME_QUEUES = _Statement(
    "forksafe_record_and_claim_some_queues",
    (*_OUTCOME_TYPES, *_CLAIM_TYPES, "text[]", "integer"),
    _record_and_claim(_SOME_QUEUES),
)
FETCH = _Statement(
    "forksafe_fetch", ("text",), f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs WHERE id = $1"
)
FETCH_FINISHED = _Statement(
    "forksafe_fetch_finished",
    ("text", "text[]"),
    f"SELECT {_JOB_COLUMNS} FROM forksafe_jobs"
    f" WHERE id = $1 OR (id = ANY($2) AND state IN {FINAL_STATES_SQL})",
)


def _disconnected(exc: BaseException) -> bool:
    code = getattr(exc, "pgcode", None)
    if isinstance(exc, psycopg2.InterfaceError) or code is None:
        return True
    return str(code)[:2] in ("08", "57", "53")  # connection, operator intervention, resources


def _job_row(job: NewJob, now: float) -> tuple[Any, ...]:
    """A new job as the values of ``_NEW_JOB_COLUMNS``."""
    eta = now if job.eta is None else job.eta
    return (
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


def _queue_param(queues: Sequence[str]) -> Any:
    """The queue parameter of a claim: a name for one queue, a list for several."""
    return queues[0] if len(queues) == 1 else list(queues)


def _outcome_columns(outcomes: Sequence[Outcome]) -> list[list[Any]]:
    """Outcomes as the seven arrays ``RECORD`` takes (id, lease, state, result, error,
    traceback, retry time)."""
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
    return columns


def _found_jobs(con: Any) -> None:
    """A claim on ``con`` found jobs: if its session waited for jobs, it stops waiting
    (lets ``IDLE_KEY`` go) with its next statement, so submissions stop notifying it."""
    raw = con.dbapi_connection
    if raw.idle:
        raw.busy_again = True


def _claimed(rows: list[Any], lease: str) -> list[ClaimedJob]:
    """Claimed rows (``id, task, queue, payload, serializer, priority, retries,
    deliveries, run_at``) as jobs, highest priority then oldest first."""
    rows.sort(key=lambda row: (-row[5], row[8]))
    return [ClaimedJob.from_row(row, lease) for row in rows]


class PostgresBroker(ServerBroker):
    """The :class:`~workers.brokers.base.Broker` interface on a PostgreSQL database."""

    transient = (psycopg2.OperationalError, psycopg2.InterfaceError)
    failures = (psycopg2.OperationalError, psycopg2.InterfaceError, psycopg2.InternalError)
    label = "PostgreSQL"
    holds_connections = True  # a worker's claims and waits share its listening session
    gather_seconds = 0.002  # every NOTIFY wakes every idle worker

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
            cursor = con.cursor()
            # A prepared statement's plan is kept; one made while the table was
            # small would go on scanning it whole once it is large. Every hot
            # statement has an index (or a row address) to go by instead. Its one
            # plan is used from the start: left to choose, the server planned some
            # statements afresh at every run (costlier than running them). And short
            # statements only: compiling one (JIT) never pays off here.
            cursor.execute(
                "SET enable_seqscan = off; SET plan_cache_mode = force_generic_plan; SET jit = off"
            )
            cursor.close()
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

    def _run(
        self, sql: str | _Statement, params: Sequence[Any] = (), retry: bool = True
    ) -> list[Any]:
        """One statement, never re-sent on a new connection by the pool; its rows.

        A :class:`_Statement` is prepared first if this connection has not yet.
        """

        def work(con: Any) -> list[Any]:
            return self._execute(con, sql, params)

        return self._attempt(work, retry, [])

    def _execute(self, con: Any, sql: str | _Statement, params: Sequence[Any]) -> list[Any]:
        """Run one statement on ``con``: its rows, or ``[rowcount]`` if it returns none.

        The statement goes to the driver's own cursor: it must never be re-sent on a
        new connection (a lost reply could hide a commit), and failures are handled
        by :meth:`_attempt`, which lets the pooled connection reconnect for its next use.
        """
        raw = con.dbapi_connection
        prefix = ""
        if raw.busy_again:  # in the same query message, before the statement
            prefix = f"SELECT pg_advisory_unlock_shared({IDLE_KEY}); "
            raw.idle = raw.busy_again = False
        with raw.cursor() as cursor:
            if isinstance(sql, _Statement):
                for statement in (sql.first, sql):
                    if statement is not None and statement.name not in raw.prepared:
                        cursor.execute(statement.prepare)
                        raw.prepared.add(statement.name)
                cursor.execute(prefix + sql.execute, params)
            else:
                cursor.execute(prefix + sql, params)
            described = cursor.description is not None
            rows = cursor.fetchall() if described else []
            count = cursor.rowcount
        if raw.notifies:
            self._heard(raw)
        return rows if rows or described else [count]

    def _heard(self, raw: Any) -> None:
        """Notifications arrived with a reply: the next :meth:`wait` returns at once."""
        raw.notifies.clear()
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
        if len(jobs) == 1:  # the common delay()
            row = _job_row(jobs[0], now)
            rows = self._run(ENQUEUE_ONE_DUE if row[7] <= now else ENQUEUE_ONE, row)
        else:
            columns: list[list[Any]] = [[] for _ in range(10)]
            for job in jobs:
                for column, value in zip(columns, _job_row(job, now), strict=True):
                    column.append(value)
            rows = self._run(ENQUEUE_MANY, (*columns, now))
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
        self._settle_doubts(now)
        lease = os.urandom(12).hex()
        statement = CLAIM_ONE_QUEUE if len(queues) == 1 else CLAIM_SOME_QUEUES
        params = (worker, lease, now + lease_seconds, now, _queue_param(queues), limit)

        def work(con: Any) -> list[Any]:
            try:
                rows = self._execute(con, statement, params)
            except self.transient as exc:
                self._doubt(exc, worker, lease)
                raise
            if rows:
                _found_jobs(con)
            return rows

        return _claimed(self._attempt(work, False, []), lease)

    def record_and_claim(
        self,
        outcomes: Sequence[Outcome],
        worker: str,
        queues: Sequence[str],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[bool], list[ClaimedJob]]:
        """One statement: the outcomes are written, then the next jobs are claimed."""
        if not outcomes or len({outcome.job_id for outcome in outcomes}) != len(outcomes):
            return super().record_and_claim(outcomes, worker, queues, limit, lease_seconds, now)
        self._want(JOBS_CHANNEL)
        self._settle_doubts(now)
        lease = os.urandom(12).hex()
        statement = RECORD_AND_CLAIM_ONE_QUEUE if len(queues) == 1 else RECORD_AND_CLAIM_SOME_QUEUES
        params = (
            *_outcome_columns(outcomes),
            now,
            worker,
            lease,
            now + lease_seconds,
            now,
            _queue_param(queues),
            limit,
        )

        def work(con: Any) -> list[Any] | None:
            try:
                rows = self._execute(con, statement, params)
            except self.transient as exc:
                self._doubt(exc, worker, lease)
                raise
            if rows[0][1] is not None:
                _found_jobs(con)
            return rows

        rows = self._attempt(work, False, None)
        if rows is None:  # unreachable: whether it committed is unknown; record as usual
            return self.record(outcomes, now), []
        kept = set(rows[0][0] or ())
        claimed = [row[1:] for row in rows if row[1] is not None]
        return [outcome.job_id in kept for outcome in outcomes], _claimed(claimed, lease)

    def _settle_doubts(self, now: float) -> None:
        doubts = self._take_doubts()
        if doubts:
            self._give_back_doubts(doubts, now)

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
        rows = self._run(RECORD, (*_outcome_columns(outcomes), now))
        kept = {row[0] for row in rows}
        return [outcome.job_id in kept for outcome in outcomes]

    def release(self, worker: str, job_ids: Sequence[str], now: float) -> int:
        if not job_ids:
            return 0
        return self._give_back("worker = %s AND id = ANY(%s)", (worker, list(job_ids)))

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
            return self._release_where("worker = %s", (worker,), max_deliveries, now)
        if running is None:
            return self._give_back("worker = %s", (worker,))
        changed = self._give_back("worker = %s AND id <> %s", (worker, running))
        return changed + self._release_where(
            "worker = %s AND id = %s", (worker, running), max_deliveries, now
        )

    def _give_back(self, where: str, params: tuple[Any, ...]) -> int:
        """Put the held jobs matching ``where`` back in their queue, their delivery
        not counted: they never started."""
        rows = self._run(
            "WITH changed AS (UPDATE forksafe_jobs SET state = 'PENDING', lease = NULL,"
            " lease_until = NULL, deliveries = greatest(deliveries - 1, 0)"
            f" WHERE state = 'STARTED' AND {where} RETURNING id)"
            + _notify(JOBS_CHANNEL)
            + " SELECT count(*) FROM changed LEFT JOIN notified ON true",
            params,
            retry=False,
        )
        return int(rows[0][0]) if rows else 0

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
        rows = self._run(FETCH, (job_id,))
        return JobRecord.from_row(rows[0], copy_blobs=True) if rows else None

    def _count_all(self) -> list[Any]:
        # The one statement that must read the whole table: sequential scans allowed
        # again, for its own transaction.
        def work(con: Any) -> list[Any]:
            with con.dbapi_connection.cursor() as cursor:
                cursor.execute("BEGIN; SET LOCAL enable_seqscan = on")
                cursor.execute(self.COUNTS)
                rows = cursor.fetchall()
                cursor.execute("COMMIT")
            return list(rows)

        return self._attempt(work, True, [])

    def fetch_finished(self, job_id: str, others: Sequence[str]) -> list[JobRecord]:
        if not others:
            return super().fetch_finished(job_id, others)
        self._want(DONE_CHANNEL)
        rows = self._run(FETCH_FINISHED, (job_id, list(others)))
        return [JobRecord.from_row(row, copy_blobs=True) for row in rows]

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

        New jobs notify only while some session waits for them, that is holds
        ``IDLE_KEY`` shared: a wait for jobs without it takes it and returns at once (the
        claim that follows sees every job whose submission saw no waiter), and a claim
        that finds jobs lets it go with the session's next statement. So a busy fleet
        is not woken by every submission.
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
            for_jobs = JOBS_CHANNEL in wanted
            if for_jobs:
                raw.busy_again = False  # waiting again: keep IDLE_KEY
            if missing or (for_jobs and not raw.idle):
                statements = [f"LISTEN {name}" for name in sorted(missing)]
                # Each lock is taken once every submission (or outcome) that saw it
                # free has committed: what those wrote is seen by the claim (or read)
                # that follows this wait; any later one finds the lock held and
                # notifies.
                if DONE_CHANNEL in missing:
                    statements.append(f"SELECT pg_advisory_lock_shared({READERS_KEY})")
                if for_jobs and not raw.idle:
                    statements.append(f"SELECT pg_advisory_lock_shared({IDLE_KEY})")
                cursor = con.cursor()
                try:
                    cursor.execute("; ".join(statements))
                finally:
                    cursor.close()
                raw.listening = raw.listening | missing
                raw.idle = raw.idle or for_jobs
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
