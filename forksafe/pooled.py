"""PooledDB: a pool of steady DB-API 2 connections that survives fork().

Compatible with DBUtils' ``PooledDB`` (same parameters, positional order, defaults,
proxies and errors), so ``from dbutils.pooled_db import PooledDB`` becomes
``from forksafe.pooled_db import PooledDB``. What differs, and why:

* **Fork.** The pool belongs to the process that uses it. In a forked child every
  inherited idle connection is discarded without a byte sent to the server (the parent
  keeps its sessions), a connection checked out before the fork is inert, and the child
  opens its own connections on first use. The fork hook points the child's copies of
  the sockets at /dev/null at once; the pool resets itself at its first use in the
  child, through the pid check at every checkout, which also covers forks that run no
  Python hook (uWSGI's).
* **Lazy.** Creating a pool opens nothing; ``mincached`` connections are made on the
  first :meth:`PooledDB.connection` in the process that uses the pool, or by
  :meth:`PooledDB.warm`. A pool built at import time in a prefork master is born empty
  in every worker.
* **No I/O under the lock.** Connecting, pinging, rolling back and closing happen outside
  the pool lock, so one slow server round trip never stalls other threads or a fork.
* **One set of idle connections per target.** Pools built in one process with identical
  connection arguments and the same ``reset`` share their idle connections, so the "new
  pool per call" mistake cannot grow server sessions without bound; building many such
  pools also warns, naming the call site.

Beyond DBUtils (keyword-only, all off by default):

``maxwait``
    seconds a ``blocking`` pool waits for a free slot before raising
    :class:`~forksafe.errors.PoolTimeoutError` (DBUtils waits forever).
``maxage``
    seconds a connection may live; older ones are replaced at checkout, never in the
    middle of a transaction. Each connection's limit is shortened by up to 10% at random
    so a fleet of workers does not reconnect all at once. A shared connection past its
    age is shared no more: it is replaced when its last share is given back.
``maxidle``
    seconds a connection may sit idle; set it below the server's ``wait_timeout``. A
    connection borrowed from a pool of the same arguments that has no ``maxidle`` was not
    timed there: it counts as idle since the borrowing, and ``ping`` vouches for it.
``leaktime``
    seconds after which a checked-out connection counts as leaked: a warning is logged on
    ``forksafe`` with the stack of the checkout. A connection dropped without ``close()``
    is reported too (and, as in DBUtils, returned to the pool).

:meth:`PooledDB.stats` returns a dict of named counters.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import total_ordering
from typing import Any, TypeVar

from forksafe import drivers, fork, forwarding
from forksafe.errors import (
    InvalidConnection,
    InvalidConnectionError,
    NotSupportedError,
    PooledDBError,
    PoolTimeoutError,
    TooManyConnections,
    TooManyConnectionsError,
)
from forksafe.steady import Recipe, SteadyDBConnection, SteadyDBCursor, _new_cursor

# Read by the inlined pid checks on the hot path; see fork.getpid().
_page = fork.page
# Compared with a connection's token by the inlined process checks; see fork.armed.
_armed = fork.armed

__all__ = [
    "InvalidConnection",
    "InvalidConnectionError",
    "ManyPoolsWarning",
    "NotSupportedError",
    "PoolTimeoutError",
    "PooledDB",
    "PooledDBError",
    "PooledDedicatedDBConnection",
    "PooledSharedDBConnection",
    "SharedDBConnection",
    "TooManyConnections",
    "TooManyConnectionsError",
]

log = logging.getLogger("forksafe")


def _check_gil() -> None:
    """Warn on a free-threaded interpreter running without the GIL: pools that do not
    share check out and return without a lock, relying on the GIL (see connection())."""
    gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if gil_enabled is not None and not gil_enabled():
        warnings.warn(
            "forksafe pools rely on the GIL, and this interpreter runs without it: "
            "concurrent checkouts may race; run with PYTHON_GIL=1",
            RuntimeWarning,
            stacklevel=2,
        )


_check_gil()

#: How many pools for one target one process may build before the pool-per-call warning.
MANY_POOLS = 4


class ManyPoolsWarning(UserWarning):
    """Many pools were built for the same target in one process: build one and share it."""


def _threadsafety(creator: Any) -> int:
    """DBUtils' rule: the creator's or its module's threadsafety; 1 for a plain function."""
    for source in (creator, getattr(creator, "dbapi", None)):
        value = getattr(source, "threadsafety", None)
        if value is not None:
            return int(value)
    connect_ = getattr(creator, "connect", None)
    if connect_ is not None and callable(connect_):
        return 0
    if callable(creator):
        return 1
    raise TypeError(
        f"creator={creator!r} is neither a DB-API 2 module nor a callable returning"
        " connections; pass e.g. psycopg2, pymysql, sqlite3 or functools.partial(connect, ...)"
    )


def _count(name: str, value: Any, allow_none: bool = True) -> int:
    if value is None and allow_none:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative integer (0 means no limit)")
    return value


