"""Queue benchmark on database servers: the forksafe PostgreSQL and MySQL brokers against
the contenders of ``bench/queue.py``, in one run, with the same workloads.

    python bench/queue_db.py [--jobs 5000] [--trickle 200] [--only forksafe-pg,celery,...]

Contenders added to those of ``bench/queue.py`` (whose workloads, table and JSON line
this reuses): ``forksafe-pg`` / ``forksafe-pg-bulk`` (``postgresql://`` broker on a
throwaway PostgreSQL, or ``FORKSAFE_BENCH_POSTGRES``), ``forksafe-mysql`` /
``forksafe-mysql-bulk`` (``mysql://`` broker on a throwaway MariaDB, or
``FORKSAFE_BENCH_MYSQL``). ``-bulk`` submits with ``task.map`` in one statement.
Every contender runs 2 worker processes executing a no-op task.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_queue", HERE / "queue.py")
assert _spec is not None and _spec.loader is not None
bench_queue: Any = importlib.util.module_from_spec(_spec)
sys.modules["bench_queue"] = bench_queue
_spec.loader.exec_module(bench_queue)

MYSQL_URL = os.environ.get("FORKSAFE_BENCH_MYSQL")


class MariaDB:
    """``FORKSAFE_BENCH_MYSQL``, else a throwaway MariaDB from the test harness."""

    def __init__(self) -> None:
        self.url = MYSQL_URL
        self._server: Any = None
        self._base: Path | None = None

    def start(self) -> str:
        if self.url:
            return self.url
        sys.path.insert(0, str(HERE.parent / "tests"))
        import servers  # the test harness: how to run a throwaway MariaDB here

        cls = servers.MysqlServer
        account = servers.server_account(cls.account_name)
        base = Path(tempfile.mkdtemp(prefix="fsbq-mariadb-"))
        base.chmod(0o755)
        servers._hand_over(base, account)
        template = base / "template"
        template.mkdir()
        servers._hand_over(template, account)
        cls.initialize(template / "data", account, template)
        home = base / "home"
        home.mkdir()
        home.chmod(0o755)
        servers._hand_over(home, account)
        self._base = base
        self._server = cls(home, template / "data", account)
        self._server.start()
        admin = self._server.admin_kwargs()
        import pymysql

        con = pymysql.connect(**admin, autocommit=True)
        with con.cursor() as cursor:
            cursor.execute("CREATE DATABASE IF NOT EXISTS bench")
        con.close()
        self.url = f"mysql://root@{admin['host']}:{admin['port']}/bench"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.destroy()
            self._server = None
        if self._base is not None:  # the template data directory (34 MB) too
            shutil.rmtree(self._base, ignore_errors=True)
            self._base = None


MARIADB = MariaDB()


def _pg_database(name: str) -> str:
    import psycopg2

    url = bench_queue.POSTGRES.start()
    con = psycopg2.connect(url)
    con.autocommit = True
    with con.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        cursor.execute(f"CREATE DATABASE {name}")
    con.close()
    return str(url).rsplit("/", 1)[0] + f"/{name}"


class ForksafeServer(bench_queue.Forksafe):  # type: ignore[misc]
    """The forksafe contender on a database server's broker."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.dir = workdir / self.name
        self.dir.mkdir()
        self.url = self.broker_url()
        (self.dir / "bench_tasks.py").write_text(
            textwrap.dedent(f"""
            from workers import App
            app = App({self.url!r})

            @app.task
            def noop(i):
                return i
            """)
        )
        sys.path.insert(0, str(self.dir))
        from workers.loader import load_app

        self.app, self.module = load_app(str(self.dir / "bench_tasks.py"), reload=True)
        self.process = None

    def broker_url(self) -> str:
        raise NotImplementedError


class ForksafePostgres(ForksafeServer):
    name = "forksafe-pg"

    def available(self) -> str | None:
        try:
            bench_queue.POSTGRES.start()
        except Exception as exc:
            return f"no PostgreSQL: {exc}"
        return None

    def broker_url(self) -> str:
        return _pg_database(self.name.replace("-", "_"))


