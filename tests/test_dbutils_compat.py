"""DBUtils' behaviour, as forksafe promises to keep it, checked against a counting fake driver.

Every test runs against forksafe and, to prove that the test describes what DBUtils really
does, against DBUtils 3 itself.  The implementations are chosen in one place,
``IMPLEMENTATIONS``.  Where the two differ on purpose, the test says so through a property
of ``Implementation``: forksafe warms ``mincached`` up at first use, not in ``PooledDB()``,
and closes the connection of a finished thread.  Two tests expect what DBUtils gets wrong
(``maxconnections`` as a hard cap when shared and dedicated connections mix; waking a waiter
that can use a freed slot) and are marked as expected failures for DBUtils only.

Parameters are mostly passed by keyword for readability; one test per class pins down the
positional order (DBUtils 3.2's, with ``isfatal`` before ``*args``).
"""

from __future__ import annotations

import gc
import importlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import fakedb
import pytest

IMPLEMENTATIONS = ("forksafe", "dbutils")
_MODULES = ("steady_db", "pooled_db", "persistent_db")


@dataclass(frozen=True)
class Implementation:
    name: str
    steady_db: ModuleType
    pooled_db: Any
    persistent_db: ModuleType

    @property
    def opens_mincached_at_construction(self) -> bool:
        """DBUtils connects ``mincached`` times in ``PooledDB()``; forksafe waits for first use."""
        return self.name == "dbutils"

    @property
    def closes_connections_of_finished_threads(self) -> bool:
        """A forksafe addition: DBUtils may keep a dead thread's connection open indefinitely."""
        return self.name == "forksafe"


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request: pytest.FixtureRequest) -> Iterator[Implementation]:
    name: str = request.param
    steady, pooled, persistent = (
        importlib.import_module(f"{name}.{module}") for module in _MODULES
    )
    pools: list[Any] = []
    yield Implementation(name, steady, _PoolTracker(pooled, pools), persistent)
    for pool in pools:
        pool.close()  # forksafe shares idle connections between equal pools: don't leak them


class _PoolTracker:
    """The pooled_db module, except that it remembers every PooledDB it builds."""

    def __init__(self, module: ModuleType, pools: list[Any]) -> None:
        self._module = module
        self._pools = pools

    def PooledDB(self, *args: Any, **kwargs: Any) -> Any:  # named like the class it builds
        pool = self._module.PooledDB(*args, **kwargs)
        self._pools.append(pool)
        return pool

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@pytest.fixture
def steady_db(impl: Implementation) -> ModuleType:
    return impl.steady_db


@pytest.fixture
def pooled_db(impl: Implementation) -> Any:
    return impl.pooled_db


@pytest.fixture
def persistent_db(impl: Implementation) -> ModuleType:
    return impl.persistent_db


@pytest.fixture(autouse=True)
def fresh_fakedb() -> Iterator[None]:
    gc.collect()  # let objects of earlier tests close their connections before counting
    fakedb.reset()
    yield
    fakedb.reset()


def expect_dbutils_to_fail(
    impl: Implementation, request: pytest.FixtureRequest, reason: str
) -> None:
    """Mark a test of something DBUtils gets wrong: it must fail there, and pass on forksafe."""
    if impl.name == "dbutils":
        request.applymarker(pytest.mark.xfail(reason=f"DBUtils bug: {reason}", strict=True))


def number_of(db: Any) -> int:
    """Run a query on ``db`` and return the number of the raw connection that answered it."""
    cursor = db.cursor()
    cursor.execute("select connection_number")
    row = cursor.fetchone()
    cursor.close()
    return int(row[0])


def raw(number: int) -> fakedb.Connection:
    return fakedb.connections[number - 1]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.01)
    return True


# The ping flags: when each one makes the connection ping.  Each row is
# (flag, pings after the check on request, after cursor(), after execute()), cumulative.
PING_FLAGS = [
    pytest.param(0, 0, 0, 0, id="0-never"),
    pytest.param(1, 1, 1, 1, id="1-on-request"),
    pytest.param(2, 0, 1, 1, id="2-on-cursor"),
    pytest.param(4, 0, 0, 1, id="4-on-execute"),
    pytest.param(7, 1, 2, 3, id="7-always"),
]

DEFAULT_FAILURES = [fakedb.OperationalError, fakedb.InterfaceError, fakedb.InternalError]
NOT_FAILURES = [
    fakedb.ProgrammingError,
    fakedb.IntegrityError,
    fakedb.DataError,
    fakedb.NotSupportedError,
]


# --- SteadyDB: one hardened connection ------------------------------------------------------


def test_connect_opens_one_connection_with_the_given_arguments(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, database="app", user="alice")

    assert fakedb.counts.connects == 1
    assert raw(1).kwargs == {"database": "app", "user": "alice"}
    assert number_of(db) == 1


def test_a_plain_function_works_as_creator(steady_db: ModuleType) -> None:
    db = steady_db.connect(lambda: fakedb.connect(database="app"))

    assert number_of(db) == 1
    assert raw(1).kwargs == {"database": "app"}


def test_a_creator_that_is_neither_module_nor_callable_is_refused(steady_db: ModuleType) -> None:
    with pytest.raises(TypeError):
        steady_db.connect(42)
    assert fakedb.counts.connects == 0


def test_dbapi_and_threadsafety_come_from_the_driver_module(steady_db: ModuleType) -> None:
    fakedb.threadsafety = 1
    db = steady_db.connect(fakedb)

    assert db.dbapi() is fakedb
    assert db.threadsafety() == 1


