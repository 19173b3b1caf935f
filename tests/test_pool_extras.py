"""What forksafe pools do beyond DBUtils: waits with a deadline, lifetimes, leak reports,
stats, laziness, bounded sessions for pool-per-call code, and clear errors for bad input.
"""

from __future__ import annotations

import functools
import gc
import logging
import socket
import sqlite3
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import fakedb
import pytest

import forksafe
from forksafe import PersistentDB, PooledDB, drivers, steady_db

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def fresh_fakedb() -> Iterator[None]:
    gc.collect()
    fakedb.reset()
    yield
    fakedb.reset()


def number_of(db: Any) -> int:
    cursor = db.cursor()
    cursor.execute("select connection_number")
    number = int(cursor.fetchone()[0])
    cursor.close()
    return number


def poll(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# -- laziness ------------------------------------------------------------------------


def test_creating_a_pool_opens_nothing_and_first_use_warms_mincached() -> None:
    pool = PooledDB(fakedb, mincached=3)
    assert fakedb.counts.connects == 0
    pool.connection().close()
    assert fakedb.counts.connects == 3
    assert pool.stats()["idle"] == 3


def test_warm_opens_mincached_connections_on_request() -> None:
    pool = PooledDB(fakedb, mincached=2)
    pool.warm()
    assert fakedb.counts.connects == 2
    pool.warm()
    assert fakedb.counts.connects == 2


def test_a_failed_warm_up_is_tried_again_at_the_next_checkout() -> None:
    pool = PooledDB(fakedb, mincached=3)
    fakedb.fail_next(1, "connect")  # the server is briefly away at the first checkout
    with pytest.raises(fakedb.OperationalError):
        pool.connection()
    pool.connection().close()
    assert pool.stats()["idle"] == 3


def test_a_warm_up_cut_short_never_fails_checkouts_idle_connections_can_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that refuses a session past the third (a per-user limit): the first
    checkout's warm-up stops at 3 of mincached=5, is logged, and is not tried again at
    every checkout."""
    attempts = []

    def limited() -> Any:
        attempts.append(1)
        if fakedb.counts.connects >= 3:
            raise fakedb.OperationalError("too many connections")
        return fakedb.connect()

    pool = PooledDB(limited, mincached=5)
    with caplog.at_level(logging.WARNING, logger="forksafe"):
        for _ in range(10):
            pool.connection().close()
    assert "stopped at 3 idle connection(s)" in caplog.text
    assert (len(attempts), pool.stats()["idle"]) == (4, 3)


def test_threads_warming_at_once_open_mincached_connections_in_all() -> None:
    def slow_connect() -> Any:
        time.sleep(0.05)  # every thread is inside warm() before the first open ends
        return fakedb.connect()

    pool = PooledDB(slow_connect, mincached=2, maxcached=2)
    start = threading.Barrier(4)

    def warm() -> None:
        start.wait()
        pool.warm()

    threads = [threading.Thread(target=warm) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fakedb.counts.connects == 2
    assert pool.stats()["idle"] == 2


def test_identical_pools_warming_at_once_open_mincached_connections_in_all() -> None:
    """The pool-per-call pattern under threads: each call's new pool warms up at once."""

    def slow_connect() -> Any:
        time.sleep(0.05)
        return fakedb.connect()

    pools = [PooledDB(slow_connect, mincached=3) for _ in range(4)]
    start = threading.Barrier(len(pools))

    def warm(pool: PooledDB) -> None:
        start.wait()
        pool.warm()

    threads = [threading.Thread(target=warm, args=(pool,)) for pool in pools]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert fakedb.counts.connects == 3
    assert sum(pool.stats()["idle"] for pool in pools) == 3


def test_a_failed_warm_up_reserves_nothing() -> None:
    pool = PooledDB(fakedb, mincached=2)
    fakedb.fail_next(operation="connect")
    with pytest.raises(fakedb.OperationalError):
        pool.warm()
    pool.warm()
    assert fakedb.counts.connects == 2
    assert pool.stats()["idle"] == 2


def test_deleting_a_pool_closes_its_idle_connections_at_once() -> None:
    pool = PooledDB(fakedb, mincached=2)
    pool.warm()
    del pool
    assert fakedb.counts.closes == 2


# -- maxwait, maxage, maxidle --------------------------------------------------------


def test_a_blocking_pool_gives_up_after_maxwait() -> None:
    pool = PooledDB(fakedb, maxconnections=1, blocking=True, maxwait=0.2)
    held = pool.connection()
    started = time.monotonic()
    with pytest.raises(forksafe.PoolTimeoutError, match=r"maxwait=0\.2"):
        pool.connection()
    assert 0.15 < time.monotonic() - started < 5
    stats = pool.stats()
    assert (stats["timeouts"], stats["waits"]) == (1, 1)
    held.close()
    pool.connection().close()


@pytest.mark.parametrize(
    ("options", "hold", "take"),
    [
        ({"maxconnections": 1}, "connection", "connection"),
        ({"maxconnections": 1, "maxshared": 1}, "connection", "dedicated_connection"),
        ({"maxconnections": 1, "maxshared": 1}, "dedicated_connection", "connection"),
        ({"maxshared": 1}, "begin", "connection"),  # the only shared one is in a transaction
    ],
    ids=["slot", "dedicated while shared", "shared while dedicated", "shared transaction"],
)
def test_waits_are_counted_once_per_checkout_that_waited(
    options: dict[str, int], hold: str, take: str
) -> None:
    for blocking in (False, True):
        pool = PooledDB(fakedb, blocking=blocking, **options)
        if hold == "begin":
            held = pool.connection()
            held.begin()
            release = held.commit
        else:
            held = getattr(pool, hold)()
            release = held.close
        if not blocking:
            with pytest.raises(forksafe.TooManyConnectionsError):
                getattr(pool, take)()
            assert pool.stats()["waits"] == 0  # refused at once: no wait
            release()
            continue
        threading.Timer(0.3, release).start()
        getattr(pool, take)().close()
        stats = pool.stats()
        assert stats["waits"] == 1
        assert 250 <= stats["wait_ms"] < 5000


def test_a_refusal_for_a_shared_connection_in_a_transaction_says_so() -> None:
    pool = PooledDB(fakedb, maxshared=1)  # no maxconnections, not blocking
    held = pool.connection()
    held.begin()
    with pytest.raises(forksafe.TooManyConnectionsError) as refused:
        pool.connection()
    message = str(refused.value)
    assert "maxshared=1" in message and "in a transaction" in message
    assert "maxconnections=0" not in message
    held.rollback()
    pool.connection().close()


def test_pool_timeout_is_a_too_many_connections_error() -> None:
    assert issubclass(forksafe.PoolTimeoutError, forksafe.TooManyConnectionsError)


def test_a_waiter_gets_the_connection_returned_within_maxwait() -> None:
    pool = PooledDB(fakedb, maxconnections=1, blocking=True, maxwait=5)
    held = pool.connection()
    number = number_of(held)
    timer = threading.Timer(0.1, held.close)
    timer.start()
    assert number_of(pool.connection()) == number
    timer.join()


def test_maxage_replaces_an_old_connection_at_checkout() -> None:
    pool = PooledDB(fakedb, maxage=0.05)
    first = pool.connection()
    number = number_of(first)
    first.close()
    time.sleep(0.06)
    second = pool.connection()
    assert number_of(second) != number
    assert fakedb.connections[number - 1].closed
    assert pool.stats()["connections_recycled"] == 1


def test_maxage_never_replaces_a_connection_in_use() -> None:
    pool = PooledDB(fakedb, maxage=0.05)
    db = pool.connection()
    db.begin()
    number = number_of(db)
    time.sleep(0.06)
    assert number_of(db) == number
    db.commit()
    db.close()


def test_maxage_is_shortened_by_a_little_jitter_per_connection() -> None:
    pool = PooledDB(fakedb, maxage=100)
    cons = [pool.connection() for _ in range(10)]
    jitters = {db._con._jitter for db in cons}
    assert len(jitters) > 1
    assert all(0.9 <= j <= 1.0 for j in jitters)


def test_maxidle_replaces_a_connection_idle_too_long() -> None:
    pool = PooledDB(fakedb, maxidle=0.05)
    db = pool.connection()
    number = number_of(db)
    db.close()
    assert number_of(pool.connection()) == number  # idle only briefly: reused
    time.sleep(0.06)
    assert number_of(pool.connection()) != number


def test_maxidle_keeps_a_connection_borrowed_from_a_pool_that_does_not_time_idleness() -> None:
    """Pools of one target lend each other idle connections; one returned just now to a
    pool without maxidle is not idle, however long it was in use before."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forksafe.ManyPoolsWarning)
        lender = PooledDB(fakedb)
        borrower = PooledDB(fakedb, maxidle=0.2)
    db = lender.connection()
    number = number_of(db)
    time.sleep(0.3)  # in use longer than the borrower's maxidle
    db.close()
    assert number_of(borrower.connection()) == number
    assert borrower.stats()["connections_recycled"] == 0
    assert fakedb.counts.connects == 1


def test_a_pool_that_resets_never_borrows_from_one_that_does_not(postgres: Any) -> None:
    """A reset=False pool's idle connection may hold an uncommitted transaction: an
    otherwise identical pool that resets must not hand it out."""
    psycopg2 = pytest.importorskip("psycopg2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forksafe.ManyPoolsWarning)
        keeps = PooledDB(psycopg2, reset=False, **postgres.kwargs)
        resets = PooledDB(psycopg2, reset=True, **postgres.kwargs)
    db = keeps.connection()
    db.cursor().execute("CREATE TEMPORARY TABLE uncommitted (x int)")
    db.close()  # reset=False: idle in transaction, as DBUtils leaves it
    with resets.connection() as db:
        status = db.dbapi_connection.get_transaction_status()
        assert status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
    assert (keeps.stats()["idle"], resets.stats()["connections_created"]) == (1, 1)
    keeps.close()
    resets.close()


# -- leaks ---------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", [{}, {"maxshared": 2}], ids=["dedicated", "shared"])
def test_a_connection_held_past_leaktime_is_reported_with_its_checkout_stack(
    sharing: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    pool = PooledDB(fakedb, leaktime=0.05, **sharing)
    held = pool.connection()
    time.sleep(0.06)
    with caplog.at_level(logging.WARNING, logger="forksafe"):
        pool.connection().close()
    assert "leaktime" in caplog.text
    assert "test_a_connection_held_past_leaktime" in caplog.text
    assert pool.stats()["leaks"] == 1
    held.close()
    assert pool.stats()["leaks"] == 1  # reported once


@pytest.mark.parametrize("sharing", [{}, {"maxshared": 2}], ids=["dedicated", "shared"])
def test_a_connection_dropped_without_close_is_reported_and_returned(
    sharing: dict[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    pool = PooledDB(fakedb, leaktime=60, **sharing)

    def leak() -> None:
        pool.connection()

    with caplog.at_level(logging.WARNING, logger="forksafe"):
        leak()
        gc.collect()
    assert "garbage collected without close()" in caplog.text
    assert "def leak" in caplog.text or "leak()" in caplog.text
    assert pool.stats()["idle"] == 1
    assert pool.stats()["in_use"] == 0


@pytest.mark.parametrize("driver_name", ["psycopg2", "psycopg", "pymysql", "sqlite3"])
@pytest.mark.parametrize("with_pool", [False, True], ids=["proxy in a cycle", "pool too"])
def test_a_connection_collected_in_a_reference_cycle_leaves_the_pool_sound(
    driver_name: str, with_pool: bool, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """The collector finalises the proxy and the connection it holds in any order: the
    proxy may give back a connection that its own finaliser then closes. The pool must
    never hand that out, nor lose the slot; a pool collected with them leaves nothing
    open (DBUtils, likewise, closes a connection collected this way)."""
    driver = pytest.importorskip(driver_name)
    if driver_name == "sqlite3":
        kwargs: dict[str, Any] = {"database": str(tmp_path / "cycle.db")}
    elif driver_name == "pymysql":
        kwargs = request.getfixturevalue("mysql").kwargs
    else:
        kwargs = request.getfixturevalue("postgres").kwargs
    pool = PooledDB(driver, maxconnections=1, **kwargs)

    def answer(db: Any) -> int:
        cursor = db.cursor()
        cursor.execute("SELECT 42")
        row = cursor.fetchone()
        cursor.close()
        return int(row[0])

    db = pool.connection()
    assert answer(db) == 42
    con = weakref.ref(db._con)
    holder: dict[str, Any] = {"db": db}
    holder["self"] = holder  # only the collector can free it
    if with_pool:
        holder["pool"] = pool
        del pool
    del db, holder
    gc.collect()
    if with_pool:
        left = con()
        assert left is None or left._closed  # closed by its finaliser or the pool's close()
        return
    assert pool.stats()["in_use"] == 0
    with pool.connection() as db:  # the one slot is free, and what it hands out works
        assert answer(db) == 42
    assert pool.stats()["in_use"] == 0
    pool.close()


def test_a_connection_collected_with_its_proxy_never_closes_under_its_next_user(
    tmp_path: Any,
) -> None:
    """The collector may finalise the proxy first: it gives the connection back, and a
    waiting thread takes it while another finaliser of the same garbage lets the GIL go.
    The connection's own finaliser, run next, must leave it open: its pool lives."""

    class Sleeper:
        def __del__(self) -> None:
            time.sleep(0.3)  # as another proxy's rollback would: I/O, the GIL released

    pool = PooledDB(
        sqlite3,
        maxconnections=1,
        blocking=True,
        database=str(tmp_path / "race.db"),
        check_same_thread=False,
    )
    answers: list[Any] = []

    def waiter() -> None:
        with pool.connection() as db:
            for _ in range(2):
                try:
                    cursor = db.cursor()
                    cursor.execute("SELECT 42")
                    answers.append(cursor.fetchone()[0])
                except Exception as error:
                    answers.append(repr(error))
                time.sleep(0.5)  # meanwhile the collector carries on

    gc.disable()
    try:
        db = pool.connection()
        sleeper = Sleeper()
        gc.collect()  # survivors keep their order: proxy, sleeper, then its connection
        holder: dict[str, Any] = {"db": db, "sleeper": sleeper}
        holder["self"] = holder
        del db, sleeper, holder
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.2)  # the waiter waits for the one slot
        gc.collect()
        thread.join(10)
    finally:
        gc.enable()
    assert answers == [42, 42]
    assert pool.stats()["connections_created"] == 1
    pool.close()


