"""The supervisor (arbiter): import the tasks once, fork the workers, keep them right.

One loop, in the style of the early gunicorn arbiter. Signal handlers only append
the signal to a short queue and write a byte to a self-pipe; the loop pops a
signal and calls ``handle_<name>()``, or, when there is none, waits on the pipe
for a moment and then does its rounds: :meth:`Supervisor.murder_workers` (hard
time limits), :meth:`Supervisor.reap_workers` (dead children: their jobs go back to
the queue), :meth:`Supervisor.maintain` (expired leases and results) and
:meth:`Supervisor.manage_workers` (as many workers as asked for).

Signals: ``TERM``/``INT`` stop gracefully (running jobs get ``graceful_timeout``
seconds, then are killed and re-queued; a second one stops at once), ``QUIT``
stops at once (running jobs are re-queued), ``HUP`` re-imports the tasks module
and replaces every worker, ``TTIN``/``TTOU`` add or remove one worker.

Crashed workers are restarted with a growing delay. Workers that keep dying on
their own right after they start (an exception in a worker init hook, a
segfault in an extension...) stop the supervisor with :class:`CrashLoopError`,
their error shown once, instead of a restart storm. Workers killed from outside
(``SIGKILL`` by the OOM killer or an operator) are simply replaced.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

import multiprocess

from workers import states
from workers.app import App
from workers.brokers.base import Outcome
from workers.errors import CrashLoopError, TimeLimitExceeded, WorkersError
from workers.failures import describe
from workers.loader import load_app
from workers.worker import (
    EXIT_INIT_FAILED,
    EXIT_RECYCLE,
    EXIT_STOPPED,
    STOP_SIGNALS,
    Slot,
    WorkerConfig,
    worker_id,
    worker_main,
)

log = logging.getLogger("workers.supervisor")

SIGNALS = ("HUP", "QUIT", "INT", "TERM", "TTIN", "TTOU", "CHLD")
EXTERNAL_KILLS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT})
"""A worker that died of these was killed from outside (OOM killer, operator): no crash loop."""


@dataclass(frozen=True)
class SupervisorConfig:
    """Everything ``forksafe run`` can set."""

    target: str
    workers: int = 2
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    graceful_timeout: float = 30.0
    crash_loop_limit: int = 5
    """Consecutive crashes of young workers (no job done) that stop the supervisor."""
    young_seconds: float = 5.0
    restart_delay_max: float = 5.0
    tick: float = 0.1
    sweep_interval: float = 1.0
    expire_interval: float = 60.0
    broker: str | None = None
    """The broker URL given on the command line, which overrides the App's (also after
    a ``SIGHUP`` reload)."""


@dataclass
class WorkerHandle:
    """The supervisor's view of one child."""

    process: Any
    slot: Slot
    nonce: str
    started: float
    retiring: bool = False
    killed_by_us: bool = False
    timed_out: str | None = None  # the job it was killed for (its time limit)

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def id(self) -> str:
        return worker_id(self.pid, self.nonce)


class _Stop(Exception):
    def __init__(self, graceful: bool) -> None:
        self.graceful = graceful


