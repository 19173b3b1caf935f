"""How a task's exception is written down by a worker and rebuilt by whoever asks.

A failure is stored as JSON: ``{"type": "module.QualName", "message": str(exc),
"args": [...]}`` plus the traceback text. :func:`rebuild` re-creates the original
exception class when it can be imported here and accepts the recorded arguments;
otherwise it returns a :class:`~workers.errors.TaskError` carrying the same facts.
A recorded exception that is not an :class:`Exception` (``SystemExit`` from a task
that called ``sys.exit()``, ``KeyboardInterrupt``, ...) is always returned as a
:class:`~workers.errors.TaskError`: raised again in the caller, it would end the
caller's program instead of reporting the job's failure.
Either way the worker's traceback text is attached as ``remote_traceback``.
"""

from __future__ import annotations

import builtins
import importlib
import json
import traceback as traceback_module
from collections.abc import Mapping
from typing import Any

from workers.errors import TaskError


def describe(exc: BaseException) -> dict[str, Any]:
    """The JSON-safe record of ``exc``: its dotted type, message and (JSON-able) args."""
    cls = type(exc)
    module = cls.__module__
    qualname = cls.__qualname__
    args: list[Any] = []
    for arg in exc.args:
        try:
            json.dumps(arg)
        except (TypeError, ValueError):
            args = [str(arg) for arg in exc.args]
            break
        args.append(arg)
    name = qualname if module == "builtins" else f"{module}.{qualname}"
    return {"type": name, "message": str(exc), "args": args}


def format_traceback(exc: BaseException, skip: int = 0) -> str:
    """The traceback text of ``exc``, as the worker stores it, without its first ``skip``
    frames (the worker's own call into the task)."""
    tb = exc.__traceback__
    for _ in range(skip):
        if tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
    return "".join(traceback_module.format_exception(type(exc), exc, tb))


def rebuild(error: Mapping[str, Any], remote_traceback: str | None) -> Exception:
    """The exception to raise for a recorded failure (never raises itself)."""
    type_name = str(error.get("type", "Exception"))
    message = str(error.get("message", ""))
    cls = _import_exception_class(type_name)
    exc: Exception
    if cls is None or not issubclass(cls, Exception):
        exc = TaskError(type_name, message, remote_traceback)
    else:
        try:
            exc = cls(*error.get("args", []))
        except Exception:
            exc = TaskError(type_name, message, remote_traceback)
    exc.remote_traceback = remote_traceback  # type: ignore[attr-defined]
    if remote_traceback and hasattr(exc, "add_note"):
        exc.add_note("Traceback in the worker:\n" + remote_traceback.rstrip())
    return exc


def _import_exception_class(type_name: str) -> type[BaseException] | None:
    module_name, _, qualname = type_name.rpartition(".")
    try:
        if not module_name:
            target: Any = builtins
            parts = [qualname]
        else:
            # A nested class: walk back until the module part imports.
            pieces = type_name.split(".")
            for cut in range(len(pieces) - 1, 0, -1):
                try:
                    target = importlib.import_module(".".join(pieces[:cut]))
                except ImportError:
                    continue
                parts = pieces[cut:]
                break
            else:
                return None
        for part in parts:
            target = getattr(target, part)
    except (AttributeError, ImportError, ValueError):
        return None
    if isinstance(target, type) and issubclass(target, BaseException):
        return target
    return None
