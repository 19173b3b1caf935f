"""The C hot paths: in use when built, out of the way when asked, same behaviour."""

from __future__ import annotations

import gc
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import types
from pathlib import Path
from typing import Any

import fakedb
import pytest

from forksafe import PooledDB, drivers, speedups
from forksafe.pooled import PooledDedicatedDBConnection


def _built() -> bool:
    try:
        from forksafe import _speedups  # noqa: F401
    except ImportError:
        return False
    return True


def test_every_hot_method_is_c_exactly_when_the_extension_is_in_use() -> None:
    pure = bool(os.environ.get("FORKSAFE_PURE_PYTHON"))
    assert speedups.active is (_built() and not pure)
    for cls, names in speedups.HOT:
        for name in names:
            method = cls.__dict__[name]
            in_c = type(method).__name__ == "method_descriptor"
            assert in_c is speedups.active, f"{cls.__name__}.{name}"
            if speedups.active:
                assert callable(cls.__dict__[f"_py_{name}"]), f"{cls.__name__}._py_{name}"


@pytest.mark.skipif(
    not os.environ.get("CI") or not shutil.which(sysconfig.get_config_var("CC").split()[0]),
    reason="checked in CI, where a C compiler is present",
)
def test_ci_builds_the_extension() -> None:
    assert _built(), "forksafe._speedups was not built although a C compiler is present"


def test_the_environment_variable_keeps_the_python_methods() -> None:
    code = "import forksafe, forksafe.speedups as s; print(s.active)"
    env = dict(os.environ, FORKSAFE_PURE_PYTHON="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_installing_twice_changes_nothing() -> None:
    before = {(cls, name): cls.__dict__[name] for cls, names in speedups.HOT for name in names}
    assert speedups.install() is speedups.active
    after = {(cls, name): cls.__dict__[name] for cls, names in speedups.HOT for name in names}
    assert after == before


class _Connection(sqlite3.Connection):
    __slots__ = ()  # no instance __dict__: the driver methods' lookups can be remembered


def test_a_driver_method_changed_between_checkouts_is_the_one_called(tmp_path: Path) -> None:
    assert _Connection.__dictoffset__ == 0
    pool = PooledDB(sqlite3, database=str(tmp_path / "methods.db"), factory=_Connection)

    def cycle() -> None:
        con = pool.connection()
        cursor = con.cursor()
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
        cursor.close()
        con.close()

    cycle()
    cycle()
    calls: list[str] = []

    def counting_cursor(self: sqlite3.Connection, *args: Any) -> Any:
        calls.append("cursor")
        return sqlite3.Connection.cursor(self, *args)

    setattr(_Connection, "cursor", counting_cursor)  # noqa: B010 (a method, for a while)
    try:
        cycle()
        assert calls == ["cursor"]
    finally:
        delattr(_Connection, "cursor")
    cycle()
    assert calls == ["cursor"]
    pool.close()


def test_a_dropped_connection_returns_without_disturbing_the_exception_being_handled() -> None:
    pool = PooledDB(fakedb)
    try:
        raise ValueError("being handled")
    except ValueError:
        pool.connection()  # dropped at once: its finaliser gives the connection back
        assert str(sys.exc_info()[1]) == "being handled"
    assert pool.stats()["idle"] == 1
    assert pool.stats()["in_use"] == 0


def test_the_quiet_probe_vouches_only_while_its_socket_has_nothing_to_read() -> None:
    """In C or in Python (whichever is in use): the probe of a PyMySQL-like connection."""
    ours, server = socket.socketpair()
    con = types.SimpleNamespace(_sock=ours)
    try:
        quiet = drivers._pymysql_quiet(con)
        assert quiet is not None
        assert quiet(con) is True
        server.sendall(b"\x00")  # what a server writes to an idle session: its goodbye
        assert quiet(con) is False
        ours.recv(1)
        assert quiet(con) is True
        con._sock = socket.socket()  # reconnected: a socket the probe does not watch
        assert quiet(con) is False
        con._sock.close()
    finally:
        ours.close()
        server.close()


@pytest.mark.skipif(not speedups.active, reason="the C extension is not in use")
def test_a_c_quiet_probe_refuses_a_negative_descriptor() -> None:
    assert drivers.native_quiet is not None
    with pytest.raises(ValueError, match="fd must be a file descriptor, got -1"):
        drivers.native_quiet(object(), -1)


def _fatal_check_that_fails(error: Exception) -> bool:
    raise ValueError(f"isfatal failed on {type(error).__name__}")


@pytest.mark.parametrize("where", ["execute", "cursor"])
def test_an_error_raised_while_handling_a_driver_error_chains_to_it(where: str) -> None:
    """The failure paths run as inside ``except``: what they raise has the driver's error
    as its context, in C as in Python."""
    fakedb.reset()
    pool = PooledDB(fakedb, isfatal=_fatal_check_that_fails)
    db = pool.connection()
    cursor = db.cursor() if where == "execute" else None
    fakedb.fail_next(1, where)
    with pytest.raises(ValueError, match="isfatal failed on OperationalError") as raised:
        cursor.execute("SELECT 1") if cursor is not None else db.cursor()
    assert isinstance(raised.value.__context__, fakedb.OperationalError)
    db.close()
    pool.close()


def test_a_checkout_whose_ping_and_cleanup_fail_raises_the_cleanup_error_chained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fakedb.reset()
    pool = PooledDB(fakedb, ping=1)
    pool.connection().close()

    def interrupted_ping(self: Any, reconnect: bool = False) -> bool:
        raise KeyboardInterrupt("ping interrupted")

    def failing_drop(self: PooledDB, con: Any) -> None:
        raise RuntimeError("drop failed")

    monkeypatch.setattr(fakedb.Connection, "ping", interrupted_ping)
    monkeypatch.setattr(PooledDB, "_drop_checkout", failing_drop)
    with pytest.raises(RuntimeError, match="drop failed") as raised:
        pool.connection()
    assert isinstance(raised.value.__context__, KeyboardInterrupt)


def test_a_proxy_dropped_without_its_fields_reports_the_error_as_python_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    proxy = PooledDedicatedDBConnection()  # no __init__ arguments: _con never set
    del proxy
    gc.collect()
    assert [type(u.exc_value) for u in unraisable] == [AttributeError]


def test_the_c_methods_keep_the_python_methods_docstrings() -> None:
    for cls, names in speedups.HOT:
        for name in names:
            if name.startswith("__"):
                continue
            method = cls.__dict__[name]
            assert method.__doc__ == cls.__dict__.get(f"_py_{name}", method).__doc__, name


def test_a_second_interpreter_imports_forksafe_with_the_python_methods() -> None:
    pytest.importorskip("_xxsubinterpreters")
    code = (
        "import forksafe, _xxsubinterpreters as si\n"
        "interp = si.create(isolated=False)\n"
        "si.run_string(interp, 'import forksafe; assert not forksafe.speedups.active')\n"
        "print('main', forksafe.speedups.active)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == f"main {speedups.active}"
