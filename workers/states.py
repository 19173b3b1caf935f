"""Job states, as stored by every broker and reported by :class:`workers.AsyncResult`.

A job moves ``PENDING`` (or ``SCHEDULED`` when it has an ``eta``) -> ``STARTED`` (a
worker holds its lease) -> one of the final states. A failed attempt that will be
tried again waits in ``RETRY``. A job whose worker died goes back to ``PENDING``.
"""

from __future__ import annotations

from typing import Final

PENDING: Final = "PENDING"
"""Waiting in its queue, ready to run (also reported for unknown job ids)."""
SCHEDULED: Final = "SCHEDULED"
"""Waiting for its ``countdown``/``eta``."""
STARTED: Final = "STARTED"
"""Claimed by a worker, which holds its lease."""
RETRY: Final = "RETRY"
"""An attempt failed; waiting for the backoff delay before the next one."""
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
REVOKED: Final = "REVOKED"
EXPIRED: Final = "EXPIRED"

ALL_STATES: Final = (PENDING, SCHEDULED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, EXPIRED)
WAITING_STATES: Final = frozenset({PENDING, SCHEDULED, RETRY})
"""States a worker may claim from once the job's ``eta`` has passed."""
READY_STATES: Final = frozenset({SUCCESS, FAILURE, REVOKED, EXPIRED})
"""Final states: the job will not run again (unless ``retry`` is asked for)."""
UNREADY_STATES: Final = frozenset({PENDING, SCHEDULED, STARTED, RETRY})