def _seconds(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number of seconds or None")
    return float(value)


class _Family:
    """The pools of one process built with identical connection arguments and ``reset``.

    Their connections are interchangeable, so a pool with no idle connection of its own
    borrows a sibling's before opening a new one, and warm-up counts the siblings' idle
    connections. Each pool still owns its idle connections (its ``maxcached``, its
    ``close()``); the family only keeps "a new pool per call" from adding sessions.
    """

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[PooledDB] = weakref.WeakSet()
        self.built = 0  # pools ever built in it, for the pool-per-call warning
        self.warned = False
        self.warming: dict[int, int] = {}  # pid -> connections warm-ups are opening there

    def idle(self) -> int:
        """Idle connections of the family's pools that belong to this process."""
        pid = fork.getpid()
        return sum(len(pool._idle) for pool in list(self.pools) if pool._pid == pid)

    def reserve(self, wanted: int) -> int:
        """For a warm-up in this process: how many connections to open so that ``wanted``
        are idle, counting those other warm-ups of the family are opening; reserved."""
        with fork.process_lock():
            pid = fork.getpid()
            opening = self.warming.get(pid, 0)
            left = max(0, wanted - self.idle() - opening)
            self.warming = {pid: opening + left}  # a parent's count means nothing here
            return left

    def settle(
        self,
        count: int,
        idle: deque[SteadyDBConnection] | None = None,
        con: SteadyDBConnection | None = None,
    ) -> None:
        """Release ``count`` reserved connections; ``con``, one just opened, goes to
        ``idle`` at the same moment."""
        with fork.process_lock():
            if idle is not None and con is not None:
                idle.append(con)
            pid = fork.getpid()
            self.warming[pid] = self.warming.get(pid, 0) - count

    def borrow(self, pool: PooledDB) -> SteadyDBConnection | None:
        """Take an idle connection from a sibling of ``pool`` in this process, if any."""
        for sibling in list(self.pools):
            if sibling is not pool and sibling._pid == pool._pid:
                try:
                    con = sibling._idle.popleft()  # atomic: no lock needed
                except IndexError:
                    continue
                if sibling._maxidle is None:
                    # Its returns do not time idleness: _idle_since is stale.
                    con._idle_since = time.monotonic()
                return con
        return None


_families: weakref.WeakValueDictionary[Any, _Family] = weakref.WeakValueDictionary()

# Seconds between re-checks of a thread waiting for a shared connection to leave its
# transaction (which not every way of ending one announces).
_RECHECK = 0.05

# Seconds before a checkout warms up again after a warm-up that stopped short of mincached
# while idle connections could serve the checkouts.
_WARM_AGAIN = 5.0


def _family_for(key: Any) -> _Family:
    if key is None:
        return _Family()  # unhashable connect arguments: a family of one
    with fork.process_lock():
        family = _families.get(key)
        if family is None:
            family = _families[key] = _Family()
        return family


def _counted(counter: itertools.count[int]) -> int:
    """How many values ``next()`` took from a counter started at 0 (its only reading is
    its repr, ``count(n)``)."""
    return int(repr(counter)[6:-1])


class _Lease:
    """When and where a connection was checked out (kept only when ``leaktime`` is set)."""

    __slots__ = ("since", "stack", "warned")

    def __init__(self) -> None:
        self.since = time.monotonic()
        # The checkout's caller and its callers: the frames of this module (which has
        # one or two on the way, by whether the C checkout runs) left out.
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        self.stack = "".join(traceback.format_stack(frame, limit=9))
        self.warned = False


class PooledDB(fork.ProcessBound):
    """A pool of steady connections; see the module docstring.

    creator: a DB-API 2 module or a callable returning new connections.
    mincached: idle connections to open on first use (0: none).
    maxcached: most idle connections to keep (0/None: no limit).
    maxshared: most shared connections (0/None: every connection dedicated); sharing
        needs a driver with ``threadsafety`` > 1.
    maxconnections: most connections checked out at once (0/None: no limit).
    blocking: at ``maxconnections``, wait (True) or raise TooManyConnectionsError.
    maxusage: reopen a connection after this many operations (0/None: never).
    setsession: SQL statements run on every new connection (committed where they opened
        a transaction the driver reports, so a rollback does not undo them).
    reset: on return, roll back always (True) or only after ``begin()`` (False). A
        rollback the driver reports unnecessary (no transaction open) is skipped.
    failures: exception class(es) that trigger a reconnect (default: the driver's
        OperationalError, InterfaceError, InternalError).
    ping: when to check connections: 0 never, 1 at checkout (default), 2 at cursor(),
        4 at execute(), 7 always; or an SQL string / callable / (flags, check) tuple.
    isfatal: called with a matching failure; False means it does not break the connection.
    args, kwargs: passed to the creator.
    maxwait, maxage, maxidle, leaktime: keyword-only, see the module docstring.

    Raises ``TypeError`` for an unusable creator, ``ValueError`` for a negative or
    non-integer size, and :class:`NotSupportedError` for a driver that is not thread-safe.
    Opens no connection.
    """

    # What the hot paths read live in slots (see forksafe.speedups); the rest in __dict__.
    __slots__ = (
        "_given_back",
        "_idle",
        "_leaktime",
        "_lean_return",
        "_life",
        "_maxshared",
        "_pid",
        "_recycling",
        "_reset",
        "_slots",
        "_taken",
        "_warm",
    )

    def __init__(
        self,
        creator: Any,
        mincached: int = 0,
        maxcached: int = 0,
        maxshared: int = 0,
        maxconnections: int = 0,
        blocking: bool = False,
        maxusage: int | None = None,
        setsession: Sequence[str] | None = None,
        reset: bool = True,
        failures: type[Exception] | tuple[type[Exception], ...] | None = None,
        ping: Any = 1,
        isfatal: Callable[[Exception], bool] | None = None,
        *args: Any,
        maxwait: float | None = None,
        maxage: float | None = None,
        maxidle: float | None = None,
        leaktime: float | None = None,
        **kwargs: Any,
    ) -> None:
        self._pid = 0  # no process's until its state is built (siblings read it to borrow)
        self._idle: deque[SteadyDBConnection] = deque()
        threadsafety = _threadsafety(creator)
        if not threadsafety:
            raise NotSupportedError(
                f"{getattr(creator, '__name__', creator)!r} has threadsafety=0: its"
                " connections cannot be used by more than one thread, so they cannot be"
                " pooled; use one connection per thread (PersistentDB) or another driver"
            )
        mincached = _count("mincached", mincached)
        maxcached = _count("maxcached", maxcached)
        maxshared = _count("maxshared", maxshared)
        maxconnections = _count("maxconnections", maxconnections)
        if maxusage is not None:
            _count("maxusage", maxusage)
        if maxcached and maxcached < mincached:
            raise ValueError(
                f"maxcached={maxcached} is below mincached={mincached}: the pool could never"
                " keep the connections it warms up; raise maxcached or set it to 0 (no limit)"
            )
        self._recipe = Recipe(creator, maxusage, setsession, failures, ping, isfatal, args, kwargs)
        self._blocking = blocking
        self._reset = reset
        self._mincached = mincached
        self._maxcached = maxcached
        self._maxshared = maxshared if threadsafety > 1 else 0
        if maxconnections:
            maxconnections = max(maxconnections, maxcached, maxshared)
        self._maxconnections = maxconnections
        self._maxwait = _seconds("maxwait", maxwait)
        self._maxage = _seconds("maxage", maxage)
        self._maxidle = _seconds("maxidle", maxidle)
        self._leaktime = _seconds("leaktime", leaktime)
        self._recycling = self._maxage is not None or self._maxidle is not None
        # Whether returning a connection needs no more than the reset and the append of
        # cache() (see PooledDedicatedDBConnection.close).
        self._lean_return = (
            not self._maxshared
            and not self._maxcached
            and self._maxidle is None
            and self._leaktime is None
        )
        self._life = [True]  # False once collected (see SteadyDBConnection.__del__)
        # Pools whose recipes agree hand out interchangeable connections, if they also
        # return them alike: a reset=False pool's idle ones may hold a transaction.
        key = self._recipe.key
        self._family = _family_for(None if key is None else (key, bool(self._reset)))
        self._family.pools.add(self)
        self._family.built += 1
        self._reset_process_state()
        self._warn_if_many_pools()
        fork.register(self)

    # -- per-process state ----------------------------------------------------------

    def _reset_process_state(self) -> None:
        """Fresh lock, counters and caches for the current process; opens nothing. The
        pid comes last: until then, other threads' pid checks wait for this reset."""
        # The mutex guards the bookkeeping of pools that share (pools that do not share
        # check out and return without it) and the rare paths (stats, close, waits); the
        # condition on it lets shared checkouts wait. Reentrant: a proxy dropped without
        # close() may be collected, and return itself, while its thread holds the lock.
        self._mutex = threading.RLock()
        self._lock = threading.Condition(self._mutex)
        self._waiting = 0  # threads waiting on the condition
        # With sharing, the checked-out dedicated connections + shared entries, counted
        # under the lock, which bounds them by maxconnections.
        self._connections = 0
        # Without sharing, no lock: checkouts and returns are counted by next() on
        # counters, atomic under the GIL (see connection()).
        self._taken = itertools.count()  # checkouts
        self._given_back = itertools.count()  # returns, and checkouts that failed
        # Without sharing, maxconnections is a queue of tokens, one per free slot: taking
        # and giving back a slot, and waiting for one, happen in C, without the condition.
        self._slots: queue.SimpleQueue[bool] | None = None
        if self._maxconnections and not self._maxshared:
            self._slots = queue.SimpleQueue()
            for _ in range(self._maxconnections):
                self._slots.put(True)
        self._idle = deque()
        self._shared_cache: list[SharedDBConnection] = []
        self._shared_pending = 0
        self._warm = not self._mincached
        self._warm_again_at = 0.0  # see _warm_at_checkout
        self._leases: dict[int, _Lease] = {}
        self._stats = dict.fromkeys(
            (
                "connections_created",
                "connections_closed",
                "connections_discarded_after_fork",
                "connections_recycled",
                "reconnects",
                "waits",
                "wait_ms",
                "timeouts",
                "leaks",
            ),
            0,
        )
        self._pid = fork.getpid()

    def _warn_if_many_pools(self) -> None:
        family = self._family
        if family.built > MANY_POOLS and not family.warned:
            family.warned = True
            message = (
                f"{family.built} PooledDB instances were built for the same database in this"
                " process; build one pool at module level and share it (these pools lend each"
                " other idle connections, so sessions stay bounded)"
            )
            log.warning("%s", message)
            warnings.warn(message, ManyPoolsWarning, stacklevel=3)

    def _fork_prepare(self, blocking: bool) -> bool:
        if self._pid != fork.getpid():
            # Inherited through a fork that ran no hook, and not used since: the mutex
            # is the parent's copy, perhaps taken by a thread this process does not have.
            self._checkpid()
        return self._mutex.acquire(blocking)

    def _fork_parent(self) -> None:
        self._mutex.release()

    def _fork_child(self) -> None:
        """In a forked child: discard every inherited connection and start empty."""
        inherited = [sc.con for sc in self._shared_cache] + list(self._idle)
        self._reset_process_state()
        drivers.discard(*(con._detach() for con in inherited))
        self._stats["connections_discarded_after_fork"] += len(inherited)

    # -- checkout -------------------------------------------------------------------

    def steady_connection(self) -> SteadyDBConnection:
        """Open a new steady connection that is not part of the pool."""
        return self._recipe.connect(True)

    def _open(self) -> SteadyDBConnection:
        con = self.steady_connection()
        if not con.threadsafety():
            con._close()
            raise NotSupportedError(
                "the driver's connections are not thread-safe (threadsafety=0), so they"
                " cannot be pooled; use PersistentDB or another driver"
            )
        con._jitter = 1.0 - 0.1 * random.random()
        con._pool_life = self._life
        self._stats["connections_created"] += 1
        return con

    def warm(self) -> None:
        """Open connections until ``mincached`` are idle. Normally done at first checkout.

        Threads warming at once, this pool or identical ones, open ``mincached``
        connections in all, not each: each reserves what the idle ones and the others'
        openings lack.
        """
        self._checkpid()
        self._warm = True
        family = self._family
        left = family.reserve(self._mincached)
        try:
            while left:
                con = self._open()  # I/O: outside any lock
                family.settle(1, self._idle, con)
                left -= 1
        finally:
            if left:  # an open failed: give back what was reserved and not opened,
                family.settle(left)
                self._warm = False  # and warm up again at a later checkout

    def _warm_at_checkout(self) -> None:
        """:meth:`warm` at a checkout. Its failure fails the checkout only if no idle
        connection can serve it (the next checkout then tries again); otherwise it is
        logged, and tried again at a checkout :data:`_WARM_AGAIN` seconds later, so a
        server refusing the ``mincached``-th session does not fail every checkout."""
        if time.monotonic() < self._warm_again_at:
            return
        try:
            self.warm()
        except Exception as error:
            if not self._idle:
                raise
            self._warm_again_at = time.monotonic() + _WARM_AGAIN
            log.warning(
                "forksafe: warming up to mincached=%d stopped at %d idle connection(s)"
                " (%s: %s); trying again in %gs",
                self._mincached,
                len(self._idle),
                type(error).__name__,
                error,
                _WARM_AGAIN,
            )

    def _too_old(self, con: SteadyDBConnection, now: float) -> bool:
        return self._maxage is not None and now - con._created_at > self._maxage * con._jitter

    def _expired(self, con: SteadyDBConnection, now: float) -> bool:
        if self._too_old(con, now):
            return True
        return self._maxidle is not None and now - con._idle_since > self._maxidle

    def _ready(self, con: SteadyDBConnection | None) -> SteadyDBConnection:
        """Turn an idle connection (or None) into one fit to hand out; I/O, outside the lock."""
        if con is not None and con._closed:
            # Closed while idle: by the collector, which finalises a proxy found in a
            # reference cycle and the connection it held in any order, so the proxy
            # may have given back what the connection's own finaliser then closed.
            self._stats["connections_closed"] += 1
            con = None
        if con is not None and self._recycling and self._expired(con, time.monotonic()):
            self._stats["connections_recycled"] += 1
            self._close_con(con)
            con = None
        if con is None:
            return self._open()
        try:
            con._ping_check()
        except BaseException:
            self._close_con(con)
            raise
        return con

    def _wait(
        self,
        deadline: float | None,
        since: list[float],
        opening: bool = False,
        recheck: float | None = None,
        busy: str = "",
    ) -> None:
        """Wait (lock held) for a connection to be returned, or raise. ``since``: the
        checkout's wait so far, empty until it first waits (see :meth:`_count_wait`).
        ``opening``: for one that another thread is opening, which even a non-blocking
        pool waits for. ``recheck``: return after at most this many seconds, woken or
        not. ``busy``: what keeps the checkout waiting, when not ``maxconnections``."""
        if not self._blocking and not opening:
            raise self._too_many(busy)
        if not since:
            since.append(time.monotonic())
        self._waiting += 1
        try:
            if deadline is None:
                self._lock.wait(recheck)
                return
            remaining = deadline - time.monotonic()
            if recheck is not None:
                remaining = min(remaining, recheck)
            woken = remaining > 0 and self._lock.wait(remaining)
        finally:
            self._waiting -= 1
        if not woken and deadline - time.monotonic() <= 0:
            raise self._timed_out(busy)  # it takes the (reentrant) lock again to count

    def _count_wait(self, since: list[float]) -> None:
        """Count (lock held) the wait of a checkout that waited (``since`` not empty)."""
        if since:
            self._stats["waits"] += 1
            self._stats["wait_ms"] += int((time.monotonic() - since[0]) * 1000)

    def _wake(self) -> None:
        """Wake waiters (lock held) after a slot or a connection was freed.

        With sharing, waiters want different things (a free slot, a shared connection
        outside a transaction), so all of them re-check; otherwise any one can proceed.
        """
        if not self._waiting:
            return
        if self._maxshared:
            self._lock.notify_all()
        else:
            self._lock.notify()

    def _transaction_ended(self) -> None:
        """A shared connection's transaction ended: it may be shared again."""
        with self._mutex:  # a waiter counts itself under the lock: read it there
            self._wake()

    def _deadline(self) -> float | None:
        return None if self._maxwait is None else time.monotonic() + self._maxwait

    def connection(self, shareable: bool = True) -> Any:
        """Check out a connection; ``close()`` it (or use ``with``) to give it back.

        With ``shareable`` and ``maxshared``, the connection may be shared with other
        threads. At ``maxconnections`` a non-blocking pool raises
        :class:`TooManyConnectionsError`; a blocking one waits, at most ``maxwait``
        seconds if set (then :class:`PoolTimeoutError`). Connect errors from the driver
        propagate; the slot they took is given back.
        """
        if not _page[0] or self._pid != fork.cached_pid:  # fork.getpid(), inlined
            self._checkpid()
        if not self._warm:
            self._warm_at_checkout()
        if self._maxshared:
            if shareable:
                return self._shared_connection()
            con = self._dedicated_in_shared_pool()
        else:
            slots = self._slots
            if slots is not None:
                try:
                    slots.get(False)
                except queue.Empty:
                    self._wait_for_token(slots)
            # No lock: the token bounds the checkouts, and taking an idle connection and
            # counting are one C call each (deque.popleft, next), atomic under the GIL.
            # (This relies on the GIL: free-threaded Python is not supported.)
            next(self._taken)
            try:
                con = self._idle.popleft()
            except IndexError:
                con = None
        if con is None or self._recycling or con._closed:
            con = self._fit(con)
        elif con._ping & 1:
            try:
                if con._plain_ping and con._token == _armed[0]:
                    # con._ping_check() for a driver whose ping is its ping() alone,
                    # inlined (hot path: one Python call fewer while the pings succeed).
                    try:
                        alive = con._con.ping(False)
                    except Exception as error:
                        con._ping_raised(error, True)
                    else:
                        if not alive and alive is not None:
                            con._ping_dead(True)
                else:
                    con._ping_check()
            except BaseException:
                self._drop_checkout(con)
                raise
        proxy = _new_proxy(PooledDedicatedDBConnection)  # no __init__ call: hot path
        proxy._pool = self
        proxy._con = con
        if self._leaktime is not None:
            self._lease(proxy)
        return proxy

    def _drop_checkout(self, con: SteadyDBConnection) -> None:
        """A checkout failed in its ping: give the slot back and close ``con``, whatever
        state the failed ping left it in."""
        self._give_back_slot()
        self._close_con(con)

    def _dedicated_in_shared_pool(self) -> SteadyDBConnection | None:
        """Take a slot, waiting for one at ``maxconnections``, and an idle connection
        (None if there is none) for a dedicated checkout from a pool that shares."""
        with self._mutex:
            if self._maxconnections and self._connections >= self._maxconnections:
                self._wait_for_slot()
            self._connections += 1
            next(self._taken)
            return self._idle.popleft() if self._idle else None

    def _fit(self, con: SteadyDBConnection | None) -> SteadyDBConnection:
        """Borrow, open or recycle a connection for a checkout that holds a slot."""
        try:
            if con is None:
                con = self._family.borrow(self)
            return self._ready(con)
        except BaseException:
            self._give_back_slot()
            raise

    def _too_many(self, busy: str = "") -> TooManyConnectionsError:
        if busy:
            return TooManyConnectionsError(
                f"{busy} and blocking=False; end transactions sooner, raise maxshared,"
                " or set blocking=True"
            )
        return TooManyConnectionsError(
            f"maxconnections={self._maxconnections} reached and blocking=False; raise"
            " maxconnections, return connections sooner, or set blocking=True"
        )

    def _timed_out(self, busy: str = "") -> PoolTimeoutError:
        with self._mutex:
            self._stats["timeouts"] += 1
        if busy:
            return PoolTimeoutError(
                f"no shared connection became usable within maxwait={self._maxwait}s"
                f" ({busy}); end transactions sooner, or raise maxshared or maxwait"
            )
        return PoolTimeoutError(
            f"no connection became free within maxwait={self._maxwait}s"
            f" (maxconnections={self._maxconnections} in use); raise maxconnections"
            " or maxwait, or return connections sooner"
        )

    def _wait_for_token(self, slots: queue.SimpleQueue[bool]) -> None:
        """Wait for a free slot (no lock held), as long as ``maxwait`` allows, or raise."""
        if not self._blocking:
            raise self._too_many()
        started = time.monotonic()
        try:
            slots.get(timeout=self._maxwait)
        except queue.Empty:
            raise self._timed_out() from None
        finally:
            with self._mutex:
                self._stats["waits"] += 1
                self._stats["wait_ms"] += int((time.monotonic() - started) * 1000)

    def _wait_for_slot(self) -> None:
        deadline = self._deadline()
        since: list[float] = []
        try:
            while self._connections >= self._maxconnections:
                self._wait(deadline, since)
        finally:
            self._count_wait(since)

    def _give_back_slot(self) -> None:
        if self._maxshared:
            with self._mutex:
                self._connections -= 1
                if self._waiting:
                    self._wake()
        else:
            next(self._given_back)
        if self._slots is not None:
            self._slots.put(True)

    def dedicated_connection(self) -> Any:
        """Check out a connection that is never shared: ``connection(shareable=False)``."""
        return self.connection(False)

    def _shared_connection(self) -> PooledSharedDBConnection:
        lock = self._mutex
        since: list[float] = []
        with lock:
            try:
                shared, con = self._claim_shared(self._deadline(), since)
            finally:
                self._count_wait(since)
            next(self._taken)
        if shared is not None:
            shared.con._ping_check()
            return self._shared_proxy(shared)
        try:
            if con is None:
                con = self._family.borrow(self)
            ready = self._ready(con)
        except BaseException:
            with lock:
                self._connections -= 1
                self._shared_pending -= 1
                if self._waiting:
                    self._wake()
            raise
        shared = SharedDBConnection(ready)
        with lock:
            self._shared_pending -= 1
            self._shared_cache.append(shared)
            if self._waiting:
                self._wake()
        return self._shared_proxy(shared)

    def _claim_shared(
        self, deadline: float | None, since: list[float]
    ) -> tuple[SharedDBConnection | None, SteadyDBConnection | None]:
        """(Lock held) A share of a shared connection, or a slot for a new one and the
        idle connection to make it from (None: open one), waiting as the pool allows."""
        while True:
            while (
                not self._shared_cache
                and self._maxconnections
                and self._connections >= self._maxconnections
            ):
                self._wait(deadline, since)
            below_max = not self._maxconnections or self._connections < self._maxconnections
            if below_max and len(self._shared_cache) + self._shared_pending < self._maxshared:
                self._connections += 1
                self._shared_pending += 1
                return None, self._idle.popleft() if self._idle else None
            if not self._shared_cache:
                # Full only of connections being opened: wait for one to share.
                self._wait(deadline, since, opening=self._shared_pending > 0)
                continue
            self._shared_cache.sort()  # least shared first
            shared = self._shared_cache[0]
            if shared.con._transaction:
                # Never share a connection inside a transaction. commit() and rollback()
                # wake the waiters; a failover or cancel() ending it does not, hence the
                # periodic re-check.
                busy = (
                    f"all {len(self._shared_cache)} shared connections"
                    f" (maxshared={self._maxshared}) are in a transaction"
                )
                self._wait(deadline, since, recheck=_RECHECK, busy=busy)
                continue
            if (
                self._maxage is not None
                and below_max
                and self._too_old(shared.con, time.monotonic())
            ):
                # Always in use, it is never idle at a checkout to be replaced: share it no
                # more, and let its last share return it (to be recycled). Only while a
                # replacement can be opened at once: at maxconnections, the checkout would
                # wait for every share of it, perhaps its own thread's.
                self._shared_cache.remove(shared)
                shared.retired = True
                continue
            shared.share()
            return shared, None

    def _shared_proxy(self, shared: SharedDBConnection) -> PooledSharedDBConnection:
        proxy = PooledSharedDBConnection(self, shared)
        if self._leaktime is not None:
            self._lease(proxy)
        return proxy

    # -- return ---------------------------------------------------------------------

    def unshare(self, con: SharedDBConnection) -> None:
        """Release one share of a shared connection; the last one returns it to the pool."""
        forgotten = False
        with self._mutex:
            con.unshare()
            if con.shared:
                return
            try:
                self._shared_cache.remove(con)
            except ValueError:
                forgotten = not con.retired  # by close(), which gave its slot back
        if forgotten:
            # close() closed it; a share used since may have reopened it (see
            # SteadyDBConnection._close).
            self._close_con(con.con)
            return
        self.cache(con.con)

    def cache(self, con: SteadyDBConnection) -> None:
        """Return a connection: roll back as ``reset`` says, then keep or close it."""
        if (not _page[0] or con._pid != fork.cached_pid) and con._pid != fork.getpid():
            con._discard()  # checked out before a fork: not ours to reuse or close
            return
        if not self._life[0]:  # a proxy collected with its pool gives back
            self._close_con(con)
            return
        if self._reset or con._transaction:
            con._reset(self._reset)
        if con._reconnects:  # since checkout, the reset's included
            self._count_reconnects(con)
        if self._maxshared:
            self._cache_in_shared_pool(con)
            return
        # No lock, as in connection(): each step is one C call, atomic under the GIL.
        idle = self._idle
        extra: SteadyDBConnection | None = con
        if not con._closed:
            if self._maxidle is not None:
                con._idle_since = time.monotonic()
            idle.append(con)
            extra = None
            # Over maxcached, every return that sees the excess closes one: never more
            # than maxcached stay idle, whichever threads return at once.
            if self._maxcached and len(idle) > self._maxcached:
                with suppress(IndexError):
                    extra = idle.pop()
        next(self._given_back)
        slots = self._slots
        if slots is not None:
            slots.put(True)  # after the connection went idle, so a waiter finds it
        if extra is not None:
            self._close_con(extra)

    def _count_reconnects(self, con: SteadyDBConnection) -> None:
        self._stats["reconnects"] += con._reconnects
        con._reconnects = 0

    def _cache_in_shared_pool(self, con: SteadyDBConnection) -> None:
        """The rest of cache() in a pool that shares: the lock bounds the slots."""
        idle = self._idle
        with self._mutex:  # critical section: hand back the slot, keep or drop
            self._connections -= 1
            keep = not con._closed and (not self._maxcached or len(idle) < self._maxcached)
            if keep:
                if self._maxidle is not None:
                    con._idle_since = time.monotonic()
                idle.append(con)
            if self._waiting:
                self._wake()
        if not keep:
            self._close_con(con)

    def _close_con(self, con: SteadyDBConnection) -> None:
        if not con._closed:
            self._stats["connections_closed"] += 1
        con._close()

    # -- leaks ----------------------------------------------------------------------

    def _lease(self, proxy: object) -> None:
        lease = _Lease()
        now = lease.since
        assert self._leaktime is not None
        with self._mutex:
            self._leases[id(proxy)] = lease
            overdue = [
                old
                for old in list(self._leases.values())  # a collected proxy may pop one
                if not old.warned and now - old.since > self._leaktime
            ]
            for old in overdue:
                old.warned = True
            self._stats["leaks"] += len(overdue)
        for old in overdue:
            log.warning(
                "forksafe: a connection has been checked out for %.1fs (leaktime=%ss);"
                " checked out at:\n%s",
                now - old.since,
                self._leaktime,
                old.stack,
            )

    def _release_lease(self, proxy: object, dropped: bool) -> None:
        self._checkpid()  # a proxy checked out before a fork may be closed in the child
        with self._mutex:
            lease = self._leases.pop(id(proxy), None)
        if lease is None:
            return
        held = time.monotonic() - lease.since
        if dropped:
            with self._mutex:
                self._stats["leaks"] += 0 if lease.warned else 1
            log.warning(
                "forksafe: a connection was garbage collected without close() after %.1fs;"
                " it went back to the pool. Checked out at:\n%s",
                held,
                lease.stack,
            )
        elif not lease.warned and self._leaktime is not None and held > self._leaktime:
            with self._mutex:
                self._stats["leaks"] += 1
            log.warning(
                "forksafe: a connection was held for %.1fs (leaktime=%ss); checked out at:\n%s",
                held,
                self._leaktime,
                lease.stack,
            )

    # -- whole pool -----------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Named counters for this pool in this process, safe to log or export as-is.

        ``idle`` counts this pool's idle connections (identical pools may borrow them),
        ``in_use`` its checked-out connections; the rest count events since the process
        started using the pool.
        """
        self._checkpid()
        with self._mutex:
            stats = dict(self._stats)
            # The counters move without the lock: read the returns between two equal
            # readings of the checkouts, so both are of one moment.
            checkouts, given_back = -1, 0
            for _ in range(100):
                before = _counted(self._taken)
                given_back = _counted(self._given_back)
                checkouts = _counted(self._taken)
                if before == checkouts:
                    break
            stats["checkouts"] = checkouts
            if self._maxshared:
                stats["in_use"] = self._connections
            else:
                stats["in_use"] = max(0, checkouts - given_back)
            stats["idle"] = len(self._idle)
            stats["shared"] = len(self._shared_cache)
            stats["maxconnections"] = self._maxconnections
        return stats

    def close(self) -> None:
        """Close the idle and shared connections. A dedicated connection checked out now
        goes back idle when returned, and a later close() (or ``del pool``) closes it.

        The pool stays usable (as in DBUtils): a later checkout opens new connections.
        In a forked child it closes nothing of the parent's; it only forgets them.
        """
        self._checkpid()
        with self._mutex:
            gone: list[SteadyDBConnection] = []
            with suppress(IndexError):
                while True:  # one popleft at a time: returns append without the lock
                    gone.append(self._idle.popleft())
            if self._shared_cache:
                gone += [sc.con for sc in self._shared_cache]
                self._connections -= len(self._shared_cache)
                self._shared_cache.clear()
            self._warm = not self._mincached
            if self._waiting:
                self._lock.notify_all()
        for con in gone:
            self._close_con(con)

    def __del__(self) -> None:
        life = getattr(self, "_life", None)  # None: __init__ failed early
        if life is not None:
            life[0] = False  # its connections close themselves, and cache() closes them
        if getattr(self, "_idle", None) or self.__dict__.get("_shared_cache"):
            with suppress(Exception):
                self.close()

    def __enter__(self) -> PooledDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_ProxyT = TypeVar("_ProxyT", bound="_PooledProxy")

# Makes a proxy without running an __init__ (a Python call); the pool sets its fields.
_new_proxy = object.__new__


class _PooledProxy:
    """What both kinds of checked-out connection share: delegation to the steady
    connection while checked out, :class:`InvalidConnectionError` after ``close()``."""

    # What the hot paths read live in slots (see forksafe.speedups); both kinds of proxy
    # set them when made.
    __slots__ = ("__dict__", "__weakref__", "_con", "_pool")

    _pool: PooledDB
    _con: SteadyDBConnection | None

    def close(self) -> None:
        raise NotImplementedError

    def _live(self, name: str = "") -> SteadyDBConnection:
        """The steady connection behind this proxy, or InvalidConnectionError."""
        con = self._con
        if con is None:
            wanted = f"; cannot get {name!r}" if name else ""
            raise InvalidConnectionError(
                f"this connection was already returned to its pool{wanted}"
            )
        return con

    def cursor(self, *args: Any, **kwargs: Any) -> SteadyDBCursor:
        """A tough cursor on the connection."""
        con = self._con
        if con is None:
            con = self._live("cursor")  # raises
        if args or kwargs:
            return SteadyDBCursor(con, *args, **kwargs)
        cls = con._cursor_class
        if not con._plain or con._token != _armed[0]:
            return con.cursor()
        # con.cursor()'s fast path, inlined (hot path: one Python call fewer).
        try:
            cursor = con._con.cursor()
        except con._failures as error:
            cursor = con._cursor_failed(error, (), {}, overused=False)
        steady = _new_cursor(cls)
        steady._con = con
        steady._sized = False
        if type(cursor) is cls._made_for:
            steady._cursor = cursor
            steady._closed = False
        else:
            steady._adopt(cursor, True)  # first cursor, or a new driver cursor type
        return steady

    def commit(self) -> None:
        """Commit the current transaction."""
        self._live().commit()

    def rollback(self) -> None:
        """Roll back the current transaction."""
        self._live().rollback()

    def __enter__(self: _ProxyT) -> _ProxyT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# What DBUtils forwards with __getattr__: everything the steady connection has (its
# methods and its declared instance attributes).
forwarding.forward(_PooledProxy, [*dir(SteadyDBConnection), *SteadyDBConnection.__annotations__])


class PooledDedicatedDBConnection(_PooledProxy):
    """A checked-out connection: everything is delegated to the steady connection;
    ``close()`` (or leaving a ``with`` block) returns it to the pool.

    Used after it was returned, or in a forked child, it raises
    :class:`InvalidConnectionError`. Dropped without ``close()``, it returns the
    connection itself (and is reported when the pool has a ``leaktime``).
    """

    def close(self) -> None:
        """Return the connection to the pool. Idempotent."""
        con = self._con
        if con is None:
            return
        self._con = None
        pool = self._pool
        if pool._lean_return and con._token == _armed[0] and not con._reconnects:
            # pool.cache(con) inlined for its common case (hot path: one Python call
            # fewer): this process's connection, nothing to count, no limit to apply.
            if con._closed:
                pass
            elif con._transaction:
                if con._rollback() is not None and con._reconnects:  # it failed, reconnected
                    pool._count_reconnects(con)
            elif pool._reset:
                # con._reset(True), inlined likewise: roll back unless the driver
                # reports no transaction open.
                probe = con._in_transaction
                state: object = None
                if probe is not None:
                    try:  # noqa: SIM105 - hot path: suppress() costs three calls
                        state = probe(con._con)
                    except Exception:
                        pass
                if state is None or state:
                    try:  # con._rollback(), inlined likewise
                        con._con.rollback()
                    except Exception as error:
                        con._rollback_failed(error)
                        if con._reconnects:
                            pool._count_reconnects(con)
            if not con._closed:
                pool._idle.append(con)
            next(pool._given_back)
            if pool._slots is not None:
                pool._slots.put(True)
            return
        if pool._leaktime is not None:
            pool._release_lease(self, dropped=False)
        pool.cache(con)

    def __del__(self) -> None:
        con = self._con
        if con is None:
            return
        with suppress(Exception):
            self._con = None
            pool = self._pool
            if pool._leaktime is not None:
                pool._release_lease(self, dropped=True)
            pool.cache(con)


@total_ordering
class SharedDBConnection:
    """A connection in the shared cache with its number of current users."""

    retired = False  # past maxage: out of the shared cache until its last share returns

    def __init__(self, con: SteadyDBConnection) -> None:
        self.con = con
        self.shared = 1

    def __lt__(self, other: SharedDBConnection) -> bool:
        if self.con._transaction == other.con._transaction:
            return self.shared < other.shared
        return not self.con._transaction

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def share(self) -> None:
        """Count one more user."""
        self.shared += 1

    def unshare(self) -> None:
        """Count one user fewer."""
        self.shared -= 1


class PooledSharedDBConnection(_PooledProxy):
    """A share of a shared connection; ``close()`` gives the share back."""

    def __init__(self, pool: PooledDB, shared_con: SharedDBConnection) -> None:
        con = shared_con.con
        if not con.threadsafety() > 1:
            raise NotSupportedError(
                "the driver's connections cannot be shared between threads (threadsafety < 2)"
            )
        self._pool = pool
        self._shared_con: SharedDBConnection | None = shared_con
        self._con = con

    def commit(self) -> None:
        """Commit; threads waiting for a shared connection outside a transaction re-check."""
        con = self._live()
        try:
            con.commit()
        finally:
            if con._pid == fork.getpid():  # in a child it raised, and the pool is not ours
                self._pool._transaction_ended()

    def rollback(self) -> None:
        """Roll back; threads waiting for a shared connection outside a transaction re-check."""
        con = self._live()
        try:
            con.rollback()
        finally:
            if con._pid == fork.getpid():
                self._pool._transaction_ended()

    def close(self) -> None:
        """Give the share back; the last share returns the connection to the pool."""
        self._give_back(dropped=False)

    def _give_back(self, dropped: bool) -> None:
        if self._con is not None:
            shared = self._shared_con
            self._shared_con = self._con = None
            if shared is not None:
                if shared.con._pid != fork.getpid():
                    return  # inherited through fork: the pool already forgot it
                pool = self._pool
                if pool._leaktime is not None:
                    pool._release_lease(self, dropped)
                pool.unshare(shared)

    def __del__(self) -> None:
        with suppress(Exception):
            self._give_back(dropped=True)
