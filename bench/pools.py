"""Pool benchmark: forksafe against DBUtils, SQLAlchemy and psycopg_pool, in one run.

    python bench/pools.py [--quick] [--backend fake|pg|mysql|all] [--repeats 9] [--budget 0.1]
                          [--cores one|two|any]

One *cycle* is what an application does per request: check out a connection, open a
cursor, ``execute("SELECT 1")``, ``fetchone()``, close the cursor, give the connection
back. Each contender runs it with 1 thread and with 8 threads sharing a pool capped at 4
connections (contenders that cannot cap are marked); on real servers the 8-thread table
also runs raw and forksafe on 4 threads, the bound for any 4-connection pool and what
the 4 threads that wait for a connection cost. Backends:

* ``fake``   a zero-I/O DB-API 2 driver defined here: pure pool overhead.
* ``pg``     PostgreSQL through psycopg2 (psycopg 3 for psycopg_pool and its raw floor).
* ``mysql``  MariaDB/MySQL through PyMySQL.

Every measurement is repeated 9 times (``--repeats``) for ``--budget`` seconds (0.1;
0.02 with ``--quick``); the best is reported and the median printed next to it. The
contenders of one driver and thread count are set up together and their repetitions
interleave, so a burst of load on the machine is shared out. Per contender: wall time
per cycle, client CPU per cycle (``time.process_time``; with 8 threads the whole
process), queries per second, connections opened, and the server sessions seen while
the run was in flight, plus ratios against a reference (DBUtils PooledDB on ``fake``,
the raw reused connection on real servers) and against the best peer pool. A second
part times ``fork()`` with 10 warmed forksafe pools of 10 connections each against a
fork with the same 100 connections open but no pools (and forksafe's fork hooks on
their own), and a child's first checkout.

Prints a table, PASS/FAIL lines for the targets (ratios within this run, never absolute
numbers), then one line ``JSON {...}`` with every number. On real servers the bench
process and the server task behind each of its connections are pinned to one CPU
(``--cores``, see :class:`Placement`): a local round trip costs 50 us on one core and
175 us across two, and left to the scheduler a contender lands on either. A backend
whose server is unreachable is skipped with a note. Servers: ``FORKSAFE_BENCH_PG`` (a
libpq conninfo, default ``host=127.0.0.1 port=5432 user=root dbname=test``) and
``FORKSAFE_BENCH_MYSQL`` (``host:port/db``, user root, default ``127.0.0.1:3306/test``).
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import json
import logging
import os
import platform
import signal
import socket
import statistics
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Run as a script, this directory comes first on sys.path, and bench/queue.py would shadow
# the standard library's queue module (which psycopg imports).
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

# Timestamps taken in a forked child before and after forksafe's after-fork hook: this one
# is registered before forksafe is imported (it is imported lazily below), so it runs first.
_CHILD_MARKS: list[int] = []
os.register_at_fork(after_in_child=lambda: _CHILD_MARKS.append(time.perf_counter_ns()))

SQL = "SELECT 1"
THREAD_MODES = (1, 8)
CAP = 4  # connections a capped pool may hold with 8 threads
REPEATS = 9
STEPS_ROUNDS, STEPS_PER_ROUND = 20, 200  # the per-step breakdown (real servers)
BUSY_LOOPS = 30  # the step table's control: a bare loop, about half an idle checkout + return

Cycle = Callable[[], None]
Factory = Callable[["Driver", dict[str, Any], int], tuple[Cycle, Cycle]]


# -- the fake driver ----------------------------------------------------------------


class FakeCursor:
    def execute(self, operation: str, parameters: Any = None) -> None:
        return None

    def fetchone(self) -> tuple[int]:
        return (1,)

    def close(self) -> None:
        return None


class FakeConnection:
    """Does nothing; no ``in_transaction`` attribute, so no pool can skip the rollback.

    With ``sockets``, each connection holds one end of a socket pair and reports it by
    ``fileno()``, as psycopg does, so fork hooks have a real descriptor to deal with.
    """

    def __init__(self, live: Callable[[str, int], None], database: str, sockets: bool) -> None:
        self._live = live
        self._database = database
        self._open = True
        self._sockets = socket.socketpair() if sockets else ()
        live(database, 1)

    def fileno(self) -> int:
        if not self._sockets:
            raise AttributeError("fileno")  # drivers without a socket
        return self._sockets[0].fileno()

    def cursor(self) -> FakeCursor:
        return FakeCursor()

    def commit(self) -> None:
        return None

    def rollback(self) -> None:
        return None

    def ping(self, reconnect: bool = False) -> bool:
        return True  # PyMySQL's signature: pools call ping(False) first

    def close(self) -> None:
        if self._open:
            self._open = False
            for sock in self._sockets:
                sock.close()
            self._live(self._database, -1)


def make_fake_module(sockets: bool = False) -> types.ModuleType:
    """A module-like DB-API 2 driver whose connections count themselves while open."""
    mod = types.ModuleType("fakedb")
    mod.apilevel = "2.0"
    mod.threadsafety = 1
    mod.paramstyle = "qmark"

    class Error(Exception):
        pass

    class DatabaseError(Error):
        pass

    errors = {
        "Warning": type("Warning", (Exception,), {}),
        "Error": Error,
        "InterfaceError": type("InterfaceError", (Error,), {}),
        "DatabaseError": DatabaseError,
    }
    for name in (
        "DataError",
        "OperationalError",
        "IntegrityError",
        "InternalError",
        "ProgrammingError",
        "NotSupportedError",
    ):
        errors[name] = type(name, (DatabaseError,), {})
    vars(mod).update(errors)
    lock = threading.Lock()
    mod.live = {}  # database -> connections open

    def live(database: str, delta: int) -> None:
        with lock:
            mod.live[database] = mod.live.get(database, 0) + delta

    def connect(database: str = "", **kwargs: Any) -> FakeConnection:
        return FakeConnection(live, database, sockets)

    mod.connect = connect
    return mod


# -- counting connects ----------------------------------------------------------------


class Driver(types.ModuleType):
    """A DB-API 2 module that counts ``connect()`` calls; everything else is the driver's.

    Pools get this instead of the driver module, so nothing in the cycle is wrapped.
    """

    def __init__(self, module: types.ModuleType, on_connect: Callable[[Any], None]) -> None:
        super().__init__(module.__name__)
        for name, value in vars(module).items():
            if not name.startswith("__") and name != "connect":
                setattr(self, name, value)
        self._connect = module.connect
        self._on_connect = on_connect
        self.opened: list[None] = []  # list.append is atomic: safe from many threads

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        return self.opened_elsewhere(self._connect(*args, **kwargs))

    def opened_elsewhere(self, con: Any) -> Any:
        """Count (and pin, see Placement) a connection opened by the driver directly."""
        self.opened.append(None)
        self._on_connect(con)
        return con


# -- contenders -----------------------------------------------------------------------


def raw(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
    """One reused connection (one per thread with 8 threads), rolled back after each query."""
    if threads == 1:
        con = drv.connect(**kw)

        def cycle() -> None:
            cur = con.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            con.rollback()

        return cycle, con.close
    local = threading.local()
    cons: list[Any] = []

    def cycle_local() -> None:
        try:
            con = local.con
        except AttributeError:
            con = local.con = drv.connect(**kw)
            cons.append(con)
        cur = con.cursor()
        cur.execute(SQL)
        cur.fetchone()
        cur.close()
        con.rollback()

    def close_all() -> None:
        for con in cons:
            con.close()

    return cycle_local, close_all


def connect_per_query(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
    def cycle() -> None:
        con = drv.connect(**kw)
        cur = con.cursor()
        cur.execute(SQL)
        cur.fetchone()
        cur.close()
        con.close()

    return cycle, lambda: None


def pooled(cls: Any, **options: Any) -> Factory:
    """DBUtils-style PooledDB (DBUtils' or forksafe's): ``connection()`` / ``close()``."""

    def factory(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
        pool = cls(drv, maxconnections=CAP, blocking=True, **options, **kw)

        def cycle() -> None:
            con = pool.connection()
            cur = con.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            con.close()

        return cycle, pool.close

    return factory


def persistent(cls: Any, explicit_rollback: bool, **options: Any) -> Factory:
    """DBUtils-style PersistentDB: one connection per thread; cannot cap."""

    def factory(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
        pool = cls(drv, **options, **kw)

        def cycle() -> None:
            con = pool.connection()
            cur = con.cursor()
            cur.execute(SQL)
            cur.fetchone()
            cur.close()
            if explicit_rollback:
                con.rollback()
            con.close()

        def close_all() -> None:
            # Threads of a crew are gone (their connections closed with them); the main
            # thread's connection is not closeable through close(): use the steady close.
            if threads == 1:
                pool.connection()._close()

        return cycle, close_all

    return factory


def queue_pool(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(lambda: drv.connect(**kw), pool_size=CAP, max_overflow=0)

    def cycle() -> None:
        con = pool.connect()
        cur = con.cursor()
        cur.execute(SQL)
        cur.fetchone()
        cur.close()
        con.close()

    return cycle, pool.dispose


def psycopg_pool_factory(drv: Driver, kw: dict[str, Any], threads: int) -> tuple[Cycle, Cycle]:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        "",
        kwargs=kw,
        min_size=CAP,
        max_size=CAP,
        open=True,
        configure=drv.opened_elsewhere,
    )
    pool.wait()
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

    def cycle() -> None:
        con = pool.getconn()
        cur = con.cursor()
        cur.execute(SQL)
        cur.fetchone()
        cur.close()
        con.rollback()  # putconn would too, but logs a warning for every such return
        pool.putconn(con)

    return cycle, pool.close


@dataclass
class Contender:
    name: str
    factory: Factory
    driver: str  # key into the backend's drivers
    ref: str  # name of the contender this one is compared with (same thread count)
    caps: bool = True  # holds at most CAP connections with 8 threads
    peer: bool = False  # a third-party capped pool: candidate for "best peer"
    forksafe: bool = False
    # A reference row of the 8-thread table run on this many threads instead (none in
    # the 1-thread table).
    crew: int | None = None


def contenders(backend: str) -> tuple[list[Contender], dict[str, str]]:
    """The contenders for ``backend`` and the footnotes saying what each does."""
    from dbutils.persistent_db import PersistentDB as DBUtilsPersistentDB
    from dbutils.pooled_db import PooledDB as DBUtilsPooledDB

    from forksafe import PersistentDB, PooledDB

    main = {"fake": "fakedb", "pg": "psycopg2", "mysql": "pymysql"}[backend]
    ref = "DBUtils PooledDB" if backend == "fake" else "raw"
    rows = [
        Contender("raw", raw, main, ref, caps=False),
        Contender("connect-per-query", connect_per_query, main, ref, caps=False),
        Contender("DBUtils PooledDB", pooled(DBUtilsPooledDB), main, ref, peer=True),
        Contender(
            "DBUtils PersistentDB",
            persistent(DBUtilsPersistentDB, explicit_rollback=True),
            main,
            ref,
            caps=False,
        ),
        Contender("SQLAlchemy QueuePool", queue_pool, main, ref, peer=True),
        Contender("forksafe PooledDB", pooled(PooledDB), main, ref, forksafe=True),
        Contender(
            "forksafe PersistentDB",
            persistent(PersistentDB, explicit_rollback=True),
            main,
            ref,
            caps=False,
            forksafe=True,
        ),
    ]
    if backend != "fake":
        # What the 4 threads beyond the 4 connections cost: the same cycles on 4 threads.
        rows += [
            Contender("raw, 4 threads", raw, main, ref, crew=CAP),
            Contender(
                "forksafe PooledDB, 4 threads", pooled(PooledDB), main, ref, crew=CAP, forksafe=True
            ),
        ]
    if backend == "pg":
        rows += [
            Contender("raw (psycopg 3)", raw, "psycopg", "raw (psycopg 3)", caps=False),
            Contender(
                "psycopg_pool", psycopg_pool_factory, "psycopg", "raw (psycopg 3)", peer=True
            ),
            Contender(
                "forksafe PooledDB (psycopg 3)",
                pooled(PooledDB),
                "psycopg",
                "raw (psycopg 3)",
                forksafe=True,
            ),
        ]
    if backend == "mysql":
        rows += [
            Contender("DBUtils PooledDB ping=0", pooled(DBUtilsPooledDB, ping=0), main, ref),
            Contender(
                "forksafe PooledDB ping=0",
                pooled(PooledDB, ping=0),
                main,
                ref,
                forksafe=True,
            ),
        ]
    rollback = {
        "fake": "a no-op",
        "pg": "a round trip (the SELECT opened a transaction: autocommit is off)",
        "mysql": "a round trip (autocommit off; PyMySQL cannot report whether a transaction"
        " is open, so nobody skips it)",
    }[backend]
    ping = {
        "fake": "ping() at checkout is a no-op call",
        "pg": "psycopg2/psycopg have no ping(): DBUtils and forksafe drop the ping=1 check",
        "mysql": "ping=1 is a COM_PING round trip at every checkout",
    }[backend]
    forksafe_ping = {
        "mysql": "ping=1 polls the idle socket at every checkout: a COM_PING round trip"
        " only when the server wrote to it, i.e. is closing the session",
    }.get(backend, ping)
    notes = {
        "raw": "one driver connection reused, no pool; cycle ends with rollback(), "
        + rollback
        + ". 8 threads: one connection per thread (cannot cap: 8 sessions).",
        "connect-per-query": "connect, query, close(); no rollback (close ends the session)."
        " Cannot cap. Each connect also pins its server task (--cores; about 20 us"
        + (
            ", and a processlist query). PyMySQL builds an SSL context per connect."
            if backend == "mysql"
            else ")."
        ),
        "DBUtils PooledDB": "maxconnections=4, blocking=True, reset=True (rollback on every"
        " return), ping=1 (" + ping + ").",
        "DBUtils PersistentDB": "one connection per thread (cannot cap); its close() does not"
        " roll back unless begin() was called, so the cycle calls rollback() before close().",
        "SQLAlchemy QueuePool": "pool_size=4, max_overflow=0; reset-on-return rollback;"
        " no ping (pre_ping is off by default).",
        "forksafe PooledDB": "maxconnections=4, blocking=True, reset=True, ping=1 ("
        + forksafe_ping
        + "); the rollback on return is skipped only when the driver reports no open"
        " transaction"
        + (" (never here: the fake driver cannot tell)." if backend == "fake" else "."),
        "forksafe PersistentDB": "one connection per thread (cannot cap); like DBUtils, the"
        " cycle calls rollback() before close() (close() itself rolls back only when the"
        " driver reports a transaction open).",
    }
    if backend != "fake":
        notes.update(
            {
                "raw, 4 threads": "8-thread table only: raw on 4 threads, a connection each."
                " A pool of 4 connections serving 8 threads does this work and its own on top,"
                " so this row's qps/peer bounds what such a pool can show.",
                "forksafe PooledDB, 4 threads": "8-thread table only: forksafe PooledDB on"
                " 4 threads, so nobody waits for a connection; the 8-thread row's extra time"
                " per cycle is what the 4 threads waiting for one cost.",
            }
        )
    if backend == "pg":
        notes.update(
            {
                "raw (psycopg 3)": "as raw, on psycopg 3 (autocommit off, rollback each cycle).",
                "psycopg_pool": "ConnectionPool min_size=max_size=4, getconn()/putconn(); the"
                " cycle calls rollback() before putconn() (putconn would roll back too, but"
                " logs a warning per return); no check at getconn.",
                "forksafe PooledDB (psycopg 3)": "forksafe PooledDB as above, on psycopg 3.",
            }
        )
    if backend == "mysql":
        notes.update(
            {
                "DBUtils PooledDB ping=0": "as DBUtils PooledDB, no ping at checkout.",
                "forksafe PooledDB ping=0": "as forksafe PooledDB, no ping at checkout.",
            }
        )
    return rows, notes


# -- where the client and the servers run ---------------------------------------------


class Placement:
    """Pins this process and the server task behind each connection it opens (a
    PostgreSQL backend process, a MariaDB connection thread) to chosen CPUs.

    A local round trip costs about 50 us when the client and its server task share a
    core and about 175 us when they sit on two (the reply needs a cross-core wake-up),
    and unpinned, the scheduler switches between the two from one second to the next:
    contenders measured back to back then differ threefold for reasons that are not
    theirs. ``one`` puts everything on one CPU, ``two`` the client on one and the server
    tasks on another, ``any`` pins nothing. Pinning starts once the server task of the
    first connection is seen holding its server end (a local server, in this network
    namespace); that, and the right to set another user's affinity, are needed.
    Otherwise nothing stays pinned and :meth:`describe` says why. Every task gets its own
    CPUs back at :meth:`release`, after which nothing more is pinned.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.problem: str | None = None
        self.client: set[int] = set()
        self.server: set[int] = set()
        self._client_before: dict[int, set[int]] = {}  # thread -> its CPUs before pin_client
        self._pinned: dict[int, tuple[str, set[int]]] = {}  # task -> (command, CPUs before)
        self._lock = threading.Lock()
        self._closed = False
        self._server_is_local = False
        if mode == "any":
            return
        if not hasattr(os, "sched_setaffinity"):
            self.problem = "this platform cannot set CPU affinity"
            return
        cpus = sorted(os.sched_getaffinity(0))
        first = cpus[0]
        second = cpus[1] if len(cpus) > 1 else first
        self.client = {first}
        self.server = {first if mode == "one" else second}
        if mode == "two" and second == first:
            self.problem = "one CPU available: the client and the servers share it"

    @property
    def active(self) -> bool:
        return self.mode != "any" and self.problem is None and not self._closed

    def describe(self) -> str:
        if self.mode == "any":
            return "unpinned"
        if self.problem is not None:
            return f"unpinned ({self.problem})"
        return f"client on CPU {min(self.client)}, server sessions on CPU {min(self.server)}"

    def pin_client(self) -> None:
        """Every thread of this process (threads started later inherit it)."""
        if not self.active:
            return
        for task in _threads():
            with contextlib.suppress(ProcessLookupError):  # a thread that just ended
                self._client_before[task] = os.sched_getaffinity(task)
                os.sched_setaffinity(task, self.client)

    def pin_server(self, client_fd: int, task: int | None, names: tuple[str, ...]) -> None:
        """Pin ``task``, the server task said to serve the connection whose socket is
        ``client_fd`` here, once its command name is one of ``names`` and its process
        holds the other end of that socket; otherwise unpin everything and stop."""
        with self._lock:
            if not self.active:
                return
            try:
                if task is None:
                    raise LookupError("the server did not say which task serves a connection")
                name = _command_name(task)
                if name not in names:
                    raise LookupError(f"task {task} is {name!r}, not {'/'.join(names)}")
                # Reading the kernel's TCP tables takes milliseconds: the first connection
                # proves the server is this machine's, later ones trust its answers.
                if not self._server_is_local:
                    if not _holds_server_end(task, client_fd):
                        raise LookupError(
                            f"task {task} does not hold the server end of this TCP connection"
                            " (a remote server, another network namespace, or not TCP)"
                        )
                    self._server_is_local = True
                # A MariaDB thread serves one connection after another: keep the CPUs it
                # had before this run first pinned it.
                known = self._pinned.get(task)
                before = known[1] if known is not None else os.sched_getaffinity(task)
                os.sched_setaffinity(task, self.server)
            except (LookupError, OSError) as exc:
                self.problem = f"cannot pin server tasks: {exc}"
                self._restore()
                return
            self._pinned[task] = (name, before)

    def server_switches(self) -> tuple[int, int]:
        """Context switches of the pinned server tasks so far, summed: (voluntary, that
        is going to sleep; involuntary, that is preempted). Tasks gone count nothing."""
        total = (0, 0)
        for task in list(self._pinned):
            total = _plus(total, _switches(str(task)))
        return total

    def release(self) -> None:
        """Give every pinned task its CPUs back (MariaDB keeps idle connection threads)."""
        with self._lock:
            self._closed = True
            self._restore()

    def _restore(self) -> None:
        """Unpin the server tasks still alive and this process's threads (lock held)."""
        for task, (name, before) in self._pinned.items():
            with contextlib.suppress(LookupError, OSError):
                if _command_name(task) == name:
                    os.sched_setaffinity(task, before)
        self._pinned.clear()
        everywhere = set().union(*self._client_before.values()) if self._client_before else None
        for task in _threads():
            with contextlib.suppress(ProcessLookupError):
                cpus = self._client_before.get(task, everywhere)
                if cpus:
                    os.sched_setaffinity(task, cpus)
        self._client_before.clear()


