"""Fork safety over TLS: the case behind "SSL error: decryption failed or bad record mac".

A throwaway PostgreSQL owned by this module gets a self-signed certificate and ``ssl=on``
at run time; every connection then requires TLS over TCP.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from forking import fork_child
from test_fork_safety import Target, assert_isolated, run_scenario

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres]


@pytest.fixture(scope="module")
def tls_postgres(owned_postgres: Any) -> Any:
    server = owned_postgres.server
    datadir = Path(server.datadir)
    cert, key = datadir / "forksafe-test.crt", datadir / "forksafe-test.key"
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    openssl += ["-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(openssl, check=True, capture_output=True)
    stat = datadir.stat()
    for path in (cert, key):
        os.chown(path, stat.st_uid, stat.st_gid)
    key.chmod(0o600)
    admin = owned_postgres.connect()
    cursor = admin.cursor()
    cursor.execute(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
    cursor.execute(f"ALTER SYSTEM SET ssl_key_file = '{key}'")
    cursor.execute("ALTER SYSTEM SET ssl = on")
    cursor.execute("SELECT pg_reload_conf()")
    admin.close()
    return owned_postgres


@pytest.fixture(params=["psycopg2", "psycopg"])
def tls_target(request: pytest.FixtureRequest, tls_postgres: Any) -> Target:
    module = pytest.importorskip(request.param)
    kwargs = dict(tls_postgres.kwargs, host="127.0.0.1", sslmode="require")
    return Target(
        request.param,
        module,
        kwargs,
        "SELECT pg_backend_pid(), %s",
        tls_postgres.connect,
        "SELECT pid FROM pg_stat_activity WHERE pid IN ({ids})",
    )


def test_connections_really_use_tls(tls_target: Target) -> None:
    con = tls_target.module.connect(**tls_target.kwargs)
    cursor = con.cursor()
    cursor.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    assert cursor.fetchone()[0] is True
    con.close()


def test_the_hazard_is_real_a_raw_tls_connection_closed_in_a_child_breaks_the_parent(
    tls_target: Target,
) -> None:
    con = tls_target.module.connect(**tls_target.kwargs)
    cursor = con.cursor()
    cursor.execute("SELECT 1")
    con.rollback()
    fork_child(lambda: con.close() or 0)
    with pytest.raises(tls_target.module.OperationalError):
        cursor = con.cursor()
        cursor.execute("SELECT 1")
        cursor.fetchone()


@pytest.mark.parametrize("mode", ["use+sys.exit", "idle+sys.exit"])
def test_tls_sessions_survive_children_that_use_the_pool_or_exit(
    tls_target: Target, mode: str
) -> None:
    seen = run_scenario("matrix", tls_target, mode)
    assert_isolated(tls_target, seen)
    assert seen["reconnects"] == 0


def test_tls_session_survives_a_child_that_drops_the_pool(tls_target: Target) -> None:
    assert_isolated(tls_target, run_scenario("del_pool", tls_target))