def test_a_connection_closed_while_idle_is_replaced_not_handed_out(tmp_path: Any) -> None:
    """The collector can close an idle connection (see the test above): on SQLite, whose
    closed connections raise ProgrammingError (no failover), handing it out would fail."""
    pool = PooledDB(sqlite3, maxconnections=1, database=str(tmp_path / "idle.db"))
    pool.connection().close()
    pool._idle[0]._close()  # what the connection's own finaliser does
    with pool.connection() as db:
        cursor = db.cursor()
        cursor.execute("SELECT 42")
        assert cursor.fetchone()[0] == 42
    stats = pool.stats()
    assert (stats["connections_created"], stats["connections_closed"]) == (2, 1)
    pool.close()


def test_a_checkout_interrupted_in_its_ping_closes_the_connection_it_took() -> None:
    """Interrupted mid-ping (Ctrl-C), the connection's state is unknown: the pool closes
    it and counts it, rather than leaving it to the collector."""
    pool = PooledDB(fakedb, ping=1)
    pool.connection().close()
    fakedb.fail_next(1, "ping", KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        pool.connection()
    stats = pool.stats()
    assert (stats["in_use"], stats["idle"], stats["connections_closed"]) == (0, 0, 1)
    assert fakedb.counts.closes == 1


# -- stats ---------------------------------------------------------------------------


def test_stats_are_named_counters() -> None:
    pool = PooledDB(fakedb, maxconnections=2)
    with pool.connection(), pool.connection():
        busy = pool.stats()
    stats = pool.stats()
    assert busy["in_use"] == 2
    assert stats["in_use"] == 0
    assert stats["idle"] == 2
    assert stats["checkouts"] == 2
    assert stats["connections_created"] == 2
    assert stats["maxconnections"] == 2
    assert all(isinstance(value, int) for value in stats.values())


def test_stats_count_transparent_reconnects() -> None:
    pool = PooledDB(fakedb, ping=0)
    db = pool.connection()
    db._con.dbapi_connection.die()
    number_of(db)  # fails over to a new connection
    db.close()
    assert pool.stats()["reconnects"] == 1


@pytest.mark.parametrize("begun", [False, True], ids=["reset", "after begin()"])
@pytest.mark.parametrize("options", [{}, {"maxcached": 5}], ids=["plain pool", "maxcached"])
def test_stats_count_a_reconnect_made_by_the_rollback_on_return_at_once(
    options: dict[str, Any], begun: bool
) -> None:
    pool = PooledDB(fakedb, ping=0, **options)
    db = pool.connection()
    if begun:
        db.begin()
    number_of(db)
    fakedb.fail_next(1, "rollback")
    db.close()
    assert fakedb.counts.connects == 2  # the failed rollback reconnected
    assert pool.stats()["reconnects"] == 1
    pool.close()
    assert pool.stats()["reconnects"] == 1


@pytest.mark.parametrize(
    ("error", "replaced"), [(fakedb.OperationalError, True), (fakedb.ProgrammingError, False)]
)
def test_a_rollback_failing_on_return_is_quiet_and_replaces_only_a_broken_connection(
    error: type[Exception], replaced: bool
) -> None:
    """The reset on return swallows the error; one of ``failures`` (OperationalError by
    default) reconnects before the connection is reused, anything else keeps it."""
    pool = PooledDB(fakedb, maxconnections=1, ping=0)
    try:
        with pool.connection() as db:
            first = number_of(db)
            fakedb.fail_next(1, "rollback", error)
        assert fakedb.counts.rollbacks == 1
        with pool.connection() as db:
            assert (number_of(db) != first) is replaced
        stats = pool.stats()
        assert stats["reconnects"] == int(replaced)
        assert stats["in_use"] == 0 and stats["idle"] == 1
    finally:
        pool.close()


# -- pool per call -------------------------------------------------------------------


def test_building_many_pools_for_one_target_warns_naming_the_call_site() -> None:
    pools = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(forksafe.pooled.MANY_POOLS + 2):
            pools.append(PooledDB(fakedb, mincached=2))
    many = [w for w in caught if issubclass(w.category, forksafe.ManyPoolsWarning)]
    assert len(many) == 1
    assert many[0].filename == __file__


def test_pools_of_one_target_lend_each_other_idle_connections() -> None:
    registry = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forksafe.ManyPoolsWarning)
        for _ in range(10):
            pool = PooledDB(fakedb, mincached=2)
            registry.append(pool)  # kept alive, as web.py's registry does
            number_of(pool.connection())
    assert fakedb.counts.connects == 2


