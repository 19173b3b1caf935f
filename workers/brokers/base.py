"""The broker interface: the small contract every queue backend implements.

A broker is a database table of jobs plus a table of live workers. The SQLite broker
(:mod:`workers.brokers.sqlite`) is the embedded default; PostgreSQL and MySQL
brokers implement the same methods. The rules every implementation keeps:

* **Idempotent submission.** :meth:`Broker.enqueue` inserts all jobs in one
  transaction; a job whose id already exists is left untouched (same id twice = one job).
* **Leases.** :meth:`Broker.claim` moves waiting jobs whose ``eta`` has passed to
  ``STARTED`` and stamps them with the claiming worker's id, a fresh lease token and
  a ``lease_until`` time. Workers extend their leases with :meth:`Broker.extend_leases`.
  A lease that runs out (:meth:`Broker.sweep`) or whose worker is known dead
  (:meth:`Broker.release_lost`) puts the job back in its queue. A delivery counts
  once its job started: jobs a worker claimed but never started go back uncounted.
* **Exactly-once completion.** :meth:`Broker.record` writes an outcome only if the
  job is still ``STARTED`` under the given lease token, so when a job runs twice (a
  lease expired under a slow worker) only one outcome is ever stored.
* **Times are Unix seconds** (``time.time()``) as floats, taken from the caller's clock.

URLs look like ``scheme://user:password@host:port/database?option=value``; see
:func:`parse_url`. A URL's password is masked in every display (:meth:`BrokerURL.masked`).
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from workers import states
from workers.errors import BrokerURLError

log = logging.getLogger("workers.brokers")

# scheme -> "module:Class"; imported only when a URL with that scheme is used.
BROKER_CLASSES: dict[str, str] = {
    "sqlite": "workers.brokers.sqlite:SQLiteBroker",
    "postgresql": "workers.brokers.postgres:PostgresBroker",
    "postgres": "workers.brokers.postgres:PostgresBroker",
    "mysql": "workers.brokers.mysql:MySQLBroker",
    "mariadb": "workers.brokers.mysql:MySQLBroker",
}

DEFAULT_URL = "sqlite:///forksafe.db"


@dataclass(frozen=True)
class BrokerURL:
    """A parsed broker URL. ``str()`` and ``repr()`` never show the password."""

    scheme: str
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    database: str = ""
    query: Mapping[str, str] = field(default_factory=dict)

    def masked(self) -> str:
        """The URL with its password replaced by ``***``, safe for logs and messages."""
        return self._render("***" if self.password is not None else None)

    def unmasked(self) -> str:
        """The full URL, password included: for connecting, never for display."""
        return self._render(self.password)

    def _render(self, password: str | None) -> str:
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if password is not None:
                auth += ":" + (password if password == "***" else quote(password, safe=""))
            auth += "@"
        netloc = auth + (self.host or "")
        if self.port is not None:
            netloc += f":{self.port}"
        query = "&".join(f"{k}={v}" for k, v in self.query.items())
        return f"{self.scheme}://{netloc}/{self.database}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.masked()


def parse_url(url: str) -> BrokerURL:
    """Parse a broker URL, raising :class:`BrokerURLError` with the fix when it is wrong.

    An unknown scheme is reported with the closest known one (``sqlte://`` -> did you
    mean ``sqlite``?). For SQLite, ``sqlite:///relative.db`` and
    ``sqlite:////absolute/path.db`` name the file.
    """
    if not isinstance(url, str) or "://" not in url:
        raise BrokerURLError(
            f"broker URL {_mask_raw(str(url))!r} has no scheme; "
            f"write it like {DEFAULT_URL!r} or 'postgresql://user@host/db'"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerURLError(f"broker URL {_mask_raw(url)!r} is malformed: {exc}") from None
    scheme = parts.scheme.lower().split("+", 1)[0]
    if scheme not in BROKER_CLASSES:
        close = difflib.get_close_matches(scheme, list(BROKER_CLASSES), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        known = ", ".join(sorted(set(BROKER_CLASSES)))
        raise BrokerURLError(
            f"unknown broker scheme {parts.scheme!r} in {_mask_raw(url)!r}; {hint}"
            f"known schemes: {known}"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return BrokerURL(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        user=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=unquote(path),
        query=dict(parse_qsl(parts.query)),
    )


def mask_url(url: str) -> str:
    """Return ``url`` with any password masked, even when it does not parse."""
    try:
        return parse_url(url).masked()
    except BrokerURLError:
        return _mask_raw(url)


def _mask_raw(url: str) -> str:
    head, sep, tail = url.partition("://")
    if not sep or "@" not in tail:
        return url
    auth, _, rest = tail.rpartition("@")
    user = auth.split(":", 1)[0]
    return f"{head}://{user}:***@{rest}" if ":" in auth else url


def create_broker(url: str | BrokerURL) -> Broker:
    """Build (but do not connect) the broker for ``url``.

    Raises :class:`BrokerURLError` for an unknown scheme or a broker that this
    installation does not have.
    """
    parsed = url if isinstance(url, BrokerURL) else parse_url(url)
    module_name, _, class_name = BROKER_CLASSES[parsed.scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise BrokerURLError(
            f"the {parsed.scheme} broker for {parsed.masked()!r} is not available in this "
            f"version of workers ({module_name} is missing); use a URL like {DEFAULT_URL!r}"
        ) from None
    broker_class: type[Broker] = getattr(module, class_name)
    return broker_class(parsed)


@dataclass(frozen=True)
class NewJob:
    """A job to insert. ``eta`` is when it may run; ``SCHEDULED`` if in the future."""

    id: str
    task: str
    queue: str
    payload: bytes
    serializer: str
    priority: int = 0
    eta: float | None = None
    expires_at: float | None = None
    max_retries: int = 0


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker now holds. Outcomes must quote ``lease``."""

    id: str
    task: str
    queue: str
    payload: bytes
    serializer: str
    priority: int
    retries: int
    deliveries: int
    lease: str

    @classmethod
    def from_row(cls, row: Sequence[Any], lease: str) -> ClaimedJob:
        """The job in a claimed row ``(id, task, queue, payload, serializer, priority,
        retries, deliveries, ...)``."""
        return cls(
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


@dataclass(frozen=True)
class Outcome:
    """The end of one execution of a claimed job.

    ``state`` is ``SUCCESS`` (``result`` set), ``FAILURE`` (``error`` and
    ``traceback`` set) or ``RETRY`` (as ``FAILURE`` plus ``retry_at``, the time of the
    next attempt; the job's retry count goes up by one).
    """

    job_id: str
    lease: str
    state: str
    result: bytes | None = None
    error: Mapping[str, Any] | None = None
    traceback: str | None = None
    retry_at: float | None = None


@dataclass(frozen=True)
class JobRecord:
    """Everything the broker knows about one job, for results and the CLI."""

    id: str
    task: str
    queue: str
    state: str
    priority: int
    payload: bytes
    serializer: str
    eta: float | None
    expires_at: float | None
    retries: int
    deliveries: int
    worker: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result: bytes | None
    error: Mapping[str, Any] | None
    traceback: str | None

    @classmethod
    def from_row(cls, row: Sequence[Any], copy_blobs: bool = False) -> JobRecord:
        """Rebuild a job from a row of the brokers' job columns, in field order.

        ``copy_blobs`` turns ``payload`` and ``result`` into :class:`bytes`: the server
        drivers may return binary columns as ``memoryview`` or ``bytearray``, while
        SQLite already returns :class:`bytes` and its values are kept as they are.
        """
        return cls(
            id=row[0],
            task=row[1],
            queue=row[2],
            state=row[3],
            priority=row[4],
            payload=bytes(row[5]) if copy_blobs else row[5],
            serializer=row[6],
            eta=row[7],
            expires_at=row[8],
            retries=row[9],
            deliveries=row[10],
            worker=row[11],
            created_at=row[12],
            started_at=row[13],
            finished_at=row[14],
            result=bytes(row[15]) if copy_blobs and row[15] is not None else row[15],
            error=json.loads(row[16]) if row[16] else None,
            traceback=row[17],
        )


FINAL_STATES_SQL = "(" + ", ".join(f"'{state}'" for state in sorted(states.READY_STATES)) + ")"
"""The final states as an SQL list, for ``state IN ...``."""


def worker_lost_error(max_deliveries: int) -> str:
    """The ``error`` (JSON) stored on a job that failed because its worker kept dying."""
    message = f"the worker running this job died {max_deliveries} times"
    return json.dumps(
        {
            "type": "workers.errors.WorkerLostError",
            "message": message,
            "args": [message],
        }
    )


@dataclass(frozen=True)
class WorkerInfo:
    """A live worker as last reported by its heartbeat."""

    id: str
    hostname: str
    pid: int
    supervisor_pid: int
    queues: tuple[str, ...]
    started_at: float
    heartbeat_at: float
    jobs_done: int
    current_job: str | None = None
    stats: Mapping[str, Any] = field(default_factory=dict)

    #: The ``forksafe_workers`` columns, in the order of :meth:`to_row` and :meth:`from_row`.
    COLUMNS: ClassVar[str] = (
        "id, hostname, pid, supervisor_pid, queues, started_at, heartbeat_at,"
        " jobs_done, current_job, stats"
    )

    def to_row(self) -> tuple[Any, ...]:
        """The values of :attr:`COLUMNS`, as every broker stores them."""
        return (
            self.id,
            self.hostname,
            self.pid,
            self.supervisor_pid,
            ",".join(self.queues),
            self.started_at,
            self.heartbeat_at,
            self.jobs_done,
            self.current_job,
            json.dumps(dict(self.stats), default=str),
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> WorkerInfo:
        """Rebuild a worker from a row of :attr:`COLUMNS`."""
        return cls(
            id=row[0],
            hostname=row[1],
            pid=row[2],
            supervisor_pid=row[3],
            queues=tuple(row[4].split(",")) if row[4] else (),
            started_at=row[5],
            heartbeat_at=row[6],
            jobs_done=int(row[7]),
            current_job=row[8],
            stats=json.loads(row[9]),
        )


class Broker(ABC):
    """A durable job queue in a database. See the module docstring for the rules.

    Brokers are built before the supervisor forks; their connection pools must be
    fork-safe (forksafe pools are), so each worker lazily opens its own connections.
    """

    url: BrokerURL

    def __init__(self, url: BrokerURL) -> None:
        self.url = url

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url.masked()}>"

    @abstractmethod
    def setup(self) -> None:
        """Create the schema, or migrate it to this version; idempotent and concurrency-safe.

        Raises :class:`workers.errors.BrokerError` if the stored schema is newer than
        this code understands.
        """

    @abstractmethod
    def enqueue(self, jobs: Sequence[NewJob], now: float) -> list[bool]:
        """Insert ``jobs`` in one transaction; return, per job, whether it was new.

        A job whose id exists already is left as it is (idempotent submission).
        """

    @abstractmethod
    def claim(
        self, worker: str, queues: Sequence[str], limit: int, lease_seconds: float, now: float
    ) -> list[ClaimedJob]:
        """Atomically take up to ``limit`` due jobs from ``queues`` for ``worker``.

        Highest ``priority`` first, then oldest ``eta``. Due jobs whose ``expires_at``
        has passed become ``EXPIRED`` instead. Returns ``[]`` when nothing is due.
        """

    @abstractmethod
    def record(self, outcomes: Sequence[Outcome], now: float) -> list[bool]:
        """Store outcomes in one transaction; per outcome, whether its lease was current.

        An outcome whose lease is no longer the job's (expired and re-claimed, revoked,
        or already recorded) is dropped and reported ``False``.
        """

    def record_and_claim(
        self,
        outcomes: Sequence[Outcome],
        worker: str,
        queues: Sequence[str],
        limit: int,
        lease_seconds: float,
        now: float,
    ) -> tuple[list[bool], list[ClaimedJob]]:
        """:meth:`record` the ``outcomes``, then :meth:`claim` the next jobs.

        What a worker does after each batch. A broker may do both in one round trip;
        this default makes two calls. The outcomes are stored even when nothing is
        claimed. Returns what :meth:`record` and :meth:`claim` return.
        """
        stored = self.record(outcomes, now) if outcomes else []
        return stored, self.claim(worker, queues, limit, lease_seconds, now)

    @abstractmethod
    def extend_leases(self, worker: str, lease_seconds: float, now: float) -> int:
        """Push ``lease_until`` of every job ``worker`` holds to ``now + lease_seconds``."""

    @abstractmethod
    def release(self, worker: str, job_ids: Sequence[str], now: float) -> int:
        """Return jobs ``worker`` claimed but never started to their queue, due now.

        Their delivery is not counted. Used by a worker that stops with prefetched jobs.
        """

    @abstractmethod
    def release_lost(
        self,
        worker: str,
        max_deliveries: int,
        now: float,
        *,
        running: str | None,
        others_started: bool = False,
    ) -> int:
        """Return every job held by ``worker``, which died, to its queue.

        ``running``: the id of the job it was running (None: none); that delivery
        counts. Its other jobs never started and go back as by :meth:`release`,
        uncounted, unless ``others_started``: one of them may have finished with its
        outcome unwritten (see :meth:`workers.worker.Slot.lost`), so every one counts.
        A counted job that has been delivered ``max_deliveries`` times already becomes
        ``FAILURE`` with a :class:`workers.errors.WorkerLostError` instead, so a job
        that kills its worker cannot loop forever. Returns how many jobs changed.
        """

    @abstractmethod
    def sweep(self, max_deliveries: int, now: float) -> int:
        """Housekeeping, run by supervisors about once a second.

        Jobs whose lease ran out are released as by :meth:`release_lost`, each delivery
        counted (which of them was running is not known here); waiting jobs
        past ``expires_at`` become ``EXPIRED``; a broker may also do its own upkeep here
        (SQLite checkpoints its WAL). Returns how many jobs changed.
        """

    @abstractmethod
    def fetch(self, job_id: str) -> JobRecord | None:
        """The job with this id, or ``None``."""

    def fetch_finished(self, job_id: str, others: Sequence[str]) -> list[JobRecord]:
        """The job ``job_id`` (in any state, if known) and those of ``others`` that are
        in a final state, in any order: one read for many result handles.

        The default reads ``job_id`` alone; brokers answer for ``others`` in the same query.
        """
        record = self.fetch(job_id)
        return [] if record is None else [record]

    @abstractmethod
    def revoke(self, job_id: str, now: float) -> bool:
        """Mark an unfinished job ``REVOKED``; a running one keeps running but its
        outcome is dropped. Returns ``False`` if the job is unknown or already final."""

    @abstractmethod
    def retry(self, job_id: str, now: float) -> bool:
        """Put a ``FAILURE``, ``REVOKED`` or ``EXPIRED`` job back in its queue, due now."""

    @abstractmethod
    def jobs(self, state_filter: Sequence[str] | None, limit: int) -> list[JobRecord]:
        """Recent jobs in ``state_filter`` (all states if ``None``), newest first."""

    @abstractmethod
    def counts(self, now: float) -> dict[str, dict[str, int]]:
        """``{queue: {state: number}}`` over every stored job."""

    @abstractmethod
    def outstanding(self, queues: Sequence[str], now: float) -> int:
        """Jobs in ``queues`` that are running or due to run now (``--burst`` drains these)."""

    @abstractmethod
    def purge(self, state_filter: Sequence[str], finished_before: float | None) -> int:
        """Delete jobs in ``state_filter`` (finished before the given time, if given)."""

    @abstractmethod
    def report_worker(self, info: WorkerInfo) -> None:
        """Insert or update a worker's row (its heartbeat)."""

    @abstractmethod
    def remove_worker(self, worker: str) -> None:
        """Forget a worker that has stopped."""

    @abstractmethod
    def workers(self) -> list[WorkerInfo]:
        """Every worker row, oldest first."""

    def wait(self, timeout: float) -> None:
        """Block until new work may have arrived, or ``timeout`` seconds passed.

        The default sleeps; brokers with a change signal (SQLite's ``data_version``,
        PostgreSQL's ``LISTEN``) return early.
        """
        import time

        time.sleep(timeout)

    gather_seconds = 0.0
    """A worker whose previous claim emptied the queue claims again no sooner than this
    after it (see :mod:`workers.worker`). Brokers whose claims are costly and whose
    wake-up reaches every idle worker at once set it, so a stream of submissions is
    claimed a few jobs at a time instead of one claim per job and per waiter."""

    def hold_connection(self) -> AbstractContextManager[None]:
        """A context in which this thread's operations keep to one connection.

        A worker's loop runs in one: its claims, outcomes and waits then share one
        session (on PostgreSQL the one that listens), instead of taking the pool's
        connections in turn. The default does nothing.
        """
        return nullcontext()

    def patience(self, seconds: float) -> AbstractContextManager[None]:
        """A context in which this thread's operations stop retrying an unreachable
        database ``seconds`` from now, if that comes before they would otherwise give up.

        :meth:`AsyncResult.get(timeout=...) <workers.result.AsyncResult.get>` reads in
        one, so that an outage cannot make it wait past its timeout. Brokers that retry
        during outages (see :mod:`workers.brokers.server`) then raise
        ``BrokerUnavailableError`` once the time is up; the default does nothing.
        """
        return nullcontext()

    def stats(self) -> dict[str, Any]:
        """The broker's connection pool counters, if its pool keeps any."""
        return {}

    def workers_allowed(self) -> int | None:
        """How many forked workers a connection budget leaves room for (``None``: no
        budget, see ``forksafe run --db-connections``)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Close this process's connections; the broker reopens them on next use."""
