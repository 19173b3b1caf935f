"""Queue benchmark: forksafe workers (SQLite broker) against other job queues, in one run.

    python bench/queue.py [--jobs 5000] [--trickle 200] [--only forksafe,celery,...]

Every contender runs 2 worker processes executing a no-op task, on this machine:

* ``enqueue``  jobs/s one producer submits, one call per job, workers stopped.
* ``e2e``      jobs/s from the first submission to the last result, workers running
               (the producer submits one call per job, then waits for every result).
* ``trickle``  200 jobs submitted 20 ms apart, each timed from submission until the
               producer sees its result (p50/p99, ms); pollers poll every 0.5-1 ms.

Contenders: ``forksafe`` (SQLite broker, ``forksafe run --workers 2``), ``forksafe-bulk``
(the same, submitting with ``task.map`` in one transaction), ``celery`` (Redis broker and
result backend, prefork, concurrency 2), ``rq`` (two ``rq worker`` processes, Redis),
``procrastinate`` and ``pgqueuer`` (PostgreSQL, two worker processes each),
``mp-pool`` (``multiprocessing.Pool(2).apply_async``: no durability, the ceiling).
Celery and RQ need ``pip install celery redis rq`` and a Redis server on 127.0.0.1:6379
(``FORKSAFE_BENCH_REDIS`` to change it); procrastinate and pgqueuer need
``pip install procrastinate pgqueuer asyncpg psycopg`` and ``FORKSAFE_BENCH_POSTGRES``, or
the PostgreSQL server binaries (a throwaway server is started). A contender that cannot run
is reported as skipped with the reason. Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SLOW = {"rq"}
"""Contenders that get a tenth of the jobs (RQ forks a process per job)."""

REDIS_URL = os.environ.get("FORKSAFE_BENCH_REDIS", "redis://127.0.0.1:6379/15")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class Contender:
    name = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    def available(self) -> str | None:
        """``None`` if the contender can run here, else why not."""
        return None

    def prepare(self) -> None:
        """Set up what submitting needs (not the workers)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def submit(self, i: int) -> Any:
        raise NotImplementedError

    def submit_many(self, count: int) -> list[Any]:
        return [self.submit(i) for i in range(count)]

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every job (between measurements)."""


class Forksafe(Contender):
    name = "forksafe"
    bulk = False

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.dir = workdir / self.name
        self.dir.mkdir()
        self.db = self.dir / "queue.db"
        (self.dir / "bench_tasks.py").write_text(
            textwrap.dedent(f"""
            from workers import App
            app = App("sqlite:///{self.db}")

            @app.task
            def noop(i):
                return i
            """)
        )
        sys.path.insert(0, str(self.dir))
        from workers.loader import load_app

        self.app, self.module = load_app(str(self.dir / "bench_tasks.py"), reload=True)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "workers.cli",
                "--log-level",
                "warning",
                "run",
                str(self.dir / "bench_tasks.py"),
                "--workers",
                "2",
            ],
            cwd=self.dir,
        )
        wait_for(lambda: len(self.app.broker.workers()) == 2, 30, "2 forksafe workers")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(30)
            self.process = None

    def submit(self, i: int) -> Any:
        return self.module.noop.delay(i)

    def submit_many(self, count: int) -> list[Any]:
        if self.bulk:
            return list(self.module.noop.map(range(count)))
        return super().submit_many(count)

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        return handle.get(timeout=timeout, interval=0.001)

    def reset(self) -> None:
        self.app.broker.purge(
            [
                "PENDING",
                "SCHEDULED",
                "STARTED",
                "RETRY",
                "SUCCESS",
                "FAILURE",
                "REVOKED",
                "EXPIRED",
            ],
            None,
        )


class ForksafeBulk(Forksafe):
    name = "forksafe-bulk"
    bulk = True


class MultiprocessingPool(Contender):
    name = "mp-pool"

    def start(self) -> None:
        self.pool = multiprocessing.get_context("fork").Pool(2)

    def stop(self) -> None:
        self.pool.close()
        self.pool.join()

    def submit(self, i: int) -> Any:
        return self.pool.apply_async(_noop, (i,))

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        return handle.get(timeout)


def _noop(i: int) -> int:
    return i


def _redis_ok() -> str | None:
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install redis)"
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as exc:
        return f"no Redis at {REDIS_URL}: {exc}"
    return None


class Celery(Contender):
    name = "celery"

    def available(self) -> str | None:
        if shutil.which("celery", path=os.path.dirname(sys.executable)) is None:
            return "celery is not installed (pip install celery redis)"
        return _redis_ok()

    def prepare(self) -> None:
        self.dir = self.workdir / "celery"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "celery_bench.py").write_text(
            textwrap.dedent(f"""
            from celery import Celery
            app = Celery("celery_bench", broker={REDIS_URL!r}, backend={REDIS_URL!r})
            app.conf.update(worker_prefetch_multiplier=4, task_acks_late=False,
                            broker_connection_retry_on_startup=True)

            @app.task
            def noop(i):
                return i
            """)
        )
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        sys.path.insert(0, str(self.dir))
        import celery_bench  # type: ignore[import-not-found]

        self.module = celery_bench

    def reset(self) -> None:
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                os.path.join(os.path.dirname(sys.executable), "celery"),
                "-A",
                "celery_bench",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                "2",
                "--loglevel",
                "warning",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=self.dir,
            env={**os.environ, "PYTHONPATH": str(self.dir)},
        )
        self.module.noop.delay(-1).get(timeout=60)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)

    def submit(self, i: int) -> Any:
        return self.module.noop.delay(i)

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        return handle.get(timeout=timeout, interval=0.0005)


class RQ(Contender):
    name = "rq"

    def available(self) -> str | None:
        try:
            import rq  # noqa: F401
        except ImportError:
            return "rq is not installed (pip install rq)"
        return _redis_ok()

    def prepare(self) -> None:
        import redis
        from rq import Queue

        self.dir = self.workdir / "rq"
        self.dir.mkdir(exist_ok=True)
        (self.dir / "rq_bench.py").write_text("def noop(i):\n    return i\n")
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.redis.flushdb()
        self.queue = Queue("bench", connection=self.redis)

    def reset(self) -> None:
        self.redis.flushdb()

    def start(self) -> None:
        rq_bin = os.path.join(os.path.dirname(sys.executable), "rq")
        self.processes = [
            subprocess.Popen(
                [rq_bin, "worker", "bench", "--url", REDIS_URL, "--quiet"],
                cwd=self.dir,
                env={**os.environ, "PYTHONPATH": str(self.dir)},
            )
            for _ in range(2)
        ]
        self.wait(self.submit(-1), 60)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(60)

    def submit(self, i: int) -> Any:
        return self.queue.enqueue("rq_bench.noop", i)

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            status = handle.get_status(refresh=True)
            if status == "finished":
                return handle.return_value()
            if status == "failed" or time.monotonic() > deadline:
                raise RuntimeError(f"rq job {handle.id} {status}")
            time.sleep(0.0005)


POSTGRES_URL = os.environ.get("FORKSAFE_BENCH_POSTGRES")


class Postgres:
    """``FORKSAFE_BENCH_POSTGRES``, else a throwaway server from the local PostgreSQL binaries.

    The throwaway server runs with ``synchronous_commit=off``: like the SQLite queue in
    WAL mode with ``synchronous=NORMAL``, a commit survives a process crash, not a power cut.
    """

    def __init__(self) -> None:
        self.url = POSTGRES_URL
        self._stop: list[str] | None = None
        self._dir: str | None = None

    def start(self) -> str:
        if self.url:
            return self.url
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
        initdb = os.path.join(bins[-1], "initdb") if bins else shutil.which("initdb")
        if not initdb or not os.path.exists(initdb):
            raise RuntimeError("no PostgreSQL here; set FORKSAFE_BENCH_POSTGRES to a URL")
        pg_ctl = os.path.join(os.path.dirname(initdb), "pg_ctl")
        self._dir = tempfile.mkdtemp(prefix="fsbq-pg-")
        run_as: list[str] = []
        if os.getuid() == 0:  # the server refuses to run as root
            shutil.chown(self._dir, "postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        data = os.path.join(self._dir, "data")
        subprocess.run(
            [*run_as, initdb, "-D", data, "-U", "bench", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        options = (
            f"-p {port} -k {self._dir} -c listen_addresses=127.0.0.1 "
            "-c synchronous_commit=off -c max_connections=50"
        )
        subprocess.run(
            [
                *run_as,
                pg_ctl,
                "-D",
                data,
                "-l",
                os.path.join(self._dir, "log"),
                "-w",
                "-o",
                options,
                "start",
            ],
            check=True,
            capture_output=True,
        )
        self._stop = [*run_as, pg_ctl, "-D", data, "-m", "fast", "-w", "stop"]
        self.url = f"postgresql://bench@127.0.0.1:{port}/postgres"
        return self.url

    def stop(self) -> None:
        if self._stop is not None:
            subprocess.run(self._stop, capture_output=True)
            self._stop = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


POSTGRES = Postgres()


def _postgres_ok(module: str) -> str | None:
    try:
        __import__(module)
        __import__("psycopg")
    except ImportError:
        return f"{module} is not installed (pip install {module} psycopg)"
    try:
        POSTGRES.start()
    except Exception as exc:
        return f"no PostgreSQL: {exc}"
    return None


def _poll(query: Any, params: tuple[Any, ...], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not query(params):
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {params}")
        time.sleep(0.0005)


class Procrastinate(Contender):
    name = "procrastinate"

    def available(self) -> str | None:
        return _postgres_ok("procrastinate")

    def _env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.dir)}

    def prepare(self) -> None:
        import psycopg

        self.dir = self.workdir / "procrastinate"
        self.dir.mkdir(exist_ok=True)
        dsn = POSTGRES.url
        with psycopg.connect(dsn, autocommit=True) as con:
            con.execute("DROP DATABASE IF EXISTS bench_procrastinate")
            con.execute("CREATE DATABASE bench_procrastinate")
        self.dsn = dsn.rsplit("/", 1)[0] + "/bench_procrastinate"
        (self.dir / "procrastinate_bench.py").write_text(
            textwrap.dedent(f"""
            import procrastinate
            app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo={self.dsn!r}))

            @app.task(name="noop")
            def noop(i):
                return i
            """)
        )
        self.cli = [
            os.path.join(os.path.dirname(sys.executable), "procrastinate"),
            "--app=procrastinate_bench.app",
        ]
        subprocess.run(
            [*self.cli, "schema", "--apply"],
            check=True,
            capture_output=True,
            cwd=self.dir,
            env=self._env(),
        )
        sys.path.insert(0, str(self.dir))
        import procrastinate_bench  # type: ignore[import-not-found]

        self.module = procrastinate_bench
        self.module.app.open()
        self.monitor = psycopg.connect(self.dsn, autocommit=True)

    def reset(self) -> None:
        self.monitor.execute("TRUNCATE procrastinate_jobs CASCADE")

    def start(self) -> None:
        self.processes = [
            subprocess.Popen(
                [*self.cli, "--log-level", "warning", "worker", "--concurrency", "1"],
                cwd=self.dir,
                env=self._env(),
            )
            for _ in range(2)
        ]
        self.wait(self.submit(-1), 60)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(60)
        self.module.app.close()
        self.monitor.close()

    def submit(self, i: int) -> Any:
        return self.module.noop.defer(i=i)

    def _done(self, params: tuple[Any, ...]) -> bool:
        row = self.monitor.execute(
            "SELECT status FROM procrastinate_jobs WHERE id = %s", params
        ).fetchone()
        return row is not None and row[0] == "succeeded"

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        _poll(self._done, (handle,), timeout)


class PgQueuer(Contender):
    name = "pgqueuer"

    def available(self) -> str | None:
        return _postgres_ok("pgqueuer")

    def prepare(self) -> None:
        import psycopg
        from pgqueuer.adapters.drivers.psycopg import SyncPsycopgDriver
        from pgqueuer.adapters.persistence.queries import SyncQueries

        self.dir = self.workdir / "pgqueuer"
        self.dir.mkdir(exist_ok=True)
        with psycopg.connect(POSTGRES.url, autocommit=True) as con:
            con.execute("DROP DATABASE IF EXISTS bench_pgqueuer")
            con.execute("CREATE DATABASE bench_pgqueuer")
        self.dsn = str(POSTGRES.url).rsplit("/", 1)[0] + "/bench_pgqueuer"
        (self.dir / "pgq_bench.py").write_text(
            textwrap.dedent(f"""
            from contextlib import asynccontextmanager

            import asyncpg
            from pgqueuer import PgQueuer
            from pgqueuer.db import AsyncpgDriver

            @asynccontextmanager
            async def main():
                connection = await asyncpg.connect({self.dsn!r})
                pgq = PgQueuer(AsyncpgDriver(connection))

                @pgq.entrypoint("noop")
                async def noop(job):
                    return None

                yield pgq
                await connection.close()
            """)
        )
        self.cli = [os.path.join(os.path.dirname(sys.executable), "pgq"), "--pg-dsn", self.dsn]
        subprocess.run([*self.cli, "install"], check=True, capture_output=True)
        self.producer = psycopg.connect(self.dsn, autocommit=True)
        self.queries = SyncQueries(SyncPsycopgDriver(self.producer))
        self.monitor = psycopg.connect(self.dsn, autocommit=True)

    def reset(self) -> None:
        self.monitor.execute("TRUNCATE pgqueuer, pgqueuer_log")

    def start(self) -> None:
        self.processes = [
            # pgqueuer.run() is what `pgq run` does (whose --log-level handling fails in 1.6).
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import asyncio, pgqueuer; asyncio.run(pgqueuer.run('pgq_bench:main'))",
                ],
                cwd=self.dir,
                env={**os.environ, "PYTHONPATH": str(self.dir)},
            )
            for _ in range(2)
        ]
        self.wait(self.submit(-1), 60)

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            process.wait(60)
        self.producer.close()
        self.monitor.close()

    def submit(self, i: int) -> Any:
        return self.queries.enqueue("noop", str(i).encode())[0]

    def _done(self, params: tuple[Any, ...]) -> bool:
        row = self.monitor.execute(
            "SELECT 1 FROM pgqueuer_log WHERE job_id = %s AND status = 'successful'", params
        ).fetchone()
        return row is not None

    def wait(self, handle: Any, timeout: float = 60) -> Any:
        _poll(self._done, (handle,), timeout)


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (Forksafe, ForksafeBulk, Celery, RQ, Procrastinate, PgQueuer, MultiprocessingPool)
}


def measure(contender: Contender, jobs: int, trickle: int) -> dict[str, Any]:
    result: dict[str, Any] = {"jobs": jobs}
    contender.prepare()
    # enqueue: workers stopped (where stopping means anything), one call per job
    if not isinstance(contender, MultiprocessingPool):
        started = time.perf_counter()
        contender.submit_many(jobs)
        result["enqueue_per_s"] = round(jobs / (time.perf_counter() - started))
        contender.reset()
    contender.start()
    try:
        # e2e: submit everything, wait for every result
        started = time.perf_counter()
        handles = contender.submit_many(jobs)
        for handle in handles:
            contender.wait(handle)
        result["e2e_per_s"] = round(jobs / (time.perf_counter() - started))
        if isinstance(contender, MultiprocessingPool):
            result["enqueue_per_s"] = None
        # trickle: one job every 20 ms, time to result
        latencies = []
        next_at = time.perf_counter()
        for i in range(trickle):
            now = time.perf_counter()
            if next_at > now:
                time.sleep(next_at - now)
            sent = time.perf_counter()
            contender.wait(contender.submit(i))
            latencies.append((time.perf_counter() - sent) * 1000)
            next_at = sent + 0.020
        result["trickle_p50_ms"] = round(statistics.median(latencies), 2)
        result["trickle_p99_ms"] = round(percentile(latencies, 0.99), 2)
    finally:
        contender.stop()
    return result


def main() -> int:
    # This file is called queue.py: keep its directory from shadowing the stdlib queue module
    # that multiprocessing, celery and rq import.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs",
        type=int,
        default=5000,
        help="jobs for enqueue/e2e (rq gets a tenth: it forks per job)",
    )
    parser.add_argument("--trickle", type=int, default=200)
    parser.add_argument("--only", default=",".join(CONTENDERS))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="forksafe-bench-queue-"))
    results: dict[str, dict[str, Any]] = {}
    for name in args.only.split(","):
        contender = CONTENDERS[name](workdir)
        why_not = contender.available()
        if why_not:
            results[name] = {"skipped": why_not}
            print(f"{name}: skipped: {why_not}", file=sys.stderr)
            continue
        jobs = max(100, args.jobs // 10) if name in SLOW else args.jobs
        print(f"{name}: {jobs} jobs ...", file=sys.stderr, flush=True)
        try:
            results[name] = measure(contender, jobs, args.trickle)
        except Exception as exc:
            results[name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"}
            print(f"{name}: failed: {exc}", file=sys.stderr)
    POSTGRES.stop()
    shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\n{'contender':<15} {'jobs':>6} {'enqueue/s':>10} {'e2e jobs/s':>11} "
        f"{'trickle p50 ms':>15} {'p99 ms':>8}"
    )
    for name, row in results.items():
        if "skipped" in row:
            print(f"{name:<15} skipped: {row['skipped']}")
            continue
        enqueue = row.get("enqueue_per_s")
        print(
            f"{name:<15} {row['jobs']:>6} {enqueue if enqueue is not None else '-':>10} "
            f"{row['e2e_per_s']:>11} {row['trickle_p50_ms']:>15} {row['trickle_p99_ms']:>8}"
        )
    celery = results.get("celery", {}).get("e2e_per_s")
    ours = results.get("forksafe", {}).get("e2e_per_s")
    if celery and ours:
        print(f"\nforksafe e2e / celery e2e = {ours / celery:.1f}x")
    print(
        json.dumps(
            {
                "bench": "queue",
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