@pytest.mark.postgres
def test_pool_per_call_keeps_server_sessions_bounded(postgres: Any) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    app = f"percall-{uuid.uuid4().hex[:8]}"
    registry = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", forksafe.ManyPoolsWarning)
        for _ in range(10):
            pool = PooledDB(psycopg2, 2, application_name=app, **postgres.kwargs)
            registry.append(pool)
            with pool.connection() as db:
                cursor = db.cursor()
                cursor.execute("SELECT 1")
    assert sessions(postgres, app) <= 2


def sessions(postgres: Any, app: str, state: str | None = None) -> int:
    admin = postgres.connect()
    try:
        cursor = admin.cursor()
        sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        args: tuple[Any, ...] = (app,)
        if state is not None:
            sql += " AND state = %s"
            args += (state,)
        cursor.execute(sql, args)
        return int(cursor.fetchone()[0])
    finally:
        admin.close()


# -- PersistentDB --------------------------------------------------------------------


@pytest.mark.parametrize("driver_name", ["psycopg2", "psycopg"])
def test_setsession_settings_last_and_leave_no_transaction_open(
    driver_name: str, postgres: Any
) -> None:
    """On a driver that opens a transaction for any statement, setsession's statements
    are committed: the warmed connection is idle, and the rollback on return keeps them."""
    driver = pytest.importorskip(driver_name)
    app = f"fs-setsession-{uuid.uuid4().hex[:8]}"
    pool = PooledDB(
        driver,
        mincached=1,
        setsession=["SET TIME ZONE 'Asia/Tokyo'"],
        application_name=app,
        **postgres.kwargs,
    )
    pool.warm()
    assert sessions(postgres, app, "idle") == 1
    seen = []
    for _ in range(3):
        with pool.connection() as db:
            cursor = db.cursor()
            cursor.execute("SHOW TIME ZONE")
            seen.append(cursor.fetchone()[0])
    assert seen == ["Asia/Tokyo"] * 3
    pool.close()


