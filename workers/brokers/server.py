"""What the PostgreSQL and MySQL brokers share: a forksafe pool per process, outages, budgets.

A broker on a database server must keep working while that server restarts or kills
its sessions, and must not flood the log while it does. Every operation goes
through :meth:`ServerBroker._attempt`, which sorts errors into two kinds:

* **transient** (the server went away, a session was killed, a deadlock victim):
  the pool reconnects on the next checkout; the operation is tried again with a
  growing pause, or given up quietly where that is safe (see below);
* everything else propagates.

The first lost connection of an outage is logged once, and its end once, by the
process that built the broker (the supervisor, a client); its forked workers log
both at debug level only, so a fleet of N workers does not log N+1 lines per
outage.

What happens to each operation during an outage:

* ``claim`` finds nothing, ``wait`` sleeps; a worker simply idles.
* ``extend_leases``, ``report_worker``, ``remove_worker``, ``release``,
  ``release_lost`` and ``sweep`` are skipped: a lease that lapses meanwhile puts its
  job back in the queue, which is what leases are for.
* ``setup`` of a broker that never reached its server fails at once (a wrong
  URL or a server that is down when ``forksafe status`` runs is reported, not waited
  for); after that, it is retried like the others:
* ``record``, ``enqueue`` and the reads are retried for up to
  ``retry_for`` seconds (URL option, default 60), then raise
  :class:`BrokerUnavailableError`; sooner in a :meth:`ServerBroker.patience` block
  (``AsyncResult.get(timeout=...)`` reads in one, and gives up at its timeout). A
  worker that cannot record an outcome dies; its job runs again once its lease runs
  out (the outcome of the first run is dropped by the lease check if it does arrive).

A claim whose commit may or may not have reached the server cannot be retried
safely, nor forgotten (the worker's heartbeat would extend those leases forever):
its lease token is remembered and the jobs it may have taken are given back before
the next claim.

**Connection budget.** Each process has its own pool (forksafe pools are fork-safe:
a worker never touches the supervisor's sessions). :meth:`limit_connections` caps
the pool of the process that built the broker and, separately, of every process
forked from it, so ``forksafe run --db-connections N`` can bound a whole fleet.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

from forksafe import PooledDB
from workers.brokers.base import Broker, BrokerURL, WorkerInfo
from workers.errors import BrokerError, BrokerURLError

log = logging.getLogger("workers.brokers")

T = TypeVar("T")

LIMITS_VARIABLE = "FORKSAFE_DB_CONNECTIONS"
"""``budget:own:forked`` connection limits for brokers built in this process tree."""

POOL_WAIT = 60.0
"""Seconds a thread waits for one of its process's capped connections before failing."""

FIRST_PAUSE = 0.02
MAX_PAUSE = 1.0

WAITING_STATES = ("PENDING", "SCHEDULED", "RETRY")

