"""Pools across fork(), checked from the server's side on real PostgreSQL and MariaDB.

A parent uses a pool, forks children that use it (or not) and exit in various ways;
the server must show that no child ever used a parent's session, every query answered
its own process, the parent's sessions survived untouched, and the children's sessions
are gone once they exit.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fakedb
import pytest
from fork_scenarios import use_pool as use_pool
from forking import fork_child

import forksafe
from forksafe import ForkedConnectionError, PersistentDB, PooledDB, drivers

HERE = Path(__file__).parent

pytestmark = pytest.mark.timeout(120)


@dataclass
class Target:
    """A driver pointed at a real server, with the SQL to ask the server about sessions."""

    name: str
    module: Any
    kwargs: dict[str, Any]
    session_sql: str
    admin: Callable[[], Any]
    alive_sql: str

    def alive(self, session_ids: list[int]) -> set[int]:
        """Which of these sessions does the server still have?"""
        if not session_ids:
            return set()
        admin = self.admin()
        try:
            cur = admin.cursor()
            marks = ",".join(str(int(s)) for s in session_ids)
            cur.execute(self.alive_sql.format(ids=marks))
            return {int(row[0]) for row in cur.fetchall()}
        finally:
            admin.close()


@pytest.fixture(params=["psycopg2", "psycopg", "pymysql"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "pymysql":
        import pymysql

        db = request.getfixturevalue("mysql")
        yield Target(
            "pymysql",
            pymysql,
            dict(db.kwargs),
            "SELECT CONNECTION_ID(), %s",
            db.connect,
            "SELECT id FROM information_schema.processlist WHERE id IN ({ids})",
        )
        return
    module = pytest.importorskip(request.param)
    db = request.getfixturevalue("postgres")
    yield Target(
        request.param,
        module,
        dict(db.kwargs),
        "SELECT pg_backend_pid(), %s",
        db.connect,
        "SELECT pid FROM pg_stat_activity WHERE pid IN ({ids})",
    )


def run_scenario(scenario: str, target: Target, mode: str = "") -> dict[str, Any]:
    """Run one scenario of fork_scenarios.py in a fresh interpreter; its JSON answer."""
    argv = [sys.executable, str(HERE / "fork_scenarios.py"), scenario, target.name]
    argv += [json.dumps(target.kwargs), mode]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=HERE)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def assert_isolated(target: Target, seen: dict[str, Any]) -> None:
    """What the server must show after any scenario."""
    parent, children = seen["parent"], seen["children"]
    assert not set(children) & set(parent), "a child was handed the parent's session"
    assert seen["after"] == parent, "the parent's sessions did not survive the children"
    assert seen["parent_alive"] == sorted(parent), "the server lost a parent session"
    assert seen["children_alive"] == [], "children's sessions outlived them"


@pytest.mark.parametrize("mode", ["use+os._exit", "idle+sys.exit", "idle+os._exit", "use+sys.exit"])
def test_children_never_share_or_kill_the_parents_sessions(target: Target, mode: str) -> None:
    seen = run_scenario("matrix", target, mode)
    assert_isolated(target, seen)
    assert seen["reconnects"] == 0
    if mode.startswith("use"):
        assert len(seen["children"]) == 8


def test_child_that_deletes_the_pool_and_collects_leaves_the_parent_alone(
    target: Target,
) -> None:
    assert_isolated(target, run_scenario("del_pool", target))


def test_grandchildren_get_their_own_sessions(target: Target) -> None:
    seen = run_scenario("grandchild", target)
    assert_isolated(target, seen)
    assert len(set(seen["children"])) == 2
    assert seen["child_kept_its_session"], "the grandchild killed the child's session"


def test_connection_checked_out_mid_transaction_is_inert_in_the_child(target: Target) -> None:
    seen = run_scenario("checked_out", target)
    assert_isolated(target, seen)
    assert "fork()" in seen["error"] and "pool" in seen["error"]


def test_persistent_connections_are_per_process(target: Target) -> None:
    assert_isolated(target, run_scenario("persistent", target))


def _attempt(use: Callable[[], object]) -> str:
    """ "refused" if ``use()`` raises ForkedConnectionError, "worked" if it returns."""
    try:
        use()
    except ForkedConnectionError:
        return "refused"
    return "worked"


def _in_children(uses: dict[str, Callable[[], object]], raw: bool) -> dict[str, str]:
    """Each use as the first thing a forked child of its own does, and its outcome."""
    return {name: fork_child(lambda use=use: _attempt(use), raw=raw) for name, use in uses.items()}


def test_pid_check_protects_a_fork_that_skips_python_hooks(target: Target) -> None:
    """Like uWSGI's C-level fork: no os.register_at_fork hook runs in the child."""
    pool = PooledDB(target.module, 2, **target.kwargs)
    parent = use_pool(pool, target.name)
    got = fork_child(lambda: use_pool(pool, target.name), exit_with="os._exit", raw=True)
    assert not set(got) & set(parent)
    assert use_pool(pool, target.name) == parent


