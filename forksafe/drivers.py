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

import ctypes
import operator
import os
import select
import weakref
from array import array
from collections.abc import Callable, Sequence
from contextlib import suppress
from itertools import chain
from stat import S_ISSOCK
from typing import Any

__all__ = [
    "blind_inherited",
    "discard",
    "fetches_from_server",
    "quiet_probe",
    "socket_fd",
    "track",
    "transaction_probe",
    "untrack",
]

# Connections that could not be detached: referenced forever so no finaliser runs.
_kept_alive: list[Any] = []


def _keep_forever(con: Any) -> None:
    """Keep ``con`` from ever being finalised, interpreter shutdown included: that clears
    module globals, and with them this list, so each also gets a reference of its own
    that nothing gives back (``sys.exit()`` in a child would otherwise close an inherited
    SQLite connection, rolling back the parent's transaction on disk)."""
    _kept_alive.append(con)
    with suppress(Exception):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(con))


# id(driver connection) -> (fd, inode) of the socket of every open connection this
# process made (or inherited through a fork that skipped the Python hooks).
_sockets: dict[int, tuple[int, int]] = {}
# The same pairs laid out flat, for the fork hook (see blind_inherited); None when the
# table changed since they were laid out.
_flat: array[int] | None = None
# In a child, the tables of its ancestors: kept referenced (see blind_inherited).
_inherited_tables: list[dict[int, tuple[int, int]]] = []

# _blinded[fd] is 1 for every inherited socket the fork hook pointed at /dev/null in
# this process (or an ancestor). Only such a descriptor, while it is still on /dev/null,
# or one still on its socket, is ours to close: a number closed and reused since (a pool
# process closing what it inherited, say) belongs to whatever has it now. A flat array,
# sized before each fork, so that the hook writes to one page (see blind_inherited).
_blinded = bytearray()


# A descriptor on /dev/null and its (device, inode): opened once, in the process that
# tracks its first socket, and inherited by its children, so the fork hook does not open
# one (an open() in a child just forked took 0.1-0.8 ms here). Checked before each use,
# as the process may have closed it.
_null: tuple[int, tuple[int, int]] | None = None


def _devnull() -> tuple[int, tuple[int, int]] | None:
    """A descriptor on /dev/null and its device and inode; None if none can be opened."""
    global _null
    if _null is not None:
        fd, null = _null
        with suppress(OSError):
            if _device_and_inode(fd) == null:
                return _null
    try:
        fd = os.open(os.devnull, os.O_RDWR)  # not inheritable across exec (PEP 446)
    except OSError:
        return None
    try:
        _null = fd, _device_and_inode(fd)
    except OSError:
        os.close(fd)
        return None
    return _null


def _module_of(con: Any) -> str:
    return type(con).__module__ or ""


def socket_fd(con: Any) -> int | None:
    """Return the file descriptor of ``con``'s server socket, or None if unknown.

    Never raises: a closed or half-built connection simply has no descriptor.
    """
    module = _module_of(con)
    try:
        if module.startswith("sqlite3"):
            return None
        if module.startswith("pymysql"):
            fileno = getattr(con._sock, "fileno", None)  # _sock is None once closed
        else:
            # psycopg2, psycopg 3 and mysqlclient expose fileno() on the connection.
            fileno = getattr(con, "fileno", None)
            if not callable(fileno):
                sock = getattr(con, "_sock", None) or getattr(con, "socket", None)
                fileno = getattr(sock, "fileno", None)
        fd = int(fileno()) if callable(fileno) else -1
    except Exception:
        return None
    return fd if fd >= 0 else None  # a closed socket object's fileno() is -1


def discard(*cons: Any) -> None:
    """Get rid of connections inherited from another process without touching their sessions.

    The server never hears of them: no goodbye, no rollback, no ``shutdown()`` of a
    socket. The parent process keeps using its sessions undisturbed. Takes any number of
    connections (``None`` is skipped). Never raises.
    """
    null = None
    for con in cons:
        if con is None:
            continue
        module = _module_of(con)
        fd = None if module.startswith("sqlite3") else socket_fd(con)
        tracked = untrack(con)
        if fd is not None and null is None:
            null = _devnull()
        if fd is None or null is None or not _ours_to_close(fd, tracked, null):
            # SQLite owns its file descriptors and may checkpoint or unlink the WAL
            # on close; an unknown driver may say goodbye; a descriptor number now
            # used by something else must not be touched. Never close those here.
            if not _is_closed(con):
                _keep_forever(con)
            continue
        # The descriptor now points at /dev/null: the driver's goodbye goes nowhere.
        with suppress(Exception):
            if module.startswith("pymysql"):
                con._force_close()  # PyMySQL's close-without-quit
            else:
                con.close()


