"""How job arguments and results become bytes in the broker, and back.

JSON is the default: a worker that decodes JSON can never be made to run code by
whoever writes rows into the queue. ``pickle`` (dill, through the ``multiprocess``
package, so lambdas and closures travel too) carries any Python object, but
decoding a pickle runs arbitrary code: use it only when every producer that can
write to the broker is trusted.

A worker only decodes payloads written with its own App's serializer, so a JSON
app never unpickles a row.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from workers.errors import CorruptPayloadError, SerializationError

log = logging.getLogger("workers.serializers")


class Serializer(Protocol):
    """Turns a Python value into bytes and back."""

    name: str

    def dumps(self, value: Any) -> bytes:
        """Encode ``value``; raise :class:`SerializationError` if it cannot be carried."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode ``data``; raise :class:`CorruptPayloadError` if it is not a valid payload."""
        ...


class JSONSerializer:
    """Compact UTF-8 JSON. Tuples come back as lists; dict keys must be strings."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"value cannot be encoded as JSON: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptPayloadError(f"payload is not valid JSON: {exc}") from exc


class PickleSerializer:
    """dill (from ``multiprocess``) when available, else stdlib pickle. Trusted producers only."""

    name = "pickle"

    def __init__(self) -> None:
        try:
            import dill  # shipped with multiprocess

            self._dumps: Callable[[Any], bytes] = dill.dumps
            self._loads: Callable[[bytes], Any] = dill.loads
        except ImportError:  # pragma: no cover - multiprocess depends on dill
            self._dumps = pickle.dumps
            self._loads = pickle.loads

    def dumps(self, value: Any) -> bytes:
        try:
            return self._dumps(value)
        except Exception as exc:
            raise SerializationError(f"value cannot be pickled: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        try:
            return self._loads(data)
        except Exception as exc:
            raise CorruptPayloadError(f"payload cannot be unpickled: {exc}") from exc


_SERIALIZERS: dict[str, Callable[[], Serializer]] = {
    "json": JSONSerializer,
    "pickle": PickleSerializer,
    "dill": PickleSerializer,
}


def get_serializer(name: str) -> Serializer:
    """Return the serializer called ``name`` (``json``, ``pickle`` or its alias ``dill``).

    Raises :class:`SerializationError` naming the known serializers for any other name.
    """
    try:
        factory = _SERIALIZERS[name]
    except KeyError:
        known = ", ".join(sorted(_SERIALIZERS))
        raise SerializationError(f"unknown serializer {name!r}; use one of: {known}") from None
    if name != "json":
        log.debug("serializer %r decodes pickles: only trusted producers may submit", name)
    return factory()


def dump_call(
    serializer: Serializer,
    task_name: str,
    func: Callable[..., Any] | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
) -> bytes:
    """Encode a call's arguments as ``{"args": [...], "kwargs": {...}}``.

    When they cannot be encoded, raises :class:`SerializationError` naming the first
    argument that is at fault (by parameter name when ``func``'s signature tells it)
    and the fix.
    """
    payload = {"args": list(args), "kwargs": dict(kwargs)}
    try:
        return serializer.dumps(payload)
    except SerializationError:
        pass
    names = _parameter_names(func, len(args))
    for index, value in enumerate(args):
        _check_one(serializer, task_name, f"argument {index} ({names[index]})", value)
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise SerializationError(
                f"{task_name}(): keyword {key!r} is not a string; keyword names must be str"
            )
        _check_one(serializer, task_name, f"keyword argument {key!r}", value)
    return serializer.dumps(payload)  # raises the generic message if no single culprit


def _check_one(serializer: Serializer, task_name: str, what: str, value: Any) -> None:
    try:
        serializer.dumps(value)
    except SerializationError as exc:
        hint = (
            "pass a JSON value instead (str, int, float, bool, None, or lists/dicts of "
            "them with str keys), e.g. a datetime as .isoformat(), or create the App with "
            "serializer='pickle' if every producer of jobs is trusted"
            if serializer.name == "json"
            else "pass a value that can be pickled"
        )
        raise SerializationError(
            f"cannot submit {task_name}(): {what} is a {type(value).__name__} that the "
            f"{serializer.name} serializer cannot carry ({exc}); {hint}"
        ) from exc


def _parameter_names(func: Callable[..., Any] | None, count: int) -> list[str]:
    names: list[str] = []
    if func is not None:
        try:
            params = list(inspect.signature(func).parameters.values())
        except (TypeError, ValueError):
            params = []
        for param in params:
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                names.append(param.name)
            elif param.kind is param.VAR_POSITIONAL:
                names.extend(f"*{param.name}" for _ in range(count))
                break
    names.extend("?" for _ in range(count - len(names)))
    return names
