"""uWSGI: reset forksafe pools (and Django's connections) in every worker right after fork.

Import it from the WSGI app module (or with ``import = forksafe.integrations.uwsgi`` in
``uwsgi.ini``)::

    import forksafe.integrations.uwsgi  # noqa: F401

Why: without ``lazy-apps``, uWSGI loads the app in the master and forks its workers from
C, so Python's ``os.register_at_fork`` hooks do not run in them (unless
``py-call-uwsgi-fork-hooks`` is set). Pools would still notice the new pid at first use;
this hook makes every worker drop what it inherited before it serves its first request,
and detaches inherited Django connections, which have no pid check of their own.

What importing does:

* inside uWSGI: registers a ``postfork`` hook through ``uwsgidecorators`` (or, when that
  module is not installed, chains ``uwsgi.post_fork_hook`` directly) that runs
  :func:`forksafe.integrations.reset_after_fork`. With ``py-call-uwsgi-fork-hooks`` the
  Python fork hooks have already reset the pools; the second reset finds nothing to do.
  Importing the module again registers nothing more. (Importing ``uwsgidecorators`` also
  sets its spooler dispatcher, ``uwsgi.spooler``, as it does for any app that uses it.)
* outside uWSGI (tests, ``manage.py``, another server): nothing, and a debug message on
  the ``forksafe.integrations.uwsgi`` logger says so. It never raises ImportError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from forksafe.integrations import reset_after_fork

__all__ = ["installed", "postfork_runs", "run_postfork"]

log = logging.getLogger("forksafe.integrations.uwsgi")

#: True when the postfork hook is registered in this uWSGI process.
installed = False
#: How many times the hook has run in this process (0 in the master, 1 in a worker).
postfork_runs = 0


def run_postfork() -> None:
    """The hook itself: reset inherited pools and connections in a new uWSGI worker."""
    global postfork_runs
    postfork_runs += 1
    reset_after_fork()
    log.debug("forksafe: reset after uWSGI fork in pid %d", os.getpid())


def _chain(previous: Callable[[], Any] | None) -> Callable[[], None]:
    def hook() -> None:
        run_postfork()
        if previous is not None:
            previous()

    return hook


def _install() -> None:
    global installed
    try:
        import uwsgi
    except ImportError:
        log.debug(
            "forksafe.integrations.uwsgi: not running under uWSGI; no postfork hook installed"
        )
        return
    if getattr(uwsgi, "_forksafe_postfork", False):
        installed = True
        return  # already registered, e.g. by an importlib.reload() of this module
    try:
        from uwsgidecorators import postfork
    except ImportError:
        # uwsgidecorators is a thin layer over this attribute; keep any hook already set.
        uwsgi.post_fork_hook = _chain(getattr(uwsgi, "post_fork_hook", None))
    else:
        postfork(run_postfork)
    uwsgi._forksafe_postfork = True
    installed = True
    log.debug("forksafe.integrations.uwsgi: postfork hook installed")


_install()