def test_a_closed_connection_reopens_at_its_next_use_as_in_dbutils(postgres: Any) -> None:
    """A closed steady connection keeps its closed driver connection, whose error on use
    (an InterfaceError, one of the failures) reopens it; a share used after pool.close()
    likewise, and its new session closes when the share is given back."""
    psycopg2 = pytest.importorskip("psycopg2")
    app = f"fs-reopen-{uuid.uuid4().hex[:8]}"
    kwargs = {**postgres.kwargs, "application_name": app}

    def answer(db: Any) -> int:
        cursor = db.cursor()
        cursor.execute("SELECT 42")
        return int(cursor.fetchone()[0])

    for make in (
        lambda: steady_db.connect(psycopg2, **kwargs),
        lambda: PersistentDB(psycopg2, closeable=True, **kwargs).connection(),
    ):
        db = make()
        db.close()
        assert answer(db) == 42
        db.close()
    pool = PooledDB(psycopg2, maxshared=2, **kwargs)
    share = pool.connection()
    pool.close()
    assert answer(share) == 42
    share.close()
    assert poll(lambda: sessions(postgres, app) == 0), sessions(postgres, app)
    assert pool.stats()["in_use"] == 0


@pytest.mark.postgres
def test_persistent_connections_close_when_their_threads_end(postgres: Any) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    app = f"threads-{uuid.uuid4().hex[:8]}"
    persist = PersistentDB(psycopg2, application_name=app, **postgres.kwargs)

    def work() -> None:
        db = persist.connection()
        cursor = db.cursor()
        cursor.execute("SELECT 1")
        db.close()

    for _ in range(50):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join(10)
    assert poll(lambda: sessions(postgres, app) == 0), sessions(postgres, app)
    assert persist.stats()["connections_open"] == 0