def test_connections_from_before_a_fork_that_skips_python_hooks_refuse_to_work(
    target: Target,
) -> None:
    """No hook runs in such a child (uWSGI forks from C), yet the first statement,
    cursor or commit on a connection held across the fork refuses, on the fast paths and
    on the checked ones (ping=7), pooled and persistent alike; the parent's sessions are
    untouched."""
    pool = PooledDB(target.module, **target.kwargs)
    checked = PooledDB(target.module, ping=7, **target.kwargs)
    persistent = PersistentDB(target.module, **target.kwargs)
    held = {"pooled": pool.connection(), "ping=7": checked.connection()}
    held["persistent"] = persistent.connection()

    def session(con: Any) -> int:
        cursor = con.cursor()
        cursor.execute(target.session_sql, ("parent",))
        return int(cursor.fetchone()[0])

    sessions = {name: session(con) for name, con in held.items()}
    cursor = held["pooled"].cursor()
    uses: dict[str, Callable[[], object]] = {
        "execute() on a cursor from before": lambda: cursor.execute(target.session_sql, (1,)),
        "cursor()": held["pooled"].cursor,
        "commit()": held["pooled"].commit,
        "cancel()": held["pooled"].cancel,
        "cursor() with ping=7": held["ping=7"].cursor,
        "cursor() of a persistent connection": held["persistent"].cursor,
    }

    assert _in_children(uses, raw=True) == dict.fromkeys(uses, "refused")
    assert {name: session(con) for name, con in held.items()} == sessions
    for con in held.values():
        con.close()
    persistent.connection()._close()
    pool.close()
    checked.close()


def _server_side_cursor(target: Target, con: Any) -> Any:
    """A cursor whose rows stay on the server until fetched, over ``con``'s session."""
    if target.name == "pymysql":
        import pymysql.cursors

        cursor = con.cursor(pymysql.cursors.SSCursor)
        cursor.execute("SELECT seq FROM seq_1_to_1000")
    else:
        cursor = con.cursor("before_fork") if target.name == "psycopg2" else con.cursor(name="x")
        cursor.execute("SELECT generate_series(1, 1000)")
    return cursor


