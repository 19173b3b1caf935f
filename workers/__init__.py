"""workers: a prefork supervisor and a durable job queue built on forksafe pools.

::

    from workers import App
    app = App()                      # broker from FORKSAFE_BROKER, else sqlite:///forksafe.db

    @app.task(max_retries=3, retry_backoff=True, time_limit=30)
    def add(x, y):
        return x + y

    # forksafe run tasks.py --workers 4
    add.delay(2, 3).get(timeout=10)  # 5
"""

from workers import states
from workers.app import App, Call, Task
from workers.errors import (
    BrokerError,
    BrokerURLError,
    CorruptPayloadError,
    CrashLoopError,
    InvalidOptionError,
    JobExpired,
    JobRevoked,
    NoAppError,
    ResultTimeout,
    SerializationError,
    SoftTimeLimitExceeded,
    TaskError,
    TaskRegistrationError,
    TasksImportError,
    TimeLimitExceeded,
    UnknownTaskError,
    WorkerLostError,
    WorkersError,
)
from workers.result import AsyncResult
from workers.states import (
    EXPIRED,
    FAILURE,
    PENDING,
    RETRY,
    REVOKED,
    SCHEDULED,
    STARTED,
    SUCCESS,
)

__all__ = [
    "EXPIRED",
    "FAILURE",
    "PENDING",
    "RETRY",
    "REVOKED",
    "SCHEDULED",
    "STARTED",
    "SUCCESS",
    "App",
    "AsyncResult",
    "BrokerError",
    "BrokerURLError",
    "Call",
    "CorruptPayloadError",
    "CrashLoopError",
    "InvalidOptionError",
    "JobExpired",
    "JobRevoked",
    "NoAppError",
    "ResultTimeout",
    "SerializationError",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskError",
    "TaskRegistrationError",
    "TasksImportError",
    "TimeLimitExceeded",
    "UnknownTaskError",
    "WorkerLostError",
    "WorkersError",
    "states",
]