def track(con: Any, until_freed: bool = False) -> None:
    """Remember the socket of ``con``, a driver connection, for :func:`blind_inherited`.

    Whoever closes ``con`` calls :func:`untrack`; with ``until_freed``, for connections
    closed by code that does not, the entry goes when ``con`` is freed (if the driver's
    connections take weak references; otherwise when its id is reused).
    """
    global _flat
    fd = socket_fd(con)
    if fd is None:
        untrack(con)
        return
    try:
        inode = os.fstat(fd).st_ino
    except OSError:
        untrack(con)
        return
    key = id(con)
    _sockets[key] = (fd, inode)
    _flat = None
    _devnull()  # open now, for the fork hook of a child
    if until_freed:
        with suppress(TypeError):  # no weak references
            weakref.finalize(con, _forget, key, (fd, inode))


def _forget(key: int, entry: tuple[int, int]) -> None:
    """Drop the table entry of a freed connection, unless another took its place."""
    global _flat
    if _sockets.get(key) == entry:
        del _sockets[key]
        _flat = None


def untrack(con: Any) -> tuple[int, int] | None:
    """Forget the socket remembered for ``con`` (it is being closed); return it."""
    global _flat
    tracked = _sockets.pop(id(con), None)
    if tracked is not None:
        _flat = None
    return tracked


def flatten() -> None:
    """Before a fork: lay the socket table out flat for :func:`blind_inherited`."""
    global _flat
    if _flat is None:
        _flat = array("q", chain.from_iterable(_sockets.values()))
        if _flat:
            _make_room(max(_flat[::2]))


def _make_room(fd: int) -> None:
    if fd >= len(_blinded):
        _blinded.extend(bytes(fd + 1 - len(_blinded)))


def blind_inherited() -> int:
    """In a forked child: point every tracked socket at /dev/null; return how many.

    Runs in the fork hook, so it reads only the table (no connection object is touched,
    which would copy its memory page). A descriptor is blinded only if it still refers
    to the same socket (same inode), since a driver may have replaced its socket since.
    The connections themselves are discarded later, by their pool's reset in this process.

    In a child just forked, every first write to a memory page copies it, and such a
    fault costs microseconds here: the hook reads the flat copy :func:`flatten` made
    before the fork, marks what it blinded in one flat array, and keeps the inherited
    table referenced rather than freeing it (which would write to every entry's page).
    """
    global _sockets, _flat
    flat = _flat
    _inherited_tables.append(_sockets)
    _sockets, _flat = {}, None
    if flat is None:  # no flatten() before this fork
        flat = array("q", chain.from_iterable(_inherited_tables[-1].values()))
    devnull = _devnull() if flat else None
    if devnull is None:
        return 0
    return _blind(flat, devnull[0])


def _blind(pairs: Sequence[int], devnull: int) -> int:
    """Point each descriptor of ``pairs`` (fd, inode, fd, inode, ...) at ``devnull`` (on
    /dev/null) in this process only, if it still refers to the socket ``inode``. Returns
    how many it blinded. One loop, no call per descriptor: the fork hook runs it."""
    blinded = 0
    for i in range(0, len(pairs), 2):
        fd = pairs[i]
        try:
            status = os.fstat(fd)
            if status.st_ino != pairs[i + 1] or not S_ISSOCK(status.st_mode):
                continue
            # Not inheritable, as the socket was not: a program the child execs gets none.
            os.dup2(devnull, fd, inheritable=False)
        except OSError:
            continue
        if fd >= len(_blinded):
            _make_room(fd)
        _blinded[fd] = 1
        blinded += 1
    return blinded


