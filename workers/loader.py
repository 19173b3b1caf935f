"""Find the user's App: import a tasks file or module and pick the App in it.

``forksafe run`` accepts ``tasks.py``, ``path/to/tasks.py``, ``package.tasks`` and any
of these followed by ``:name`` to choose the App attribute. A file is imported under
its stem as module name (``tasks``) with its directory first on ``sys.path``, so
``from tasks import add`` elsewhere names the same tasks.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType

from workers.app import App
from workers.errors import NoAppError, TasksImportError

log = logging.getLogger("workers.loader")


@dataclass(frozen=True)
class Target:
    """What to import: a file path or a module name, and the App attribute (if given)."""

    location: str
    attribute: str | None

    @classmethod
    def parse(cls, spec: str) -> Target:
        location, attribute = spec, None
        head, sep, tail = spec.rpartition(":")
        # "C:\\x" style drive letters aside, a trailing ":name" picks the attribute.
        if sep and tail.isidentifier() and head:
            location, attribute = head, tail
        return cls(location, attribute)

    @property
    def is_file(self) -> bool:
        return self.location.endswith(".py") or os.sep in self.location


def load_app(spec: str, *, reload: bool = False) -> tuple[App, ModuleType]:
    """Import the tasks module named by ``spec`` and return its App and the module.

    ``reload`` re-executes the module's code (for SIGHUP), replacing it in
    ``sys.modules``. Raises :class:`~workers.errors.TasksImportError` (carrying the
    original traceback text) when the file is missing or its import fails, and
    :class:`~workers.errors.NoAppError` when no single App can be found.
    """
    target = Target.parse(spec)
    module = _import(target, reload)
    return _find_app(module, target), module


def _import(target: Target, reload: bool) -> ModuleType:
    if target.is_file:
        path = os.path.abspath(target.location)
        if not os.path.isfile(path):
            raise TasksImportError(
                f"tasks file {target.location!r} does not exist (looked at {path}); "
                f"give the path of a .py file or a module name like 'myapp.tasks'"
            )
        name = os.path.splitext(os.path.basename(path))[0]
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        existing = sys.modules.get(name)
        if existing is not None and not reload and _same_file(existing, path):
            return existing
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TasksImportError(f"cannot import {path!r} as a Python module")
        module = importlib.util.module_from_spec(spec)
        previous = sys.modules.get(name)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            if previous is not None:
                sys.modules[name] = previous
            else:
                sys.modules.pop(name, None)
            raise _import_failed(target.location, exc) from exc
        return module
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if reload and target.location in sys.modules:
            return importlib.reload(sys.modules[target.location])
        return importlib.import_module(target.location)
    except ModuleNotFoundError as exc:
        if exc.name and (target.location + ".").startswith(exc.name + "."):
            raise TasksImportError(
                f"no module named {target.location!r}; give a path to a .py file or run "
                f"from the directory that contains the package"
            ) from exc
        raise _import_failed(target.location, exc) from exc
    except BaseException as exc:
        raise _import_failed(target.location, exc) from exc


def _same_file(module: ModuleType, path: str) -> bool:
    filename = getattr(module, "__file__", None)
    return filename is not None and os.path.abspath(filename) == path


def _import_failed(location: str, exc: BaseException) -> TasksImportError:
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    error = TasksImportError(
        f"importing {location!r} failed with {type(exc).__name__}: {exc}\n{text.rstrip()}"
    )
    error.traceback_text = text  # type: ignore[attr-defined]
    return error


def _find_app(module: ModuleType, target: Target) -> App:
    if target.attribute is not None:
        found = getattr(module, target.attribute, None)
        if not isinstance(found, App):
            raise NoAppError(
                f"{target.location!r} has no App named {target.attribute!r} "
                f"(found {type(found).__name__}); check the name after ':'"
            )
        return found
    apps = {name: value for name, value in vars(module).items() if isinstance(value, App)}
    if "app" in apps:
        return apps["app"]
    if len(apps) == 1:
        return next(iter(apps.values()))
    if not apps:
        raise NoAppError(
            f"{target.location!r} defines no workers.App; add 'app = App()' and declare "
            f"tasks with @app.task"
        )
    names = ", ".join(sorted(apps))
    raise NoAppError(
        f"{target.location!r} defines several Apps ({names}); choose one with "
        f"'{target.location}:NAME'"
    )