@pytest.mark.parametrize("raw", [False, True], ids=["os.fork", "fork without hooks"])
def test_a_server_side_cursor_from_before_a_fork_reads_nothing_in_the_child(
    target: Target, raw: bool
) -> None:
    """Fetching, scrolling or closing a server-side cursor talks to its session: a child
    doing it would read the parent's rows off the parent's socket (or, after the fork
    hook, off /dev/null). Each use is refused, and close() does nothing."""
    pool = PooledDB(target.module, **target.kwargs)
    held = pool.connection()
    cursor = _server_side_cursor(target, held)
    assert cursor.fetchone()[0] == 1
    rows = iter(cursor)
    uses: dict[str, Callable[[], object]] = {
        "fetchone()": cursor.fetchone,
        "fetchmany()": lambda: cursor.fetchmany(5),
        "fetchall()": cursor.fetchall,
        "iteration": lambda: next(iter(cursor)),
        "an iterator from before the fork": lambda: next(rows),
        "scroll() (forwarded)": lambda: cursor.scroll(10),
    }

    assert _in_children(uses, raw=raw) == dict.fromkeys(uses, "refused")
    assert _in_children({"close()": cursor.close}, raw=raw) == {"close()": "worked"}
    assert cursor.fetchone()[0] == 2, "a child moved the parent's cursor"
    cursor.close()
    held.close()
    pool.close()


def test_cancel_is_refused_in_a_child(target: Target) -> None:
    """libpq's cancel reaches the session through a socket of its own, which blinding
    the inherited one cannot stop."""
    pool = PooledDB(target.module, **target.kwargs)
    held = pool.connection()

    assert _in_children({"cancel()": held.cancel}, raw=False) == {"cancel()": "refused"}
    held.close()
    pool.close()


_WITHOUT_WIPED_PAGES = """
import mmap, sqlite3, sys
sys.path[:0] = [{tests!r}]

mmap.MADV_WIPEONFORK = None  # as on a kernel that cannot wipe pages in a child
from forksafe import ForkedConnectionError, PooledDB, fork
from forking import fork_child

assert type(fork.armed) is bytearray
pool = PooledDB(sqlite3, database=":memory:", check_same_thread=False)
held = pool.connection()

def child():
    try:
        held.cursor().execute("SELECT 1")
    except ForkedConnectionError:
        refused = True
    else:
        refused = False
    with pool.connection() as own:
        cursor = own.cursor()
        cursor.execute("SELECT 2")
        return [refused, cursor.fetchone()[0]]

assert fork_child(child) == [True, 2]
cursor = held.cursor()
cursor.execute("SELECT 3")
assert cursor.fetchone()[0] == 3
print("ok")
"""


def test_without_wiped_pages_the_fork_hook_still_makes_connections_refuse() -> None:
    """Where the kernel cannot wipe a page in a child, the fork hook writes the child's
    token instead: a connection from before the fork refuses, the pool opens a new one."""
    script = _WITHOUT_WIPED_PAGES.format(tests=str(HERE))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=HERE
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


_FINALISER_TAKES_ANOTHER_POOLS_LOCK = """
import os, sys, threading, time
sys.path[:0] = [{tests!r}]
import fakedb, forksafe

first, second = forksafe.PooledDB(fakedb, leaktime=60), forksafe.PooledDB(
    fakedb, leaktime=60, database="other"
)
x, y = [p for p in forksafe.fork._snapshot() if p in (first, second)]  # the hook's order
dropped = [x.connection()]  # returned by its finaliser, which takes x's lock
forked = threading.Event()

def forker():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    forked.set()

def holder():
    # Like the collector running inside y's critical section: while holding y's lock,
    # drop x's connection, once the forking thread has taken x's lock.
    with y._mutex:
        threading.Thread(target=forker, daemon=True).start()
        deadline = time.monotonic() + 10
        while x._mutex.acquire(blocking=False):
            x._mutex.release()
            if time.monotonic() > deadline:
                raise SystemExit("the fork hook never took the first pool's lock")
        dropped.clear()

threading.Thread(target=holder, daemon=True).start()
print("forked" if forked.wait(20) else "deadlock", flush=True)
os._exit(0)
"""


def test_fork_while_a_finaliser_takes_another_pools_lock_never_deadlocks() -> None:
    """The prepare hook takes every pool's lock; a dropped connection's finaliser, run
    while its thread holds one pool's lock, takes its own pool's: the hook must not hold
    one lock while it waits for another."""
    script = _FINALISER_TAKES_ANOTHER_POOLS_LOCK.format(tests=str(HERE))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=HERE
    )
    assert done.stdout.strip() == "forked", done.stdout + done.stderr


