"""The ``forksafe`` command: run workers, submit jobs, look at the queue.

::

    forksafe run tasks.py --workers 4          # supervisor + 4 forked workers
    forksafe run tasks.py --burst              # drain the queue, then exit 0
    forksafe submit tasks.py add 2 3 --wait    # prints 5
    forksafe status                            # workers, queue depth by state, pool stats
    forksafe jobs --failed                     # failed jobs with their errors
    forksafe retry JOB_ID                      # put a failed job back in its queue
    forksafe purge                             # delete finished jobs

The broker is ``--broker URL``, else the App's (for commands given a tasks file),
else ``FORKSAFE_BROKER``, else ``sqlite:///forksafe.db``. Exit codes: 0 success, 1 a
job failed or was not found, 2 bad input (the message says what and how to fix it),
3 the workers crash-looped, 4 ``submit --wait --timeout`` ran out of time (the job
stays in the queue; the message names it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from workers import states
from workers.app import App
from workers.brokers.base import DEFAULT_URL, Broker, JobRecord, create_broker
from workers.errors import BrokerError, CrashLoopError, ResultTimeout, WorkersError
from workers.loader import load_app
from workers.supervisor import Supervisor, SupervisorConfig
from workers.worker import WorkerConfig

log = logging.getLogger("workers.cli")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_CRASH_LOOP, EXIT_TIMEOUT = 0, 1, 2, 3, 4

FINISHED = [states.SUCCESS, states.FAILURE, states.REVOKED, states.EXPIRED]


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with a job's ``task``/``job_id``/``outcome``/``duration_ms``."""

    FIELDS = ("task", "job_id", "outcome", "duration_ms", "recorded")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for name in self.FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str) -> None:
    """Send ``workers`` and ``forksafe`` logs to stderr as ``text`` or ``json`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-7s [%(process)d] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _queues(text: str) -> tuple[str, ...]:
    queues = tuple(q.strip() for q in text.split(",") if q.strip())
    if not queues:
        raise argparse.ArgumentTypeError(f"--queues {text!r} names no queue; use e.g. default,fast")
    return queues


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _positive_number(text: str) -> float:
    value = _float(text, "a number")
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


def _seconds(text: str) -> float:
    value = _float(text, "a number of seconds")
    if not value >= 0:  # NaN too
        raise argparse.ArgumentTypeError(f"{text} must be 0 or more seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forksafe",
        description="Run workers, submit jobs, look at the queue.",
        epilog="Broker: --broker URL, else the tasks module's App, else FORKSAFE_BROKER, "
        "else sqlite:///forksafe.db.",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a supervisor and its workers")
    run.add_argument("target", metavar="PATH_OR_MODULE[:app]")
    run.add_argument(
        "--workers",
        "-w",
        type=_positive_int,
        default=os.cpu_count() or 2,
        help="worker processes to fork (default: one per CPU)",
    )
    run.add_argument("--broker", help="broker URL (overrides the App's)")
    run.add_argument(
        "--queues",
        "-Q",
        type=_queues,
        default=None,
        help="comma-separated queues to serve (default: the App's default queue)",
    )
    run.add_argument(
        "--max-tasks-per-child",
        type=_positive_int,
        default=None,
        metavar="N",
        help="replace a worker after it has run N jobs",
    )
    run.add_argument(
        "--max-memory-per-child",
        type=_positive_number,
        default=None,
        metavar="MIB",
        help="replace a worker whose RSS exceeds this many MiB (between jobs)",
    )
    run.add_argument(
        "--graceful-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="on TERM/INT, running jobs get this long before they are killed "
        "and re-queued (default 30)",
    )
    run.add_argument(
        "--prefetch",
        type=_positive_int,
        default=10,
        help="jobs a worker claims at once (default 10)",
    )
    run.add_argument(
        "--burst",
        action="store_true",
        help="run every job that is due (and its retries), then exit 0; jobs scheduled "
        "for later stay queued",
    )
    run.add_argument(
        "--hostname",
        default=None,
        help="the name workers report and put in their ids (default: this machine's)",
    )
    run.add_argument(
        "--db-connections",
        type=_positive_int,
        default=None,
        metavar="N",
        help="most connections the supervisor and all its workers together open to the "
        "broker database (the supervisor takes 1, each worker an equal share of the rest)",
    )
    _add_log_options(run)

    submit = commands.add_parser("submit", help="submit one job")
    submit.add_argument("target", metavar="PATH_OR_MODULE[:app]")
    submit.add_argument("task")
    submit.add_argument("args", nargs="*", help="arguments, each read as JSON if it parses")
    submit.add_argument("--kwarg", "-k", action="append", default=[], metavar="NAME=VALUE")
    submit.add_argument("--broker")
    submit.add_argument("--countdown", type=float)
    submit.add_argument("--expires", type=float, metavar="SECONDS")
    submit.add_argument("--priority", type=int)
    submit.add_argument("--queue")
    submit.add_argument("--job-id")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="with --wait, give up after this long and exit 4 (default: wait forever)",
    )
    _add_log_options(submit)

    status = commands.add_parser("status", help="workers, queue depth by state, pool stats")
    _add_broker_options(status)
    status.add_argument("--json", action="store_true")

    jobs = commands.add_parser("jobs", help="list recent jobs")
    _add_broker_options(jobs)
    jobs.add_argument("--failed", action="store_true", help="only FAILURE")
    jobs.add_argument("--state", action="append", choices=states.ALL_STATES, default=[])
    jobs.add_argument("--limit", type=_positive_int, default=20)
    jobs.add_argument("--traceback", action="store_true", help="show tracebacks")

    retry = commands.add_parser("retry", help="put failed/revoked/expired jobs back in the queue")
    _add_broker_options(retry)
    retry.add_argument("job_ids", nargs="+", metavar="JOB_ID")

    purge = commands.add_parser("purge", help="delete finished jobs (all states with --all)")
    _add_broker_options(purge)
    group = purge.add_mutually_exclusive_group()
    group.add_argument("--failed", action="store_true", help="only FAILURE")
    group.add_argument("--state", action="append", choices=states.ALL_STATES)
    group.add_argument("--all", action="store_true", help="every job, waiting ones too")
    return parser


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default=argparse.SUPPRESS, choices=["text", "json"])


def _add_broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", help="broker URL")
    parser.add_argument(
        "--app", metavar="PATH_OR_MODULE[:app]", help="use this tasks module's broker"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``forksafe`` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        command = {
            "run": cmd_run,
            "submit": cmd_submit,
            "status": cmd_status,
            "jobs": cmd_jobs,
            "retry": cmd_retry,
            "purge": cmd_purge,
        }[args.command]
        return command(args)
    except CrashLoopError as exc:
        log.critical("%s", exc)
        return EXIT_CRASH_LOOP
    except ResultTimeout as exc:
        print(f"forksafe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_TIMEOUT
    except WorkersError as exc:
        print(f"forksafe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


def _load(target: str, broker: str | None) -> App:
    if broker:
        os.environ["FORKSAFE_BROKER"] = broker
    app, _ = load_app(target)
    if broker:
        app.set_broker(broker)
    return app


def cmd_run(args: argparse.Namespace) -> int:
    if args.hostname:
        os.environ["FORKSAFE_HOSTNAME"] = args.hostname
    app = _load(args.target, args.broker)
    if args.db_connections is not None:
        _limit_connections(app, args.db_connections, args.workers)
    config = SupervisorConfig(
        target=args.target,
        workers=args.workers,
        broker=args.broker,
        graceful_timeout=args.graceful_timeout,
        worker=WorkerConfig(
            queues=args.queues or (app.default_queue,),
            prefetch=args.prefetch,
            max_tasks_per_child=args.max_tasks_per_child,
            max_memory_per_child=args.max_memory_per_child,
            burst=args.burst,
        ),
    )
    return Supervisor(app, config).run()


def _limit_connections(app: App, budget: int, workers: int) -> None:
    """Split ``--db-connections`` between the supervisor (1) and its workers."""
    limit = getattr(app.broker, "limit_connections", None)
    if limit is None:
        log.warning("--db-connections has no effect on the %s broker", app.broker.url.scheme)
        return
    per_worker = (budget - 1) // workers
    if per_worker < 1:
        raise BrokerError(
            f"--db-connections {budget} cannot give the supervisor and {workers} workers one "
            f"connection each; raise it to at least {workers + 1} or use fewer --workers"
        )
    limit(1, per_worker, budget)
    log.info(
        "db connections: at most %d (supervisor 1, %d per worker)",
        1 + per_worker * workers,
        per_worker,
    )


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_submit(args: argparse.Namespace) -> int:
    app = _load(args.target, args.broker)
    if args.task not in app.tasks:
        known = ", ".join(sorted(app.tasks)) or "none"
        print(
            f"forksafe submit: no task named {args.task!r} in {args.target} (known: {known})",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    kwargs: dict[str, Any] = {}
    for item in args.kwarg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"forksafe submit: --kwarg {item!r} must look like NAME=VALUE", file=sys.stderr)
            return EXIT_BAD_INPUT
        kwargs[name] = _parse_value(value)
    result = app.tasks[args.task].apply_async(
        [_parse_value(a) for a in args.args],
        kwargs,
        countdown=args.countdown,
        expires=args.expires,
        priority=args.priority,
        queue=args.queue,
        job_id=args.job_id,
    )
    if not args.wait:
        print(result.id)
        return EXIT_OK
    value = result.get(timeout=args.timeout, propagate=False)
    if result.state != states.SUCCESS:
        print(f"job {result.id} {result.state}", file=sys.stderr)
        if result.traceback:
            print(result.traceback.rstrip(), file=sys.stderr)
        return EXIT_FAILED
    print(_render(value))
    return EXIT_OK


def _render(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _broker(args: argparse.Namespace) -> Broker:
    if args.broker:
        broker = create_broker(args.broker)
    elif args.app:
        return _load(args.app, None).broker
    else:
        broker = create_broker(os.environ.get("FORKSAFE_BROKER") or DEFAULT_URL)
    broker.setup()
    return broker


def _ago(moment: float | None) -> str:
    if moment is None:
        return "-"
    seconds = time.time() - moment
    return f"{seconds:.1f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def cmd_status(args: argparse.Namespace) -> int:
    broker = _broker(args)
    now = time.time()
    workers = broker.workers()
    counts = broker.counts(now)
    if args.json:
        print(
            json.dumps(
                {
                    "broker": broker.url.masked(),
                    "workers": [
                        {
                            "id": w.id,
                            "pid": w.pid,
                            "hostname": w.hostname,
                            "jobs_done": w.jobs_done,
                            "heartbeat_age": round(now - w.heartbeat_at, 3),
                            "current_job": w.current_job,
                            "queues": list(w.queues),
                            "stats": dict(w.stats),
                        }
                        for w in workers
                    ],
                    "queues": counts,
                }
            )
        )
        return EXIT_OK
    print(f"broker: {broker.url.masked()}")
    print(f"workers: {len(workers)}")
    if workers:
        print(f"  {'PID':>7}  {'HOST':<16} {'JOBS':>7}  {'HEARTBEAT':<11} {'QUEUES':<12} CURRENT")
        for w in workers:
            stale = " (stale)" if now - w.heartbeat_at > 10 else ""
            print(
                f"  {w.pid:>7}  {w.hostname[:16]:<16} {w.jobs_done:>7}  "
                f"{_ago(w.heartbeat_at) + stale:<11} {','.join(w.queues)[:12]:<12} "
                f"{w.current_job or '-'}"
            )
    print("queues:")
    if not counts:
        print("  (empty)")
    for queue, by_state in sorted(counts.items()):
        parts = ", ".join(
            f"{state} {by_state[state]}" for state in states.ALL_STATES if state in by_state
        )
        print(f"  {queue}: {parts}")
    budgets = _connection_budgets(workers)
    if budgets:
        print("db connections:")
        for host, (budget, in_use, per_worker) in sorted(budgets.items()):
            print(f"  {host}: workers hold {in_use}, at most {per_worker} each; budget {budget}")
    if workers:
        print("pool stats:")
        for w in workers:
            print(f"  {w.pid}: {json.dumps(dict(w.stats), sort_keys=True, default=str)}")
    return EXIT_OK


def _connection_budgets(workers: Sequence[Any]) -> dict[str, tuple[int, int, int]]:
    """Per supervisor (``host/pid``) with ``--db-connections``: (budget, open, per worker)."""
    found: dict[str, tuple[int, int, int]] = {}
    for w in workers:
        broker = w.stats.get("broker") or {}
        if not broker.get("fleet_budget"):
            continue
        key = f"{w.hostname}/{w.supervisor_pid}"
        in_use = found.get(key, (0, 0, 0))[1]
        found[key] = (
            int(broker["fleet_budget"]),
            in_use + int(broker.get("in_use", 0)) + int(broker.get("idle", 0)),
            int(broker.get("connection_limit", 0)),
        )
    return found


def _job_line(job: JobRecord, with_traceback: bool) -> str:
    error = ""
    if job.error and job.state in (states.FAILURE, states.RETRY):
        error = f"  {job.error.get('type')}: {job.error.get('message')}"
    finished = _ago(job.finished_at) if job.finished_at else ""
    line = (
        f"{job.id}  {job.task:<16} {job.state:<9} queue={job.queue} retries={job.retries} "
        f"{finished}{error}"
    )
    if with_traceback and job.traceback:
        line += "\n    " + job.traceback.rstrip().replace("\n", "\n    ")
    return line


def cmd_jobs(args: argparse.Namespace) -> int:
    broker = _broker(args)
    wanted = list(args.state) + ([states.FAILURE] if args.failed else [])
    for job in broker.jobs(wanted or None, args.limit):
        print(_job_line(job, args.traceback))
    return EXIT_OK


def cmd_retry(args: argparse.Namespace) -> int:
    broker = _broker(args)
    code = EXIT_OK
    for job_id in args.job_ids:
        if broker.retry(job_id, time.time()):
            print(f"{job_id} requeued")
            continue
        job = broker.fetch(job_id)
        if job is None:
            print(
                f"forksafe retry: no job {job_id!r}; list jobs with 'forksafe jobs --failed'",
                file=sys.stderr,
            )
        else:
            print(
                f"forksafe retry: job {job_id} is {job.state}; only FAILURE, REVOKED and "
                f"EXPIRED jobs can be retried",
                file=sys.stderr,
            )
        code = EXIT_FAILED
    return code


def cmd_purge(args: argparse.Namespace) -> int:
    broker = _broker(args)
    if args.all:
        wanted = list(states.ALL_STATES)
    elif args.failed:
        wanted = [states.FAILURE]
    else:
        wanted = args.state or FINISHED
    removed = broker.purge(wanted, None)
    print(f"purged {removed} job(s) ({', '.join(wanted)})")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