@pytest.mark.postgres
def test_closing_a_persistent_connection_never_leaves_it_idle_in_transaction(
    postgres: Any,
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    app = f"idletx-{uuid.uuid4().hex[:8]}"
    persist = PersistentDB(psycopg2, application_name=app, **postgres.kwargs)
    db = persist.connection()
    cursor = db.cursor()
    cursor.execute("SELECT 1")
    assert sessions(postgres, app, "idle in transaction") == 1
    db.close()
    assert sessions(postgres, app, "idle in transaction") == 0
    assert sessions(postgres, app, "idle") == 1
    assert persist.connection() is db


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("creator", [42, "psycopg2", None])
def test_a_creator_that_cannot_connect_is_refused_by_name(creator: Any) -> None:
    with pytest.raises(TypeError, match="creator="):
        PooledDB(creator)


@pytest.mark.parametrize("name", ["mincached", "maxcached", "maxshared", "maxconnections"])
def test_negative_sizes_are_refused_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}=-1"):
        PooledDB(fakedb, **{name: -1})


@pytest.mark.parametrize("name", ["maxwait", "maxage", "maxidle", "leaktime"])
@pytest.mark.parametrize("value", [0, -1, "5"])
def test_bad_durations_are_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{name}="):
        PooledDB(fakedb, **{name: value})