def _threads() -> list[int]:
    return [int(task) for task in os.listdir("/proc/self/task")]


def _switches(task: str) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of ``task`` ("thread-self" or a task id);
    (0, 0) for a task gone, or where /proc does not tell."""
    try:
        with open(f"/proc/{task}/status") as status:
            counts = dict(line.split(":") for line in status if "ctxt_switches" in line)
        return int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _plus(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _command_name(task: int) -> str:
    try:
        with open(f"/proc/{task}/comm") as comm:
            return comm.read().strip()
    except OSError:
        raise LookupError(f"no task {task} on this machine") from None


def _tcp_sockets() -> dict[int, tuple[int, int]]:
    """This network namespace's TCP sockets: inode -> (local port, remote port)."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local, remote, inode = fields[1], fields[2], int(fields[9])
                if inode:
                    sockets[inode] = (int(local[-4:], 16), int(remote[-4:], 16))
    return sockets


def _socket_inode(link: str) -> int | None:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def _holds_server_end(task: int, client_fd: int) -> bool:
    """Whether the process of ``task`` holds the local TCP socket at the other end of
    the one that ``client_fd`` is in this process."""
    sockets = _tcp_sockets()
    ports = sockets.get(_socket_inode(f"/proc/self/fd/{client_fd}") or 0)
    if ports is None:
        return False  # not a TCP socket (a Unix socket): cannot tell
    peers = {inode for inode, pair in sockets.items() if pair == (ports[1], ports[0])}
    with open(f"/proc/{task}/status") as status:
        tgid = next(line.split()[1] for line in status if line.startswith("Tgid:"))
    fds = f"/proc/{tgid}/fd"
    return any(_socket_inode(f"{fds}/{fd}") in peers for fd in os.listdir(fds))


