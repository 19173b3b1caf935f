"""What each DB-API driver needs to be detached safely after fork, and what it can tell us.

A connection inherited through ``fork()`` shares its socket with the parent. Closing
it the usual way sends the server a protocol goodbye (PostgreSQL *Terminate*, MySQL
*COM_QUIT*) that ends the parent's session too. :func:`discard` gets rid of such a
connection without a byte reaching the server:

1. find the connection's socket file descriptor (per driver);
2. point the child's copy of that descriptor at ``/dev/null`` with :func:`os.dup2`,
   so whatever the driver writes while closing goes nowhere;
3. let the driver close, which now only frees memory and the child's descriptor.

Where no descriptor can be found (an unknown driver, sqlite3 whose files the library
owns), the connection is kept referenced for the life of the process so that no
finaliser ever runs on it. This module is the only place that knows driver internals.

:func:`transaction_probe` picks, per driver, how to tell whether a connection has a
transaction open (``None`` where the driver cannot tell), so pools roll back only when needed.
:func:`quiet_probe` picks a local liveness check that lets a ``ping`` skip its round trip.

:func:`track` / :func:`untrack` keep a table of the sockets of this process's open
connections, so that the fork hook can blind them all in a child (:func:`blind_inherited`)
with one system call each, without touching a connection object.
"""

from __future__ import annotations

import operator
import os
import select
from collections.abc import Callable
from contextlib import suppress
from typing import Any

__all__ = [
    "blind_inherited",
    "discard",
    "quiet_probe",
    "socket_fd",
    "track",
    "transaction_probe",
    "untrack",
]

# Connections that could not be detached: referenced forever so no finaliser runs.
_kept_alive: list[Any] = []

# id(driver connection) -> (fd, inode) of the socket of every open connection this
# process made (or inherited through a fork that skipped the Python hooks).
_sockets: dict[int, tuple[int, int]] = {}

# fd -> (device, inode) of /dev/null, for every inherited socket the fork hook blinded in
# this process (or an ancestor). Only such a descriptor, or one still on its socket, is
# ours to close: a number closed and reused since (a pool process closing what it
# inherited, say) belongs to whatever has it now.
_blinded: dict[int, tuple[int, int]] = {}


def _module_of(con: Any) -> str:
    return type(con).__module__ or ""


def socket_fd(con: Any) -> int | None:
    """Return the file descriptor of ``con``'s server socket, or None if unknown.

    Never raises: a closed or half-built connection simply has no descriptor.
    """
    module = _module_of(con)
    try:
        if module.startswith("pymysql"):
            sock = con._sock
            return None if sock is None else int(sock.fileno())
        if module.startswith("sqlite3"):
            return None
        # psycopg2, psycopg 3 and mysqlclient expose fileno() on the connection.
        fileno = getattr(con, "fileno", None)
        if callable(fileno):
            fd = int(fileno())
            return fd if fd >= 0 else None
        sock = getattr(con, "_sock", None) or getattr(con, "socket", None)
        if sock is not None and callable(getattr(sock, "fileno", None)):
            fd = int(sock.fileno())
            return fd if fd >= 0 else None
    except Exception:
        return None
    return None


def discard(*cons: Any) -> None:
    """Get rid of connections inherited from another process without touching their sessions.

    The server never hears of them: no goodbye, no rollback, no ``shutdown()`` of a
    socket. The parent process keeps using its sessions undisturbed. Takes any number of
    connections (``None`` is skipped) so a fork hook pays for opening /dev/null once.
    Never raises.
    """
    devnull = -1
    try:
        for con in cons:
            if con is None:
                continue
            module = _module_of(con)
            fd = None if module.startswith("sqlite3") else socket_fd(con)
            tracked = _sockets.pop(id(con), None)
            if fd is not None and devnull < 0:
                with suppress(OSError):
                    devnull = os.open(os.devnull, os.O_RDWR)
            if fd is None or devnull < 0 or not _ours_to_close(fd, tracked, devnull):
                # SQLite owns its file descriptors and may checkpoint or unlink the WAL
                # on close; an unknown driver may say goodbye; a descriptor number now
                # used by something else must not be touched. Never close those here.
                if not _is_closed(con):
                    _kept_alive.append(con)
                continue
            # The descriptor now points at /dev/null: the driver's goodbye goes nowhere.
            with suppress(Exception):
                if module.startswith("pymysql"):
                    con._force_close()  # PyMySQL's close-without-quit
                else:
                    con.close()
    finally:
        if devnull >= 0:
            os.close(devnull)


def track(con: Any) -> None:
    """Remember the socket of ``con``, a driver connection, for :func:`blind_inherited`."""
    fd = socket_fd(con)
    if fd is None:
        _sockets.pop(id(con), None)
        return
    try:
        _sockets[id(con)] = (fd, os.fstat(fd).st_ino)
    except OSError:
        _sockets.pop(id(con), None)


def untrack(con: Any) -> None:
    """Forget the socket remembered for ``con`` (it is being closed)."""
    _sockets.pop(id(con), None)