def _ours_to_close(
    fd: int, tracked: tuple[int, int] | None, devnull: tuple[int, tuple[int, int]]
) -> bool:
    """Whether an inherited connection's descriptor ``fd`` points at /dev/null and is
    still its own, so the driver may close it: blinded now if it is still on its socket
    (a fork that skipped the hooks left the table), or blinded by the fork hook.
    ``devnull`` is what :func:`_devnull` returns."""
    if tracked is not None and tracked[0] == fd:
        _blind(tracked, devnull[0])
    if fd >= len(_blinded) or not _blinded[fd] or fd == devnull[0]:
        # Not blinded here, or the number now holds forksafe's own /dev/null descriptor
        # (a process that closed everything it inherited opened it again).
        return False
    _blinded[fd] = 0
    try:
        return _device_and_inode(fd) == devnull[1]
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
# is open. The C-level probes below (operator's attrgetter, a C method taken from the class)
# cost no Python call.

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
        # libpq's PQtransactionStatus: PQTRANS_IDLE == 0; active, in transaction, error
        # count. The class's method, called with the connection: no bound method each time.
        probe: Callable[[Any], object] | None
        probe = getattr(type(con), "get_transaction_status", None)
        return probe
    if module.startswith("psycopg"):
        return _psycopg_in_transaction
    if module.startswith("pymysql"):
        return _pymysql_in_transaction
    if module.startswith("sqlite3"):
        return _sqlite3_in_transaction
    if hasattr(con, "in_transaction"):
        return _generic_in_transaction
    return None


# Classes (by name, anywhere in a cursor type's MRO) whose cursors leave rows on the server.
_SERVER_CURSORS = {
    "psycopg": frozenset({"ServerCursorMixin", "AsyncServerCursorMixin"}),
    "pymysql": frozenset({"SSCursor"}),
    "MySQLdb": frozenset({"CursorUseResultMixIn"}),
}


def fetches_from_server(cursor: Any) -> bool:
    """Whether reading rows from ``cursor`` may read its session: a psycopg2 named cursor,
    a psycopg server cursor, a PyMySQL or mysqlclient unbuffered cursor; sqlite3 (which
    steps its statement as rows are read) and unknown drivers too. False only for the
    client-side cursors of the drivers above, which hold every row after ``execute()``."""
    module = _module_of(cursor)
    if module.startswith("psycopg2"):
        return getattr(cursor, "name", None) is not None
    for prefix, server_side in _SERVER_CURSORS.items():
        if module.startswith(prefix):
            return any(kind.__name__ in server_side for kind in type(cursor).__mro__)
    return True


_QUIET_EVENTS = select.POLLIN | select.POLLPRI if hasattr(select, "poll") else 0


#: The C version of the probe below, ``(sock, fd) -> probe``: set by forksafe.speedups.
native_quiet: Callable[[Any, int], Callable[[Any], bool]] | None = None


def _pymysql_quiet(con: Any) -> Callable[[Any], bool] | None:
    """The quiet probe of one PyMySQL connection: one poller, registered once."""
    sock = con._sock
    if sock is None or not _QUIET_EVENTS:
        return None
    if native_quiet is not None:
        return native_quiet(sock, sock.fileno())
    poller = select.poll()
    poller.register(sock.fileno(), _QUIET_EVENTS)

    def quiet(con: Any) -> bool:
        # A connection that has another socket (or none) since is not vouched for.
        return con._sock is sock and not poller.poll(0)

    return quiet


def quiet_probe(con: Any) -> Callable[[Any], bool] | None:
    """A local check of ``con`` that stands in for a ping's round trip, or None for its
    driver. Made once per driver connection, and called with it.

    The MySQL protocol never sends an idle client anything unasked: the server writes to
    an idle session's socket only as it closes it (``KILL``, ``wait_timeout``, shutdown,
    restart). So while the socket of an idle PyMySQL connection has nothing to read, the
    session is alive as far as a ``COM_PING`` could tell, short of a silent network
    failure that would make the ping itself hang. The check is one ``poll()`` with no
    timeout; when it returns False, ask the server (ping). PostgreSQL sends idle
    sessions notifications and parameter changes, so it gets no such probe.
    """
    if _module_of(con).startswith("pymysql"):
        return _pymysql_quiet(con)
    return None
