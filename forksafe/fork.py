"""One fork hook for the whole process, and the registry of objects that care about fork.

``os.register_at_fork`` is called once, at import. Fork-aware objects (pools, shelves of
idle connections) register themselves in a weak set and implement three methods:

``_fork_prepare(blocking)``
    runs in the parent just before fork: take the object's lock, so that no thread is
    half-way through changing its bookkeeping when the address space is copied; return
    False if ``blocking`` is false and the lock is taken;
``_fork_parent()``
    runs in the parent after fork: release that lock;
``_fork_child()``
    the reset, run in the child at the object's first use there: give the object fresh
    locks and discard, never close, every inherited connection (see
    :mod:`forksafe.drivers`).

Every object remembers the pid it belongs to and calls its own reset when it is first
used in another process. That one mechanism serves every kind of fork, including those
that run no Python hook (uWSGI forks its workers from C); :func:`after_fork` runs the
resets at once. A reset runs at most once per process.

The child-side hook itself only blinds the inherited sockets: each one is pointed at
/dev/null with one system call, from a table of descriptors, so nothing the child does
can reach the parent's sessions. It touches no pool and no connection object: in a
forked child every first write to an object copies its memory page, so a hook that
walked the pools would cost the fork about a millisecond for ten pools of ten
connections, and a child that never uses a pool would pay it for nothing.
"""

from __future__ import annotations

import logging
import mmap
import os
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Protocol

from forksafe import drivers

log = logging.getLogger("forksafe")

__all__ = [
    "ForkAware",
    "ProcessBound",
    "after_fork",
    "armed",
    "generation",
    "getpid",
    "note_process",
    "process_lock",
    "register",
    "reset_lock",
    "token",
]

#: Bumped once in every new process (by the fork hook, or by the first pid check that
#: notices the process changed). Comparing it is much cheaper than ``os.getpid()``, a
#: system call; see :func:`token`.
generation = 0
_pid = os.getpid()


def token() -> int:
    """This process's token: :data:`generation` as one non-zero byte, what
    ``armed[0]`` holds while the process is known (see :data:`armed`). Connections keep
    the token of their process and compare it with ``armed[0]``, one read: a different
    value means they may have been inherited. Tokens repeat after 255 generations, so a
    connection carried through 255 nested forks unused would go unnoticed."""
    return generation % 255 + 1


# Linux's MADV_WIPEONFORK (4.14+; not exported by every Python's mmap module).
_MADV_WIPEONFORK = getattr(mmap, "MADV_WIPEONFORK", 18 if sys.platform == "linux" else None)


def _wipe_on_fork_page() -> mmap.mmap | None:
    """A private page the kernel zeroes in every child, however the fork was made."""
    if _MADV_WIPEONFORK is None:
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        page.madvise(_MADV_WIPEONFORK)
    except (AttributeError, OSError, ValueError):
        return None
    page[0] = token()
    return page


_wiped_page = _wipe_on_fork_page()
_wipes = _wiped_page is not None

#: ``page[0]`` is true only in the process that last set :data:`cached_pid`: the kernel
#: zeroes the page in every child. Hot paths inline :func:`getpid` as ``cached_pid if
#: page[0] else getpid()``. Where pages cannot be wiped, ``page[0]`` is always 0.
page: mmap.mmap | bytearray = _wiped_page if _wiped_page is not None else bytearray(1)
cached_pid = os.getpid()

#: ``armed[0]`` is this process's :func:`token` while the process is known, which
#: connections compare with the token they were made with. Where pages can be wiped it
#: is :data:`page`, zeroed in a child however it was forked, until :func:`getpid` runs
#: there, bumps the generation and writes the new token: a fork that ran no Python hook
#: is noticed at the next statement. Elsewhere :func:`note_process` writes it (the fork
#: hook, :func:`after_fork`, a pool's pid check), and a fork that ran no hook goes
#: unnoticed until one of those runs.
armed: mmap.mmap | bytearray = _wiped_page if _wiped_page is not None else bytearray([token()])


def getpid() -> int:
    """``os.getpid()``, without its system call while this process has not forked.

    Pools compare pids at every checkout and return, to catch forks that ran no Python
    hook (uWSGI's). ``os.getpid()`` is a system call; reading a byte of a page the kernel
    wipes in every child is not. Where the kernel cannot wipe pages, falls back to
    ``os.getpid()``. In a new process it bumps :data:`generation` (if the fork hook did
    not) before writing the new token to the page (see :data:`armed`).
    """
    global cached_pid
    if page[0]:
        return cached_pid
    pid = os.getpid()
    if _wipes:
        note_process(pid)
        cached_pid = pid
        page[0] = token()
    return pid


def note_process(pid: int | None = None) -> bool:
    """Record that this may be a new process; True if it is (and bump :data:`generation`).
    ``pid``: ``os.getpid()``, if the caller has it."""
    global generation, _pid
    if pid is None:
        pid = os.getpid()
    if pid == _pid:
        return False
    generation += 1
    if not _wipes:
        armed[0] = token()
    # Last: another thread that finds the new pid here finds the new generation too.
    _pid = pid
    return True