@pytest.mark.parametrize("failures", ["OperationalError", (fakedb.OperationalError, "oops")])
def test_failures_that_are_not_exception_classes_are_refused_by_name(failures: Any) -> None:
    for make in (PooledDB, PersistentDB, steady_db.connect):
        with pytest.raises(TypeError, match="failures="):
            make(fakedb, failures=failures)
    assert fakedb.counts.connects == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: steady_db.connect(None),
        lambda: steady_db.connect(fakedb, None, "SET x"),  # setsession: a string
        lambda: PooledDB(fakedb, ping=(1,)).connection(),
    ],
    ids=["creator", "setsession", "ping"],
)
def test_a_refused_argument_raises_once_and_leaves_no_finaliser_error(
    make: Callable[[], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    with pytest.raises(TypeError):
        make()
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []


def test_maxcached_below_mincached_is_refused() -> None:
    with pytest.raises(ValueError, match="maxcached=1 is below mincached=3"):
        PooledDB(fakedb, mincached=3, maxcached=1)


def test_a_driver_that_is_not_thread_safe_is_refused_by_name() -> None:
    fakedb.threadsafety = 0
    with pytest.raises(forksafe.NotSupportedError, match="threadsafety=0"):
        PooledDB(fakedb)


@pytest.mark.postgres
def test_an_unreachable_server_fails_fast_and_frees_the_slot() -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens here once the probe closes
    pool = PooledDB(psycopg2, maxconnections=1, host="127.0.0.1", port=port, connect_timeout=3)
    for _ in range(2):  # the slot comes back: the second attempt fails the same way
        with pytest.raises(psycopg2.OperationalError):
            pool.connection()
    assert pool.stats()["in_use"] == 0


# -- broken connections ---------------------------------------------------------------


def _kill_session(target: Any, session: int) -> None:
    admin = target.connect()
    try:
        cursor = admin.cursor()
        if target.kind == "postgres":
            cursor.execute("SELECT pg_terminate_backend(%s)", (session,))
        else:
            cursor.execute(f"KILL CONNECTION {int(session)}")
    finally:
        admin.close()


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_a_connection_killed_by_the_server_is_replaced_after_its_failed_use(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Even with ping=0 and no failover, the broken connection does not go back idle."""
    target = request.getfixturevalue(kind)
    if kind == "postgres":
        driver = pytest.importorskip("psycopg2")
        session_sql = "SELECT pg_backend_pid()"
    else:
        driver = pytest.importorskip("pymysql")
        session_sql = "SELECT CONNECTION_ID()"
    pool = PooledDB(driver, maxconnections=1, ping=0, **target.kwargs)

    def session() -> int:
        with pool.connection() as db:
            cursor = db.cursor()
            with cursor.no_failover():
                cursor.execute(session_sql)
                return int(cursor.fetchone()[0])

    first = session()
    _kill_session(target, first)
    with pytest.raises(driver.Error):
        for _ in range(3):  # the server may need a moment to act on the kill
            session()
            time.sleep(0.05)
    assert session() not in (first, None)
    assert pool.stats()["reconnects"] == 1
    pool.close()


def test_a_pymysql_ping_asks_the_server_only_when_its_socket_has_news(mysql: Any) -> None:
    """ping=1 polls the idle socket; a round trip happens only after the server wrote."""
    pymysql = pytest.importorskip("pymysql")
    pool = PooledDB(pymysql, maxconnections=1, **mysql.kwargs)  # ping=1, the default

    def session() -> tuple[int, int]:
        with pool.connection() as db:
            cursor = db.cursor()
            with cursor.no_failover():  # a replacement must come from the checkout's ping
                cursor.execute("SELECT CONNECTION_ID()")
                session_id = int(cursor.fetchone()[0])
                cursor.execute("SHOW SESSION STATUS LIKE 'Com_admin_commands'")
                return session_id, int(cursor.fetchone()[1])

    first, pings_before = session()
    for _ in range(5):
        pool.connection().close()
    again, pings_after = session()
    assert again == first
    assert pings_after == pings_before, "a checkout sent COM_PING to a quiet connection"
    _kill_session(mysql, first)
    assert poll(lambda: not _alive_mysql_session(mysql, first))
    second, pings_before = session()
    assert second != first
    assert pool.stats()["reconnects"] == 1
    for _ in range(5):  # the replacement is polled too, through its own socket
        pool.connection().close()
    assert session() == (second, pings_before)
    pool.close()


def test_only_cursors_that_leave_rows_on_the_server_count_as_reading_it(
    postgres: Any, mysql: Any, tmp_path: Any
) -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    psycopg = pytest.importorskip("psycopg")
    pymysql = pytest.importorskip("pymysql")
    cursors = pytest.importorskip("pymysql.cursors")

    pg2, pg3, my = (
        psycopg2.connect(**postgres.kwargs),
        psycopg.connect(**postgres.kwargs),
        pymysql.connect(**mysql.kwargs),
    )
    lite = sqlite3.connect(str(tmp_path / "rows.db"))
    try:
        seen = {
            "psycopg2": drivers.fetches_from_server(pg2.cursor()),
            "psycopg2 named": drivers.fetches_from_server(pg2.cursor("named")),
            "psycopg": drivers.fetches_from_server(pg3.cursor()),
            "psycopg server": drivers.fetches_from_server(pg3.cursor(name="named")),
            "pymysql": drivers.fetches_from_server(my.cursor()),
            "pymysql SSCursor": drivers.fetches_from_server(my.cursor(cursors.SSCursor)),
            "pymysql SSDictCursor": drivers.fetches_from_server(my.cursor(cursors.SSDictCursor)),
            "sqlite3": drivers.fetches_from_server(lite.cursor()),
            "unknown": drivers.fetches_from_server(fakedb.connect().cursor()),
        }
    finally:
        for con in (pg2, pg3, my, lite):
            con.close()
    assert seen == {
        "psycopg2": False,
        "psycopg2 named": True,
        "psycopg": False,
        "psycopg server": True,
        "pymysql": False,
        "pymysql SSCursor": True,
        "pymysql SSDictCursor": True,
        "sqlite3": True,
        "unknown": True,
    }


def test_a_pymysql_quiet_probe_vouches_only_for_the_socket_it_watches(mysql: Any) -> None:
    pymysql = pytest.importorskip("pymysql")
    con = pymysql.connect(**mysql.kwargs)
    quiet = drivers.quiet_probe(con)
    assert quiet is not None and quiet(con)
    other = pymysql.connect(**mysql.kwargs)
    try:
        con._sock, other._sock = other._sock, con._sock  # as after a reconnect
        assert not quiet(con), "a probe watching the old socket vouched for a new one"
    finally:
        con._sock, other._sock = other._sock, con._sock
        other.close()
        con.close()


def _alive_mysql_session(target: Any, session: int) -> bool:
    admin = target.connect()
    try:
        cursor = admin.cursor()
        cursor.execute(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE id = %s", (session,)
        )
        return bool(cursor.fetchone()[0])
    finally:
        admin.close()


def test_a_proxy_forwards_every_attribute_of_its_steady_connection() -> None:
    pool = PooledDB(fakedb, 1)
    proxy = pool.connection()
    steady = proxy._con
    names = set(vars(steady)) | {n for n in dir(steady) if not n.startswith("__")}
    own = {"close", "cursor", "commit", "rollback"}  # the proxy's own methods
    own |= {f"_py_{name}" for name in own}  # their Python versions, where C replaced them
    for name in names - own - {"_con"}:
        assert getattr(proxy, name) == getattr(steady, name), name
    assert proxy._con._con is steady._con  # DBUtils' way to the driver connection
    proxy.close()
    with pytest.raises(forksafe.InvalidConnectionError, match="_transaction"):
        _ = proxy._transaction


# -- cursor attributes ------------------------------------------------------------------


def test_steady_cursors_forward_every_driver_cursor_attribute(postgres: Any, mysql: Any) -> None:
    """Fixed-attribute cursors (psycopg2) and open-ended ones (PyMySQL) alike."""
    import psycopg2
    import pymysql

    for driver, target, insert in (
        (psycopg2, postgres, "CREATE TEMP TABLE t (i int); INSERT INTO t VALUES (1)"),
        (pymysql, mysql, "CREATE TEMPORARY TABLE t (i int)"),
    ):
        pool = PooledDB(driver, **target.kwargs)
        with pool.connection() as db:
            cursor = db.cursor()
            assert isinstance(cursor, forksafe.SteadyDBCursor)
            cursor.execute(insert)
            cursor.execute("SELECT 1 AS one")
            raw = cursor.dbapi_cursor
            assert cursor.rowcount == raw.rowcount == 1
            assert cursor.description[0][0] == "one"
            assert cursor.fetchone() == (1,)
            for name in dir(raw):
                if not name.startswith("__") and not name.startswith(("execute", "call")):
                    assert hasattr(cursor, name), name
            if driver is pymysql:
                assert cursor._executed == raw._executed  # set on the driver cursor late
            else:
                assert cursor.query == b"SELECT 1 AS one"
            cursor.close()
        pool.close()


class _Gone(Exception):
    pass


class _SlottedConnection:
    """A driver whose cursors have a fixed set of attributes (like psycopg2's)."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.dead = False

    def cursor(self) -> _SlottedCursor:
        return _SlottedCursor(self)

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


class _SlottedCursor:
    __slots__ = ("con",)

    def __init__(self, con: _SlottedConnection) -> None:
        self.con = con

    def execute_batch(self, sql: str) -> tuple[str, int]:
        if self.con.dead:
            raise _Gone("server closed the connection")
        return sql, self.con.number

    def close(self) -> None:
        pass


def test_driver_execute_methods_the_wrapper_lacks_still_fail_over() -> None:
    made: list[_SlottedConnection] = []

    def connect() -> _SlottedConnection:
        made.append(_SlottedConnection(len(made)))
        return made[-1]

    steady = steady_db.connect(connect, failures=_Gone)
    cursor = steady.cursor()
    assert not hasattr(type(cursor), "__getattr__"), "fixed attributes are forwarded directly"
    assert cursor.con is made[0]
    assert cursor.execute_batch("x") == ("x", 0)
    made[0].dead = True
    assert cursor.execute_batch("y") == ("y", 1)  # retried on a new connection
    steady.close()


class _LateCursor:
    """A driver cursor (with a ``__dict__``) that gains attributes as it is used."""

    def __init__(self) -> None:
        self.arraysize = 1

    def execute(self, sql: str) -> None:
        self.last_sql = sql  # a name no cursor has before its first execute()
        self.executed = True  # named like a method the steady cursor wraps; a flag

        def remember() -> None:
            self.statements = [*getattr(self, "statements", []), sql]

        remember()

    def close(self) -> None:
        pass


class _LateConnection:
    def cursor(self) -> _LateCursor:
        return _LateCursor()

    def rollback(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_attributes_a_driver_sets_on_its_cursors_later_are_forwarded() -> None:
    steady = steady_db.connect(_LateConnection, failures=OSError)
    first = steady.cursor()
    assert not hasattr(type(first), "__getattr__"), "listable names are forwarded directly"
    with pytest.raises(AttributeError, match="last_sql"):
        first.last_sql  # noqa: B018 - not set yet: the driver cursor's own error
    first.execute("SELECT 1")
    second = steady.cursor()
    second.execute("SELECT 2")
    assert (first.last_sql, second.last_sql) == ("SELECT 1", "SELECT 2")
    assert second.statements == ["SELECT 2"]
    assert second.executed is True
    with pytest.raises(AttributeError, match="execute_batch"):
        second.execute_batch  # noqa: B018 - a driver method this driver lacks
    assert first.arraysize == 1
    first.arraysize = 5  # set on the wrapper, as with DBUtils' forwarding
    assert (first.arraysize, first.dbapi_cursor.arraysize) == (5, 1)
    first.dbapi_cursor.lastrowid = 7  # a PEP 249 name, forwarded even if never listed
    assert first.lastrowid == 7
    steady.close()


def _recorded(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any) -> Any:
        return method(self, *args)

    return wrapper


class _DecoratedCursor(_LateCursor):
    @_recorded
    def execute(self, sql: str) -> None:
        self.status = "EXECUTED"  # set inside a decorated method


class _SetattrCursor(_LateCursor):
    def execute(self, sql: str) -> None:
        setattr(self, "notices", [sql])  # noqa: B010 - what some drivers do


@pytest.mark.parametrize("kind", [_DecoratedCursor, _SetattrCursor])
def test_names_set_in_decorated_methods_or_by_setattr_are_forwarded(kind: type) -> None:
    class Connection(_LateConnection):
        def cursor(self) -> Any:
            return kind()

    steady = steady_db.connect(Connection, failures=OSError)
    cursor = steady.cursor()
    cursor.execute("SELECT 1")
    if kind is _DecoratedCursor:
        assert not hasattr(type(cursor), "__getattr__"), "the wrapped method was read"
        assert cursor.status == "EXECUTED"
    else:
        assert hasattr(type(cursor), "__getattr__"), "setattr() names cannot be listed"
        assert cursor.notices == ["SELECT 1"]
    steady.close()


class _DynamicCursor(_LateCursor):
    def __getattr__(self, name: str) -> str:
        if name.startswith("dyn_"):
            return name.upper()
        raise AttributeError(name)


def test_a_driver_cursor_with_its_own_getattr_is_forwarded_by_name() -> None:
    class Connection(_LateConnection):
        def cursor(self) -> _DynamicCursor:
            return _DynamicCursor()

    steady = steady_db.connect(Connection, failures=OSError)
    cursor = steady.cursor()
    assert hasattr(type(cursor), "__getattr__")
    assert cursor.dyn_anything == "DYN_ANYTHING"
    with pytest.raises(AttributeError):
        cursor.other  # noqa: B018
    steady.close()


def test_a_steady_cursor_subclass_keeps_forwarding_by_name() -> None:
    class Mine(forksafe.SteadyDBCursor):
        pass

    steady = steady_db.connect(fakedb)
    cursor = Mine(steady)
    assert type(cursor) is Mine
    assert cursor.arraysize == cursor.dbapi_cursor.arraysize
    steady.close()


def test_an_interpreter_without_the_gil_is_warned_about(monkeypatch: pytest.MonkeyPatch) -> None:
    from forksafe import pooled

    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    with pytest.warns(RuntimeWarning, match="rely on the GIL.*PYTHON_GIL=1"):
        pooled._check_gil()
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pooled._check_gil()


# -- sharing and concurrency ---------------------------------------------------------


def test_a_shared_checkout_that_waited_on_a_transaction_opens_its_own_connection() -> None:
    """B waits while the only shared connection is in A's transaction and no slot is
    free; a freed slot must give B a new connection, not A's."""
    pool = PooledDB(fakedb, maxshared=2, maxconnections=2, blocking=True, maxwait=5)
    a = pool.connection()
    a.begin()
    number_of(a)
    dedicated = pool.dedicated_connection()  # the last slot
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.connection()))
    waiter.start()
    assert poll(lambda: pool._waiting == 1)
    dedicated.close()
    waiter.join(timeout=10)
    b = got[0]
    assert number_of(b) != number_of(a)
    b.close()
    assert a._con._transaction, "B's return ended A's transaction"
    a.close()
    assert pool.stats()["in_use"] == 0
    both = [pool.dedicated_connection(), pool.dedicated_connection()]  # no slot was lost
    for con in both:
        con.close()
    pool.close()


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_ending_a_shared_transaction_lets_a_waiter_share_the_connection(end: str) -> None:
    pool = PooledDB(fakedb, maxshared=1, maxconnections=1, blocking=True, maxwait=30)
    holder = pool.connection()
    holder.begin()
    number = number_of(holder)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.connection()))
    waiter.start()
    assert poll(lambda: pool._waiting == 1)
    getattr(holder, end)()  # the holder keeps its share
    assert poll(lambda: bool(got)), "the waiter still waits for a share"
    assert number_of(got[0]) == number
    waiter.join(timeout=10)
    got[0].close()
    holder.close()


def test_a_shared_connection_that_is_never_idle_is_still_replaced_after_maxage() -> None:
    pool = PooledDB(fakedb, maxshared=1, maxconnections=2, maxage=1.0)
    old = pool.connection()
    first = number_of(old)
    time.sleep(1.1)
    new = pool.connection()  # old is still shared out: never idle at a checkout
    assert number_of(new) != first
    old.close()  # its last share: the connection goes back, to be recycled
    assert pool.stats()["in_use"] == 1
    later = pool.connection()
    assert number_of(later) == number_of(new)
    for con in (new, later):
        con.close()
    assert pool.stats()["in_use"] == 0
    pool.connection().close()  # the expired idle connection is replaced at checkout
    assert pool.stats()["connections_recycled"] >= 1
    assert not any(c.number == first for c in fakedb.open_connections())


def test_a_shared_connection_past_maxage_is_still_shared_when_no_slot_is_free() -> None:
    """Retiring it would make the checkout wait for all its shares: here, its own
    thread's."""
    pool = PooledDB(fakedb, maxshared=1, maxconnections=1, blocking=True, maxwait=5, maxage=0.2)
    first = pool.connection()
    number = number_of(first)
    time.sleep(0.3)
    again = pool.connection()  # the same thread, its first share still held
    assert number_of(again) == number
    again.close()
    first.close()


def test_a_transaction_ended_by_a_failed_statement_lets_a_waiter_share() -> None:
    """Inside a transaction a failure is raised and the connection replaced, which ends
    the transaction without commit() or rollback()."""
    pool = PooledDB(fakedb, maxshared=1, maxconnections=1, blocking=True, maxwait=30)
    holder = pool.connection()
    holder.begin()
    number_of(holder)
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(pool.connection()))
    waiter.start()
    assert poll(lambda: pool._waiting == 1)
    fakedb.fail_next()
    with pytest.raises(fakedb.OperationalError):
        number_of(holder)
    assert poll(lambda: bool(got)), "the waiter still waits for a share"
    waiter.join(timeout=10)
    got[0].close()
    holder.close()


