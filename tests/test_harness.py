"""The test harness itself: real servers answer, every worker has a database of its own, an
owned server can be stopped, restarted and stripped of its sessions, a missing server is
reported (and fails the run under CI), and nothing is left running afterwards."""

from __future__ import annotations

import os
import signal
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import psycopg2
import pymysql
import pytest
from servers import Database, MysqlServer, PostgresServer, ServerUnavailable, in_ci, supply_key

pytestmark = pytest.mark.timeout(60)

MYSQL_LOST = (pymysql.err.OperationalError, pymysql.err.InterfaceError)


def this_workers_database() -> str:
    return f"test_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"


def fetch_one(conn: object, sql: str) -> tuple[object, ...]:
    with conn.cursor() as cur:  # type: ignore[attr-defined]
        cur.execute(sql)
        row: tuple[object, ...] = cur.fetchone()
        return row


# --- shared servers -------------------------------------------------------------------------


def test_postgres_answers_select_one_and_knows_its_version(postgres: Database) -> None:
    conn = postgres.connect()
    try:
        assert fetch_one(conn, "SELECT 1, current_setting('server_version')") == (
            1,
            postgres.server.version,
        )
    finally:
        conn.close()


def test_mysql_answers_select_one_and_knows_its_version(mysql: Database) -> None:
    conn = mysql.connect()
    try:
        assert fetch_one(conn, "SELECT 1, VERSION()") == (1, mysql.server.version)
        assert "MariaDB" in mysql.server.version or mysql.server.source == "external"
    finally:
        conn.close()


def test_each_worker_works_in_a_database_of_its_own(postgres: Database, mysql: Database) -> None:
    assert postgres.name == mysql.name == this_workers_database()
    pg = postgres.connect()
    my = mysql.connect()
    try:
        assert fetch_one(pg, "SELECT current_database()") == (this_workers_database(),)
        assert fetch_one(my, "SELECT DATABASE()") == (this_workers_database(),)
    finally:
        pg.close()
        my.close()


def test_postgres_kwargs_and_dsn_suit_psycopg2_and_psycopg(postgres: Database) -> None:
    assert set(postgres.kwargs) >= {"host", "port", "user", "dbname"}
    assert postgres.dsn.startswith("postgresql://")
    for conn in (
        psycopg2.connect(**postgres.kwargs),
        psycopg2.connect(postgres.dsn),
        psycopg.connect(**postgres.kwargs),
        psycopg.connect(postgres.dsn),
    ):
        try:
            assert fetch_one(conn, "SELECT current_database()") == (postgres.name,)
        finally:
            conn.close()


def test_mysql_kwargs_and_dsn_name_the_same_database(mysql: Database) -> None:
    kwargs = mysql.kwargs
    assert set(kwargs) >= {"host", "port", "user", "password", "database"}
    assert "autocommit" not in kwargs
    url = urlsplit(mysql.dsn)
    assert (url.scheme, url.hostname, url.port, url.username, url.path) == (
        "mysql",
        kwargs["host"],
        kwargs["port"],
        kwargs["user"],
        f"/{mysql.name}",
    )
    conn = pymysql.connect(**kwargs)
    try:
        assert fetch_one(conn, "SELECT DATABASE(), @@autocommit") == (mysql.name, 0)
    finally:
        conn.close()


def test_connect_gives_autocommit_connections(postgres: Database, mysql: Database) -> None:
    pg = postgres.connect()
    my = mysql.connect()
    try:
        assert pg.autocommit is True
        assert fetch_one(my, "SELECT @@autocommit") == (1,)
    finally:
        pg.close()
        my.close()


def test_kwargs_are_a_fresh_dict_each_time(postgres: Database) -> None:
    postgres.kwargs["dbname"] = "elsewhere"
    assert postgres.kwargs["dbname"] == postgres.name


def test_the_shared_servers_refuse_to_be_stopped(postgres: Database, mysql: Database) -> None:
    with pytest.raises(RuntimeError, match="owned_postgres"):
        postgres.server.stop()
    with pytest.raises(RuntimeError, match="owned_mysql"):
        mysql.server.stop()
    assert fetch_one(postgres.connect(), "SELECT 1") == (1,)


# --- owned servers --------------------------------------------------------------------------


def test_owned_postgres_is_a_server_apart_from_the_shared_one(
    owned_postgres: Database, postgres: Database
) -> None:
    assert (owned_postgres.kwargs["host"], owned_postgres.kwargs["port"]) != (
        postgres.kwargs["host"],
        postgres.kwargs["port"],
    )
    assert owned_postgres.name == this_workers_database()
    assert fetch_one(owned_postgres.connect(), "SELECT current_database()") == (
        owned_postgres.name,
    )


def test_owned_postgres_restart_breaks_old_sessions_and_lets_new_ones_in(
    owned_postgres: Database,
) -> None:
    server = owned_postgres.server
    old = owned_postgres.connect()
    (started_before,) = fetch_one(old, "SELECT pg_postmaster_start_time()")
    pid_before = server.pid
    server.restart()
    with pytest.raises(psycopg2.OperationalError):
        fetch_one(old, "SELECT 1")
    new = owned_postgres.connect()
    try:
        (started_after,) = fetch_one(new, "SELECT pg_postmaster_start_time()")
        assert started_after > started_before
        assert server.pid != pid_before
    finally:
        new.close()