def blind_inherited() -> int:
    """In a forked child: point every tracked socket at /dev/null; return how many.

    Runs in the fork hook, so it reads only the table (no connection object is touched,
    which would copy its memory page). A descriptor is blinded only if it still refers
    to the same socket (same inode), since a driver may have replaced its socket since.
    The connections themselves are discarded later, by their pool's reset in this process.
    """
    sockets = list(_sockets.values())
    _sockets.clear()
    if not sockets:
        return 0
    try:
        devnull = os.open(os.devnull, os.O_RDWR)
    except OSError:
        return 0
    blinded = 0
    try:
        null = _device_and_inode(devnull)
        for fd, inode in sockets:
            if _blind(fd, inode, devnull, null):
                blinded += 1
    except OSError:
        pass
    finally:
        os.close(devnull)
    return blinded


def _blind(fd: int, inode: int, devnull: int, null: tuple[int, int]) -> bool:
    """Point descriptor ``fd`` at ``devnull`` (whose device and inode are ``null``) in
    this process only, if it still refers to the socket ``inode``. True on success."""
    try:
        if os.fstat(fd).st_ino != inode:
            return False
        os.dup2(devnull, fd)
    except OSError:
        return False
    _blinded[fd] = null
    return True


def _ours_to_close(fd: int, tracked: tuple[int, int] | None, devnull: int) -> bool:
    """Whether an inherited connection's descriptor ``fd`` points at /dev/null and is
    still its own, so the driver may close it: blinded now if it is still on its socket
    (a fork that skipped the hooks left the table), or blinded by the fork hook."""
    with suppress(OSError):
        if tracked is not None and tracked[0] == fd:
            _blind(fd, tracked[1], devnull, _device_and_inode(devnull))
    null = _blinded.pop(fd, None)
    try:
        return null is not None and null == _device_and_inode(fd)
    except OSError:
        return False


def _device_and_inode(fd: int) -> tuple[int, int]:
    status = os.fstat(fd)
    return status.st_dev, status.st_ino


def _is_closed(con: Any) -> bool:
    closed = getattr(con, "closed", None)
    if isinstance(closed, bool):
        return closed
    if isinstance(closed, int):  # psycopg2: 0 open, 1/2 closed
        return closed != 0
    return False


# A probe answers None (cannot tell), or a value that is false exactly when no transaction
# is open. The C-level probes below (operator's attrgetter, methodcaller) cost no Python call.

# libpq's PQtransactionStatus: PQTRANS_IDLE == 0; active, in transaction, error count.
_psycopg2_in_transaction: Callable[[Any], object] = operator.methodcaller("get_transaction_status")
_psycopg_in_transaction: Callable[[Any], object] = operator.attrgetter(
    "pgconn.transaction_status"  # psycopg 3
)


def _pymysql_in_transaction(con: Any) -> bool | None:
    if con._sock is None:
        # PyMySQL drops its socket when the connection breaks: "cannot tell" makes the
        # pool roll back, which fails and replaces the connection before it is reused.
        return None
    # The server's last status: IN_TRANS (1) is reliable when set, but a read-only
    # transaction holding a snapshot is not reported. Only AUTOCOMMIT (2) without
    # IN_TRANS proves there is none.
    status = con.server_status
    if status & 1:
        return True
    return False if status & 2 else None


def _generic_in_transaction(con: Any) -> bool | None:
    value = con.in_transaction
    return value if isinstance(value, bool) else None


# sqlite3's in_transaction is always a bool.
_sqlite3_in_transaction: Callable[[Any], object] = operator.attrgetter("in_transaction")


def transaction_probe(con: Any) -> Callable[[Any], object] | None:
    """The function that tells, for connections like ``con``, whether one has a transaction
    open: a true value if so, a false one (not None) if not, None when it cannot tell; or
    None when the driver can never tell (asking every time would raise and catch an
    AttributeError). Picked once per connection; the probe reads client-side state only
    and never talks to the server.
    """
    module = _module_of(con)
    if module.startswith("psycopg2"):
        return _psycopg2_in_transaction
    if module.startswith("psycopg"):
        return _psycopg_in_transaction
    if module.startswith("pymysql"):
        return _pymysql_in_transaction
    if module.startswith("sqlite3"):
        return _sqlite3_in_transaction
    if hasattr(con, "in_transaction"):
        return _generic_in_transaction
    return None


_QUIET_EVENTS = select.POLLIN | select.POLLPRI if hasattr(select, "poll") else 0


def _pymysql_quiet(con: Any) -> bool:
    sock = con._sock
    if sock is None or not _QUIET_EVENTS:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), _QUIET_EVENTS)
    return not poller.poll(0)


def quiet_probe(con: Any) -> Callable[[Any], bool] | None:
    """A local check that stands in for a ping's round trip, or None for this driver.

    The MySQL protocol never sends an idle client anything unasked: the server writes to
    an idle session's socket only as it closes it (``KILL``, ``wait_timeout``, shutdown,
    restart). So while the socket of an idle PyMySQL connection has nothing to read, the
    session is alive as far as a ``COM_PING`` could tell, short of a silent network
    failure that would make the ping itself hang. The check is one ``poll()`` with no
    timeout; when it returns False, ask the server (ping). PostgreSQL sends idle
    sessions notifications and parameter changes, so it gets no such probe.
    """
    if _module_of(con).startswith("pymysql"):
        return _pymysql_quiet
    return None