# Held while a process builds a broker's pool. A child gets a fresh lock: the one it
# inherits may have been held by a thread of the parent at the fork.
_new_pools = [threading.Lock()]
os.register_at_fork(after_in_child=lambda: _new_pools.__setitem__(0, threading.Lock()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


class BrokerUnavailableError(BrokerError):
    """The broker's database could not be reached for longer than ``retry_for`` seconds."""


def url_number(url: BrokerURL, name: str, default: float, minimum: float = 0.0) -> float:
    """A numeric URL option, or :class:`BrokerURLError` naming it and the fix."""
    text = url.query.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise BrokerURLError(
            f"{name}={text!r} in {url.masked()!r} must be a number >= {minimum:g}; "
            f"use e.g. ?{name}={default:g}"
        )
    return value


class ServerBroker(Broker):
    """Pool, outage handling and connection budget for a broker on a database server.

    Subclasses set :attr:`transient` and implement :meth:`_connect` (a new driver
    connection, session prepared), :meth:`_is_disconnect` and the broker methods,
    running their statements through :meth:`_attempt`.
    """

    transient: tuple[type[BaseException], ...] = ()
    failures: tuple[type[Exception], ...] = ()
    """Driver errors after which the pool replaces a connection."""
    label = "database"
    """How the database is called in log lines."""
    holds_connections = False
    """Whether :meth:`hold_connection` keeps a connection (a broker whose waits need
    the session its claims ran on); otherwise each operation takes one from the pool."""

    def __init__(self, url: BrokerURL) -> None:
        super().__init__(url)
        self.retry_for = url_number(url, "retry_for", 60.0)
        self._owner_pid = os.getpid()
        self._own_limit = int(url_number(url, "max_connections", 0))
        self._forked_limit = self._own_limit
        self._budget: int | None = None
        # Set by `forksafe run --db-connections`, so a broker rebuilt on SIGHUP keeps it.
        fleet = os.environ.get(LIMITS_VARIABLE, "")
        if fleet.count(":") == 2 and fleet.replace(":", "").isdigit():
            budget, own, forked = (int(part) for part in fleet.split(":"))
            self._own_limit, self._forked_limit, self._budget = own, forked, budget or None
        self._pool: PooledDB | None = None
        self._pool_pid = 0
        self._schema_ok = False
        self._health = threading.Lock()
        self._outage_since: float | None = None
        self._outage_pid = 0
        self._reached = False  # whether this broker ever reached its server
        self._unsure: list[tuple[str, str]] = []  # (worker, lease) of claims in doubt
        self._held = threading.local()  # pid, con: the connection hold_connection() keeps
        self._patience = threading.local()  # until: the monotonic time patience() set

    # -- connections --------------------------------------------------------------

    def _connect(self) -> Any:
        """A new driver connection with its session prepared."""
        raise NotImplementedError

    def _is_disconnect(self, exc: BaseException) -> bool:
        """Whether ``exc`` means the connection or the server is gone (an outage)."""
        raise NotImplementedError

    def _run(self, sql: str, params: Sequence[Any] = (), retry: bool = True) -> list[Any]:
        """One statement through :meth:`_attempt`: its rows, or ``[rowcount]`` without any."""
        raise NotImplementedError

    def _count(self, sql: str, params: Sequence[Any], retry: bool) -> int:
        """How many rows a statement changed (its ``[rowcount]``), 0 if it was skipped."""
        rows = self._run(sql, params, retry)
        return int(rows[0]) if rows else 0

    def limit_connections(self, own: int, forked: int, budget: int | None = None) -> None:
        """Cap this process's connections at ``own`` and each forked child's at ``forked``.

        ``budget`` is the fleet-wide total they were derived from, shown in :meth:`stats`.
        Takes effect at once in this process (idle connections over the cap are closed),
        and for brokers built later in this process and its children (``FORKSAFE_DB_CONNECTIONS``
        in the environment), such as the one a ``SIGHUP`` reload builds.
        """
        if own < 1 or forked < 1:
            raise BrokerError(f"connection limits must be at least 1 (got {own}, {forked})")
        os.environ[LIMITS_VARIABLE] = f"{budget or 0}:{own}:{forked}"
        self._owner_pid = os.getpid()
        self._own_limit, self._forked_limit, self._budget = own, forked, budget
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.close()
            self._pool = None

    def _process_pool(self) -> PooledDB:
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with _new_pools[0]:  # one pool per process, however many threads start at once
            pool = self._pool
            if pool is not None and self._pool_pid == pid:
                return pool
            # A forked child gets a pool of its own with the child's cap. The inherited
            # one already dropped the parent's connections without a word to the server.
            limit = self._own_limit if pid == self._owner_pid else self._forked_limit
            pool = PooledDB(
                self._connect,
                0,
                limit,
                0,
                limit,
                True,
                None,
                None,
                True,
                self.failures,
                0,
                maxwait=POOL_WAIT,
            )
            self._pool, self._pool_pid = pool, pid
            return pool

    def _limit(self) -> int:
        """This process's connection cap (0: none)."""
        return self._own_limit if os.getpid() == self._owner_pid else self._forked_limit

    @contextmanager
    def hold_connection(self) -> Iterator[None]:
        """With :attr:`holds_connections`, this thread keeps the first connection it
        checks out until the block ends.

        Unless this process may open only one connection: its other threads (a
        worker's heartbeat) need it too, so the thread takes it from the pool each time.
        A connection that fails is given back, and the next operation takes another.
        """
        if (
            not self.holds_connections
            or self._limit() == 1
            or getattr(self._held, "pid", None) == os.getpid()
        ):
            yield
            return
        self._held.pid, self._held.con = os.getpid(), None
        try:
            yield
        finally:
            con, self._held.pid, self._held.con = self._held.con, None, None
            if con is not None:
                con.close()

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        held = self._held
        if getattr(held, "pid", None) == os.getpid():
            if held.con is None:
                held.con = self._process_pool().connection()
            try:
                yield held.con
            except BaseException:
                con, held.con = held.con, None
                con.close()
                raise
            return
        con = self._process_pool().connection()
        try:
            yield con
        finally:
            con.close()

    # -- outages ------------------------------------------------------------------

    @contextmanager
    def patience(self, seconds: float) -> Iterator[None]:
        until = time.monotonic() + max(0.0, seconds)
        outer = getattr(self._patience, "until", None)
        self._patience.until = until if outer is None else min(outer, until)
        try:
            yield
        finally:
            self._patience.until = outer

    def _log_level(self) -> int:
        return logging.WARNING if os.getpid() == self._owner_pid else logging.DEBUG

    def _lost(self, exc: BaseException) -> None:
        with self._health:
            if self._outage_pid == os.getpid() and self._outage_since is not None:
                return
            self._outage_pid, self._outage_since = os.getpid(), time.monotonic()
        log.log(
            self._log_level(),
            "broker %s %s unreachable (%s: %s); retrying quietly until it is back",
            self.label,
            self.url.masked(),
            type(exc).__name__,
            _first_line(exc),
        )

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        with self._health:
            since, self._outage_since = self._outage_since, None
            if since is None or self._outage_pid != os.getpid():
                return
        log.log(
            logging.INFO if self._log_level() == logging.WARNING else logging.DEBUG,
            "broker %s %s reachable again after %.1f s",
            self.label,
            self.url.masked(),
            time.monotonic() - since,
        )

    def _attempt(
        self, work: Callable[[Any], T], retry: bool, default: T, patience: float | None = None
    ) -> T:
        """Run ``work(connection)``; on a transient error retry (``retry``) or return ``default``.

        Retries stop after ``patience`` (default ``retry_for``) seconds, or at the end
        of this thread's :meth:`patience` block if that comes first, with
        :class:`BrokerUnavailableError`. A deadlock victim is always retried.
        """
        if patience is None:
            patience = self.retry_for
        until: float | None = getattr(self._patience, "until", None)
        deadline: float | None = None
        pause = FIRST_PAUSE
        while True:
            try:
                with self._connection() as con:
                    try:
                        result = work(con)
                    except self.transient:
                        # Ends a broken transaction; on a dead connection, the failed
                        # rollback makes the pool connection reconnect for its next use.
                        with suppress(Exception):
                            con.rollback()
                        raise
            except self.transient as exc:
                disconnect = self._is_disconnect(exc)
                now = time.monotonic()
                if deadline is None:
                    deadline = now + patience
                    if until is not None and until < deadline:
                        deadline, patience = until, max(0.0, until - now)
                if now >= deadline and (retry or not disconnect):
                    waited = f"for {patience:.3g} s " if patience else ""
                    raise BrokerUnavailableError(
                        f"the broker {self.label} {self.url.masked()} could not be used "
                        f"{waited}({type(exc).__name__}: {_first_line(exc)}); check "
                        f"the server and the URL, or raise ?retry_for="
                    ) from exc
                if disconnect:
                    self._lost(exc)
                    if not retry:
                        return default
                time.sleep(min(pause if disconnect else pause / 4, deadline - now))
                pause = min(pause * 2, MAX_PAUSE)
                continue
            self._reached = True
            if self._outage_since is not None:
                self._recovered()
            return result

    # -- claims in doubt ----------------------------------------------------------

    def _doubt(self, exc: BaseException, worker: str, lease: str) -> None:
        """Remember a claim that failed with ``exc`` if its commit may have happened
        without us hearing of it: it was cut off. An error the server answered with
        (a deadlock victim, say) rolled it back, and :meth:`_attempt` runs it again with
        the same lease, which must not be given back later."""
        if self._is_disconnect(exc):
            self._unsure.append((worker, lease))

    def _take_doubts(self) -> list[tuple[str, str]]:
        doubts, self._unsure = self._unsure, []
        return doubts

    # -- schema -------------------------------------------------------------------

    def _migrate(
        self,
        cursor: Any,
        current: int,
        target: int,
        migrations: Mapping[int, Sequence[str]],
        logger: logging.Logger,
    ) -> None:
        """Bring the queue schema from version ``current`` to ``target`` on ``cursor``.

        The caller holds the server's migration lock. A schema newer than ``target`` is
        refused: this code would not know what the newer columns mean. Each step is
        logged on ``logger``, the broker module's own.
        """
        if current > target:
            raise BrokerError(
                f"the queue in {self.url.masked()} has schema version {current}, "
                f"newer than this workers version understands ({target}); "
                f"upgrade forksafe"
            )
        for version in range(current + 1, target + 1):
            for statement in migrations[version]:
                cursor.execute(statement)
            cursor.execute("DELETE FROM forksafe_schema")
            cursor.execute("INSERT INTO forksafe_schema (version) VALUES (%s)", (version,))
            logger.info("queue schema in %s migrated to version %d", self.url.masked(), version)

    # -- statements the two servers write alike ----------------------------------

    def extend_leases(self, worker: str, lease_seconds: float, now: float) -> int:
        return self._count(
            "UPDATE forksafe_jobs SET lease_until = %s WHERE worker = %s AND state = 'STARTED'",
            (now + lease_seconds, worker),
            retry=False,
        )

    COUNTS = "SELECT queue, state, count(*) FROM forksafe_jobs GROUP BY queue, state"

    def counts(self, now: float) -> dict[str, dict[str, int]]:
        result: dict[str, dict[str, int]] = {}
        for queue, state, number in self._count_all():
            result.setdefault(queue, {})[state] = int(number)
        return result

    def _count_all(self) -> list[Any]:
        """The rows of :attr:`COUNTS`, which reads every job."""
        return self._run(self.COUNTS)

    def remove_worker(self, worker: str) -> None:
        self._run("DELETE FROM forksafe_workers WHERE id = %s", (worker,), retry=False)

    def workers(self) -> list[WorkerInfo]:
        rows = self._run(f"SELECT {WorkerInfo.COLUMNS} FROM forksafe_workers ORDER BY started_at")
        return [WorkerInfo.from_row(row) for row in rows]

    # -- Broker hooks -------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        pool = self._pool
        stats: dict[str, Any] = (
            dict(pool.stats()) if pool is not None and self._pool_pid == os.getpid() else {}
        )
        stats["connection_limit"] = self._limit()
        if self._budget is not None:
            stats["fleet_budget"] = self._budget
        return stats

    def workers_allowed(self) -> int | None:
        if self._budget is None:
            return None
        return (self._budget - self._own_limit) // self._forked_limit

    def close(self) -> None:
        pool = self._pool
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()