def test_shares_given_back_after_the_pool_closed_them_free_no_slot_twice() -> None:
    pool = PooledDB(fakedb, maxshared=2, maxconnections=2)
    held = [pool.connection() for _ in range(2)]
    pool.close()  # closes both shared connections and frees their slots
    for con in held:
        con.close()
    assert pool.stats()["in_use"] == 0
    both = [pool.dedicated_connection(), pool.dedicated_connection()]
    with pytest.raises(forksafe.TooManyConnectionsError):
        pool.dedicated_connection()  # a third would exceed maxconnections=2
    for con in both:
        con.close()


def test_a_non_blocking_sharing_pool_lets_more_threads_than_maxshared_in_at_once() -> None:
    """Without maxconnections there is no limit to reach: threads that find the shared
    slots all taken by connections still being opened wait for one to share."""

    def slow_connect() -> Any:
        time.sleep(0.05)  # all eight arrive while the first connections are being opened
        return fakedb.connect()

    slow_connect.threadsafety = 2  # type: ignore[attr-defined]
    pool = PooledDB(slow_connect, maxshared=2)
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def first_checkout() -> None:
        start.wait()
        try:
            with pool.connection() as db:
                number_of(db)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=first_checkout) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert fakedb.counts.connects <= 2
    pool.close()