PLACEMENT = Placement("any")


# -- backends -------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    drivers: dict[str, types.ModuleType]
    connect_kwargs: Callable[[str, str], dict[str, Any]]  # (driver, tag) -> kwargs
    sessions: Callable[[str], int]  # tag -> server sessions open now
    on_connect: Callable[[str], Callable[[Any], None]]  # tag -> hook run on each connect
    close: Cycle = lambda: None
    note: str = ""


def fake_backend() -> Backend:
    fake = make_fake_module()
    return Backend(
        "fake",
        {"fakedb": fake},
        lambda driver, tag: {"database": tag},
        lambda tag: int(fake.live.get(tag, 0)),
        lambda tag: lambda con: None,
        note="zero-I/O driver defined in bench/pools.py; sessions = fake connections open",
    )


def pg_backend() -> Backend:
    import psycopg2

    conninfo = os.environ.get("FORKSAFE_BENCH_PG", "host=127.0.0.1 port=5432 user=root dbname=test")
    params = dict(item.split("=", 1) for item in conninfo.split())
    params["connect_timeout"] = "3"
    monitor = psycopg2.connect(**params)
    monitor.autocommit = True
    drivers: dict[str, types.ModuleType] = {"psycopg2": psycopg2}
    try:
        import psycopg

        drivers["psycopg"] = psycopg
    except ImportError:
        pass

    def sessions(tag: str) -> int:
        with monitor.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [tag])
            return int(cur.fetchone()[0])

    return Backend(
        "pg",
        drivers,
        lambda driver, tag: {**params, "application_name": tag},
        sessions,
        lambda tag: (
            lambda con: PLACEMENT.pin_server(con.fileno(), con.info.backend_pid, ("postgres",))
        ),
        close=monitor.close,
        note="sessions = pg_stat_activity rows with this contender's application_name",
    )