class ForkAware(Protocol):
    """What the fork hooks call on a registered object."""

    def _fork_prepare(self, blocking: bool) -> bool: ...

    def _fork_parent(self) -> None: ...

    def _fork_child(self) -> None: ...

    def _checkpid(self) -> None: ...


class ProcessBound:
    """Base for objects that belong to the process that uses them.

    Subclasses set ``_pid`` and implement ``_fork_child()`` (which must set ``_pid`` to
    the current pid); this class supplies the pid check and no-op lock hooks.
    """

    _pid: int

    def _fork_prepare(self, blocking: bool) -> bool:
        return True

    def _fork_parent(self) -> None:
        pass

    def _fork_child(self) -> None:
        raise NotImplementedError

    def _checkpid(self) -> None:
        """Run the child-side reset if this object is used in a new process."""
        if self._pid != getpid():
            with reset_lock():
                if self._pid != getpid():
                    note_process()
                    self._fork_child()


_registry: weakref.WeakSet[ForkAware] = weakref.WeakSet()
# pid -> the lock of process_lock() in that process. A fork copies the parent's lock as
# it is, perhaps taken by a thread the child does not have; keyed by pid, the child never
# uses it. setdefault() makes threads racing to create a process's lock agree on one.
_process_locks: dict[int, threading.Lock] = {}
# The lock the prepare hook took, released in the parent after fork.
_prepared_lock: threading.Lock | None = None
# Objects whose lock the prepare hook took, released in the parent after fork.
_prepared: list[ForkAware] = []
# In a child, the parent's list: kept referenced, not released (see _after_in_child).
_inherited: list[ForkAware] = []


def _lock_of_this_process() -> threading.Lock:
    pid = getpid()
    lock = _process_locks.get(pid)
    if lock is None:
        lock = _process_locks.setdefault(pid, threading.Lock())
    return lock


@contextmanager
def process_lock() -> Iterator[None]:
    """Hold the lock of this process's registries (fork-aware objects, families of pools).

    Each process has its own, however it was forked: the parent's may have been taken,
    at the fork, by a thread the child does not have. The fork hook holds it across fork.
    """
    with _lock_of_this_process():
        yield


def register(obj: ForkAware) -> None:
    """Add ``obj`` to the registry; it is dropped automatically when garbage collected."""
    with process_lock():
        _registry.add(obj)


_reset_lock = threading.Lock()


@contextmanager
def reset_lock() -> Iterator[None]:
    """Serialise the pid-check resets of one process.

    A fork that skipped the Python hooks may have copied this lock while another thread
    held it; it would then stay locked forever in the child. Waiting a bounded time and
    then replacing it is safe because a reset only rebuilds per-process state.
    """
    global _reset_lock
    lock = _reset_lock
    if not lock.acquire(timeout=2.0):
        log.warning("forksafe: reset lock was inherited locked across fork; replacing it")
        lock = _reset_lock = threading.Lock()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _snapshot() -> list[ForkAware]:
    return list(_registry)


def _prepare() -> None:
    global _prepared_lock
    lock = _lock_of_this_process()
    lock.acquire()
    _prepared_lock = lock
    # Pools never hold their lock during I/O, so each acquire below waits only for
    # another thread's bookkeeping to finish. Only while holding none: a finaliser run by
    # the collector inside one pool's critical section takes another pool's lock (a
    # connection dropped without close() returns itself), so holding one lock while
    # waiting for the next could wait forever. Take all or none, and try again.
    objs = _snapshot()
    pause = 0.0001
    while True:
        for obj in objs:
            if not obj._fork_prepare(not _prepared):
                break
            _prepared.append(obj)
        else:
            break
        while _prepared:
            _prepared.pop()._fork_parent()
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    with suppress(Exception):  # without it, the child reads the socket table itself
        drivers.flatten()


def _after_in_parent() -> None:
    objs = list(_prepared)
    _prepared.clear()
    for obj in objs:
        obj._fork_parent()
    if _prepared_lock is not None:
        _prepared_lock.release()


def _after_in_child() -> None:
    # The child holds copies of the locks the prepare hook took. The objects' own locks
    # are replaced by their reset at first use; releasing them here, or even dropping
    # the references to them, would write to every pool's memory page.
    global _reset_lock, _prepared, _inherited
    note_process()
    _inherited, _prepared = _prepared, []
    _reset_lock = threading.Lock()
    drivers.blind_inherited()


def after_fork() -> None:
    """Make every pool in this process drop what it inherited from its parent process.

    Call it first thing in a process made by a fork that does not run Python's
    ``os.register_at_fork`` hooks (uWSGI without ``py-call-uwsgi-fork-hooks``, C
    extensions). Pools also do this on their own at first use in a new process, so this
    only makes it happen at a known moment. Safe to call any number of times, in any
    process: objects that already belong to this process are left alone.
    """
    note_process()
    for obj in _snapshot():
        obj._checkpid()


os.register_at_fork(
    before=_prepare, after_in_parent=_after_in_parent, after_in_child=_after_in_child
)