def test_stats_in_use_stays_between_zero_and_maxconnections_under_churn() -> None:
    pool = PooledDB(fakedb, maxconnections=4, blocking=True)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            pool.connection().close()

    threads = [threading.Thread(target=churn) for _ in range(8)]
    for thread in threads:
        thread.start()
    seen = set()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            seen.add(pool.stats()["in_use"])
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    assert min(seen) >= 0 and max(seen) <= 4, sorted(seen)
    pool.close()


@pytest.mark.parametrize(
    "options", [{"leaktime": 60}, {"maxshared": 2}, {"leaktime": 60, "maxshared": 2}], ids=str
)
def test_a_dropped_proxy_collected_while_its_thread_holds_the_pool_lock_returns(
    options: dict[str, Any],
) -> None:
    """The collector runs at any allocation, also inside the pool's own critical
    sections; a proxy it frees there returns its connection instead of waiting for the
    lock its own thread holds."""
    pool = PooledDB(fakedb, **options)
    proxy = pool.connection()
    cycle: list[Any] = [proxy]
    cycle.append(cycle)  # only the collector can free it
    del proxy
    gc.disable()
    try:
        del cycle
        done = threading.Event()

        def collect_holding_the_lock() -> None:
            with pool._mutex:
                gc.collect()
            done.set()

        worker = threading.Thread(target=collect_holding_the_lock, daemon=True)
        worker.start()
        assert done.wait(10), "the collected proxy waited for the lock its thread holds"
    finally:
        gc.enable()
    assert pool.stats()["in_use"] == 0
    pool.close()