def test_owned_postgres_terminate_backends_kills_every_other_session(
    owned_postgres: Database,
) -> None:
    victims = [owned_postgres.connect(), psycopg.connect(**owned_postgres.kwargs)]
    assert owned_postgres.server.terminate_backends() >= len(victims)
    with pytest.raises(psycopg2.OperationalError):
        fetch_one(victims[0], "SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        fetch_one(victims[1], "SELECT 1")
    assert fetch_one(owned_postgres.connect(), "SELECT 1") == (1,)


def test_owned_postgres_stop_refuses_connections_until_started_again(
    owned_postgres: Database,
) -> None:
    owned_postgres.server.stop()
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(**owned_postgres.kwargs, connect_timeout=5)
    owned_postgres.server.start()
    assert fetch_one(owned_postgres.connect(), "SELECT 1") == (1,)


def test_owned_mysql_restart_breaks_old_sessions_and_lets_new_ones_in(
    owned_mysql: Database,
) -> None:
    server = owned_mysql.server
    old = owned_mysql.connect()
    pid_before = server.pid
    server.restart()
    with pytest.raises(MYSQL_LOST):
        fetch_one(old, "SELECT 1")
    new = owned_mysql.connect()
    try:
        (uptime,) = fetch_one(
            new,
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS"
            " WHERE VARIABLE_NAME = 'UPTIME'",
        )
        assert int(str(uptime)) < 30
        assert server.pid != pid_before
        assert fetch_one(new, "SELECT DATABASE()") == (owned_mysql.name,)
    finally:
        new.close()


def test_owned_mysql_terminate_backends_kills_every_other_session(owned_mysql: Database) -> None:
    victims = [owned_mysql.connect(), pymysql.connect(**owned_mysql.kwargs)]
    assert owned_mysql.server.terminate_backends() >= len(victims)
    for victim in victims:
        with pytest.raises(MYSQL_LOST):
            fetch_one(victim, "SELECT 1")
    assert fetch_one(owned_mysql.connect(), "SELECT 1") == (1,)


def test_owned_mysql_stop_refuses_connections_until_started_again(owned_mysql: Database) -> None:
    owned_mysql.server.stop()
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(**owned_mysql.kwargs, connect_timeout=5)
    owned_mysql.server.start()
    assert fetch_one(owned_mysql.connect(), "SELECT 1") == (1,)


def test_a_forked_child_cleaning_up_leaves_the_servers_alone(
    owned_postgres: Database, postgres: Database, pytestconfig: pytest.Config
) -> None:
    # A child that exits through sys.exit() runs the harness's atexit handler.
    pid = os.fork()
    if pid == 0:
        try:
            pytestconfig.stash[supply_key].cleanup()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert owned_postgres.server.running
    for database in (owned_postgres, postgres):
        conn = database.connect()
        try:
            assert fetch_one(conn, "SELECT 1") == (1,)
        finally:
            conn.close()


def test_a_forked_child_dies_of_sigterm_as_usual() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- whole sessions, run in a subprocess ----------------------------------------------------


@pytest.fixture
def inner_session(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A pytest session of its own, loading the harness, with throwaway servers only and a
    TMPDIR of its own (returned), so that what it leaves behind can be found."""
    for name in ("FORKSAFE_TEST_POSTGRES", "FORKSAFE_TEST_MYSQL", "CI"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("PYTEST_XDIST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))
    tmpdir = Path(tempfile.mkdtemp(prefix="harness-", dir="/tmp"))
    tmpdir.chmod(0o755)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    pytester.makeconftest('pytest_plugins = ["servers"]')
    yield tmpdir
    os.rmdir(tmpdir)  # fails the test if the inner session left anything in it


def processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.timeout(180)
def test_under_xdist_every_worker_gets_its_own_database_and_nothing_is_left_running(
    pytester: pytest.Pytester, inner_session: Path
) -> None:
    try:
        PostgresServer.binaries()
        MysqlServer.binaries()
    except ServerUnavailable as exc:
        if in_ci():
            pytest.fail(f"CI=true, and throwaway servers need their binaries: {exc}")
        pytest.skip(f"throwaway servers need their binaries: {exc}")
    names = inner_session / "names"
    pytester.makepyfile(
        test_names=textwrap.dedent(
            f"""
            def test_record_the_database_names(postgres, mysql, owned_postgres):
                with open({str(names)!r}, "a") as out:
                    out.write(f"{{postgres.name}} {{mysql.name}} {{owned_postgres.name}}\\n")
            """
        )
    )
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "*forksafe test servers: PostgreSQL * (throwaway) at 127.0.0.1:*, ready in * s*",
            "*forksafe test servers: MariaDB * (throwaway) at 127.0.0.1:*",
            "*forksafe test servers: owned servers started: 2 PostgreSQL*",
        ]
    )
    lines = sorted(names.read_text().splitlines())
    names.unlink()
    assert lines == ["test_gw0 test_gw0 test_gw0", "test_gw1 test_gw1 test_gw1"]
    assert processes_mentioning(str(inner_session)) == []


def test_a_missing_server_skips_its_tests_with_a_summary_line_saying_why(
    pytester: pytest.Pytester, inner_session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_needs_postgres(postgres):\n    pass\n")
    monkeypatch.setenv("FORKSAFE_TEST_POSTGRES_BIN", str(pytester.mkdir("no-binaries")))
    result = pytester.runpytest_subprocess("-n", "0", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*forksafe test servers: 1 test(s) SKIPPED for want of PostgreSQL: no initdb and post*"]
    )


def test_a_missing_server_fails_the_run_under_ci(
    pytester: pytest.Pytester, inner_session: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("def test_needs_mysql(mysql):\n    pass\n")
    monkeypatch.setenv("FORKSAFE_TEST_MARIADB_BIN", str(pytester.mkdir("no-binaries")))
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-n", "0", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*forksafe test servers: 1 test(s) FAILED (CI=true) for want of MariaDB: no mariadbd*"]
    )