class Supervisor:
    """Owns the worker processes of one ``forksafe run``. Call :meth:`run` once."""

    def __init__(self, app: App, config: SupervisorConfig) -> None:
        self.app = app
        self.config = config
        self.num_workers = config.workers
        self.workers: dict[int, WorkerHandle] = {}
        self.pid = os.getpid()
        self._context = multiprocess.get_context("fork")
        self._signal_queue: list[int] = []
        self._pipe: tuple[int, int] | None = None
        self._consecutive_crashes = 0
        self._next_spawn = 0.0
        self._last_error: str | None = None
        self._last_sweep = 0.0
        self._last_expire = 0.0
        self._burst_done = 0

    # -- signals ------------------------------------------------------------------

    def _init_signals(self) -> None:
        read_fd, write_fd = os.pipe()
        for fd in (read_fd, write_fd):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        self._pipe = (read_fd, write_fd)
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), self._signal)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        if len(self._signal_queue) < 5:
            self._signal_queue.append(signum)
        self._wakeup()

    def _wakeup(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self._pipe[1], b".")

    def _sleep(self, seconds: float) -> None:
        """Wait on the self-pipe until a signal arrives or ``seconds`` pass."""
        assert self._pipe is not None
        try:
            ready, _, _ = select.select([self._pipe[0]], [], [], seconds)
            if ready:
                while os.read(self._pipe[0], 512):
                    pass
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise

    def _restore_signals(self) -> None:
        for name in SIGNALS:
            signal.signal(getattr(signal, f"SIG{name}"), signal.SIG_DFL)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    # -- main loop ----------------------------------------------------------------

    def run(self) -> int:
        """Supervise until stopped; returns the process exit code (0 on a clean stop).

        Raises :class:`CrashLoopError` when workers keep dying right after they start.
        """
        self._init_signals()
        self.app.broker  # noqa: B018 - create/migrate the schema once, before forking
        self._log_banner()
        handlers: dict[int, Callable[[], None]] = {
            getattr(signal, f"SIG{name}"): getattr(self, f"handle_{name.lower()}")
            for name in SIGNALS
        }
        try:
            self.manage_workers()
            while True:
                signum = self._signal_queue.pop(0) if self._signal_queue else None
                if signum is not None:
                    handlers[signum]()
                    continue
                self._sleep(self.config.tick)
                self._rounds()
                if self.config.worker.burst and self.num_workers == 0 and not self.workers:
                    log.info("burst: queue drained, supervisor exits")
                    return 0
        except _Stop as stop:
            self.stop(graceful=stop.graceful)
            return 0
        except BaseException:
            self.stop(graceful=False)
            raise
        finally:
            self._restore_signals()

    def _rounds(self) -> None:
        self.murder_workers()
        self.reap_workers()
        try:
            self.maintain()
        except Exception:
            # A broker hiccup (a lock held too long, a full disk) must not take the
            # workers down: expired leases and results are simply handled next round.
            log.exception("queue housekeeping failed; trying again in a moment")
        self.manage_workers()

    def _log_banner(self) -> None:
        tasks = ", ".join(sorted(self.app.tasks)) or "(none)"
        cfg = self.config.worker
        log.info("forksafe workers: supervisor %d", self.pid)
        log.info("  broker:  %s", self.app.broker_url)
        log.info(
            "  workers: %d (prefetch %d%s%s)",
            self.num_workers,
            cfg.prefetch,
            f", max {cfg.max_tasks_per_child} tasks/child" if cfg.max_tasks_per_child else "",
            ", burst" if cfg.burst else "",
        )
        log.info("  queues:  %s", ", ".join(cfg.queues))
        log.info("  tasks:   %s", tasks)

    # -- signal handlers ----------------------------------------------------------

    def handle_chld(self) -> None:
        self.reap_workers()

    def handle_hup(self) -> None:
        log.info("SIGHUP: reloading %s", self.config.target)
        try:
            app, _ = load_app(self.config.target, reload=True)
        except WorkersError as exc:
            log.error("reload failed; the running workers keep the old code:\n%s", exc)
            return
        if self.config.broker:
            app.set_broker(self.config.broker)
        self.app = app
        self.app.broker  # noqa: B018 - schema check in the supervisor, before forking
        log.info(
            "reloaded; tasks: %s; replacing %d workers",
            ", ".join(sorted(app.tasks)),
            len(self.workers),
        )
        for handle in list(self.workers.values()):
            self._retire(handle)
        self.manage_workers()

    def handle_ttin(self) -> None:
        allowed = self.app.broker.workers_allowed()
        if allowed is not None and self.num_workers >= allowed:
            log.warning(
                "SIGTTIN ignored: the connection budget (--db-connections) has room for %d"
                " workers; raise it to add more",
                allowed,
            )
            return
        self.num_workers += 1
        log.info("SIGTTIN: %d workers", self.num_workers)
        self.manage_workers()

    def handle_ttou(self) -> None:
        if self.num_workers > 1:
            self.num_workers -= 1
        log.info("SIGTTOU: %d workers", self.num_workers)
        self.manage_workers()

    def handle_int(self) -> None:
        raise _Stop(graceful=True)

    handle_term = handle_int

    def handle_quit(self) -> None:
        raise _Stop(graceful=False)

    # -- rounds -------------------------------------------------------------------

    def spawn_worker(self) -> WorkerHandle:
        """Fork one worker running :func:`workers.worker.worker_main`."""
        slot = Slot()
        nonce = os.urandom(4).hex()
        process = self._context.Process(
            target=worker_main,
            args=(self.app, self._worker_config(), slot, nonce, self.pid),
            name=f"forksafe-worker-{nonce}",
        )
        # A stop signal reaching the child before it installs its own handlers would go
        # to the supervisor's, copied by fork, and be lost: the child starts with them
        # blocked, and takes any that are pending once its handlers are in place.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        handle = WorkerHandle(process, slot, nonce, time.monotonic())
        self.workers[handle.pid] = handle
        log.debug("started worker %d", handle.pid)
        return handle

    def _worker_config(self) -> WorkerConfig:
        """The workers' config, heartbeating often enough for the App's lease (which a
        reload may have changed)."""
        config = self.config.worker
        if self.app.heartbeat_interval < config.heartbeat_interval:
            return replace(config, heartbeat_interval=self.app.heartbeat_interval)
        return config

    def manage_workers(self) -> None:
        """Start or retire workers until as many as asked for are running."""
        active = [h for h in self.workers.values() if not h.retiring]
        if len(active) > self.num_workers:
            for handle in sorted(active, key=lambda h: h.started)[: len(active) - self.num_workers]:
                self._retire(handle)
            return
        missing = self.num_workers - len(active)
        while missing > 0 and time.monotonic() >= self._next_spawn:
            self.spawn_worker()
            missing -= 1

    def _retire(self, handle: WorkerHandle) -> None:
        handle.retiring = True
        self._kill(handle, signal.SIGTERM)

    def _kill(self, handle: WorkerHandle, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(handle.pid, signum)

    def murder_workers(self) -> None:
        """Kill each worker whose job passed its hard ``time_limit``; record the job.

        The worker is killed first: a broker that cannot be reached delays the record
        only. A record that fails is logged, and the job left to :meth:`reap_workers`
        or to the lease sweep, which put it back in the queue.
        """
        now = time.time()
        for handle in list(self.workers.values()):
            if handle.killed_by_us:
                continue  # its slot still names the job until reap_workers collects it
            running = handle.slot.running()
            if running is None:
                continue
            job_id, lease, task_name, started, limit = running
            if not limit or now - started <= limit:
                continue
            handle.killed_by_us = True
            handle.timed_out = job_id
            self._kill(handle, signal.SIGKILL)
            try:
                state = self._record_time_limit(handle, job_id, lease, task_name, limit, now)
            except Exception:
                log.exception(
                    "%s[%s]: time limit %g s exceeded; killed worker %d but could not record "
                    "the failure; the job goes back to the queue",
                    task_name,
                    job_id,
                    limit,
                    handle.pid,
                )
                continue
            log.error(
                "%s[%s] %s: time limit %g s exceeded; killed worker %d",
                task_name,
                job_id,
                state,
                limit,
                handle.pid,
            )

    def _record_time_limit(
        self,
        handle: WorkerHandle,
        job_id: str,
        lease: str,
        task_name: str,
        limit: float,
        now: float,
    ) -> str:
        """Record the failure (or retry) of a job killed for its time limit; its state."""
        error = TimeLimitExceeded(
            f"task {task_name}[{job_id}] ran longer than its time_limit of {limit:g} s "
            f"and its worker {handle.pid} was killed; make it faster or raise time_limit"
        )
        task = self.app.tasks.get(task_name)
        record = self.app.broker.fetch(job_id)
        retries = record.retries if record is not None else 0
        outcome = Outcome(
            job_id,
            lease,
            states.FAILURE,
            error=describe(error),
            traceback=f"{type(error).__name__}: {error}\n",
        )
        if (
            task is not None
            and task.options.max_retries > retries
            and isinstance(error, task.options.retry_for)
        ):
            outcome = Outcome(
                job_id,
                lease,
                states.RETRY,
                error=outcome.error,
                traceback=outcome.traceback,
                retry_at=now + task.options.retry_delay(retries),
            )
        self.app.broker.record([outcome], now)
        return outcome.state

    def reap_workers(self) -> None:
        """Collect dead children, give their jobs back, and judge how they died."""
        for pid, handle in list(self.workers.items()):
            code = handle.process.exitcode
            if code is None:
                continue
            del self.workers[pid]
            running, others_started = handle.slot.lost()
            try:
                released = self.app.broker.release_lost(
                    handle.id,
                    self.app.max_deliveries,
                    time.time(),
                    running=handle.timed_out or running,
                    others_started=others_started,
                )
                self.app.broker.remove_worker(handle.id)
            except Exception:
                # Its jobs keep their lease; the sweep returns them once it runs out.
                log.exception("could not give back the jobs of worker %d yet", pid)
                released = 0
            text, jobs_done = handle.slot.error(), handle.slot.jobs_done
            handle.slot.close()
            handle.process.close()
            if released:
                log.warning(
                    "worker %d died holding %d job(s); they went back to the queue", pid, released
                )
            self._judge_exit(pid, handle, code, text, jobs_done)

    def _judge_exit(
        self, pid: int, handle: WorkerHandle, code: int, text: str, jobs_done: int
    ) -> None:
        if code == EXIT_STOPPED:
            log.debug("worker %d stopped", pid)
            if self.config.worker.burst and not handle.retiring:
                self.num_workers = max(0, self.num_workers - 1)
            self._consecutive_crashes = 0
            return
        if code == EXIT_RECYCLE or handle.killed_by_us or handle.retiring:
            log.info("worker %d exited (%s)", pid, _describe_exit(code))
            return
        young = time.monotonic() - handle.started < self.config.young_seconds
        counted = young and jobs_done == 0 and -code not in EXTERNAL_KILLS
        if text and text != self._last_error:
            log.error("worker %d crashed (%s):\n%s", pid, _describe_exit(code), text.rstrip())
            self._last_error = text
        else:
            log.error(
                "worker %d crashed (%s)%s",
                pid,
                _describe_exit(code),
                "; same error as before" if text else "",
            )
        if not counted:
            self._consecutive_crashes = 0
            return
        self._consecutive_crashes += 1
        if self._consecutive_crashes >= self.config.crash_loop_limit:
            error = CrashLoopError(
                f"workers crashed {self._consecutive_crashes} times in a row right after "
                f"starting (last: {_describe_exit(code)}); stopping instead of restarting "
                f"them. The cause is in the worker error logged above; fix it and run again"
            )
            error.worker_error = text  # type: ignore[attr-defined]
            raise error
        delay = min(self.config.restart_delay_max, 0.1 * 2 ** (self._consecutive_crashes - 1))
        self._next_spawn = time.monotonic() + delay
        log.info("restarting in %.1f s", delay)

    def maintain(self) -> None:
        """Return jobs with lapsed leases, expire old results (each on its own interval)."""
        now = time.monotonic()
        if now - self._last_sweep >= self.config.sweep_interval:
            self._last_sweep = now
            changed = self.app.broker.sweep(self.app.max_deliveries, time.time())
            if changed:
                log.info("sweep: %d job(s) with a lapsed lease or past expiry updated", changed)
        if (
            self.app.result_expires is not None
            and now - self._last_expire >= self.config.expire_interval
        ):
            self._last_expire = now
            removed = self.app.broker.purge(
                [states.SUCCESS, states.REVOKED, states.EXPIRED],
                finished_before=time.time() - self.app.result_expires,
            )
            if removed:
                log.info(
                    "expired %d finished job(s) older than %g s", removed, self.app.result_expires
                )

    # -- stopping -----------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker: politely with ``graceful`` (up to ``graceful_timeout``), then kill.

        Jobs of killed workers go back to the queue. A second ``INT``/``TERM`` during
        a graceful stop kills at once.
        """
        if not self.workers:
            return
        if graceful:
            log.info(
                "stopping %d worker(s); running jobs get %g s",
                len(self.workers),
                self.config.graceful_timeout,
            )
            for handle in self.workers.values():
                handle.retiring = True
                self._kill(handle, signal.SIGTERM)
            deadline = time.monotonic() + self.config.graceful_timeout
            while self.workers and time.monotonic() < deadline:
                self._sleep(min(self.config.tick, max(0.0, deadline - time.monotonic())))
                if any(
                    s in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT) for s in self._signal_queue
                ):
                    log.info("second stop signal: stopping at once")
                    break
                self._signal_queue.clear()
                self.murder_workers()
                self._reap_quietly()
        if self.workers:
            log.warning("killing %d worker(s); their jobs go back to the queue", len(self.workers))
            for handle in self.workers.values():
                handle.retiring = True
                self._kill(handle, signal.SIGKILL)
            for handle in self.workers.values():
                handle.process.join(5)
            self._reap_quietly()

    def _reap_quietly(self) -> None:
        with contextlib.suppress(CrashLoopError):  # crashes while stopping do not matter now
            self.reap_workers()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_INIT_FAILED:
        return "worker init failed"
    return f"exit code {code}"