_SQLITE_CHILD_EXITS = """
import sqlite3, sys
sys.path[:0] = [{tests!r}]
from forking import fork_child
from forksafe import PooledDB

path, raw = {path!r}, {raw!r}
pool = PooledDB(sqlite3, database=path, check_same_thread=False)
db = pool.connection()
cursor = db.cursor()
cursor.execute("PRAGMA cache_size=2")  # spill the transaction's pages to the file
for _ in range(300):
    cursor.execute("INSERT INTO t VALUES (?)", ("y" * 2000,))

def child():
    db.close()  # given back in the child: discarded, never closed
    return True

assert fork_child(child, exit_with="sys.exit", raw=raw)
db.commit()
db.close()
pool.close()
"""


@pytest.mark.parametrize("raw", [False, True], ids=["os.fork", "no Python hooks"])
def test_a_child_exiting_with_sys_exit_leaves_the_parents_sqlite_transaction_alone(
    tmp_path: Path, raw: bool
) -> None:
    """The child's interpreter shutdown clears module globals; the inherited SQLite
    connection must still never be closed there, or its rollback would undo the
    parent's open write transaction on disk. (In a fresh interpreter: sys.exit() in a
    child forked from the test process would unwind the test runner.)"""
    import sqlite3

    path = tmp_path / "parent.db"
    setup = sqlite3.connect(path)
    setup.execute("CREATE TABLE t (x TEXT)")
    setup.commit()
    setup.close()
    code = _SQLITE_CHILD_EXITS.format(tests=str(HERE), path=str(path), raw=raw)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert check.execute("SELECT count(*) FROM t").fetchone() == (300,)
    check.close()


def test_a_fork_that_skips_python_hooks_while_a_pool_is_being_built_does_not_hang() -> None:
    """Building a pool holds the registry lock for a moment; a C-level fork at that
    moment (the builder preempted) copies it taken, by a thread the child does not have.
    Here this thread holds it across the fork: the child never resumes it either."""

    def child() -> int:
        pool = PooledDB(sqlite3, database=":memory:")
        with pool.connection() as db:
            cursor = db.cursor()
            cursor.execute("SELECT 7")
            return int(cursor.fetchone()[0])

    with forksafe.fork.process_lock():
        assert fork_child(child, raw=True, timeout=10) == 7