def mysql_backend() -> Backend:
    import pymysql

    address = os.environ.get("FORKSAFE_BENCH_MYSQL", "127.0.0.1:3306/test")
    hostport, _, database = address.partition("/")
    host, _, port = hostport.partition(":")
    params = {
        "host": host,
        "port": int(port or 3306),
        "user": "root",
        "database": database or "test",
        "connect_timeout": 3,
    }
    monitor = pymysql.connect(**params, autocommit=True)
    lock = threading.Lock()  # the monitor serves the crews' threads and the sampler
    ports: dict[str, set[int]] = {}

    def server_thread(con: Any) -> int | None:
        """The OS thread serving ``con`` (MariaDB's processlist has a TID column; MySQL's
        has not, and then the run stays unpinned)."""
        try:
            with lock, monitor.cursor() as cur:
                cur.execute(
                    "SELECT tid FROM information_schema.processlist WHERE id = %s",
                    [con.thread_id()],
                )
                row = cur.fetchone()
        except Exception:
            return None
        return None if row is None else int(row[0])

    def on_connect(tag: str) -> Callable[[Any], None]:
        seen = ports.setdefault(tag, set())

        def hook(con: Any) -> None:
            seen.add(con._sock.getsockname()[1])
            if PLACEMENT.active:
                PLACEMENT.pin_server(con._sock.fileno(), server_thread(con), ("mariadbd", "mysqld"))

        return hook

    def sessions(tag: str) -> int:
        seen = ports.get(tag, set())
        with lock, monitor.cursor() as cur:
            cur.execute("SELECT host FROM information_schema.processlist")
            hosts = [row[0] or "" for row in cur.fetchall()]
        return sum(
            1 for h in hosts if h.rpartition(":")[2].isdigit() and int(h.rpartition(":")[2]) in seen
        )

    return Backend(
        "mysql",
        {"pymysql": pymysql},
        lambda driver, tag: dict(params),
        sessions,
        on_connect,
        close=monitor.close,
        note="sessions = processlist rows whose client port belongs to this contender",
    )


# -- running --------------------------------------------------------------------------


class Crew:
    """``threads`` long-lived threads that run a cycle ``n`` times each, on demand.

    Long-lived so that per-thread connections (PersistentDB, raw) survive between runs.
    """

    def __init__(self, threads: int) -> None:
        self.start = threading.Barrier(threads + 1)
        self.done = threading.Barrier(threads + 1)
        self.job: Cycle | None = None
        self.n = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _work(self) -> None:
        while True:
            self.start.wait()
            job, n = self.job, self.n
            if job is None:
                return
            try:
                for _ in range(n):
                    job()
            except BaseException as exc:
                self.errors.append(exc)
            self.done.wait()

    def run(self, job: Cycle, n: int) -> tuple[int, int]:
        """Run ``job`` ``n`` times in every thread; (wall ns, process CPU ns)."""
        self.job, self.n = job, n
        cpu = time.process_time_ns()
        wall = time.perf_counter_ns()
        self.start.wait()
        self.done.wait()
        wall = time.perf_counter_ns() - wall
        cpu = time.process_time_ns() - cpu
        if self.errors:
            raise self.errors[0]
        return wall, cpu

    def stop(self) -> None:
        self.job = None
        self.start.wait()
        for thread in self.threads:
            thread.join()


def run_alone(job: Cycle, n: int) -> tuple[int, int]:
    cpu = time.process_time_ns()
    wall = time.perf_counter_ns()
    for _ in range(n):
        job()
    wall = time.perf_counter_ns() - wall
    cpu = time.process_time_ns() - cpu
    return wall, cpu


@dataclass
class Result:
    backend: str
    threads: int
    contender: str
    ns_best: float = 0.0
    ns_median: float = 0.0
    cpu_ns: float = 0.0
    qps: float = 0.0
    cycles: int = 0
    opened: int = 0
    sessions: int = 0
    caps: bool = True
    vs_ref: float | None = None  # fake: ns / ref ns; real: qps / ref qps
    vs_peer: float | None = None  # qps / best peer qps (8 threads)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Trial:
    """One contender at one thread count: set up and calibrated, then run on demand.

    The trials of one driver and thread count are alive together and their repetitions
    interleave, so a burst of load on the machine does not land on one contender only.
    """

    def __init__(
        self, backend: Backend, contender: Contender, threads: int, budget: float, tag: str
    ) -> None:
        self.backend, self.budget, self.tag = backend, budget, tag
        self.result = Result(backend.name, threads, contender.name, caps=contender.caps)
        threads = self.threads = contender.crew or threads
        self.samples: list[tuple[int, int]] = []
        self.sampled: list[int] = []
        self.crew: Crew | None = None
        self.teardown: Cycle = lambda: None
        self.n = 0
        module = backend.drivers.get(contender.driver)
        if module is None:
            self.result.error = f"{contender.driver} is not installed"
            return
        self.drv = Driver(module, backend.on_connect(tag))
        kw = backend.connect_kwargs(contender.driver, tag)
        try:
            self.crew = Crew(threads) if threads > 1 else None
            self.cycle, self.teardown = contender.factory(self.drv, kw, threads)
            # Warm up (the first cycles connect, which would skew the calibration), then
            # calibrate: grow n until one run takes a tenth of the budget.
            self._run(3)
            n = 1
            while True:
                wall, _ = self._run(n)
                if wall >= budget * 1e9 / 10 or n >= 1 << 22:
                    break
                n *= 4
            self.n = max(1, round(n * budget * 1e9 / max(wall, 1)))
        except Exception as exc:  # a contender that breaks is reported, not fatal
            self.fail(exc)

    def _run(self, n: int) -> tuple[int, int]:
        return self.crew.run(self.cycle, n) if self.crew else run_alone(self.cycle, n)

    def fail(self, exc: Exception) -> None:
        self.result.error = f"{type(exc).__name__}: {exc}"
        self.close()

    def repeat(self, last: bool) -> None:
        if self.result.error:
            return
        sampler = None
        if last:  # count server sessions while the last run is in flight
            tag, sessions = self.tag, self.backend.sessions
            sampler = threading.Timer(self.budget / 2, lambda: self.sampled.append(sessions(tag)))
            sampler.start()
        try:
            self.samples.append(self._run(self.n))
        except Exception as exc:
            self.fail(exc)
        if sampler is not None:
            sampler.join()

    def finish(self) -> Result:
        result = self.result
        if not result.error:
            cycles = self.n * self.threads
            best_wall, best_cpu = min(self.samples)
            result.ns_best = best_wall / cycles
            result.ns_median = statistics.median(wall for wall, _ in self.samples) / cycles
            result.cpu_ns = best_cpu / cycles
            result.qps = cycles * 1e9 / best_wall
            result.cycles = cycles
            # ns per cycle of each repetition, in round order (see paired_ratio).
            result.extra["ns_runs"] = [wall / cycles for wall, _ in self.samples]
            result.opened = len(self.drv.opened)
            try:
                result.sessions = max([*self.sampled, self.backend.sessions(self.tag)])
            except Exception as exc:
                result.error = f"counting sessions: {type(exc).__name__}: {exc}"
        self.close()
        return result

    def close(self) -> None:
        if self.crew is not None:
            self.crew.stop()
            self.crew = None
        with contextlib.suppress(Exception):
            self.teardown()
        self.teardown = lambda: None