class ForksafePostgresBulk(ForksafePostgres):
    name = "forksafe-pg-bulk"
    bulk = True


class ForksafeMySQL(ForksafeServer):
    name = "forksafe-mysql"

    def available(self) -> str | None:
        try:
            MARIADB.start()
        except Exception as exc:
            return f"no MariaDB: {exc}"
        return None

    def broker_url(self) -> str:
        import pymysql

        from workers.brokers import parse_url

        url = parse_url(MARIADB.start())
        con = pymysql.connect(
            host=url.host, port=url.port, user=url.user, password=url.password or ""
        )
        name = self.name.replace("-", "_")
        with con.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
            cursor.execute(f"CREATE DATABASE {name}")
        con.close()
        return MARIADB.start().rsplit("/", 1)[0] + f"/{name}"

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        from workers.errors import ResultTimeout

        try:
            return super().wait(handle, timeout)
        except ResultTimeout:
            print(mysql_stuck_report(self.url, handle.id), file=sys.stderr, flush=True)
            raise


def mysql_stuck_report(url: str, job_id: str) -> str:
    """What the server knows when a job outlives its ``get()`` timeout: the job's row, the
    workers' rows, open transactions, sessions and InnoDB's lock waits and last deadlock."""
    import pymysql

    from workers.brokers import parse_url

    parsed = parse_url(url)
    con = pymysql.connect(
        host=parsed.host,
        port=parsed.port,
        user=parsed.user,
        password=parsed.password or "",
        database=parsed.database,
        autocommit=True,
    )
    lines = [f"--- {job_id} timed out; the server's view:"]
    queries = {
        "job": "SELECT id, state, worker, lease, lease_until, started_at, finished_at,"
        " deliveries, retries FROM forksafe_jobs WHERE id = %s",
        "started jobs": "SELECT id, worker, lease, lease_until, started_at, deliveries"
        " FROM forksafe_jobs WHERE state = 'STARTED' ORDER BY started_at LIMIT 20",
        "workers": "SELECT id, heartbeat_at, jobs_done, current_job FROM forksafe_workers",
        "transactions": "SELECT trx_id, trx_state, trx_started, trx_wait_started,"
        " trx_mysql_thread_id, trx_rows_locked, trx_query FROM information_schema.INNODB_TRX",
        "sessions": "SELECT ID, COMMAND, TIME, STATE, INFO FROM information_schema.PROCESSLIST"
        " WHERE ID <> CONNECTION_ID()",
    }
    try:
        with con.cursor() as cursor:
            lines.append(f"now: {time.time():.3f}")
            for title, sql in queries.items():
                cursor.execute(sql, (job_id,) if "%s" in sql else ())
                lines.append(f"{title}:")
                lines += [f"  {row}" for row in cursor.fetchall()]
            cursor.execute("SHOW ENGINE INNODB STATUS")
            # Sections are a title between two lines of dashes, then the body.
            parts = re.split(r"(?m)^-+\n([A-Z][A-Z /]+)\n-+\n", cursor.fetchone()[2])
            sections = dict(zip(parts[1::2], parts[2::2], strict=True))
            for title in ("LATEST DETECTED DEADLOCK", "TRANSACTIONS"):
                if title in sections:
                    lines += [f"innodb {title.lower()}:", sections[title].rstrip()]
    finally:
        con.close()
    return "\n".join(lines)


class ForksafeMySQLBulk(ForksafeMySQL):
    name = "forksafe-mysql-bulk"
    bulk = True


def main() -> int:
    for contender in (ForksafePostgres, ForksafePostgresBulk, ForksafeMySQL, ForksafeMySQLBulk):
        bench_queue.CONTENDERS[contender.name] = contender
    default = [
        "forksafe-pg",
        "forksafe-pg-bulk",
        "forksafe-mysql",
        "forksafe-mysql-bulk",
        *[n for n in ("celery", "pgqueuer", "procrastinate", "rq") if n in bench_queue.CONTENDERS],
    ]
    if not any(arg.startswith("--only") for arg in sys.argv[1:]):
        sys.argv += ["--only", ",".join(default)]
    try:
        code = int(bench_queue.main())
    finally:
        MARIADB.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
