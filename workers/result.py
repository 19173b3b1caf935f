"""Result handles: ask the broker what became of a job, from any process.

``add.delay(2, 3)`` returns an :class:`AsyncResult`; ``AsyncResult(job_id, app=app)``
rebuilds one from a bare id (in another process, a web request, the CLI). Every
property reads the broker afresh; nothing is cached except final states.

A read for one handle also asks after other handles of the same App in this process
whose job was not yet seen finished, and keeps the final states it finds: waiting for a
thousand results in turn then costs a few reads, not a thousand.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from workers import states
from workers.app import App, current_app
from workers.brokers.base import JobRecord
from workers.brokers.server import BrokerUnavailableError
from workers.errors import JobExpired, JobRevoked, ResultTimeout, WorkersError
from workers.failures import rebuild

R = TypeVar("R")
T = TypeVar("T")


class _Unfinished:
    """One App's result handles in this process whose job was not yet seen final
    (weak references: a handle dropped by its owner drops out).

    A read for one handle asks after up to :attr:`batch` others in the same query, those
    asked after least recently first. The batch doubles (to 256) after a read that found
    some of them finished and halves (to 4) after one that found none, so a lone handle
    polled while others wait pays little.
    """

    SMALLEST, LARGEST = 4, 256

    def __init__(self) -> None:
        self._lock = threading.Lock()  # handles are made and read from any thread
        self._handles: weakref.WeakValueDictionary[str, AsyncResult[Any]] = (
            weakref.WeakValueDictionary()
        )
        self.batch = 32

    def add(self, handle: AsyncResult[Any]) -> None:
        with self._lock:
            self._handles[handle.id] = handle

    def discard(self, handle: AsyncResult[Any]) -> None:
        with self._lock:
            if self._handles.get(handle.id) is handle:
                del self._handles[handle.id]

    def others(self, job_id: str) -> dict[str, AsyncResult[Any]]:
        """Up to :attr:`batch` handles for jobs other than ``job_id``."""
        picked: dict[str, AsyncResult[Any]] = {}
        with self._lock:
            for other_id, handle in self._handles.items():
                if len(picked) >= self.batch:
                    break
                if other_id != job_id:
                    picked[other_id] = handle
        return picked

    def learn(self, asked: Mapping[str, AsyncResult[Any]], finished: int) -> None:
        """After a read that asked after ``asked`` and found ``finished`` of them final:
        the others go to the back, and the batch is adjusted."""
        with self._lock:
            for other_id, handle in asked.items():
                if handle._final is None and self._handles.get(other_id) is handle:
                    del self._handles[other_id]
                    self._handles[other_id] = handle
        if finished:
            self.batch = min(self.batch * 2, self.LARGEST)
        elif asked:
            self.batch = max(self.batch // 2, self.SMALLEST)


_unfinished: weakref.WeakKeyDictionary[App, _Unfinished] = weakref.WeakKeyDictionary()
_unfinished_lock = threading.Lock()


def _unfinished_of(app: App) -> _Unfinished:
    with _unfinished_lock:
        unfinished = _unfinished.get(app)
        if unfinished is None:
            unfinished = _unfinished[app] = _Unfinished()
        return unfinished


def _fresh_locks_after_fork() -> None:
    """A forked child gets new locks: an inherited one may have been held by a thread
    of the parent at the fork, and would never be released in the child."""
    global _unfinished_lock
    _unfinished_lock = threading.Lock()
    for unfinished in _unfinished.values():
        unfinished._lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_locks_after_fork)


class AsyncResult(Generic[R]):
    """The state and outcome of one job.

    ``app`` defaults to the App created most recently in this process; with no App
    at all, :class:`~workers.errors.WorkersError` is raised telling to pass one.
    """

    def __init__(self, id: str, app: App | None = None) -> None:
        chosen = app or current_app()
        if chosen is None:
            raise WorkersError(f"AsyncResult({id!r}) has no App to ask; pass app=your_app")
        self.id = id
        self.app = chosen
        self._final: JobRecord | None = None
        self._unfinished = _unfinished_of(chosen)
        self._unfinished.add(self)

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id} {self.state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _record(self) -> JobRecord | None:
        if self._final is not None:
            return self._final
        others = self._unfinished.others(self.id)
        mine = None
        finished = 0
        for record in self.app.broker.fetch_finished(self.id, list(others)):
            handle = self if record.id == self.id else others.get(record.id)
            if handle is self:
                mine = record
            if handle is not None and record.state in states.READY_STATES:
                finished += handle is not self
                handle._finish(record)
        self._unfinished.learn(others, finished)
        return mine

    def _finish(self, record: JobRecord) -> None:
        if self._final is None:
            self._final = record
            self._unfinished.discard(self)

    @property
    def state(self) -> str:
        """One of :data:`workers.states.ALL_STATES`; ``PENDING`` for an unknown id."""
        record = self._record()
        return record.state if record is not None else states.PENDING

    status = state

    def ready(self) -> bool:
        """Whether the job reached a final state (success, failure, revoked, expired)."""
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state == states.FAILURE

    @property
    def result(self) -> Any:
        """The return value on success, the rebuilt exception on failure, else ``None``."""
        record = self._record()
        if record is None:
            return None
        if record.state == states.SUCCESS:
            return self._decode(record)
        if record.error is not None and record.state in (states.FAILURE, states.RETRY):
            return rebuild(record.error, record.traceback)
        return None

    @property
    def traceback(self) -> str | None:
        """The traceback text of the last failed attempt, if any."""
        record = self._record()
        return record.traceback if record is not None else None

    @property
    def info(self) -> Mapping[str, Any] | None:
        """The raw failure record (``type``, ``message``, ``args``) of the last failed attempt."""
        record = self._record()
        return record.error if record is not None else None

    @property
    def worker(self) -> str | None:
        """The id (``host:pid:...``) of the worker that last ran the job."""
        record = self._record()
        return record.worker if record is not None else None

    def get(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.05
    ) -> R:
        """Wait for the job to finish and return its result.

        Polls the broker, waking up early on any change it can see (every
        millisecond at first, backing off to at most ``interval`` seconds between reads).
        Raises :class:`~workers.errors.ResultTimeout` after ``timeout`` seconds (wait
        forever if ``None``), also while the broker's database is unreachable: the
        broker's retries end at the timeout. On failure, with ``propagate`` the task's
        exception is re-raised (same type when it can be rebuilt, else
        :class:`~workers.errors.TaskError`) with the worker's traceback attached as
        ``remote_traceback``; without it the exception is returned. A task that ended
        with an exception that is not an :class:`Exception` (``sys.exit()``,
        ``KeyboardInterrupt``) always comes back as a ``TaskError`` naming it, so that it
        does not end the calling program.
        A revoked or expired job raises :class:`~workers.errors.JobRevoked` or
        :class:`~workers.errors.JobExpired` (returns ``None`` without ``propagate``).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while True:
            record = self._bounded(self._record, deadline, timeout)
            if record is not None and record.state in states.READY_STATES:
                return self._outcome(record, propagate)  # type: ignore[no-any-return]
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    state = record.state if record is not None else states.PENDING
                    raise ResultTimeout(
                        f"job {self.id} is still {state} after {timeout} s; wait longer "
                        f"(get(timeout=...)) or check that a worker serves its queue"
                    )
                pause = min(pause, remaining)
            # Returns early when the broker sees a commit (SQLite data_version, ...).
            self._bounded(functools.partial(self.app.broker.wait, pause), deadline, timeout)
            pause = min(pause * 2, interval)

    def _bounded(self, read: Callable[[], T], deadline: float | None, timeout: float | None) -> T:
        """``read()``, whose broker calls give up retrying an unreachable database at
        ``deadline`` (a monotonic time), raising :class:`ResultTimeout` then."""
        if deadline is None:
            return read()
        try:
            with self.app.broker.patience(deadline - time.monotonic()):
                return read()
        except BrokerUnavailableError as exc:
            if time.monotonic() < deadline:
                raise  # gave up sooner: retry_for is shorter than the timeout
            cause = exc.__cause__ or exc
            first_line = (str(cause).strip().splitlines() or [""])[0]
            raise ResultTimeout(
                f"job {self.id} could not be read within {timeout} s: the broker "
                f"{self.app.broker.url.masked()} is unreachable ({type(cause).__name__}: "
                f"{first_line}); wait longer (get(timeout=...)) or check the server"
            ) from exc

    def _outcome(self, record: JobRecord, propagate: bool) -> Any:
        if record.state == states.SUCCESS:
            return self._decode(record)
        if record.state == states.FAILURE:
            exc = rebuild(record.error or {}, record.traceback)
            if propagate:
                raise exc
            return exc
        if not propagate:
            return None
        if record.state == states.REVOKED:
            raise JobRevoked(f"job {self.id} ({record.task}) was revoked; it has no result")
        raise JobExpired(
            f"job {self.id} ({record.task}) expired before a worker started it; "
            f"submit it again with a later expires= or add workers"
        )

    def _decode(self, record: JobRecord) -> Any:
        if record.result is None:
            return None
        if record.serializer != self.app.serializer.name:
            # Never decode with a serializer the App did not choose: that is how a
            # JSON App would end up unpickling whatever someone wrote into the queue.
            raise WorkersError(
                f"job {self.id} was stored with the {record.serializer!r} serializer but "
                f"this App uses {self.app.serializer.name!r}; read it with "
                f"App(serializer={record.serializer!r})"
            )
        return self.app.serializer.loads(record.result)

    def revoke(self) -> bool:
        """Cancel the job if it has not finished; returns whether it was cancelled.

        A job already running is not interrupted, but its outcome is discarded.
        """
        revoked = self.app.broker.revoke(self.id, time.time())
        self._final = None
        self._unfinished.add(self)
        return revoked