def measure_group(
    backend: Backend, group: list[tuple[int, Contender]], threads: int, budget: float
) -> list[Result]:
    """Run the contenders of ``group`` (index, contender) with interleaved repetitions."""
    trials = [
        Trial(backend, contender, threads, budget, f"fsbench_{index}_{threads}_{os.getpid()}")
        for index, contender in group
    ]
    for repeat in range(REPEATS):
        # Rotate the order so that no contender always runs first or last.
        shift = repeat % len(trials)
        for trial in trials[shift:] + trials[:shift]:
            trial.repeat(last=repeat == REPEATS - 1)
    results = [trial.finish() for trial in trials]
    gc.collect()
    return results


def add_ratios(results: list[Result], rows: list[Contender], backend: str) -> None:
    by_name = {(r.contender, r.threads): r for r in results if not r.error}
    for contender in rows:
        for threads in THREAD_MODES:
            result = by_name.get((contender.name, threads))
            ref = by_name.get((contender.ref, threads))
            if result is None or ref is None:
                continue
            if backend == "fake":
                result.vs_ref = result.ns_best / ref.ns_best
            else:
                result.vs_ref = result.qps / ref.qps
    for threads in THREAD_MODES:
        peers = [by_name.get((c.name, threads)) for c in rows if c.peer]
        best = max((p for p in peers if p is not None), key=lambda p: p.qps, default=None)
        if best is None:
            continue
        for result in results:
            if result.threads == threads and not result.error:
                result.vs_peer = result.qps / best.qps
                result.extra["best_peer"] = best.contender


def format_time(ns: float) -> str:
    return f"{ns:,.0f} ns" if ns < 10_000 else f"{ns / 1000:,.1f} us"


def print_table(backend: Backend, results: list[Result], notes: dict[str, str]) -> None:
    ref_label = "ns/ref" if backend.name == "fake" else "qps/ref"
    print(f"\n### {backend.name}: {backend.note}")
    header = (
        f"{'threads':>7}  {'contender':<30} {'per cycle':>11} {'median':>11} {'cpu/cycle':>11}"
        f" {'qps':>10} {'opened':>7} {'sessions':>8} {ref_label:>7} {'qps/peer':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        name = r.contender + ("" if r.caps or r.threads == 1 else " *")
        if r.error:
            print(f"{r.threads:>7}  {name:<30} skipped: {r.error}")
            continue
        vs_ref = "" if r.vs_ref is None else f"{r.vs_ref:.2f}x"
        vs_peer = "" if r.vs_peer is None or r.threads == 1 else f"{r.vs_peer:.2f}x"
        print(
            f"{r.threads:>7}  {name:<30} {format_time(r.ns_best):>11}"
            f" {format_time(r.ns_median):>11} {format_time(r.cpu_ns):>11} {r.qps:>10,.0f}"
            f" {r.opened:>7} {r.sessions:>8} {vs_ref:>7} {vs_peer:>8}"
        )
    print("  * cannot cap at 4 connections with 8 threads")
    for name, note in notes.items():
        print(f"  {name}: {note}")


def run_backend(name: str, budget: float, all_results: list[Result], cores: str) -> dict[str, Any]:
    makers = {"fake": fake_backend, "pg": pg_backend, "mysql": mysql_backend}
    try:
        backend = makers[name]()
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}".strip()
        print(f"\n### {name}: skipped, server or driver unavailable ({message})")
        return {"backend": name, "skipped": message}
    global PLACEMENT
    PLACEMENT = Placement("any" if name == "fake" else cores)  # afresh for each backend
    PLACEMENT.pin_client()
    try:
        rows, notes = contenders(name)
        results = []
        # One group per driver, so that not too many server sessions are open at once.
        drivers = sorted({c.driver for c in rows}, key=[c.driver for c in rows].index)
        for threads in THREAD_MODES:
            for driver in drivers:
                group = [
                    (i, c)
                    for i, c in enumerate(rows)
                    if c.driver == driver and (c.crew is None or threads > 1)
                ]
                results += measure_group(backend, group, threads, budget)
        add_ratios(results, rows, name)
        print_table(backend, results, notes)
        all_results.extend(results)
        report: dict[str, Any] = {"backend": name, "notes": notes}
        if name != "fake":
            driver = {"pg": "psycopg2", "mysql": "pymysql"}[name]
            report["steps_us"] = measure_steps(backend, driver, STEPS_ROUNDS, STEPS_PER_ROUND)
            print_steps(f"{name} ({driver})", report["steps_us"])
            report["placement"] = PLACEMENT.describe()
            print(f"\n  placement (table and steps): {report['placement']}")
        return report
    finally:
        backend.close()
        PLACEMENT.release()


# -- steps ----------------------------------------------------------------------------

STEPS = ("checkout", "cursor", "execute", "fetchone", "close cursor", "return")


