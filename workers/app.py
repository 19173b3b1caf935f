"""The App and its tasks: what a user's ``tasks.py`` declares and submits through.

::

    from workers import App
    app = App()                      # broker from FORKSAFE_BROKER, else sqlite:///forksafe.db

    @app.task(max_retries=3, retry_backoff=True, time_limit=30)
    def add(x, y):
        return x + y

    add(2, 3)                        # a plain call runs inline
    add.delay(2, 3).get(timeout=10)  # runs in a worker of `forksafe run tasks.py`

Creating an App opens nothing: the broker is built on first use, so a tasks module
imported by the supervisor before it forks holds no connection its workers share.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from workers.brokers.base import DEFAULT_URL, Broker, NewJob, create_broker, parse_url
from workers.errors import InvalidOptionError, TaskRegistrationError
from workers.serializers import Serializer, dump_call, get_serializer

if TYPE_CHECKING:
    from workers.result import AsyncResult

log = logging.getLogger("workers.app")

P = ParamSpec("P")
R = TypeVar("R")

DEFAULT_QUEUE = "default"

HEARTBEATS_PER_LEASE = 4
"""Workers extend their leases at least this often per ``lease_seconds`` (and at least
once a second), so that a heartbeat or two that come late lose no lease."""

MIN_LEASE_SECONDS = 0.2
"""The shortest ``lease_seconds``: heartbeats more often than every 50 ms would load
the broker for little."""

_current_app: App | None = None


def current_app() -> App | None:
    """The App created most recently in this process (``AsyncResult(id)`` uses it)."""
    return _current_app


class App:
    """A registry of tasks bound to one broker.

    ``broker`` is a URL, a :class:`~workers.brokers.base.Broker`, or ``None`` for the
    ``FORKSAFE_BROKER`` environment variable, else ``sqlite:///forksafe.db``. A bad URL
    raises :class:`~workers.errors.BrokerURLError` here, at import of the tasks module.

    ``serializer`` is ``"json"`` (default) or ``"pickle"``/``"dill"`` for trusted
    producers only (see :mod:`workers.serializers`). ``result_expires`` is how many
    seconds finished successful jobs are kept (failed ones are kept until purged).
    ``lease_seconds`` is how long a claimed job stays with a silent worker before it
    goes back to the queue (at least 0.2). Workers extend the leases of the jobs they
    hold every second, or every quarter of ``lease_seconds`` if that is shorter
    (:attr:`heartbeat_interval`), so a short lease costs more heartbeats but never lets
    a job that is still running go to another worker.
    """

    def __init__(
        self,
        broker: str | Broker | None = None,
        serializer: str = "json",
        *,
        default_queue: str = DEFAULT_QUEUE,
        result_expires: float | None = 24 * 3600,
        lease_seconds: float = 60.0,
        max_deliveries: int = 10,
    ) -> None:
        global _current_app
        if isinstance(broker, Broker):
            self._broker: Broker | None = broker
            self.broker_url = broker.url.masked()
            self._url = broker.url.unmasked()
        else:
            self._url = broker or os.environ.get("FORKSAFE_BROKER") or DEFAULT_URL
            self.broker_url = parse_url(self._url).masked()  # validates the URL now
            self._broker = None
        self.serializer: Serializer = get_serializer(serializer)
        self.default_queue = default_queue
        self.result_expires = result_expires
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.pools: dict[str, Any] = {}
        self.worker_init: list[Callable[[], None]] = []
        self._setup_pid: int | None = None
        _current_app = self

    def __repr__(self) -> str:
        return f"<App broker={self.broker_url} tasks={sorted(self.tasks)}>"

    @property
    def lease_seconds(self) -> float:
        """How long a claimed job stays with a silent worker (checked when set)."""
        return self._lease_seconds

    @lease_seconds.setter
    def lease_seconds(self, value: float) -> None:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = float("nan")
        if isinstance(value, bool) or not seconds >= MIN_LEASE_SECONDS:
            raise InvalidOptionError(
                f"lease_seconds={value!r} must be a number of seconds >= {MIN_LEASE_SECONDS:g}; "
                f"workers heartbeat every lease_seconds / {HEARTBEATS_PER_LEASE}, and a lease "
                f"is how long a job of a lost worker waits to run again"
            )
        self._lease_seconds = seconds

    @property
    def heartbeat_interval(self) -> float:
        """The longest time between two lease extensions of a worker that respects the
        lease: a quarter of :attr:`lease_seconds` (workers also beat at least every second)."""
        return self._lease_seconds / HEARTBEATS_PER_LEASE

    @property
    def broker(self) -> Broker:
        """The broker, built and its schema created on first use in each process."""
        if self._broker is None:
            self._broker = create_broker(self._url)
        if self._setup_pid != os.getpid():
            self._broker.setup()
            self._setup_pid = os.getpid()
        return self._broker

    def set_broker(self, broker: str | Broker) -> None:
        """Point the App at another broker (``forksafe run --broker``); opens nothing yet."""
        if isinstance(broker, Broker):
            self._broker = broker
            self._url = broker.url.unmasked()
        else:
            self.broker_url = parse_url(broker).masked()
            self._url = broker
            self._broker = None
        self.broker_url = parse_url(self._url).masked()
        self._setup_pid = None

    # -- declaring ----------------------------------------------------------------

    @overload
    def task(self, func: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
        func: None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int = 0,
        retry_backoff: bool | float = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        retry_for: Sequence[type[BaseException]] = (Exception,),
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        priority: int = 0,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        func: Callable[P, R] | None = None,
        /,
        *,
        name: str | None = None,
        queue: str | None = None,
        max_retries: int = 0,
        retry_backoff: bool | float = False,
        retry_backoff_max: float = 600.0,
        retry_jitter: bool = True,
        retry_for: Sequence[type[BaseException]] = (Exception,),
        time_limit: float | None = None,
        soft_time_limit: float | None = None,
        priority: int = 0,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task; usable as ``@app.task`` or ``@app.task(...)``.

        ``name`` defaults to the function's name and must be unique in the App
        (:class:`~workers.errors.TaskRegistrationError` otherwise). A failed attempt
        whose exception is one of ``retry_for`` is tried again up to ``max_retries``
        times; ``retry_backoff=True`` waits 1, 2, 4, ... seconds (a number sets the
        first delay), capped at ``retry_backoff_max``, each scaled by a random factor
        in [0.5, 1] when ``retry_jitter``. Past ``soft_time_limit`` seconds a
        :class:`~workers.errors.SoftTimeLimitExceeded` is raised inside the task; past
        ``time_limit`` the supervisor kills the worker and records
        :class:`~workers.errors.TimeLimitExceeded`.
        """
        options = TaskOptions(
            queue=queue or self.default_queue,
            max_retries=max_retries,
            retry_backoff=retry_backoff,
            retry_backoff_max=retry_backoff_max,
            retry_jitter=retry_jitter,
            retry_for=tuple(retry_for),
            time_limit=time_limit,
            soft_time_limit=soft_time_limit,
            priority=priority,
        )
        options.check()

        def register(fn: Callable[P, R]) -> Task[P, R]:
            task_name = name or fn.__name__
            if task_name in self.tasks and self.tasks[task_name].func is not fn:
                raise TaskRegistrationError(
                    f"two tasks are named {task_name!r} in this App; give one of them "
                    f"@app.task(name='...')"
                )
            task = Task(self, task_name, fn, options)
            self.tasks[task_name] = task
            return task

        return register(func) if func is not None else register

    def on_worker_init(self, func: Callable[[], None]) -> Callable[[], None]:
        """Run ``func`` in each worker right after it is forked, before its first job.

        If it raises, the worker exits and the supervisor counts a crash.
        """
        self.worker_init.append(func)
        return func

    def track_pool(self, name: str, pool: Any) -> Any:
        """Report ``pool.stats()`` under ``name`` in each worker's heartbeat; returns ``pool``."""
        self.pools[name] = pool
        return pool

    # -- submitting ---------------------------------------------------------------

    def submit_many(self, calls: Iterable[Call]) -> list[AsyncResult[Any]]:
        """Submit many calls (from ``task.s(...)``) in one broker transaction.

        Arguments are all checked before anything is written, so one bad call
        submits nothing.
        """
        from workers.result import AsyncResult

        now = time.time()
        jobs = [self._new_job(call, now) for call in calls]
        if jobs:
            self.broker.enqueue(jobs, now)
        return [AsyncResult(job.id, app=self) for job in jobs]

    def _new_job(self, call: Call, now: float) -> NewJob:
        task = self.tasks.get(call.task) if isinstance(call.task, str) else call.task
        task_name = call.task if isinstance(call.task, str) else call.task.name
        options = call.options
        payload = dump_call(
            self.serializer,
            task_name,
            task.func if task is not None else None,
            call.args,
            call.kwargs,
        )
        eta = _eta(options.get("eta"), options.get("countdown"), now)
        expires_option = options.get("expires")
        if isinstance(expires_option, dt.datetime):
            expires: float | None = expires_option.timestamp()
        elif expires_option is not None:
            expires = now + _seconds("expires", expires_option, "seconds from now or a datetime")
        else:
            expires = None
        task_options = task.options if task is not None else TaskOptions(queue=self.default_queue)
        priority = options.get("priority")
        return NewJob(
            id=str(options.get("job_id") or uuid.uuid4().hex),
            task=task_name,
            queue=str(options.get("queue") or task_options.queue),
            payload=payload,
            serializer=self.serializer.name,
            priority=task_options.priority if priority is None else _priority(priority),
            eta=eta,
            expires_at=expires,
        )

    def send(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult[Any]:
        """Submit a job by task name (the task need not be defined in this process).

        ``args`` is a list or tuple and ``kwargs`` a mapping, else
        :class:`~workers.errors.InvalidOptionError` is raised.
        """
        args, kwargs = _call_arguments(args, kwargs)
        return self.submit_many([Call(task_name, tuple(args), dict(kwargs), options)])[0]

    def AsyncResult(self, job_id: str) -> AsyncResult[Any]:
        """A result handle for ``job_id`` bound to this App."""
        from workers.result import AsyncResult

        return AsyncResult(job_id, app=self)


def _eta(eta: Any, countdown: Any, now: float) -> float | None:
    if eta is not None:
        if isinstance(eta, dt.datetime):
            return eta.timestamp()
        return _seconds("eta", eta, "a datetime or a Unix time")
    if countdown is not None:
        return now + _seconds("countdown", countdown, "seconds")
    return None


def _seconds(name: str, value: Any, wanted: str) -> float:
    """``value`` of the submission option ``name`` as a float, or
    :class:`InvalidOptionError` naming both."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = math.nan
    if isinstance(value, bool) or not math.isfinite(seconds):
        raise InvalidOptionError(f"{name}={value!r} must be a number: {wanted}")
    return seconds


def _priority(value: Any) -> int:
    try:
        priority = int(value)
    except (TypeError, ValueError, OverflowError):
        priority = None
    if (
        priority is None
        or isinstance(value, bool)
        or (isinstance(value, float) and value != priority)
    ):
        raise InvalidOptionError(
            f"priority={value!r} must be a whole number (higher runs first), e.g. priority=5"
        )
    return priority


def _call_arguments(args: Any, kwargs: Any) -> tuple[Sequence[Any], Mapping[str, Any]]:
    """``(args, kwargs)`` of a submission, checked: a str is a sequence too, and
    ``apply_async("12")`` would call the task with ``"1", "2"``."""
    if isinstance(args, (str, bytes, bytearray)) or not isinstance(args, Sequence):
        raise InvalidOptionError(
            f"args={args!r} must be a list or tuple of positional arguments, "
            f"not {type(args).__name__}; for one argument write args=({args!r},)"
        )
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping):
        raise InvalidOptionError(
            f"kwargs={kwargs!r} must be a mapping (a dict) of keyword arguments, "
            f"not {type(kwargs).__name__}"
        )
    return args, kwargs


@dataclass(frozen=True)
class TaskOptions:
    """A task's execution options (see :meth:`App.task`)."""

    queue: str = DEFAULT_QUEUE
    max_retries: int = 0
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    retry_for: tuple[type[BaseException], ...] = (Exception,)
    time_limit: float | None = None
    soft_time_limit: float | None = None
    priority: int = 0

    def check(self) -> None:
        """Raise :class:`TaskRegistrationError` naming the first impossible option."""
        if self.max_retries < 0:
            raise TaskRegistrationError(f"max_retries={self.max_retries} must be >= 0")
        for label, limit in (
            ("time_limit", self.time_limit),
            ("soft_time_limit", self.soft_time_limit),
        ):
            if limit is not None and limit <= 0:
                raise TaskRegistrationError(f"{label}={limit} must be a positive number of seconds")
        if (
            self.time_limit is not None
            and self.soft_time_limit is not None
            and self.soft_time_limit >= self.time_limit
        ):
            raise TaskRegistrationError(
                f"soft_time_limit={self.soft_time_limit} must be below time_limit="
                f"{self.time_limit}, or the task is killed before it can clean up"
            )

    def retry_delay(self, retries: int) -> float:
        """Seconds to wait before attempt ``retries + 2`` (``retries`` failures so far)."""
        if self.retry_backoff is False:
            return 0.0
        base = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay: float = min(self.retry_backoff_max, base * (2**retries))
        if self.retry_jitter:
            delay *= random.uniform(0.5, 1.0)
        return delay


@dataclass(frozen=True)
class Call:
    """One invocation waiting to be submitted (see :meth:`Task.s`, :meth:`App.submit_many`)."""

    task: Task[Any, Any] | str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def with_options(self, **options: Any) -> Call:
        """A copy with submission options (``countdown``, ``queue``, ...) set; ``None`` skips."""
        merged = dict(self.options)
        merged.update({key: value for key, value in options.items() if value is not None})
        return Call(self.task, self.args, self.kwargs, merged)


class Task(Generic[P, R]):
    """A registered function. Calling it runs it here; :meth:`delay` queues it."""

    def __init__(self, app: App, name: str, func: Callable[P, R], options: TaskOptions) -> None:
        self.app = app
        self.name = name
        self.func = func
        self.options = options
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult[R]:
        """Queue a call with the task's default options; returns its result handle."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: dt.datetime | float | None = None,
        expires: dt.datetime | float | None = None,
        priority: int | None = None,
        queue: str | None = None,
        job_id: str | None = None,
    ) -> AsyncResult[R]:
        """Queue a call.

        ``countdown`` (seconds) or ``eta`` (a datetime or Unix time) delays it;
        ``expires`` (seconds from now, or a datetime) drops it as ``EXPIRED`` if no
        worker started it by then. Higher ``priority`` runs first. Submitting the same
        ``job_id`` twice creates one job: the second call returns the first job's
        handle. Raises :class:`~workers.errors.SerializationError` naming the argument
        the serializer cannot carry, and :class:`~workers.errors.InvalidOptionError`
        naming an option of the wrong kind (``args`` not a list or tuple, ``kwargs`` not
        a mapping, ``countdown="soon"``, ...).
        """
        args, kwargs = _call_arguments(args, kwargs)
        call = self.s(*args, **kwargs).with_options(
            countdown=countdown,
            eta=eta,
            expires=expires,
            priority=priority,
            queue=queue,
            job_id=job_id,
        )
        result: AsyncResult[R] = self.app.submit_many([call])[0]
        return result

    def s(self, *args: Any, **kwargs: Any) -> Call:
        """A :class:`Call` of this task for :meth:`App.submit_many`."""
        return Call(self, args, kwargs)

    def map(self, items: Iterable[Any]) -> list[AsyncResult[R]]:
        """Submit ``task(item)`` for each item, in one transaction."""
        return self.app.submit_many(self.s(item) for item in items)

    def starmap(self, items: Iterable[Sequence[Any]]) -> list[AsyncResult[R]]:
        """Submit ``task(*item)`` for each item, in one transaction."""
        return self.app.submit_many(self.s(*item) for item in items)
