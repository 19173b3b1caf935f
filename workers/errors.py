"""Named errors of the workers package.

Every error a user can meet is a subclass of :class:`WorkersError`, so
``except WorkersError`` catches them all. Messages name the offending value and
the fix; broker passwords never appear in them (URLs are masked first).
"""

from __future__ import annotations


class WorkersError(Exception):
    """Base class of every error raised by the workers package."""


class BrokerURLError(WorkersError, ValueError):
    """A broker URL could not be understood (unknown scheme, missing path, ...)."""


class BrokerError(WorkersError):
    """The broker failed to do something it should be able to do (schema too new, ...)."""


class SerializationError(WorkersError, TypeError):
    """Arguments or a result cannot be carried by the App's serializer."""


class CorruptPayloadError(WorkersError):
    """A job's stored payload cannot be decoded; the job is failed, the worker carries on."""


class UnknownTaskError(WorkersError, LookupError):
    """A job names a task the App does not have; the job is failed, the worker carries on."""


class InvalidOptionError(WorkersError, ValueError, TypeError):
    """An option of the App or of a submission has a value it cannot take
    (``lease_seconds=0``, ``countdown="soon"``, ...); the message names the option and
    the value. Both a ``ValueError`` and a ``TypeError``, like the errors it replaces."""


class TaskRegistrationError(WorkersError, ValueError):
    """A task was declared wrongly (duplicate name, bad option)."""


class TasksImportError(WorkersError, ImportError):
    """The tasks file or module given to ``forksafe run`` could not be imported."""


class NoAppError(WorkersError, LookupError):
    """The tasks module defines no :class:`workers.App` (or several, and none was chosen)."""


class ResultTimeout(WorkersError, TimeoutError):
    """``AsyncResult.get(timeout=...)`` ran out of time before the job finished."""


class JobRevoked(WorkersError):
    """The job was revoked before it finished; it has no result."""


class JobExpired(WorkersError):
    """The job passed its ``expires`` time before a worker could run it."""


class TaskError(WorkersError):
    """A task failed with an exception that could not be rebuilt in this process.

    ``exc_type`` is the dotted name of the original exception class and
    ``remote_traceback`` the traceback text recorded by the worker.
    """

    def __init__(self, exc_type: str, message: str, remote_traceback: str | None) -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback


class SoftTimeLimitExceeded(WorkersError):
    """Raised inside a running task when its ``soft_time_limit`` has passed.

    The task may catch it to clean up; if it does not, the job fails (or retries).
    """


class TimeLimitExceeded(WorkersError):
    """Recorded for a job whose worker was killed because it passed ``time_limit``."""


class WorkerLostError(WorkersError):
    """Recorded for a job whose worker died while running it too many times."""


class CrashLoopError(WorkersError):
    """Workers kept crashing right after they started; the supervisor stopped."""
