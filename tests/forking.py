"""Helpers for fork tests: run code in a forked child and get its answer back.

A child reports through a pipe as JSON and always ends with ``os._exit`` or
``sys.exit`` as the test asks, so the parent can check what the server saw.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any


def fork_child(
    body: Callable[[], Any],
    exit_with: str = "os._exit",
    raw: bool = False,
    timeout: float = 20.0,
) -> Any:
    """Fork, run ``body()`` in the child, return its JSON-able result in the parent.

    ``exit_with`` is ``"os._exit"`` or ``"sys.exit"`` (full interpreter shutdown, which
    runs finalisers). ``raw`` forks through libc directly, skipping Python's
    ``os.register_at_fork`` hooks the way uWSGI's C-level fork does. A child that fails
    makes this raise with the child's traceback; one that hangs is killed after
    ``timeout`` seconds and reported.
    """
    read_end, write_end = os.pipe()
    pid = _libc_fork() if raw else os.fork()
    if pid == 0:
        me = os.getpid()
        os.close(read_end)
        # The default action kills a hung child. pytest-timeout's handler would instead
        # raise inside whatever hangs (a fork hook swallows that), hiding the hang.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(timeout))
        status = 0
        try:
            payload = {"ok": body()}
        except BaseException:
            if os.getpid() != me:
                raise  # a grandchild unwinding its own exit: not this child's answer
            payload = {"error": traceback.format_exc()}
            status = 1
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(payload))
        if exit_with == "sys.exit":
            sys.exit(status)
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as answer:
        text = answer.read()
    status = wait_for(pid, timeout)
    if not text:
        raise AssertionError(f"child {pid} said nothing (exit status {status})")
    result = json.loads(text)
    if "error" in result:
        raise AssertionError(f"child {pid} failed:\n{result['error']}")
    if status != 0:
        raise AssertionError(f"child {pid} exited with status {status}")
    return result["ok"]


def wait_for(pid: int, timeout: float) -> int:
    """Wait for child ``pid`` at most ``timeout`` seconds; kill it if it overstays."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not finish within {timeout}s")
        time.sleep(0.005)


def _libc_fork() -> int:
    # PyDLL keeps the GIL across the call: no other thread of the parent can hold it
    # when the child starts, which would leave the child waiting for it forever.
    libc = ctypes.PyDLL(None, use_errno=True)
    pid = int(libc.fork())
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork failed")
    return pid