@contextmanager
def _held_by_another_thread(lock: Any) -> Iterator[None]:
    """Hold ``lock`` in a thread of its own for the duration of the block."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            held.set()
            release.wait()

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait()
    try:
        yield
    finally:
        release.set()
        thread.join()


def _fork_again() -> int:
    pid = os.fork()  # runs the fork hooks, in a process whose locks were copied taken
    if pid == 0:
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("lock", ["registry", "pool"])
def test_a_child_of_a_fork_without_hooks_can_fork_again(lock: str) -> None:
    """Another thread of the parent held a lock the fork hook takes (the registry's, or
    an unused pool's) when a fork without hooks copied it: the child's own os.fork()
    must not wait for it."""
    pool = PooledDB(sqlite3, database=":memory:")
    held = forksafe.fork._lock_of_this_process() if lock == "registry" else pool._mutex
    with _held_by_another_thread(held):
        assert fork_child(_fork_again, raw=True, timeout=10) == 0
    pool.close()


def test_commit_on_a_share_inherited_through_a_fork_without_hooks_raises() -> None:
    """The share's commit() must refuse, not wake the parent's waiters through the
    parent's copy of the pool lock (taken by a thread the child does not have)."""
    pool = PooledDB(fakedb, maxshared=1, maxconnections=1, blocking=True)
    share = pool.connection()
    share.begin()
    waiter = threading.Thread(target=lambda: pool.connection().close())
    waiter.start()  # waits for the transaction to end
    while not pool._waiting:
        time.sleep(0.01)

    with _held_by_another_thread(pool._mutex):
        assert _in_children({"commit()": share.commit}, raw=True) == {"commit()": "refused"}
    share.commit()
    waiter.join(timeout=10)
    share.close()
    pool.close()


def test_after_fork_is_idempotent_in_a_fork_that_skips_python_hooks(target: Target) -> None:
    pool = PooledDB(target.module, 1, **target.kwargs)
    parent = use_pool(pool, target.name, 1)

    def child() -> list[int]:
        forksafe.after_fork()
        forksafe.after_fork()
        first = use_pool(pool, target.name, 1)
        forksafe.after_fork()
        assert use_pool(pool, target.name, 1) == first, "a second after_fork() reset the pool"
        return first

    got = fork_child(child, raw=True)
    assert got != parent
    assert use_pool(pool, target.name, 1) == parent


def test_fork_while_another_thread_churns_the_pool_never_deadlocks(target: Target) -> None:
    pool = PooledDB(target.module, 1, maxconnections=2, blocking=True, **target.kwargs)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            with pool.connection():
                pass

    threads = [threading.Thread(target=churn) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(200):
            fork_child(lambda: pool.stats()["in_use"], timeout=10)
        got = fork_child(lambda: use_pool(pool, target.name, 1), timeout=10)
        assert got
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def test_forking_with_a_thread_waiting_for_a_connection_gives_the_child_a_working_pool(
    target: Target,
) -> None:
    pool = PooledDB(target.module, maxconnections=1, blocking=True, **target.kwargs)
    held = pool.connection()
    waiter_got: list[int] = []
    waiter = threading.Thread(target=lambda: waiter_got.extend(use_pool(pool, target.name, 1)))
    waiter.start()
    try:
        got = fork_child(lambda: use_pool(pool, target.name, 1), timeout=10)
        assert got
    finally:
        held.close()
        waiter.join(timeout=10)
    assert waiter_got


@pytest.mark.parametrize("package", ["multiprocessing", "multiprocess"])
def test_fork_context_process_pools_give_each_worker_its_own_session(
    target: Target, package: str
) -> None:
    context = pytest.importorskip(package).get_context("fork")
    pool = PooledDB(target.module, 1, **target.kwargs)
    parent = use_pool(pool, target.name, 1)
    _inherited[:] = [pool, target]  # reaches the workers through fork, not pickling
    try:
        with context.Pool(2) as workers:
            seen = workers.map(_session_in_worker, range(8), chunksize=1)
        assert parent[0] not in seen
        assert len(set(seen)) <= 2
        assert use_pool(pool, target.name, 1) == parent
    finally:
        _inherited.clear()
        pool.close()


_inherited: list[Any] = []


def _session_in_worker(_: int) -> int:
    pool, target = _inherited
    return use_pool(pool, target.name, 1)[0]


def _fd_target(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_fork_hook_blinds_every_inherited_socket_before_the_pool_is_used(
    target: Target,
) -> None:
    """Idle and checked-out sockets alike point at /dev/null in the child at once."""
    pool = PooledDB(target.module, 2, **target.kwargs)
    pool.warm()
    held = pool.connection()
    fds = [drivers.socket_fd(con._con) for con in [*pool._idle, held._con]]
    assert all(fd is not None for fd in fds)
    parent = {fd: _fd_target(fd) for fd in fds}

    def child() -> dict[str, Any]:
        blinded = {fd: _fd_target(fd) for fd in fds}
        return {"blinded": blinded, "session": use_pool(pool, target.name, 1)}

    try:
        got = fork_child(child)
        assert set(got["blinded"].values()) == {os.devnull}
        assert all(path.startswith("socket:") for path in parent.values())
        assert {fd: _fd_target(fd) for fd in fds} == parent
        assert got["session"] != use_pool(pool, target.name, 1)
    finally:
        held.close()
        pool.close()


def test_the_fork_hook_leaves_a_reused_descriptor_alone(tmp_path: Path) -> None:
    """A driver that replaced its socket left a stale number; whatever now has it is kept."""
    first, peer = socket.socketpair()
    drivers.track(first)
    stale = first.fileno()
    first.close()
    peer.close()
    with open(tmp_path / "kept", "w") as reused:
        assert reused.fileno() == stale, "the descriptor number was not reused"
        try:
            got = fork_child(lambda: _fd_target(stale))
        finally:
            drivers.untrack(first)
    assert got == str(tmp_path / "kept")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_fork_hook_opens_dev_null_again_when_its_descriptor_was_taken(
    tmp_path: Path,
) -> None:
    """forksafe keeps one descriptor on /dev/null open for its fork hook; a process that
    closed it (closing every descriptor, as daemons do) and reused the number keeps that
    file, and the sockets are still blinded."""
    sock, peer = socket.socketpair()
    drivers.track(sock)
    null = drivers._devnull()
    assert null is not None and _fd_target(null[0]) == os.devnull
    os.close(null[0])
    try:
        with open(tmp_path / "mine", "w") as mine:
            assert mine.fileno() == null[0], "the descriptor number was not reused"
            got = fork_child(lambda: [_fd_target(sock.fileno()), _fd_target(mine.fileno())])
            assert got == [os.devnull, str(tmp_path / "mine")]
            assert _fd_target(mine.fileno()) == str(tmp_path / "mine")
    finally:
        drivers.untrack(sock)
        sock.close()
        peer.close()


def test_a_connection_tracked_until_freed_leaves_the_socket_table_when_freed() -> None:
    """For connections closed by code that never untracks them (Django's)."""
    sock, peer = socket.socketpair()
    drivers.track(sock, until_freed=True)
    key = id(sock)
    assert key in drivers._sockets
    sock.close()
    del sock
    gc.collect()
    peer.close()
    assert key not in drivers._sockets


def test_blinded_descriptors_are_not_inherited_by_programs_the_child_runs() -> None:
    sock, peer = socket.socketpair()
    drivers.track(sock)
    try:
        got = fork_child(lambda: [_fd_target(sock.fileno()), os.get_inheritable(sock.fileno())])
    finally:
        drivers.untrack(sock)
        sock.close()
        peer.close()
    assert got == [os.devnull, False]


def test_discarding_a_connection_whose_socket_object_is_closed_is_quiet() -> None:
    """PyMySQL keeps a closed socket object whose fileno() is -1: no descriptor to blind."""
    sock, peer = socket.socketpair()
    sock.close()
    peer.close()
    connection = type("Connection", (), {"__module__": "pymysql.connections"})()
    connection._sock = sock
    assert drivers.socket_fd(connection) is None
    drivers.discard(connection)  # never raises


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_a_child_that_reused_an_inherited_descriptor_keeps_it_when_the_pool_resets(
    target: Target,
) -> None:
    """A pool process may close what it inherited (Celery's, say) and get the number back
    for a pipe of its own before the pool's first use; the reset must leave it alone."""
    pool = PooledDB(target.module, 1, **target.kwargs)
    pool.warm()
    (inherited,) = [drivers.socket_fd(con._con) for con in pool._idle]
    assert inherited is not None

    def child() -> dict[str, Any]:
        read_end, write_end = os.pipe()
        os.close(inherited)
        os.dup2(write_end, inherited)  # the inherited number is now this pipe's
        os.close(write_end)
        session = use_pool(pool, target.name, 1)  # resets the pool: inherited discarded
        target_now = _fd_target(inherited)
        os.write(inherited, b"still mine")
        os.close(inherited)
        return {"session": session, "fd": target_now, "read": os.read(read_end, 64).decode()}

    try:
        got = fork_child(child)
        assert got["fd"].startswith("pipe:"), got
        assert got["read"] == "still mine"
        assert got["session"] != use_pool(pool, target.name, 1)
    finally:
        pool.close()