def measure_steps(backend: Backend, driver: str, rounds: int, per_round: int) -> dict[str, Any]:
    """Median us of each step of a 1-thread cycle: a raw connection, then forksafe
    PooledDB, alternating by rounds with the runs of the control below. The raw cycle's
    "checkout" only returns the connection (the timer's and a call's own cost); its
    "return" is ``rollback()``."""
    from forksafe import PooledDB

    tag = f"fsbench_steps_{os.getpid()}"
    drv = Driver(backend.drivers[driver], backend.on_connect(tag))
    kw = backend.connect_kwargs(driver, tag)
    con = drv.connect(**kw)
    pool = PooledDB(drv, maxconnections=CAP, blocking=True, **kw)
    ns = time.perf_counter_ns

    def steps(take: Callable[[], Any], give: Callable[[Any], Any]) -> tuple[int, ...]:
        t0 = ns()
        handle = take()
        t1 = ns()
        cur = handle.cursor()
        t2 = ns()
        cur.execute(SQL)
        t3 = ns()
        cur.fetchone()
        t4 = ns()
        cur.close()
        t5 = ns()
        give(handle)
        t6 = ns()
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5

    def raw_steps() -> tuple[int, ...]:
        return steps(lambda: con, lambda handle: handle.rollback())

    def pool_steps() -> tuple[int, ...]:
        return steps(pool.connection, lambda handle: handle.close())

    # The pool's own work without I/O: checkout and return of a connection that has no
    # transaction to roll back (reset=False: its return sends nothing), timed alone in a
    # tight loop, and wrapped around the raw cycle (which then runs its round trips while
    # the pool connection is out).
    idle = PooledDB(drv, maxconnections=CAP, blocking=True, reset=False, **kw)

    def idle_alone() -> tuple[int, ...]:
        t0 = ns()
        idle.connection().close()
        return (ns() - t0,)

    def raw_amid_idle() -> tuple[int, ...]:
        held = idle.connection()
        out = raw_steps()
        held.close()
        return out

    # The control: plain Python work that touches almost nothing, before the raw cycle.
    def busy() -> None:
        for _ in range(BUSY_LOOPS):
            pass

    def busy_alone() -> tuple[int, ...]:
        t0 = ns()
        busy()
        return (ns() - t0,)

    def raw_after_busy() -> tuple[int, ...]:
        busy()
        return raw_steps()

    samples: dict[str, list[tuple[int, ...]]] = {
        "raw": [],
        "forksafe PooledDB": [],
        "raw amid a checkout": [],
        "checkout alone": [],
        "raw after a loop": [],
        "loop alone": [],
    }
    runs = (
        ("raw", raw_steps),
        ("forksafe PooledDB", pool_steps),
        ("raw amid a checkout", raw_amid_idle),
        ("checkout alone", idle_alone),
        ("raw after a loop", raw_after_busy),
        ("loop alone", busy_alone),
    )
    try:
        for _name, run in runs:  # warm up
            for _ in range(per_round // 4):
                run()
        # Each round's median cycle, for the controls' differences: taken round by
        # round, they do not carry the drift between rounds.
        per_round_us: dict[str, list[float]] = {name: [] for name in samples}
        # Context switches of the server tasks and of this thread, (voluntary,
        # involuntary) each, over all rounds of a run.
        switched: dict[str, tuple[int, ...]] = dict.fromkeys(samples, (0, 0, 0, 0))
        for i in range(rounds):
            for name, run in runs if i % 2 == 0 else runs[::-1]:
                before = (*PLACEMENT.server_switches(), *_switches("thread-self"))
                got = [run() for _ in range(per_round)]
                after = (*PLACEMENT.server_switches(), *_switches("thread-self"))
                switched[name] = _plus(switched[name], _plus(after, tuple(-n for n in before)))
                samples[name] += got
                per_round_us[name].append(statistics.median(map(sum, got)) / 1000)
    finally:
        idle.close()
        pool.close()
        con.close()
    result: dict[str, Any] = {
        name: [statistics.median(s[j] for s in got) / 1000 for j in range(len(got[0]))]
        for name, got in samples.items()
    }
    result["raw cycle added, per-round median"] = {
        name: statistics.median(
            amid - bare for amid, bare in zip(per_round_us[name], per_round_us["raw"], strict=True)
        )
        for name in ("raw amid a checkout", "raw after a loop")
    }
    if PLACEMENT.active:
        result["context switches per cycle"] = {
            name: [n / (rounds * per_round) for n in switched[name]]
            for name in ("raw", "forksafe PooledDB", "raw amid a checkout", "raw after a loop")
        }
    return result


def print_steps(name: str, steps: dict[str, Any]) -> None:
    raw_us, fs_us = steps["raw"], steps["forksafe PooledDB"]
    print(f"\n### {name}, 1 thread, each step of a cycle: median us ({STEPS_ROUNDS} rounds x")
    print(f"    {STEPS_PER_ROUND} cycles each, every run below alternating by rounds)")
    print(f"  {'step':14s} {'raw':>8s} {'forksafe':>9s} {'added':>7s}")
    for step, a, b in zip(STEPS, raw_us, fs_us, strict=True):
        print(f"  {step:14s} {a:8.1f} {b:9.1f} {b - a:+7.1f}")
    total_raw, total_fs = sum(raw_us), sum(fs_us)
    print(
        f"  {'total':14s} {total_raw:8.1f} {total_fs:9.1f} {total_fs - total_raw:+7.1f}"
        f"   (raw / forksafe: {total_raw / total_fs:.3f})"
    )
    print(
        "  what a little client work between round trips costs (median alone; the raw"
        " cycle's\n  steps with the work around them minus without, median of the rounds):"
    )
    added = steps["raw cycle added, per-round median"]
    for work, alone, amid in (
        ("checkout + return of an idle connection", "checkout alone", "raw amid a checkout"),
        (f"a bare loop of {BUSY_LOOPS} iterations first", "loop alone", "raw after a loop"),
    ):
        print(f"    {work:48s} {steps[alone][0]:5.1f} us alone, raw cycle {added[amid]:+5.1f} us")
    switches = steps.get("context switches per cycle")
    if switches:
        print(
            "  context switches per cycle: server tasks sleeping + preempted,"
            " this thread sleeping + preempted"
        )
        for name, (s_sleep, s_pre, c_sleep, c_pre) in switches.items():
            print(f"    {name:22s} {s_sleep:4.2f} + {s_pre:4.2f}   {c_sleep:4.2f} + {c_pre:4.2f}")


# -- fork -----------------------------------------------------------------------------


#: Children that did not exit within CHILD_TIMEOUT: killed with SIGABRT, so that
#: faulthandler (enabled before forking) prints where they were stuck.
HUNG: list[str] = []
CHILD_TIMEOUT = 10.0


class _ChildTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _ChildTimeout


def reap(pid: int, what: str) -> bool:
    """Wait for child ``pid``; if it hangs, abort it (traceback on stderr). True if it exited."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CHILD_TIMEOUT)
    try:
        os.waitpid(pid, 0)
        return True
    except _ChildTimeout:
        HUNG.append(what)
        print(f"child {pid} ({what}) hung after fork; aborting it", file=sys.stderr)
        os.kill(pid, signal.SIGABRT)
        os.waitpid(pid, 0)
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def median(values: Any) -> float:
    values = list(values)
    return float(statistics.median(values)) if values else float("nan")


def child_reports(child: Callable[[], str], what: str) -> str | None:
    """Fork; the child runs ``child`` and sends back its text; None if it hung."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, child().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    exited = reap(pid, what)
    with os.fdopen(read_end) as reader:
        data = reader.read()
    return data if exited and data else None


def time_forks(count: int) -> list[int]:
    times = []
    for _ in range(count):
        start = time.perf_counter_ns()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        if reap(pid, "fork + os._exit"):
            times.append(time.perf_counter_ns() - start)
    return times


@contextlib.contextmanager
def hooks_idle() -> Any:
    """forksafe's fork hooks, with nothing to do: no pool to lock, no socket to blind.

    For timing only (the children it forks exit at once): their work is what a fork
    with pools pays and a fork without them does not.
    """
    from forksafe import drivers, fork

    real = drivers.flatten, drivers.blind_inherited, fork._snapshot
    drivers.flatten, drivers.blind_inherited, fork._snapshot = (lambda: None), (lambda: 0), list
    try:
        yield
    finally:
        drivers.flatten, drivers.blind_inherited, fork._snapshot = real


def time_fork_pairs(count: int) -> list[int]:
    """ns a fork + exit + wait takes with forksafe's hooks at work minus one right after
    (or before: the order alternates) with the hooks idle, in the same process state."""
    added = []
    for i in range(count):
        first_on = i % 2 == 0
        first = time_forks(1) if first_on else _idle_fork()
        second = _idle_fork() if first_on else time_forks(1)
        if first and second:
            on, off = (first[0], second[0]) if first_on else (second[0], first[0])
            added.append(on - off)
    return added


def _idle_fork() -> list[int]:
    with hooks_idle():
        return time_forks(1)


def child_checkouts(pool: Any, count: int) -> list[tuple[int, int]]:
    """In ``count`` forked children: ns of the first and of the second checkout."""

    def child() -> str:
        start = time.perf_counter_ns()
        pool.connection().close()
        first = time.perf_counter_ns() - start
        start = time.perf_counter_ns()
        pool.connection().close()
        second = time.perf_counter_ns() - start
        return f"{first} {second}"

    samples = []
    for _ in range(count):
        data = child_reports(child, "checkouts")
        if data:
            first, second = (int(x) for x in data.split())
            samples.append((first, second))
    return samples


def build_pools(fake: types.ModuleType) -> list[Any]:
    from forksafe import PooledDB

    # Distinct connect kwargs: pools with identical arguments would share idle connections.
    pools = [PooledDB(fake, mincached=10, database=f"db{i}") for i in range(10)]
    for pool in pools:
        pool.warm()
    return pools


def time_hooks(count: int) -> list[int]:
    """ns of the parent-side fork hooks alone (prepare + after_in_parent), no fork."""
    from forksafe import fork

    times = []
    for _ in range(count):
        start = time.perf_counter_ns()
        fork._prepare()
        fork._after_in_parent()
        times.append(time.perf_counter_ns() - start)
    return times


def time_child_hooks(count: int) -> list[int]:
    """ns the child spends in forksafe's after-fork hook, between the two marks."""
    samples = []
    for _ in range(count):
        data = child_reports(lambda: str(_CHILD_MARKS[-1] - _CHILD_MARKS[-2]), "hook timing")
        if data:
            samples.append(int(data))
    return samples


def measure_fork(count: int) -> dict[str, Any]:
    """fork() + child ``os._exit(0)`` + ``waitpid`` with 10 pools x 10 idle connections.

    Blocks with and without pools alternate, so load on the machine hits both alike;
    the blocks without pools hold 100 connections of the same fake driver (not tracked
    by forksafe), so both fork a process with the same sockets.
    """
    from forksafe import ManyPoolsWarning

    # This part builds the same 10 pools several times on purpose.
    warnings.simplefilter("ignore", ManyPoolsWarning)
    logging.getLogger("forksafe").setLevel(logging.ERROR)
    os.register_at_fork(after_in_child=lambda: _CHILD_MARKS.append(time.perf_counter_ns()))
    faulthandler.enable()  # inherited by children: a hung one prints its stack on SIGABRT
    fake = make_fake_module(sockets=True)
    time_forks(3)  # warm up
    blocks = 10 if count >= 50 else 5
    per_block = max(2, count // blocks)
    without: list[int] = []
    with_pools: list[int] = []
    hooks_without: list[int] = []
    hooks_with: list[int] = []
    child_without: list[int] = []
    child_with: list[int] = []
    paired: list[int] = []
    idle = 0
    for _ in range(blocks):
        gc.collect()
        # The same 100 connections (and sockets) without pools: the kernel's share of a
        # fork (copying and closing descriptors) is the same in both blocks.
        held = [fake.connect(database=f"db{i}") for i in range(10) for _ in range(10)]
        without += time_forks(per_block)
        hooks_without += time_hooks(per_block)
        child_without += time_child_hooks(max(1, per_block // 2))
        for con in held:
            con.close()
        del held
        pools = build_pools(fake)
        idle = sum(pool.stats()["connections_created"] for pool in pools)
        with_pools += time_forks(per_block)
        paired += time_fork_pairs(per_block * 2)
        hooks_with += time_hooks(per_block)
        child_with += time_child_hooks(max(1, per_block // 2))
        for pool in pools:
            pool.close()
        del pools
    pools = build_pools(fake)
    checkouts = child_checkouts(pools[0], max(3, count // 4))
    for pool in pools:
        pool.close()
    del pools
    gc.collect()
    base = median(without)
    with_median = median(with_pools)
    return {
        "forks": len(with_pools),
        "pools": 10,
        "idle_connections": idle,
        "fork_ns_without_pools": base,
        "fork_ns_with_pools": with_median,
        "added_ns": with_median - base,
        "hooks_added_ns": median(paired),
        "paired_forks": len(paired),
        "parent_hooks_ns_without_pools": median(hooks_without),
        "parent_hooks_ns_with_pools": median(hooks_with),
        "child_hook_ns_without_pools": median(child_without),
        "child_hook_ns_with_pools": median(child_with),
        "child_first_checkout_ns": median(c[0] for c in checkouts),
        "child_second_checkout_ns": median(c[1] for c in checkouts),
        "hung_children": list(HUNG),
    }


# -- targets --------------------------------------------------------------------------


def targets(results: list[Result], fork: dict[str, Any] | None) -> list[dict[str, Any]]:
    by = {(r.backend, r.threads, r.contender): r for r in results if not r.error}
    lines: list[dict[str, Any]] = []

    def check(text: str, value: float | None, limit: float, below: bool, info: bool = False):
        if value is None:
            lines.append({"target": text, "value": None, "status": "SKIP"})
            return
        ok = value <= limit if below else value >= limit
        status = ("PASS" if ok else "FAIL") if not info else "INFO"
        lines.append({"target": text, "value": value, "status": status})

    def ratio(backend: str, threads: int, a: str, b: str, field_: str) -> float | None:
        x, y = by.get((backend, threads, a)), by.get((backend, threads, b))
        if x is None or y is None:
            return None
        return float(getattr(x, field_) / getattr(y, field_))

    def paired_ratio(backend: str, threads: int, a: str, b: str) -> float | None:
        """ns per cycle of ``a`` / that of ``b`` (on a real server: qps of ``a`` / qps of
        ``b``): the median over the rounds of the ratio within each round (both ran one
        repetition per round, back to back), so that load that comes and goes between
        rounds cancels out."""
        x, y = by.get((backend, threads, a)), by.get((backend, threads, b))
        if x is None or y is None:
            return None
        runs = list(zip(x.extra["ns_runs"], y.extra["ns_runs"], strict=False))
        if not runs:
            return None
        if backend == "fake":
            return statistics.median(ns_a / ns_b for ns_a, ns_b in runs)
        return statistics.median(ns_b / ns_a for ns_a, ns_b in runs)

    def peer_ratio(backend: str, contender: str) -> tuple[float | None, str]:
        r = by.get((backend, 8, contender))
        if r is None or r.vs_peer is None:
            return None, "?"
        return r.vs_peer, str(r.extra.get("best_peer"))

    fs, db = "forksafe PooledDB", "DBUtils PooledDB"
    check(
        f"fake 1 thread: {fs} ns/cycle <= 0.25x {db}",
        ratio("fake", 1, fs, db, "ns_best"),
        0.25,
        True,
    )
    check(
        f"fake 8 threads: {fs} ns/cycle <= 0.5x {db}",
        ratio("fake", 8, fs, db, "ns_best"),
        0.5,
        True,
    )
    for threads, limit in ((1, 0.25), (8, 0.5)):
        check(
            f"fake {threads} thread{'s' if threads > 1 else ''}: {fs} ns/cycle <= {limit}x"
            f" {db} [extra: median of the per-round ratios]",
            paired_ratio("fake", threads, fs, db),
            limit,
            True,
            info=True,
        )
    for backend, label in (("pg", "PostgreSQL/psycopg2"), ("mysql", "MariaDB/PyMySQL")):
        check(
            f"{label} 1 thread: {fs} qps >= 0.95x raw reused connection",
            ratio(backend, 1, fs, "raw", "qps"),
            0.95,
            False,
        )
        value, peer = peer_ratio(backend, fs)
        check(f"{label} 8 threads: {fs} qps >= 1.2x best peer ({peer})", value, 1.2, False)
    for backend, label in (("pg", "PostgreSQL/psycopg2"), ("mysql", "MariaDB/PyMySQL")):
        check(
            f"{label} 1 thread: {fs} qps >= 0.95x raw reused connection [extra: median of"
            " the per-round ratios]",
            paired_ratio(backend, 1, fs, "raw"),
            0.95,
            False,
            info=True,
        )
        peer = peer_ratio(backend, fs)[1]
        check(
            f"{label} 8 threads: {fs} qps >= 1.2x best peer ({peer}) [extra: median of the"
            " per-round ratios]",
            paired_ratio(backend, 8, fs, peer),
            1.2,
            False,
            info=True,
        )
    for backend, label in (("pg", "PostgreSQL/psycopg2"), ("mysql", "MariaDB/PyMySQL")):
        value, peer = peer_ratio(backend, "raw, 4 threads")
        lines.append(
            {
                "target": f"{label} 8 threads: the most a 4-connection pool could reach, raw"
                f" on 4 threads qps / best peer ({peer}) [extra: not a target]",
                "value": value,
                "status": "SKIP" if value is None else "INFO",
            }
        )
    check(
        "PostgreSQL/psycopg 3 8 threads: forksafe PooledDB (psycopg 3) qps >= 1.2x best peer"
        f" ({peer_ratio('pg', 'forksafe PooledDB (psycopg 3)')[1]}) [extra]",
        peer_ratio("pg", "forksafe PooledDB (psycopg 3)")[0],
        1.2,
        False,
        info=True,
    )
    check(
        f"fake 1 thread: {fs} CPU/cycle <= 0.25x {db} [extra: CPU, less sensitive to load]",
        ratio("fake", 1, fs, db, "cpu_ns"),
        0.25,
        True,
        info=True,
    )
    check(
        f"fake 8 threads: {fs} CPU/cycle <= 0.5x {db} [extra: CPU]",
        ratio("fake", 8, fs, db, "cpu_ns"),
        0.5,
        True,
        info=True,
    )
    fs0 = "forksafe PooledDB ping=0"
    check(
        f"MariaDB/PyMySQL 1 thread: {fs0} qps >= 0.95x raw [extra]",
        ratio("mysql", 1, fs0, "raw", "qps"),
        0.95,
        False,
        info=True,
    )
    value, peer = peer_ratio("mysql", fs0)
    check(
        f"MariaDB/PyMySQL 8 threads: {fs0} qps >= 1.2x best peer ({peer}) [extra]",
        value,
        1.2,
        False,
        info=True,
    )
    check(
        "fork with 10 pools x 10 idle connections: forksafe's hooks add < 1 ms (ms)",
        None if fork is None else fork["hooks_added_ns"] / 1e6,
        1.0,
        True,
    )
    check(
        "fork with 10 pools x 10 idle connections, minus one with the same connections"
        " and no pools, < 1 ms (ms) [extra: the forks' own noise is larger]",
        None if fork is None else fork["added_ns"] / 1e6,
        1.0,
        True,
        info=True,
    )
    check(
        "fork: forksafe's child-side hook, with minus without pools, < 1 ms (ms) [extra]",
        None
        if fork is None
        else (fork["child_hook_ns_with_pools"] - fork["child_hook_ns_without_pools"]) / 1e6,
        1.0,
        True,
        info=True,
    )
    return lines


def git_state() -> str:
    """The commit measured, and whether forksafe/ had uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "forksafe"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" + uncommitted forksafe/ changes" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds in total")
    parser.add_argument("--backend", choices=("fake", "pg", "mysql", "all"), default="all")
    parser.add_argument("--budget", type=float, help="seconds per repetition (default 0.1)")
    parser.add_argument("--repeats", type=int, default=9, help="repetitions, best is kept")
    parser.add_argument(
        "--cores",
        choices=("one", "two", "any"),
        default="one",
        help="real servers: pin the client and the server sessions to one CPU (default),"
        " the client to one and the servers to another, or pin nothing",
    )
    args = parser.parse_args(argv)
    # A terminated run still gives the server tasks their CPUs back (finally clauses).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    budget = args.budget or (0.02 if args.quick else 0.1)
    global REPEATS, STEPS_ROUNDS
    REPEATS = max(1, args.repeats)
    if args.quick:
        STEPS_ROUNDS = 4
    forks = 10 if args.quick else 100
    names = ["fake", "pg", "mysql"] if args.backend == "all" else [args.backend]
    import dbutils
    import sqlalchemy

    machine = {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dbutils": dbutils.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "loadavg_at_start": os.getloadavg(),
        "git": git_state(),
        "cores": args.cores,
    }
    started = time.time()
    print(
        f"pool cycle: checkout, cursor, execute({SQL!r}), fetchone, close cursor, return;"
        f" best of {REPEATS} x {budget:g} s; nproc {machine['nproc']},"
        f" Python {machine['python']}; load average {machine['loadavg_at_start'][0]:.1f};"
        f" git {machine['git']}"
    )
    results: list[Result] = []
    backends = []
    for name in names:
        began = time.time()
        backends.append(run_backend(name, budget, results, args.cores))
        backends[-1]["seconds"] = round(time.time() - began, 1)
        print(f"({name}: {backends[-1]['seconds']} s)")
    fork = None
    if args.backend in ("fake", "all"):
        began = time.time()
        fork = measure_fork(forks)
        fork["seconds"] = round(time.time() - began, 1)
        print(
            f"\n### fork: {fork['pools']} forksafe pools, {fork['idle_connections']} idle fake"
            f" connections, each with a socket; median of {fork['forks']} x"
            " (fork + child os._exit(0) + waitpid),"
            " alternating blocks with and without pools (without: the same 100"
            " connections open, no pools)"
        )
        print(f"  without pools   {fork['fork_ns_without_pools'] / 1000:10.1f} us")
        print(f"  with pools      {fork['fork_ns_with_pools'] / 1000:10.1f} us")
        print(f"  added per fork  {fork['added_ns'] / 1000:10.1f} us")
        print(
            f"  forksafe's hooks, paired: {fork['hooks_added_ns'] / 1000:.1f} us (median of"
            f" {fork['paired_forks']} differences: a fork with pools and the hooks at work"
            " minus the next one with the hooks idle, order alternating)"
        )
        print(
            "  parent-side hooks alone (prepare + after_in_parent, no fork):"
            f" {fork['parent_hooks_ns_with_pools'] / 1000:.1f} us with pools,"
            f" {fork['parent_hooks_ns_without_pools'] / 1000:.1f} us without"
        )
        print(
            "  child-side hook alone (after_in_child):"
            f" {fork['child_hook_ns_with_pools'] / 1000:.1f} us with pools,"
            f" {fork['child_hook_ns_without_pools'] / 1000:.1f} us without"
        )
        print(f"  child's first checkout  {fork['child_first_checkout_ns'] / 1000:8.1f} us")
        if fork["hung_children"]:
            print(f"  HUNG children (aborted, stacks on stderr): {fork['hung_children']}")
        print(f"  child's second checkout {fork['child_second_checkout_ns'] / 1000:8.1f} us")
    checks = targets(results, fork)
    print("\n### targets")
    for line in checks:
        value = "n/a" if line["value"] is None else f"{line['value']:.3f}"
        print(f"{line['status']}  {line['target']}: {value}")
    print(f"\n(total {time.time() - started:.1f} s)")
    payload = {
        "machine": machine,
        "budget_s": budget,
        "repeats": REPEATS,
        "backends": backends,
        "results": [vars(r) for r in results],
        "fork": fork,
        "targets": checks,
        "seconds": time.time() - started,
    }
    print("JSON " + json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
