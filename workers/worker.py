"""The worker: the loop a forked child runs until it is told to stop.

Claim a batch of due jobs, run each, record each outcome under its lease, repeat.
The outcomes of a batch's last jobs are recorded together with the next claim
(:meth:`~workers.brokers.base.Broker.record_and_claim`, one round trip on
PostgreSQL), which follows at once: results are never held back while the worker
waits or stops. While a batch runs, an outcome that has waited
``OUTCOME_FLUSH_SECONDS`` is written by a background thread with the others then
finished, so a slow job does not hold back the outcomes of those before it (nor
lose them, should its worker be killed).
A background thread heartbeats: it extends the leases of held jobs, reports the
worker's row (jobs done, pool stats), and notices when the supervisor has died, in
which case the worker gives its jobs back and exits, even from inside a task that
never returns.

A :class:`Slot` (a few hundred bytes of shared memory made by the supervisor before
the fork) tells the supervisor, without any database round trip, which job is
running since when: that is how it enforces ``time_limit``.

Exit codes tell the supervisor what happened: :data:`EXIT_STOPPED` (asked to stop,
or ``--burst`` found the queue empty), :data:`EXIT_RECYCLE` (``max_tasks_per_child``
or ``max_memory_per_child`` reached: replace me), :data:`EXIT_INIT_FAILED` (a worker
init hook raised; the traceback is in the slot), anything else is a crash.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from workers import states
from workers.app import App, Task
from workers.brokers.base import ClaimedJob, Outcome, WorkerInfo
from workers.errors import (
    CorruptPayloadError,
    SerializationError,
    SoftTimeLimitExceeded,
    UnknownTaskError,
    WorkersError,
)
from workers.failures import describe, format_traceback

log = logging.getLogger("workers.worker")

EXIT_STOPPED = 0
EXIT_RECYCLE = 75
EXIT_INIT_FAILED = 70
EXIT_ORPHANED = 71

STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
"""What asks a worker to stop after its current job (a graceful stop)."""

OUTCOME_FLUSH_SECONDS = 0.05
"""Outcomes of a prefetched batch are written together, but never held longer than this."""

OUTCOME_RETRY_SECONDS = 1.0
"""After a failed write of due outcomes, the writer thread tries again this much later."""

Done = tuple[ClaimedJob, Outcome, float]
"""A finished job, how it ended and how long it ran (seconds)."""


class Slot:
    """Shared memory one worker writes and its supervisor reads.

    Fields: heartbeat time and jobs done; start time of the running job (0 when idle)
    and its hard time limit (0 for none); its id, lease and task name; how many jobs
    started and have no outcome written yet (the running one included); the text of a
    fatal error. A job's names are written before its start time and the start time
    is cleared first when it ends, so a reader that sees the same start time before
    and after reading the names has read them whole.
    """

    _BEAT = struct.Struct("<dq")  # heartbeat, jobs done
    _CLOCK = struct.Struct("<dd")  # started, time limit
    _NAMES = struct.Struct("<64s32s64s")  # job id, lease, task
    _UNSETTLED = struct.Struct("<q")
    _TEXT_LEN = struct.Struct("<I")
    _CLOCK_AT = _BEAT.size
    _NAMES_AT = _CLOCK_AT + _CLOCK.size
    _UNSETTLED_AT = _NAMES_AT + _NAMES.size
    _TEXT_LEN_AT = _UNSETTLED_AT + _UNSETTLED.size
    _TEXT_AT = _TEXT_LEN_AT + _TEXT_LEN.size
    _TEXT = 8192

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, self._TEXT_AT + self._TEXT)

    def beat(self, jobs_done: int) -> None:
        """Record that the worker is alive (between jobs)."""
        self._BEAT.pack_into(self._map, 0, time.time(), jobs_done)

    def begin(self, job: ClaimedJob, time_limit: float | None) -> None:
        self._NAMES.pack_into(
            self._map, self._NAMES_AT, job.id.encode(), job.lease.encode(), job.task.encode()
        )
        self._CLOCK.pack_into(self._map, self._CLOCK_AT, time.time(), time_limit or 0.0)

    def end(self) -> None:
        self._CLOCK.pack_into(self._map, self._CLOCK_AT, 0.0, 0.0)

    def running(self) -> tuple[str, str, str, float, float] | None:
        """``(job_id, lease, task, started, time_limit)`` of the running job, or ``None``."""
        started, limit = self._CLOCK.unpack_from(self._map, self._CLOCK_AT)
        if not started:
            return None
        job, lease, task = self._NAMES.unpack_from(self._map, self._NAMES_AT)
        if self._CLOCK.unpack_from(self._map, self._CLOCK_AT)[0] != started:
            return None  # changed while we read it; look again next round
        return (
            job.rstrip(b"\0").decode(),
            lease.rstrip(b"\0").decode(),
            task.rstrip(b"\0").decode(),
            started,
            limit,
        )

    def set_unsettled(self, count: int) -> None:
        self._UNSETTLED.pack_into(self._map, self._UNSETTLED_AT, count)

    def lost(self) -> tuple[str | None, bool]:
        """For the jobs of a worker that died: the id of the job it was running (None:
        none), and whether another job it started may have its outcome unwritten (one
        that finished, its outcome lost with the worker)."""
        running = self.running()
        job = running[0] if running else None
        (unsettled,) = self._UNSETTLED.unpack_from(self._map, self._UNSETTLED_AT)
        return job, unsettled > (1 if job else 0)

    @property
    def jobs_done(self) -> int:
        return int(self._BEAT.unpack_from(self._map, 0)[1])

    @property
    def heartbeat(self) -> float:
        return float(self._BEAT.unpack_from(self._map, 0)[0])

    def set_error(self, text: str) -> None:
        data = text.encode(errors="replace")[-self._TEXT :]
        self._map[self._TEXT_AT : self._TEXT_AT + len(data)] = data
        self._TEXT_LEN.pack_into(self._map, self._TEXT_LEN_AT, len(data))

    def error(self) -> str:
        (length,) = self._TEXT_LEN.unpack_from(self._map, self._TEXT_LEN_AT)
        return self._map[self._TEXT_AT : self._TEXT_AT + length].decode(errors="replace")

    def close(self) -> None:
        self._map.close()


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker behaves; the same for every worker of one supervisor."""

    queues: tuple[str, ...] = ("default",)
    prefetch: int = 10
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None
    """Resident set size in MiB after which the worker is replaced (checked between jobs)."""
    burst: bool = False
    heartbeat_interval: float = 1.0
    """Seconds between lease extensions; the supervisor lowers it to the App's
    ``heartbeat_interval`` (a quarter of ``lease_seconds``) when that is shorter."""
    idle_wait: float = 0.25


