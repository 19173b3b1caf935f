"""Wake-ups between the processes of one machine that share a SQLite queue.

SQLite cannot notify anyone of a commit. Polling fast enough for millisecond
latency costs every idle worker thousands of wake-ups a second, so waiters ring a
doorbell instead: each waiting thread binds a Linux abstract Unix datagram socket
and drops a marker file named after it in ``<database>-wake/``; whoever commits
something a waiter may care about sends one byte to every marker's socket. A
marker whose socket is gone (its process died) is removed by the next ring.

The doorbell is only a shortcut: waiters still look at the database on a slow
timer, so a lost ring (a full socket buffer, a process that commits without
ringing) costs latency, never a job. On systems without abstract sockets the
doorbell is off and waiters poll.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import sys
import threading
import weakref

log = logging.getLogger("workers.brokers.doorbell")

SUPPORTED = sys.platform.startswith("linux")


class Doorbell:
    """One directory of waiters. Safe across fork: a child binds its own sockets."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._local = threading.local()
        self._sender: tuple[int, socket.socket] | None = None

    def _waiter(self) -> tuple[socket.socket, str]:
        entry = getattr(self._local, "entry", None)
        if entry is not None and entry[0] == os.getpid():
            return entry[1], entry[2]
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        name = f"forksafe-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.bind("\0" + name)
        marker = os.path.join(self.directory, name)
        with open(marker, "w"):
            pass
        # The marker goes when the socket does (its thread ends), but only in the process
        # that made it: a forked child dropping its inherited copy must not remove it.
        weakref.finalize(sock, _remove, marker, os.getpid())
        self._local.entry = (os.getpid(), sock, marker)
        return sock, marker

    def arm(self) -> None:
        """Make sure this thread will hear rings from now on (before looking for work)."""
        self._waiter()

    def wait(self, timeout: float) -> bool:
        """Block until a ring or ``timeout`` seconds; returns whether it rang."""
        sock, _ = self._waiter()
        readable, _, _ = select.select([sock], [], [], max(0.0, timeout))
        if not readable:
            return False
        with contextlib.suppress(BlockingIOError):
            while sock.recv(64):
                pass
        return True

    def ring(self) -> None:
        """Wake every waiter (but this thread). Never raises; never blocks."""
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        own = getattr(self._local, "entry", None)
        own_name = os.path.basename(own[2]) if own is not None and own[0] == os.getpid() else ""
        sender = self._sending_socket()
        for name in names:
            if name == own_name or not name.startswith("forksafe-"):
                continue
            try:
                sender.sendto(b"!", "\0" + name)
            except ConnectionRefusedError:
                _remove(os.path.join(self.directory, name), None)  # its owner is gone
            except OSError:
                pass  # a full buffer means it has been rung already

    def _sending_socket(self) -> socket.socket:
        if self._sender is None or self._sender[0] != os.getpid():
            sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sender.setblocking(False)
            self._sender = (os.getpid(), sender)
        return self._sender[1]


def _remove(path: str, owner: int | None) -> None:
    if owner is not None and owner != os.getpid():
        return
    with contextlib.suppress(OSError):
        os.unlink(path)