def test_closing_closes_the_raw_connection_once(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    db.close()
    db.close()

    assert fakedb.counts.closes == 1
    assert raw(1).closed


def test_an_uncloseable_connection_ignores_close(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, closeable=False)
    db.close()

    assert fakedb.counts.closes == 0
    assert number_of(db) == 1


def test_closing_an_uncloseable_connection_rolls_back_an_open_transaction(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb, closeable=False)
    db.begin()
    db.cursor().execute("update account set balance = 0")
    db.close()

    assert fakedb.counts.rollbacks == 1
    assert fakedb.counts.closes == 0


def test_cursor_passes_queries_and_results_through(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    cursor = db.cursor()
    cursor.execute("select 1")
    cursor.executemany("insert into t values (?)", [(1,), (2,)])
    cursor.execute("select 2")

    assert cursor.fetchall() == [(1,)]
    assert fakedb.counts.statements == [
        "select 1",
        "insert into t values (?)",
        "insert into t values (?)",
        "select 2",
    ]


def test_maxusage_reconnects_after_that_many_operations(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, maxusage=3)
    numbers = [number_of(db) for _ in range(7)]

    assert numbers == [1, 1, 1, 2, 2, 2, 3]
    assert fakedb.counts.connects == 3
    assert raw(1).closed and raw(2).closed and not raw(3).closed


def test_setsession_runs_on_every_connect(steady_db: ModuleType) -> None:
    setsession = ["set time zone 'UTC'", "set search_path to app"]
    db = steady_db.connect(fakedb, maxusage=2, setsession=setsession)
    for query in ("q1", "q2", "q3"):
        db.cursor().execute(query)

    assert raw(1).statements == [*setsession, "q1", "q2"]
    assert raw(2).statements == [*setsession, "q3"]


def test_a_lost_connection_is_replaced_transparently_outside_a_transaction(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb)
    cursor = db.cursor()
    cursor.execute("select 1")
    raw(1).die()
    cursor.execute("select 2")

    assert cursor.fetchone() == (2,)
    assert fakedb.counts.connects == 2
    assert fakedb.counts.statements == ["select 1", "select 2"]


@pytest.mark.parametrize("error", DEFAULT_FAILURES, ids=lambda e: e.__name__)
def test_default_failure_classes_are_retried_transparently(
    steady_db: ModuleType, error: type[Exception]
) -> None:
    cursor = steady_db.connect(fakedb).cursor()
    fakedb.fail_next(1, "execute", error)
    cursor.execute("select 1")

    assert fakedb.counts.statements == ["select 1"]


@pytest.mark.parametrize("error", NOT_FAILURES, ids=lambda e: e.__name__)
def test_other_database_errors_are_raised_without_retry(
    steady_db: ModuleType, error: type[Exception]
) -> None:
    cursor = steady_db.connect(fakedb).cursor()
    fakedb.fail_next(1, "execute", error)
    with pytest.raises(error):
        cursor.execute("select 1")

    assert fakedb.counts.statements == []
    assert fakedb.counts.connects == 1


def test_failures_replaces_the_default_failure_classes(steady_db: ModuleType) -> None:
    cursor = steady_db.connect(fakedb, failures=fakedb.ProgrammingError).cursor()
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    cursor.execute("select 1")
    fakedb.fail_next(1, "execute", fakedb.OperationalError)
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("select 2")

    assert fakedb.counts.statements == ["select 1"]


def test_failures_accepts_a_tuple_of_classes(steady_db: ModuleType) -> None:
    failures = (fakedb.ProgrammingError, fakedb.IntegrityError)
    cursor = steady_db.connect(fakedb, failures=failures).cursor()
    fakedb.fail_next(1, "execute", fakedb.IntegrityError)
    cursor.execute("select 1")

    assert fakedb.counts.statements == ["select 1"]


def test_a_lost_connection_inside_a_transaction_raises_instead_of_reconnecting_silently(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb)
    db.begin()
    cursor = db.cursor()
    cursor.execute("update account set balance = 0")
    raw(1).die()
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("update account set balance = 1")

    assert fakedb.counts.statements == ["update account set balance = 0"]


def test_the_connection_is_usable_again_after_a_failed_transaction(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb)
    db.begin()
    raw(1).die()
    with pytest.raises(fakedb.OperationalError):
        db.cursor().execute("update account set balance = 1")
    db.rollback()

    assert number_of(db) == 2


def test_commit_ends_the_transaction_so_reconnecting_is_allowed_again(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb)
    db.begin()
    db.cursor().execute("update account set balance = 0")
    db.commit()
    raw(1).die()

    assert fakedb.counts.commits == 1
    assert number_of(db) == 2


def test_rollback_ends_the_transaction_so_reconnecting_is_allowed_again(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb)
    db.begin()
    db.cursor().execute("update account set balance = 0")
    db.rollback()
    raw(1).die()

    assert fakedb.counts.rollbacks == 1
    assert number_of(db) == 2


def test_connection_context_commits_on_success(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    with db:
        db.cursor().execute("insert into t values (1)")

    assert (fakedb.counts.commits, fakedb.counts.rollbacks) == (1, 0)
    assert fakedb.counts.closes == 0


def test_connection_context_rolls_back_on_error(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    with pytest.raises(ZeroDivisionError), db:
        db.cursor().execute("insert into t values (1)")
        _ = 1 / 0

    assert (fakedb.counts.commits, fakedb.counts.rollbacks) == (0, 1)


def test_cursor_context_closes_the_cursor(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    with db.cursor() as cursor:
        cursor.execute("select 1")
        assert not raw(1).cursors[-1].closed

    assert raw(1).cursors[-1].closed
    assert fakedb.counts.statements == ["select 1"]


@pytest.mark.parametrize(("flag", "on_check", "on_cursor", "on_execute"), PING_FLAGS)
def test_ping_flag_decides_when_a_steady_connection_pings(
    steady_db: ModuleType, flag: int, on_check: int, on_cursor: int, on_execute: int
) -> None:
    db = steady_db.connect(fakedb, ping=flag)
    assert fakedb.counts.pings == 0
    db._ping_check()
    assert fakedb.counts.pings == on_check
    cursor = db.cursor()
    assert fakedb.counts.pings == on_cursor
    cursor.execute("select 1")
    assert fakedb.counts.pings == on_execute


def test_a_ping_that_fails_replaces_the_connection(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, ping=1)
    raw(1).die()

    assert db._ping_check()
    assert fakedb.counts.connects == 2
    assert raw(1).closed
    assert number_of(db) == 2


def test_a_ping_on_cursor_replaces_a_dead_connection_before_it_is_used(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb, ping=2)
    raw(1).die()
    cursor = db.cursor()

    assert fakedb.counts.connects == 2
    cursor.execute("select 1")
    assert cursor.fetchone() == (2,)


def test_no_pings_inside_a_transaction(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, ping=7)
    db.begin()
    db.cursor().execute("update account set balance = 0")

    assert fakedb.counts.pings == 0


def test_a_failing_reconnect_raises_the_original_error(steady_db: ModuleType) -> None:
    cursor = steady_db.connect(fakedb, ping=0).cursor()
    raw(1).die()
    fakedb.fail_next(5, "connect", fakedb.InternalError)
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("select 1")


@pytest.mark.parametrize(
    "arguments",
    [{"maxusage": "10"}, {"failures": "OperationalError"}],
    ids=["maxusage", "failures"],
)
def test_badly_typed_arguments_are_refused(
    steady_db: ModuleType, arguments: dict[str, Any]
) -> None:
    with pytest.raises(TypeError):
        steady_db.connect(fakedb, **arguments)


def test_a_connection_whose_setsession_fails_is_closed_and_the_error_raised(
    steady_db: ModuleType,
) -> None:
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    with pytest.raises(fakedb.ProgrammingError):
        steady_db.connect(fakedb, setsession=["set nonsense to 1"])

    assert fakedb.counts.connects == 1
    assert raw(1).closed


def test_a_failed_commit_raises_and_replaces_the_connection(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    db.begin()
    db.cursor().execute("update account set balance = 0")
    fakedb.fail_next(1, "commit")
    with pytest.raises(fakedb.OperationalError):
        db.commit()

    assert raw(1).closed
    assert number_of(db) == 2


def test_a_dropped_steady_connection_is_closed(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb)
    number_of(db)
    del db

    assert wait_until(lambda: raw(1).closed)
    assert fakedb.counts.closes == 1


def test_connect_takes_the_dbutils_positional_parameters(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, 2, ["set role app"], fakedb.ProgrammingError, 0, False, None)
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    numbers = [number_of(db) for _ in range(3)]
    db.close()

    assert numbers == [1, 1, 2]
    assert raw(2).statements[0] == "set role app"
    assert fakedb.counts.pings == 0
    assert fakedb.counts.closes == 1  # only the overused one: close() was ignored


def test_execute_executemany_and_callproc_each_count_as_one_use(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, maxusage=3)
    cursor = db.cursor()
    cursor.execute("select 1")
    cursor.executemany("insert into t values (?)", [(1,), (2,), (3,)])
    cursor.callproc("refresh")
    cursor.execute("select 2")

    assert cursor.fetchone() == (2,)
    assert raw(1).statements == ["select 1", *["insert into t values (?)"] * 3, "call refresh"]


def test_sizes_set_on_a_cursor_apply_to_its_next_execute_and_to_a_failover_cursor(
    steady_db: ModuleType,
) -> None:
    cursor = steady_db.connect(fakedb, ping=0).cursor()
    cursor.setinputsizes([10])
    cursor.setoutputsize(5, 0)
    cursor.execute("select 1")
    cursor.execute("select 2")
    assert raw(1).cursors[0].sizes == [("input", [10]), ("output", 5, 0)]  # once only

    cursor.setinputsizes([20])
    fakedb.fail_next(1, "execute")
    cursor.execute("select 3")  # retried on a new driver cursor, which gets the sizes
    assert len(raw(1).cursors) == 2
    assert raw(1).cursors[1].sizes == [("input", [20])]

    cursor.setinputsizes(None)
    cursor.execute("select 4")
    assert raw(1).cursors[1].sizes == [("input", [20])]  # no sizes: nothing set
    assert fakedb.counts.statements[-1] == "select 4"


def test_a_steady_cursor_can_be_iterated_and_exposes_the_driver_attributes(
    steady_db: ModuleType,
) -> None:
    cursor = steady_db.connect(fakedb).cursor()
    cursor.execute("select 1")

    assert cursor.rowcount == 1
    assert cursor.description[0][0] == "number"
    assert list(cursor) == [(1,)]


def test_a_failure_while_opening_a_cursor_reconnects_transparently(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb, ping=0)
    fakedb.fail_next(1, "cursor")

    assert number_of(db) == 2
    assert raw(1).closed


def test_a_statement_failing_twice_is_retried_on_a_new_connection(
    steady_db: ModuleType,
) -> None:
    cursor = steady_db.connect(fakedb).cursor()
    fakedb.fail_next(2, "execute")
    cursor.execute("select 1")

    assert cursor.fetchone() == (2,)
    assert raw(1).closed
    assert fakedb.counts.statements == ["select 1"]


def test_maxusage_does_not_reconnect_inside_a_transaction(steady_db: ModuleType) -> None:
    db = steady_db.connect(fakedb, maxusage=1)
    db.begin()
    numbers = [number_of(db) for _ in range(3)]
    db.commit()

    assert numbers == [1, 1, 1]
    assert number_of(db) == 2


def test_a_dead_connection_is_not_replaced_by_a_ping_inside_a_transaction(
    steady_db: ModuleType,
) -> None:
    db = steady_db.connect(fakedb, ping=1)
    db.begin()
    raw(1).die()

    assert not db._ping_check()
    assert fakedb.counts.connects == 1


@pytest.mark.parametrize(
    ("ping", "on_check", "on_execute"),
    [
        pytest.param("select 1", 1, 1, id="sql"),
        pytest.param((4, "select 1"), 0, 1, id="flag-and-sql"),
    ],
)
def test_ping_can_be_an_sql_statement(
    steady_db: ModuleType, ping: Any, on_check: int, on_execute: int
) -> None:
    db = steady_db.connect(fakedb, ping=ping)
    db._ping_check()
    assert fakedb.counts.statements.count("select 1") == on_check
    db.cursor().execute("select 2")
    assert fakedb.counts.statements.count("select 1") == on_execute
    assert fakedb.counts.pings == 0


def test_ping_can_be_a_callable_that_says_whether_the_connection_lives(
    steady_db: ModuleType,
) -> None:
    checked: list[int] = []

    def alive(con: fakedb.Connection) -> bool:
        checked.append(con.number)
        return not con.dead

    db = steady_db.connect(fakedb, ping=alive)
    assert db._ping_check()
    raw(1).die()
    assert db._ping_check()

    assert checked == [1, 1]
    assert number_of(db) == 2


@pytest.mark.parametrize(("fatal", "retried"), [(True, True), (False, False)])
def test_isfatal_decides_whether_a_failure_is_retried(
    steady_db: ModuleType, fatal: bool, retried: bool
) -> None:
    seen: list[Exception] = []

    def isfatal(error: Exception) -> bool:
        seen.append(error)
        return fatal

    cursor = steady_db.connect(fakedb, isfatal=isfatal).cursor()
    fakedb.fail_next(1, "execute")
    if retried:
        cursor.execute("select 1")
    else:
        with pytest.raises(fakedb.OperationalError):
            cursor.execute("select 1")

    assert [type(error) for error in seen] == [fakedb.OperationalError]
    assert fakedb.counts.statements == (["select 1"] if retried else [])


def test_steady_db_exports_the_dbutils_names(steady_db: ModuleType) -> None:
    assert issubclass(steady_db.InvalidCursorError, steady_db.SteadyDBError)
    assert isinstance(steady_db.connect(fakedb), steady_db.SteadyDBConnection)
    assert isinstance(steady_db.connect(fakedb).cursor(), steady_db.SteadyDBCursor)


# --- PooledDB: a pool shared by threads -----------------------------------------------------


def test_pool_passes_its_extra_arguments_to_the_creator(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, database="app", user="alice")
    pool.connection()

    assert raw(1).kwargs == {"database": "app", "user": "alice"}


def test_a_returned_connection_is_reused_instead_of_opening_a_new_one(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb)
    for _ in range(3):
        db = pool.connection()
        assert number_of(db) == 1
        db.close()

    assert fakedb.counts.connects == 1
    assert fakedb.counts.closes == 0


def test_idle_connections_are_reused_first_in_first_out(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    first, second, third = (pool.connection() for _ in range(3))
    for db in (second, third, first):
        db.close()

    reused = [number_of(pool.connection()) for _ in range(3)]

    assert reused == [2, 3, 1]
    assert fakedb.counts.connects == 3


def test_mincached_connections_are_opened_before_they_are_needed(
    impl: Implementation,
) -> None:
    pool = impl.pooled_db.PooledDB(fakedb, mincached=2)
    # the one deliberate difference: forksafe opens nothing until the pool is first used
    assert fakedb.counts.connects == (2 if impl.opens_mincached_at_construction else 0)

    first = pool.connection()
    assert fakedb.counts.connects == 2
    second = pool.connection()

    assert fakedb.counts.connects == 2
    assert {number_of(first), number_of(second)} == {1, 2}


def test_maxcached_limits_idle_connections_and_closes_the_surplus(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxcached=2)
    connections = [pool.connection() for _ in range(3)]
    for db in connections:
        db.close()

    assert fakedb.counts.closes == 1
    assert len(fakedb.open_connections()) == 2


def test_maxcached_below_mincached_is_raised_by_dbutils_and_refused_by_forksafe(
    impl: Implementation,
) -> None:
    # Deliberate difference: DBUtils silently raises maxcached to mincached; forksafe
    # names the contradiction instead of guessing which of the two the caller meant.
    if impl.name == "forksafe":
        with pytest.raises(ValueError, match="maxcached=1 is below mincached=3"):
            impl.pooled_db.PooledDB(fakedb, mincached=3, maxcached=1)
        return
    pool = impl.pooled_db.PooledDB(fakedb, mincached=3, maxcached=1)
    connections = [pool.connection() for _ in range(3)]
    for db in connections:
        db.close()

    assert fakedb.counts.connects == 3
    assert fakedb.counts.closes == 0


def test_maxcached_zero_keeps_every_returned_connection(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxcached=0)
    connections = [pool.connection() for _ in range(5)]
    for db in connections:
        db.close()

    assert fakedb.counts.closes == 0
    assert len(fakedb.open_connections()) == 5


def test_reset_true_rolls_back_every_returned_connection_if_the_driver_cannot_tell(
    pooled_db: Any,
) -> None:
    fakedb.reports_transaction_status = False
    pool = pooled_db.PooledDB(fakedb, reset=True)
    pool.connection().close()
    db = pool.connection()
    db.cursor().execute("select 1")
    db.close()

    assert fakedb.counts.rollbacks == 2
    assert not raw(1).transaction_open


def test_reset_true_rolls_back_a_connection_the_driver_reports_in_a_transaction(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, reset=True)
    db = pool.connection()
    db.cursor().execute("select 1")
    db.close()

    assert fakedb.counts.rollbacks == 1
    assert not raw(1).transaction_open


def test_reset_false_rolls_back_only_transactions_started_with_begin(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, reset=False)
    db = pool.connection()
    db.cursor().execute("select 1")
    db.close()
    assert fakedb.counts.rollbacks == 0

    db = pool.connection()
    db.begin()
    db.cursor().execute("update account set balance = 0")
    db.close()
    assert fakedb.counts.rollbacks == 1


def test_a_freshly_opened_connection_is_not_pinged_on_checkout(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, ping=1)
    pool.connection()

    assert fakedb.counts.pings == 0


@pytest.mark.parametrize(("flag", "on_checkout", "on_cursor", "on_execute"), PING_FLAGS)
def test_ping_flag_decides_when_a_pooled_connection_pings(
    pooled_db: Any, flag: int, on_checkout: int, on_cursor: int, on_execute: int
) -> None:
    pool = pooled_db.PooledDB(fakedb, ping=flag)
    pool.connection().close()
    assert fakedb.counts.pings == 0

    db = pool.connection()
    assert fakedb.counts.pings == on_checkout
    cursor = db.cursor()
    assert fakedb.counts.pings == on_cursor
    cursor.execute("select 1")
    assert fakedb.counts.pings == on_execute


def test_a_dead_idle_connection_is_replaced_on_checkout(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, ping=1)
    pool.connection().close()
    raw(1).die()

    db = pool.connection()

    assert fakedb.counts.connects == 2
    assert raw(1).closed
    assert number_of(db) == 2


def test_after_a_server_restart_every_idle_connection_is_replaced(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb)
    connections = [pool.connection() for _ in range(3)]
    for db in connections:
        db.close()
    fakedb.kill_all()

    connections = [pool.connection() for _ in range(3)]

    assert sorted(number_of(db) for db in connections) == [4, 5, 6]
    assert fakedb.open_connections() == fakedb.connections[3:]


def test_without_ping_a_dead_idle_connection_is_replaced_at_first_use(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, ping=0)
    pool.connection().close()
    raw(1).die()

    assert number_of(pool.connection()) == 2
    assert fakedb.counts.pings == 0


def test_pooled_connections_are_renewed_after_maxusage_uses_across_checkouts(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxusage=2)
    numbers = []
    for _ in range(3):
        db = pool.connection()
        numbers.append(number_of(db))
        db.close()

    assert numbers == [1, 1, 2]
    assert raw(1).closed


def test_setsession_runs_once_on_each_new_pooled_connection(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, setsession=["set search_path to app"])
    first, second = pool.connection(), pool.connection()
    number_of(first)
    number_of(second)
    first.close()
    number_of(pool.connection())

    assert raw(1).statements == [
        "set search_path to app",
        "select connection_number",
        "select connection_number",
    ]
    assert raw(2).statements == ["set search_path to app", "select connection_number"]


def test_pool_failures_decide_which_errors_are_retried(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, failures=fakedb.ProgrammingError)
    cursor = pool.connection().cursor()
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    cursor.execute("select 1")
    fakedb.fail_next(1, "execute", fakedb.OperationalError)
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("select 2")

    assert fakedb.counts.statements == ["select 1"]


def test_a_lost_pooled_connection_is_replaced_transparently(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    db = pool.connection()
    number_of(db)
    raw(1).die()

    assert number_of(db) == 2


def test_a_lost_pooled_connection_inside_a_transaction_raises(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    db = pool.connection()
    db.begin()
    cursor = db.cursor()
    raw(1).die()
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("update account set balance = 0")

    assert fakedb.counts.statements == []


def test_maxshared_shares_connections_when_the_driver_allows_it(pooled_db: Any) -> None:
    fakedb.threadsafety = 2
    pool = pooled_db.PooledDB(fakedb, maxshared=2)
    connections = [pool.connection() for _ in range(5)]

    assert fakedb.counts.connects == 2
    assert {number_of(db) for db in connections} == {1, 2}


def test_a_shared_connection_goes_idle_when_its_last_user_returns_it(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=2)
    connections = [pool.connection() for _ in range(3)]
    for db in connections:
        db.close()

    dedicated = [pool.dedicated_connection() for _ in range(2)]

    assert fakedb.counts.connects == 2
    assert {number_of(db) for db in dedicated} == {1, 2}


def test_a_connection_in_a_transaction_is_not_shared(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=2)
    busy, free = pool.connection(), pool.connection()
    busy.begin()

    assert number_of(pool.connection()) == number_of(free)
    assert fakedb.counts.connects == 2


def test_maxshared_is_ignored_when_the_driver_cannot_share_connections(
    pooled_db: Any,
) -> None:
    fakedb.threadsafety = 1
    pool = pooled_db.PooledDB(fakedb, maxshared=2)
    connections = [pool.connection() for _ in range(3)]

    assert fakedb.counts.connects == 3
    assert {number_of(db) for db in connections} == {1, 2, 3}


def test_dedicated_connections_are_never_shared(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1)
    shared = pool.connection()
    dedicated = [pool.dedicated_connection(), pool.connection(shareable=False)]
    also_shared = pool.connection()

    assert fakedb.counts.connects == 3
    assert number_of(also_shared) == number_of(shared)
    assert number_of(shared) not in {number_of(db) for db in dedicated}


def test_maxconnections_without_blocking_raises_too_many_connections(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=2)
    held = [pool.connection(), pool.connection()]
    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.connection()

    held[0].close()
    assert number_of(pool.connection()) == 1


def test_shareable_requests_share_instead_of_failing_at_maxconnections(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1, maxconnections=1)
    first, second = pool.connection(), pool.connection()

    assert number_of(first) == number_of(second) == 1
    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.dedicated_connection()


def test_maxconnections_caps_shared_and_dedicated_connections_together(
    impl: Implementation, request: pytest.FixtureRequest
) -> None:
    expect_dbutils_to_fail(impl, request, "it opens a new shared connection past maxconnections")
    pool = impl.pooled_db.PooledDB(fakedb, maxshared=2, maxconnections=3)
    held = [pool.connection(), pool.dedicated_connection(), pool.dedicated_connection()]
    try:
        also_shared = pool.connection()  # may share the shared one, must not open a fourth
    except impl.pooled_db.TooManyConnectionsError:
        also_shared = None

    assert fakedb.counts.connects == 3
    if also_shared is not None:
        assert number_of(also_shared) == number_of(held[0])


def test_maxconnections_is_raised_to_maxcached_and_maxshared(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxcached=3, maxconnections=1)
    held = [pool.dedicated_connection() for _ in range(3)]

    assert fakedb.counts.connects == 3
    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.connection()
    assert len(held) == 3


def test_a_failed_connect_does_not_use_up_a_connection_slot(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1)
    fakedb.fail_next(1, "connect")
    with pytest.raises(fakedb.OperationalError):
        pool.connection()

    assert number_of(pool.connection()) == 1


def test_a_failed_setsession_closes_the_connection_and_frees_its_slot(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1, setsession=["set role app"])
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    with pytest.raises(fakedb.ProgrammingError):
        pool.connection()

    assert raw(1).closed
    assert number_of(pool.connection()) == 2


@pytest.mark.timeout(20)
def test_a_blocked_request_gets_the_connection_when_it_is_returned(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1, blocking=True)
    held = pool.connection()
    number_of(held)
    got: list[int] = []

    def waiter() -> None:
        db = pool.connection()
        got.append(number_of(db))
        db.close()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), "the second request should wait while the connection is held"
    assert got == []

    held.close()
    thread.join(10)
    assert not thread.is_alive(), "the waiting request was not woken up"
    assert got == [1]
    assert fakedb.counts.connects == 1


@pytest.mark.timeout(20)
def test_a_blocked_shareable_request_waits_for_a_connection_in_a_transaction(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1, maxconnections=1, blocking=True)
    held = pool.connection()
    held.begin()
    got: list[int] = []

    def waiter() -> None:
        db = pool.connection()
        got.append(number_of(db))
        db.close()

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), "a connection in a transaction must not be shared"

    held.commit()
    held.close()
    thread.join(10)
    assert not thread.is_alive(), "the waiting request was not woken up"
    assert got == [1]


@pytest.mark.timeout(20)
def test_a_freed_slot_wakes_a_waiter_that_can_use_it(
    impl: Implementation, request: pytest.FixtureRequest
) -> None:
    expect_dbutils_to_fail(impl, request, "it notifies one waiter, maybe one that cannot proceed")
    pool = impl.pooled_db.PooledDB(fakedb, maxshared=1, maxconnections=2, blocking=True)
    in_transaction = pool.connection()
    in_transaction.begin()
    dedicated = pool.dedicated_connection()
    got: list[str] = []

    def wait_for(kind: str, shareable: bool) -> None:
        db = pool.connection(shareable)
        got.append(kind)
        db.close()

    # first in line: a shareable request, which must wait for the transaction to end
    shared_waiter = threading.Thread(target=wait_for, args=("shared", True), daemon=True)
    shared_waiter.start()
    shared_waiter.join(0.3)
    # second in line: a dedicated request, which only needs a free slot
    dedicated_waiter = threading.Thread(target=wait_for, args=("dedicated", False), daemon=True)
    dedicated_waiter.start()
    dedicated_waiter.join(0.3)
    assert got == []

    dedicated.close()  # frees a slot: the dedicated request can go ahead
    dedicated_waiter.join(5)
    woken = not dedicated_waiter.is_alive()
    in_transaction.commit()
    in_transaction.close()
    shared_waiter.join(5)
    dedicated_waiter.join(5)

    assert woken, "the waiter that could use the free slot was not woken"
    assert got[0] == "dedicated"


@pytest.mark.timeout(30)
def test_many_threads_share_a_small_blocking_pool_without_losing_connections(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=3, blocking=True)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                with pool.connection() as db:
                    number_of(db)
                    time.sleep(0.001)  # hold it long enough for the other threads to queue up
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert fakedb.counts.connects <= 3
    assert fakedb.counts.executes == 8 * 20


@pytest.mark.timeout(60)
def test_many_threads_mixing_shared_and_dedicated_requests_neither_hang_nor_leak(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=2, maxconnections=3, blocking=True)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for turn in range(20):
                with pool.connection(shareable=(index + turn) % 3 != 0) as db:
                    number_of(db)
                    time.sleep(0.001)  # hold it long enough for the other threads to queue up
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40)

    assert not any(thread.is_alive() for thread in threads), "a request hung"
    assert errors == []
    held: list[Any] = []
    taker = threading.Thread(
        target=lambda: held.extend(pool.dedicated_connection() for _ in range(3)), daemon=True
    )
    taker.start()
    taker.join(10)
    assert len(held) == 3, "not every connection slot was given back"


@pytest.mark.timeout(20)
def test_a_connection_can_be_returned_by_another_thread(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1)
    db = pool.connection()
    thread = threading.Thread(target=db.close, daemon=True)
    thread.start()
    thread.join(10)

    assert number_of(pool.connection()) == 1


def test_sharing_an_open_connection_pings_it(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1, ping=1)
    pool.connection()
    assert fakedb.counts.pings == 0
    pool.connection()
    assert fakedb.counts.pings == 1


def test_pooled_connection_context_returns_the_connection_without_committing(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb)
    with pool.connection() as db:
        db.cursor().execute("insert into t values (1)")

    assert fakedb.counts.commits == 0
    assert fakedb.counts.rollbacks == 1  # reset=True on return
    assert fakedb.counts.closes == 0
    assert number_of(pool.connection()) == 1


def test_shared_connections_work_as_context_managers(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1)
    with pool.connection() as first, pool.connection() as second:
        assert number_of(first) == number_of(second) == 1

    db = pool.dedicated_connection()
    assert number_of(db) == 1
    assert fakedb.counts.connects == 1


def test_using_a_returned_connection_raises_invalid_connection(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    db = pool.connection()
    db.close()
    with pytest.raises(pooled_db.InvalidConnectionError):
        db.cursor()


def test_returning_a_connection_twice_is_harmless(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1)
    db = pool.connection()
    db.close()
    db.close()
    first = pool.connection()

    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.connection()
    assert number_of(first) == 1


def test_a_dropped_pooled_connection_goes_back_to_the_pool(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1)
    number_of(pool.connection())  # checked out and dropped at once
    gc.collect()
    assert fakedb.counts.rollbacks == 1  # reset=True, as if it had been closed

    db = pool.connection()
    assert number_of(db) == 1
    assert fakedb.counts.closes == 0


def test_dedicated_connection_is_connection_not_shareable(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    db = pool.dedicated_connection()
    db.close()

    assert number_of(pool.dedicated_connection()) == 1


def test_steady_connection_of_a_pool_is_not_pooled(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    db = pool.steady_connection()
    number_of(db)
    db.close()

    assert fakedb.counts.closes == 1
    assert number_of(pool.connection()) == 2


def test_closing_the_pool_closes_its_idle_connections(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    connections = [pool.connection() for _ in range(3)]
    for db in connections:
        db.close()
    pool.close()

    assert fakedb.counts.closes == 3
    assert fakedb.open_connections() == []


def test_closing_the_pool_closes_its_shared_connections(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=2)
    held = [pool.connection() for _ in range(2)]
    pool.close()

    assert fakedb.counts.closes == 2
    assert len(held) == 2


def test_each_pool_keeps_up_to_its_own_maxcached_idle_connections(pooled_db: Any) -> None:
    first = pooled_db.PooledDB(fakedb, maxcached=1)
    second = pooled_db.PooledDB(fakedb, maxcached=1)
    connections = [first.connection(), second.connection()]
    for db in connections:
        db.close()

    assert fakedb.counts.closes == 0


def test_closing_one_pool_leaves_the_idle_connections_of_another_alone(
    pooled_db: Any,
) -> None:
    first = pooled_db.PooledDB(fakedb)
    second = pooled_db.PooledDB(fakedb)
    connections = [first.connection(), second.connection()]
    numbers = [number_of(db) for db in connections]
    for db in connections:
        db.close()
    first.close()

    assert raw(numbers[0]).closed
    assert not raw(numbers[1]).closed


def test_a_driver_with_threadsafety_zero_is_refused(pooled_db: Any) -> None:
    fakedb.threadsafety = 0
    with pytest.raises(pooled_db.NotSupportedError):
        pool = pooled_db.PooledDB(fakedb)
        pool.connection()


def test_a_creator_function_of_a_threadsafety_zero_driver_is_refused(
    pooled_db: Any,
) -> None:
    fakedb.threadsafety = 0
    with pytest.raises(pooled_db.NotSupportedError):
        pool = pooled_db.PooledDB(lambda: fakedb.connect())
        pool.connection()


def test_a_pool_creator_that_is_neither_module_nor_callable_is_refused(
    pooled_db: Any,
) -> None:
    with pytest.raises(TypeError):
        pool = pooled_db.PooledDB(42)
        pool.connection()
    assert fakedb.counts.connects == 0


def test_pooled_db_takes_the_dbutils_positional_parameters(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(
        fakedb, 0, 1, 0, 2, False, 2, ["set role app"], False, fakedb.ProgrammingError, 0
    )
    first, second = pool.connection(), pool.connection()
    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.connection()
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    assert number_of(first) == 1
    first.close()
    second.close()

    assert fakedb.counts.closes == 1  # maxcached=1
    assert raw(1).statements == ["set role app", "select connection_number"]
    assert fakedb.counts.rollbacks == 0  # reset=False
    assert fakedb.counts.pings == 0


def test_a_pooled_connection_passes_dbapi_and_threadsafety_through(pooled_db: Any) -> None:
    db = pooled_db.PooledDB(fakedb).connection()

    assert db.dbapi() is fakedb
    assert db.threadsafety() == 2


def test_an_error_inside_a_with_block_returns_the_connection_rolled_back(
    pooled_db: Any,
) -> None:
    pool = pooled_db.PooledDB(fakedb, maxconnections=1)
    with pytest.raises(ZeroDivisionError), pool.connection() as db:
        db.cursor().execute("update account set balance = 0")
        _ = 1 / 0

    assert fakedb.counts.rollbacks == 1
    assert not raw(1).transaction_open
    assert number_of(pool.connection()) == 1


def test_a_shared_connection_is_invalid_after_close(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=1)
    first, second = pool.connection(), pool.connection()
    first.close()
    first.close()

    with pytest.raises(pooled_db.InvalidConnectionError):
        first.cursor()
    assert number_of(second) == 1


def test_shared_connections_count_against_maxconnections(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb, maxshared=2, maxconnections=2)
    shared = [pool.connection() for _ in range(4)]

    with pytest.raises(pooled_db.TooManyConnectionsError):
        pool.dedicated_connection()
    assert fakedb.counts.connects == 2
    assert len(shared) == 4


def test_a_closed_pool_stays_usable(pooled_db: Any) -> None:
    pool = pooled_db.PooledDB(fakedb)
    held = pool.connection()
    pool.connection().close()
    pool.close()
    held.close()

    with pool.connection() as db:
        assert number_of(db) in {1, 3}
    assert raw(2).closed


def test_pooled_db_exports_the_dbutils_error_classes(pooled_db: Any) -> None:
    for name in ("InvalidConnectionError", "NotSupportedError", "TooManyConnectionsError"):
        assert issubclass(getattr(pooled_db, name), pooled_db.PooledDBError), name
    assert issubclass(pooled_db.PooledDBError, Exception)


def test_pooled_db_keeps_the_deprecated_error_aliases(pooled_db: Any) -> None:
    assert pooled_db.InvalidConnection is pooled_db.InvalidConnectionError
    assert pooled_db.TooManyConnections is pooled_db.TooManyConnectionsError


# --- PersistentDB: one connection per thread ------------------------------------------------


def test_the_same_thread_gets_the_same_connection(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb, database="app")

    assert number_of(persist.connection()) == number_of(persist.connection()) == 1
    assert fakedb.counts.connects == 1
    assert raw(1).kwargs == {"database": "app"}


@pytest.mark.timeout(20)
def test_each_thread_gets_its_own_connection(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    barrier = threading.Barrier(3, timeout=10)
    numbers: dict[int, list[int]] = {}

    def work(index: int) -> None:
        numbers[index] = [number_of(persist.connection())]
        barrier.wait()  # all three threads hold their connection at the same time
        numbers[index].append(number_of(persist.connection()))

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    assert not any(thread.is_alive() for thread in threads)
    assert sorted(first for first, _ in numbers.values()) == [1, 2, 3]
    assert all(first == again for first, again in numbers.values())


@pytest.mark.timeout(20)
def test_the_connection_of_a_finished_thread_is_closed(impl: Implementation) -> None:
    if not impl.closes_connections_of_finished_threads:
        pytest.skip(f"{impl.name} does not promise to close a finished thread's connection")
    persist = impl.persistent_db.PersistentDB(fakedb)
    thread = threading.Thread(target=lambda: number_of(persist.connection()), daemon=True)
    thread.start()
    thread.join(10)
    del thread

    assert fakedb.counts.connects == 1
    assert wait_until(lambda: raw(1).closed), "the dead thread's connection stayed open"


def test_persistent_close_is_ignored_by_default(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    persist.connection().close()

    assert fakedb.counts.closes == 0
    assert number_of(persist.connection()) == 1


def test_closing_a_persistent_connection_rolls_back_its_transaction(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    db = persist.connection()
    db.begin()
    db.cursor().execute("update account set balance = 0")
    db.close()

    assert fakedb.counts.rollbacks == 1
    assert fakedb.counts.closes == 0


def test_a_closeable_persistent_connection_is_reopened_after_close(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb, closeable=True)
    persist.connection().close()

    assert fakedb.counts.closes == 1
    assert number_of(persist.connection()) == 2


@pytest.mark.parametrize(("flag", "on_request", "on_cursor", "on_execute"), PING_FLAGS)
def test_ping_flag_decides_when_a_persistent_connection_pings(
    persistent_db: ModuleType, flag: int, on_request: int, on_cursor: int, on_execute: int
) -> None:
    persist = persistent_db.PersistentDB(fakedb, ping=flag)
    db = persist.connection()
    assert fakedb.counts.pings == on_request  # even a fresh connection is checked
    cursor = db.cursor()
    assert fakedb.counts.pings == on_cursor
    cursor.execute("select 1")
    assert fakedb.counts.pings == on_execute


def test_every_persistent_request_pings(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb, ping=1)
    for _ in range(3):
        persist.connection()

    assert fakedb.counts.pings == 3
    assert fakedb.counts.connects == 1


def test_a_dead_persistent_connection_is_replaced_on_request(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    persist.connection()
    raw(1).die()

    assert number_of(persist.connection()) == 2
    assert raw(1).closed


def test_persistent_connections_honour_maxusage_and_setsession(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb, maxusage=1, setsession=["set role app"])
    numbers = [number_of(persist.connection()) for _ in range(2)]

    assert numbers == [1, 2]
    assert raw(2).statements == ["set role app", "select connection_number"]


def test_persistent_failures_decide_which_errors_are_retried(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb, failures=fakedb.ProgrammingError)
    cursor = persist.connection().cursor()
    fakedb.fail_next(1, "execute", fakedb.ProgrammingError)
    cursor.execute("select 1")
    fakedb.fail_next(1, "execute", fakedb.OperationalError)
    with pytest.raises(fakedb.OperationalError):
        cursor.execute("select 2")


def test_persistent_connection_context_commits_and_keeps_the_connection(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    with persist.connection() as db:
        db.cursor().execute("insert into t values (1)")

    assert fakedb.counts.commits == 1
    assert fakedb.counts.closes == 0
    assert number_of(persist.connection()) == 1


def test_shareable_and_dedicated_requests_get_the_thread_connection(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb)
    numbers = {
        number_of(persist.connection(shareable=True)),
        number_of(persist.connection(shareable=False)),
        number_of(persist.dedicated_connection()),
    }

    assert numbers == {1}


def test_steady_connection_of_persistent_db_is_a_separate_connection(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(fakedb)

    assert number_of(persist.connection()) == 1
    assert number_of(persist.steady_connection()) == 2
    assert number_of(persist.connection()) == 1


@pytest.mark.timeout(20)
def test_a_threadlocal_class_can_be_given(persistent_db: ModuleType) -> None:
    persist = persistent_db.PersistentDB(fakedb, threadlocal=threading.local)
    numbers: list[int] = []
    thread = threading.Thread(
        target=lambda: numbers.append(number_of(persist.connection())), daemon=True
    )
    thread.start()
    thread.join(10)

    assert numbers == [1]
    assert number_of(persist.connection()) == 2


def test_persistent_db_refuses_a_driver_with_threadsafety_zero(
    persistent_db: ModuleType,
) -> None:
    fakedb.threadsafety = 0
    with pytest.raises(persistent_db.NotSupportedError):
        persist = persistent_db.PersistentDB(fakedb)
        persist.connection()


def test_persistent_db_takes_the_dbutils_positional_parameters(
    persistent_db: ModuleType,
) -> None:
    persist = persistent_db.PersistentDB(
        fakedb, 1, ["set role app"], fakedb.ProgrammingError, 0, True, threading.local
    )
    numbers = [number_of(persist.connection()) for _ in range(2)]
    persist.connection().close()

    assert numbers == [1, 2]
    assert raw(2).statements == ["set role app", "select connection_number"]
    assert fakedb.counts.pings == 0
    assert raw(2).closed  # closeable=True


def test_a_creator_function_of_a_threadsafety_zero_driver_gets_no_persistent_connection(
    persistent_db: ModuleType,
) -> None:
    fakedb.threadsafety = 0
    with pytest.raises(persistent_db.NotSupportedError):
        persist = persistent_db.PersistentDB(lambda: fakedb.connect())
        persist.connection()


def test_persistent_db_exports_the_dbutils_error_classes(persistent_db: ModuleType) -> None:
    assert issubclass(persistent_db.NotSupportedError, persistent_db.PersistentDBError)