def hostname() -> str:
    """This machine's name as workers report it: ``FORKSAFE_HOSTNAME`` (``forksafe run
    --hostname``), else the system's host name."""
    return os.environ.get("FORKSAFE_HOSTNAME") or socket.gethostname()


def worker_id(pid: int, nonce: str) -> str:
    """The id under which a worker holds leases: ``host:pid:nonce``."""
    return f"{hostname()}:{pid}:{nonce}"


def rss_mib() -> float:
    """This process's resident set size in MiB."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):  # not Linux: peak RSS is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Worker:
    """One worker process's loop. Build it in the child, then call :meth:`run`."""

    def __init__(
        self, app: App, config: WorkerConfig, slot: Slot, nonce: str, supervisor_pid: int
    ) -> None:
        self.app = app
        self.config = config
        self.slot = slot
        self.pid = os.getpid()
        self.id = worker_id(self.pid, nonce)
        self.supervisor_pid = supervisor_pid
        self.started_at = time.time()
        self.jobs_done = 0
        self.stopping = threading.Event()
        self.exit_code = EXIT_STOPPED
        self._in_task = False
        self._current: str | None = None
        self._held: list[ClaimedJob] = []
        self._finished = threading.Event()
        # Set when the loop has ended: no job runs any more, the heartbeat may stop. Not
        # at a stop signal: the job still running through a graceful stop keeps its lease.
        self._jobs_over = threading.Event()
        # Finished jobs whose outcome is still to be written, shared by the loop and the
        # outcome writer thread: whoever takes them (under the lock) writes them.
        self._outcomes = threading.Condition(threading.Lock())
        self._done: list[Done] = []
        self._unsettled = 0  # jobs started whose outcome is not written (see Slot.lost)
        self._write_at = 0.0  # monotonic time by which the writer writes self._done
        self._writing = True  # the writer thread runs until the loop ends
        self._writer_idle = False  # it waits for a first outcome, without a timeout
        self._last_claim = 0.0

    # -- process setup ------------------------------------------------------------

    def install_signals(self) -> None:
        """Replace the supervisor's handlers inherited through fork with the worker's."""
        signal.signal(signal.SIGTERM, self._handle_stop)
        signal.signal(signal.SIGINT, self._handle_stop)
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        signal.signal(signal.SIGALRM, self._handle_soft_limit)
        for name in ("SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1", "SIGUSR2"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The supervisor forks with the stop signals blocked (see spawn_worker).
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping.set()

    def _handle_soft_limit(self, signum: int, frame: FrameType | None) -> None:
        if self._in_task:
            raise SoftTimeLimitExceeded(
                f"task {self._current} passed its soft_time_limit; catch "
                f"SoftTimeLimitExceeded in the task to clean up, or raise the limit"
            )

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped, drained (``burst``) or recycled; return the exit code."""
        broker = self.app.broker
        broker.report_worker(self._info())
        beat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        beat.start()
        writer = threading.Thread(target=self._writer_loop, name="outcomes", daemon=True)
        writer.start()
        log.debug("worker %s serving queues %s", self.id, ",".join(self.config.queues))
        with broker.hold_connection():  # claims and waits on one session
            self._loop(beat, writer)
        return self.exit_code

    def _loop(self, beat: threading.Thread, writer: threading.Thread) -> None:
        """Claim, run and record until told to stop; then write the outcomes left, give
        back the jobs left and wait for the ``beat`` and ``writer`` threads to end."""
        broker = self.app.broker
        drained = False  # the previous claim emptied the queue
        try:
            while not self.stopping.is_set():
                if os.getppid() != self.supervisor_pid:
                    log.warning(
                        "supervisor %d is gone; worker %d stops", self.supervisor_pid, self.pid
                    )
                    self.exit_code = EXIT_ORPHANED
                    break
                if drained:
                    self._gather()
                now = time.time()
                self._last_claim = time.monotonic()
                recorded = self._take_outcomes()
                limit = self._claim_limit()
                stored, jobs = broker.record_and_claim(
                    [outcome for _, outcome, _ in recorded],
                    self.id,
                    self.config.queues,
                    limit,
                    self.app.lease_seconds,
                    now,
                )
                self._recorded(recorded, stored)
                self._settle(len(recorded))
                drained = len(jobs) < limit  # the queue had no more: more arrive one by one
                if not jobs:
                    if self.config.burst and broker.outstanding(self.config.queues, now) == 0:
                        log.debug("worker %d: queue drained (burst)", self.pid)
                        break
                    broker.wait(self.config.idle_wait)
                    continue
                self._run_batch(jobs)
                if self._should_recycle():
                    self.exit_code = EXIT_RECYCLE
                    break
        finally:
            self.stopping.set()
            self._jobs_over.set()
            try:
                with self._outcomes:
                    self._writing = False
                    self._outcomes.notify()
                writer.join()
                self._flush()
            finally:
                if self._held:
                    broker.release(self.id, [job.id for job in self._held], time.time())
                broker.remove_worker(self.id)
                self._finished.set()
                beat.join(timeout=self.config.heartbeat_interval + 1)

    def _gather(self) -> None:
        """Before a claim that follows one which emptied the queue (whether or not it
        found jobs), let the broker's ``gather_seconds`` pass since that claim: jobs
        submitted in a stream are then claimed a few at a time instead of one claim per
        job; a job submitted alone, long after the previous claim, is claimed at once."""
        pause = self._last_claim + self.app.broker.gather_seconds - time.monotonic()
        if pause > 0:
            time.sleep(pause)

    def _run_batch(self, jobs: list[ClaimedJob]) -> None:
        """Run claimed jobs in order until done or stopping. Their outcomes wait in
        ``self._done`` for the next claim, or for the writer thread once they have
        waited ``OUTCOME_FLUSH_SECONDS``."""
        self._held = list(jobs)
        while self._held:
            if self.stopping.is_set():
                break
            job = self._held.pop(0)  # started: never given back as if it had not
            self._settle(-1)
            started = time.monotonic()
            try:
                outcome = self.execute(job)
            except BaseException as exc:  # outside the task: its payload, its result...
                outcome = self._broken(job, exc)
            self.jobs_done += 1
            self._finish((job, outcome, time.monotonic() - started))

    def _finish(self, done: Done) -> None:
        """Add a finished job to those whose outcome is to be written."""
        with self._outcomes:
            if not self._done:
                self._write_at = time.monotonic() + OUTCOME_FLUSH_SECONDS
                if self._writer_idle:  # else it looks again by the time this one is due
                    self._outcomes.notify()
            self._done.append(done)

    def _settle(self, written: int) -> None:
        """Count ``written`` outcomes written (-1: a job started), in the slot too."""
        with self._outcomes:
            self._unsettled -= written
            self.slot.set_unsettled(self._unsettled)

    def _take_outcomes(self) -> list[Done]:
        """The finished jobs whose outcome is to be written; the caller writes them."""
        with self._outcomes:
            done, self._done = self._done, []
        return done

    def _flush(self) -> None:
        """Write the outcomes still to be written, now."""
        self._write(self._take_outcomes())

    def _write(self, done: Sequence[Done]) -> None:
        if done:
            self._recorded(done, self.app.broker.record([o for _, o, _ in done], time.time()))
            self._settle(len(done))

    def _writer_loop(self) -> None:
        """Write outcomes that have waited ``OUTCOME_FLUSH_SECONDS`` (those finished
        while a later job of the batch runs) until the loop ends."""
        while True:
            with self._outcomes:
                while self._writing:
                    pause = self._write_at - time.monotonic()
                    if pause > 0:  # (the loop may have taken them by then: no matter)
                        self._outcomes.wait(pause)
                    elif self._done:
                        break
                    else:  # nothing finished since: sleep until a job does
                        self._writer_idle = True
                        self._outcomes.wait()
                        self._writer_idle = False
                if not self._writing:
                    return
                done, self._done = self._done, []
            try:
                self._write(done)
            except Exception:
                log.exception(
                    "worker %d could not write %d outcome(s) yet; will try again",
                    self.pid,
                    len(done),
                )
                with self._outcomes:
                    self._done[:0] = done
                    self._write_at = time.monotonic() + OUTCOME_RETRY_SECONDS

    def _recorded(self, done: Sequence[Done], stored: Sequence[bool]) -> None:
        """Log each recorded outcome (``stored``: whether its lease was still current)."""
        for (job, outcome, seconds), kept in zip(done, stored, strict=True):
            state = outcome.state if kept else f"{outcome.state} (dropped: lease lost)"
            extra = {
                "task": job.task,
                "job_id": job.id,
                "outcome": outcome.state,
                "duration_ms": round(seconds * 1000, 3),
                "recorded": kept,
            }
            if outcome.state == states.SUCCESS:
                log.info(
                    "%s[%s] %s in %.1f ms", job.task, job.id, state, seconds * 1000, extra=extra
                )
            else:
                message = (outcome.error or {}).get("message", "")
                error_type = (outcome.error or {}).get("type", "")
                log.warning(
                    "%s[%s] %s in %.1f ms: %s: %s",
                    job.task,
                    job.id,
                    state,
                    seconds * 1000,
                    error_type,
                    message,
                    extra=extra,
                )
        if done:
            self.slot.beat(self.jobs_done)

    def _claim_limit(self) -> int:
        """``prefetch``, but never more than the jobs left before ``max_tasks_per_child``."""
        limit = self.config.max_tasks_per_child
        if limit is None:
            return self.config.prefetch
        return max(1, min(self.config.prefetch, limit - self.jobs_done))

    def _should_recycle(self) -> bool:
        limit = self.config.max_tasks_per_child
        if limit is not None and self.jobs_done >= limit:
            log.info(
                "worker %d ran %d jobs (max_tasks_per_child); recycling", self.pid, self.jobs_done
            )
            return True
        memory = self.config.max_memory_per_child
        if memory is not None and (rss := rss_mib()) > memory:
            log.info(
                "worker %d uses %.0f MiB > max_memory_per_child %.0f MiB; recycling",
                self.pid,
                rss,
                memory,
            )
            return True
        return False

    # -- one job ------------------------------------------------------------------

    def execute(self, job: ClaimedJob) -> Outcome:
        """Run one claimed job and describe how it ended (never raises for a task's error).

        Whatever the task raises is its failure, :class:`BaseException` included (a
        ``CancelledError``, a ``KeyboardInterrupt`` of its own): the worker's stop
        signals set :attr:`stopping` and never raise inside a task.
        """
        self.slot.begin(job, None)  # started: its delivery counts should the worker die
        try:
            task, args, kwargs = self._decode(job)
        except BaseException as exc:
            self.slot.end()
            if not isinstance(exc, WorkersError):
                raise
            return Outcome(
                job.id,
                job.lease,
                states.FAILURE,
                error=describe(exc),
                traceback=format_traceback(exc),
            )
        options = task.options
        if options.time_limit:
            self.slot.begin(job, options.time_limit)
        self._current = f"{job.task}[{job.id}]"
        try:
            if options.soft_time_limit:
                signal.setitimer(signal.ITIMER_REAL, options.soft_time_limit)
            self._in_task = True
            try:
                value = task.func(*args, **kwargs)
            finally:
                self._in_task = False
                if options.soft_time_limit:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as exc:
            return self._failed(job, task, exc)
        finally:
            self.slot.end()
            self._current = None
        try:
            result = self.app.serializer.dumps(value)
        except SerializationError as exc:
            error = SerializationError(
                f"task {job.task} returned a {type(value).__name__} that the "
                f"{self.app.serializer.name} serializer cannot carry ({exc}); return a "
                f"JSON value or use App(serializer='pickle')"
            )
            return Outcome(
                job.id,
                job.lease,
                states.FAILURE,
                error=describe(error),
                traceback=format_traceback(error),
            )
        return Outcome(job.id, job.lease, states.SUCCESS, result=result)

    def _decode(self, job: ClaimedJob) -> tuple[Task[Any, Any], list[Any], dict[str, Any]]:
        serializer = self.app.serializer
        if job.serializer != serializer.name:
            raise CorruptPayloadError(
                f"job {job.id} was submitted with the {job.serializer!r} serializer but this "
                f"App decodes only {serializer.name!r}; submit it from an App with the same "
                f"serializer"
            )
        call = serializer.loads(job.payload)
        if (
            not isinstance(call, dict)
            or not isinstance(call.get("args"), list)
            or not isinstance(call.get("kwargs"), dict)
        ):
            raise CorruptPayloadError(
                f"job {job.id} payload is not {{'args': [...], 'kwargs': {{...}}}}: "
                f"{job.payload[:80]!r}"
            )
        task = self.app.tasks.get(job.task)
        if task is None:
            known = ", ".join(sorted(self.app.tasks)) or "none"
            raise UnknownTaskError(
                f"no task named {job.task!r} in this App (known: {known}); deploy the code "
                f"that defines it or fix the name"
            )
        return task, call["args"], call["kwargs"]

    def _broken(self, job: ClaimedJob, exc: BaseException) -> Outcome:
        """The failure of a job whose run raised ``exc`` outside its task's code."""
        return Outcome(
            job.id, job.lease, states.FAILURE, error=describe(exc), traceback=format_traceback(exc)
        )

    def _failed(self, job: ClaimedJob, task: Task[Any, Any], exc: BaseException) -> Outcome:
        options = task.options
        text = format_traceback(exc, skip=1)
        if isinstance(exc, options.retry_for) and job.retries < options.max_retries:
            delay = options.retry_delay(job.retries)
            log.info(
                "%s[%s] retry %d/%d in %.2f s after %s: %s",
                job.task,
                job.id,
                job.retries + 1,
                options.max_retries,
                delay,
                type(exc).__name__,
                exc,
            )
            return Outcome(
                job.id,
                job.lease,
                states.RETRY,
                error=describe(exc),
                traceback=text,
                retry_at=time.time() + delay,
            )
        return Outcome(job.id, job.lease, states.FAILURE, error=describe(exc), traceback=text)

    # -- heartbeat ----------------------------------------------------------------

    def _info(self) -> WorkerInfo:
        stats: dict[str, Any] = {"broker": self.app.broker.stats(), "rss_mib": round(rss_mib(), 1)}
        for name, pool in self.app.pools.items():
            pool_stats = getattr(pool, "stats", None)
            if callable(pool_stats):
                try:
                    stats[name] = dict(pool_stats())
                except Exception as exc:  # a stats bug must not stop the heartbeat
                    stats[name] = {"error": repr(exc)}
        return WorkerInfo(
            id=self.id,
            hostname=hostname(),
            pid=self.pid,
            supervisor_pid=self.supervisor_pid,
            queues=self.config.queues,
            started_at=self.started_at,
            heartbeat_at=time.time(),
            jobs_done=self.jobs_done,
            current_job=self._current,
            stats=stats,
        )

    def _heartbeat_loop(self) -> None:
        broker = self.app.broker
        tick = min(0.25, self.config.heartbeat_interval)
        next_beat = time.monotonic() + self.config.heartbeat_interval
        while not self._jobs_over.wait(tick):
            if os.getppid() != self.supervisor_pid:
                self._abandon()
                return
            self.slot.beat(self.jobs_done)
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.config.heartbeat_interval
                try:
                    broker.extend_leases(self.id, self.app.lease_seconds, time.time())
                    broker.report_worker(self._info())
                except Exception:
                    log.exception("worker %d heartbeat failed; will try again", self.pid)

    def _abandon(self) -> None:
        """The supervisor died: give the main loop a moment, then give jobs back and exit."""
        self.stopping.set()
        if self._finished.wait(2.0):
            return  # the main loop was between jobs and has wound up by itself
        log.warning(
            "supervisor %d is gone and job %s is still running; worker %d gives its "
            "jobs back and exits",
            self.supervisor_pid,
            self._current,
            self.pid,
        )
        try:
            broker = self.app.broker
            try:
                self._flush()  # the outcomes of the jobs it finished
            except Exception:
                log.exception("worker %d could not write its last outcomes", self.pid)
            running, others_started = self.slot.lost()
            broker.release_lost(
                self.id,
                self.app.max_deliveries,
                time.time(),
                running=running,
                others_started=others_started,
            )
            broker.remove_worker(self.id)
        finally:
            os._exit(EXIT_ORPHANED)


def worker_main(
    app: App, config: WorkerConfig, slot: Slot, nonce: str, supervisor_pid: int
) -> None:
    """Entry point of a forked worker process; exits with one of the ``EXIT_*`` codes."""
    worker = Worker(app, config, slot, nonce, supervisor_pid)
    worker.install_signals()
    try:
        for hook in app.worker_init:
            hook()
    except BaseException as exc:
        slot.set_error(format_traceback(exc))
        sys.exit(EXIT_INIT_FAILED)
    try:
        code = worker.run()
    except BaseException as exc:
        slot.set_error(format_traceback(exc))
        log.error("worker %d crashed: %s: %s", worker.pid, type(exc).__name__, exc)
        sys.exit(1)
    sys.exit(code)
