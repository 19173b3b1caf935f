"""SteadyDB: a "tough" DB-API 2 connection that reconnects by itself and knows its process.

A :class:`SteadyDBConnection` wraps one driver connection, made with ``creator``
(a DB-API 2 module or any callable returning a connection). Outside a transaction it
transparently replaces a connection that failed with one of ``failures`` (by default the
module's ``OperationalError``, ``InterfaceError`` and ``InternalError``) and retries the
statement once; inside a transaction (after :meth:`~SteadyDBConnection.begin`) it raises,
because the work done so far is lost. It reopens the connection after ``maxusage``
operations, runs ``setsession`` statements on every (re)connect and pings according to
the ``ping`` flags (0 never, 1 when ``_ping_check()`` is called, i.e. when a pool hands it
out, 2 when a cursor is created, 4 when a statement is executed, 7 always). Where the
driver allows (PyMySQL), a ping first polls the socket and skips the server round trip
when nothing arrived on it, since a MySQL server writes to an idle session only as it
closes it (see :func:`forksafe.drivers.quiet_probe`).

This is DBUtils' SteadyDB with the same parameters, defaults and behaviour, plus one
guarantee: a connection remembers the process that opened it. Used in another process
(it was inherited through ``fork()``), it raises :class:`~forksafe.errors.ForkedConnectionError`;
closed or garbage-collected there, it is *discarded* (see :mod:`forksafe.drivers`)
so the parent's session never receives a goodbye.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from forksafe import drivers, fork, forwarding
from forksafe.errors import ForkedConnectionError, InvalidCursorError, SteadyDBError

__all__ = [
    "InvalidCursor",
    "InvalidCursorError",
    "Recipe",
    "SteadyDBConnection",
    "SteadyDBCursor",
    "SteadyDBError",
    "connect",
]

InvalidCursor = InvalidCursorError

# Read by the inlined pid checks on the hot path; see fork.getpid().
_page = fork.page
# Compared with a connection's token by the process checks on the hot paths; see fork.armed.
_armed = fork.armed

_PING_ERROR = (
    "'ping' must be an integer, an SQL statement, a callable,"
    " or a tuple with an integer and one of the latter"
)

Pinger = Callable[[Any], Any]


def _sql_pinger(sql: str) -> Pinger:
    def pinger(con: Any) -> None:
        cursor = con.cursor()
        try:
            cursor.execute(sql)
        finally:
            with suppress(Exception):
                cursor.close()

    return pinger


def parse_ping(ping: Any) -> tuple[int, Pinger | None]:
    """Split DBUtils' ``ping`` argument into (flags, check function or None)."""
    pinger: Any
    if isinstance(ping, tuple):
        try:
            ping, pinger = ping
        except ValueError:
            raise TypeError(_PING_ERROR) from None
    elif isinstance(ping, str) or callable(ping):
        ping, pinger = 1, ping
    else:
        pinger = None
    if isinstance(pinger, str):
        pinger = _sql_pinger(pinger)
    elif pinger is not None and not callable(pinger):
        raise TypeError(_PING_ERROR)
    return (ping if isinstance(ping, int) else 0), pinger


def _parent_module(name: str | None) -> Any:
    """Walk up a dotted module name to the first module with a callable ``connect``."""
    while name:
        module = sys.modules.get(name)
        if module is not None and callable(getattr(module, "connect", None)):
            return module
        name = name.rpartition(".")[0]
    return None


def connect(
    creator: Any,
    maxusage: int | None = None,
    setsession: Sequence[str] | None = None,
    failures: type[Exception] | tuple[type[Exception], ...] | None = None,
    ping: Any = 1,
    closeable: bool = True,
    isfatal: Callable[[Exception], bool] | None = None,
    *args: Any,
    **kwargs: Any,
) -> SteadyDBConnection:
    """Open a tough connection; the parameters are those of :class:`SteadyDBConnection`."""
    return SteadyDBConnection(
        creator, maxusage, setsession, failures, ping, closeable, isfatal, *args, **kwargs
    )


def _check_failures(failures: Any) -> None:
    """Refuse a ``failures`` argument that is not None, an exception class or a tuple of them."""
    if failures is not None and not all(
        isinstance(kind, type) and issubclass(kind, Exception)
        for kind in (failures if isinstance(failures, tuple) else (failures,))
    ):
        raise TypeError(f"failures={failures!r} must be an exception class or a tuple of them")


class Recipe:
    """Everything that determines a steady connection, as the pools keep it.

    Two recipes that compare equal make interchangeable connections; :attr:`key` is
    that identity, or None when the arguments are unhashable.
    """

    def __init__(
        self,
        creator: Any,
        maxusage: int | None,
        setsession: Sequence[str] | None,
        failures: type[Exception] | tuple[type[Exception], ...] | None,
        ping: Any,
        isfatal: Callable[[Exception], bool] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        _check_failures(failures)
        self.creator = creator
        self.maxusage = maxusage
        self.setsession = setsession
        self.failures = failures
        self.ping = ping
        self.isfatal = isfatal
        self.args = args
        self.kwargs = kwargs
        key: Any = (
            creator,
            args,
            tuple(sorted(kwargs.items())),
            maxusage,
            tuple(setsession) if setsession else None,
            failures,
            ping,
            isfatal,
        )
        try:
            hash(key)
        except TypeError:
            key = None
        self.key = key

    def connect(self, closeable: bool) -> SteadyDBConnection:
        """Open a steady connection by this recipe."""
        return SteadyDBConnection(
            self.creator,
            self.maxusage,
            self.setsession,
            self.failures,
            self.ping,
            closeable,
            self.isfatal,
            *self.args,
            **self.kwargs,
        )


class SteadyDBConnection:
    """A hardened DB-API 2 connection (DBUtils-compatible).

    creator: a DB-API 2 module or a callable returning new driver connections.
    maxusage: reopen the connection after this many operations (0/None: never).
    setsession: SQL statements run on every new connection (committed where they opened
        a transaction the driver reports, so a rollback does not undo them).
    failures: exception class(es) that trigger a transparent reconnect.
    ping: when to check the connection (see the module docstring).
    closeable: if false, :meth:`close` only ends an open transaction.
    isfatal: called with a matching failure; return False for errors that do not break
        the connection (a statement timeout), so they are raised and not retried.
    args, kwargs: passed to the creator.

    Raises ``TypeError`` for a creator that cannot make connections or a malformed
    parameter, and whatever the driver raises when the first connect fails.
    """

    # What the hot paths read live in slots (see forksafe.speedups); the rest in __dict__.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_closed",
        "_con",
        "_cursor_class",
        "_failures",
        "_in_transaction",
        "_ping",
        "_pinger",
        "_plain",
        "_plain_ping",
        "_quiet",
        "_reconnects",
        "_token",
        "_transaction",
    )

    # Every instance attribute is declared here: a pool's proxies forward these names.
    _con: Any
    _closed: bool
    _creator: Callable[..., Any]
    _dbapi: Any
    _threadsafety: int | None
    _maxusage: int
    _setsession_sql: Sequence[str] | None
    _failures: Any
    _failure: Any
    _isfatal: Callable[[Exception], bool] | None
    _ping: int
    _pinger: Pinger | None
    # No ping at cursor() or execute(), no maxusage: their fast paths apply (see _set_ping).
    _plain: bool
    _closeable: bool
    _args: tuple[Any, ...]
    _kwargs: dict[str, Any]
    _transaction: bool
    _usage: int  # operations since connect, counted where maxusage is set
    _pid: int
    _token: int  # fork.token() of the process that opened it (see fork.armed)
    _created_at: float
    _reconnects: int
    _jitter: float  # fraction of a pool's maxage this connection may live
    _idle_since: float  # when a pool last took it back
    # Whether the pool that opened it is alive (its one item), if a pool did: see __del__.
    _pool_life: list[bool] | None = None
    # See drivers.transaction_probe(); None: the driver cannot tell.
    _in_transaction: Callable[[Any], object] | None
    _quiet: Callable[[Any], bool] | None
    _plain_ping: bool  # a ping is the driver's ping(), no probe first (see PooledDB.connection)
    _cursor_class: type[SteadyDBCursor]  # what cursor() without arguments makes

    def __init__(
        self,
        creator: Any,
        maxusage: int | None = None,
        setsession: Sequence[str] | None = None,
        failures: type[Exception] | tuple[type[Exception], ...] | None = None,
        ping: Any = 1,
        closeable: bool = True,
        isfatal: Callable[[Exception], bool] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self._con = None
        self._closed = True
        self._cursor_class = SteadyDBCursor
        try:
            self._creator = creator.connect
            dbapi = getattr(creator, "dbapi", None)
            self._dbapi = dbapi if callable(getattr(dbapi, "connect", None)) else creator
        except AttributeError:
            self._creator = creator
            self._dbapi = getattr(creator, "dbapi", None)
            if self._dbapi is None:
                module = sys.modules.get(getattr(creator, "__module__", None) or "")
                if module is not None and getattr(module, "connect", None) == creator:
                    self._dbapi = module
        self._threadsafety = getattr(creator, "threadsafety", None)
        if self._threadsafety is None:
            self._threadsafety = getattr(self._dbapi, "threadsafety", None)
        if not callable(self._creator):
            raise TypeError(
                f"creator={creator!r} is not a connection provider; pass a DB-API 2 module"
                " (like psycopg2) or a callable that returns a new connection"
            )
        if maxusage is None:
            maxusage = 0
        if not isinstance(maxusage, int) or isinstance(maxusage, bool) or maxusage < 0:
            raise TypeError(f"maxusage={maxusage!r} must be a non-negative integer or None")
        self._maxusage = maxusage
        if isinstance(setsession, str):
            raise TypeError(
                f"setsession={setsession!r} must be a list of SQL statements, not one string"
            )
        self._setsession_sql = setsession
        _check_failures(failures)
        self._failures = failures
        self._failure = None
        if isfatal is not None and not callable(isfatal):
            raise TypeError(f"isfatal={isfatal!r} must be a callable")
        self._isfatal = isfatal
        ping, self._pinger = parse_ping(ping)
        self._set_ping(ping)
        self._closeable = closeable
        self._args, self._kwargs = args, kwargs
        self._transaction = False
        self._usage = 0
        self._pid = 0
        self._token = 0
        self._created_at = 0.0
        self._reconnects = 0
        self._jitter = 1.0
        self._idle_since = 0.0
        self._store(self._create())
        self._reconnects = 0

    # -- life cycle -----------------------------------------------------------------

    def _create(self) -> Any:
        """Make a new driver connection and prepare its session; close it if that fails."""
        con = self._creator(*self._args, **self._kwargs)
        try:
            if self._dbapi is None or self._dbapi.connect != self._creator:
                found = _parent_module(getattr(type(con), "__module__", None))
                if found is None:
                    error_class = getattr(con, "OperationalError", None)
                    found = _parent_module(getattr(error_class, "__module__", None))
                if found is not None:
                    self._dbapi = found
            if self._threadsafety is None:
                self._threadsafety = getattr(self._dbapi, "threadsafety", None)
                if self._threadsafety is None:
                    self._threadsafety = getattr(con, "threadsafety", None)
            if self._failures is None:
                self._failures = self._default_failures(con)
            self._failure = (
                self._failures[0] if isinstance(self._failures, tuple) else self._failures
            )
            self._setsession(con)
        except Exception:
            with suppress(Exception):
                con.close()
            raise
        return con

    def _default_failures(self, con: Any) -> tuple[type[Exception], ...]:
        sources: tuple[Any, ...] = (self._dbapi, self._creator, con)
        for source in sources:
            try:
                return (source.OperationalError, source.InterfaceError, source.InternalError)
            except AttributeError:
                continue
        raise AttributeError(
            "could not determine the failure exceptions of this driver;"
            " pass failures=(...) or give the creator a dbapi attribute"
        )

    def _setsession(self, con: Any = None) -> None:
        if con is None:
            con = self._con
        if self._setsession_sql:
            cursor = con.cursor()
            for sql in self._setsession_sql:
                cursor.execute(sql)
            cursor.close()
            # A driver that opens a transaction for any statement (psycopg2, psycopg
            # without autocommit) would leave the connection idle in transaction, and the
            # first rollback would undo the settings: commit them where it reports one.
            probe = drivers.transaction_probe(con)
            if probe is not None and probe(con):
                con.commit()

    def _store(self, con: Any) -> None:
        if self._pid:
            self._reconnects += 1
        self._con = con
        pid = fork.getpid()  # first: in a new process, this also writes the new token
        drivers.track(con)
        self._in_transaction = drivers.transaction_probe(con)
        self._quiet = drivers.quiet_probe(con)
        self._plain_ping = self._pinger is None and self._quiet is None
        self._transaction = False
        self._closed = False
        self._usage = 0
        self._pid = pid
        self._token = _armed[0]
        self._created_at = self._idle_since = time.monotonic()

    def _replace(self, con: Any) -> None:
        self._close()
        self._store(con)

    def _try_reconnect(self) -> bool:
        try:
            con = self._create()
        except Exception:
            return False
        self._replace(con)
        return True

    def _close(self) -> None:
        """Close the driver connection; in a process that did not open it, discard it."""
        con = self._detach()
        if con is None:
            return
        if self._pid == fork.getpid():
            drivers.untrack(con)
            with suppress(Exception):
                con.close()
            # Kept, closed, as in DBUtils: a later use gets the driver's error on a
            # closed connection (an InterfaceError, one of the default failures) and
            # reopens it, where a None would raise AttributeError.
            self._con = con
        else:
            drivers.discard(con)

    def _detach(self) -> Any:
        """Mark closed and hand over the driver connection (None if already closed)."""
        if self._closed:
            return None
        self._closed = True
        self._transaction = False
        con, self._con = self._con, None
        return con

    def _discard(self) -> None:
        """Drop an inherited connection without a word to the server (see drivers.discard)."""
        drivers.discard(self._detach())

    def _check_process(self) -> None:
        """Refuse to work in a process that did not open this connection.

        The hot paths call it only when ``self._token != _armed[0]``: a new process, or
        one not known yet (its page wiped by a fork that ran no Python hook), in which
        :func:`fork.getpid` then writes the new token.
        """
        pid = fork.getpid()
        if self._pid != pid:
            raise ForkedConnectionError(
                f"this connection was opened by process {self._pid} and inherited"
                f" through fork() by process {pid}; using it would mix both processes'"
                " queries on one socket. Get a new connection from the pool in this"
                " process"
            )
        self._token = _armed[0]

    def _driver_in_transaction(self) -> bool | None:
        """What the driver says of an open transaction: True, False or None (cannot tell)."""
        probe = self._in_transaction
        if probe is None:
            return None
        try:
            state = probe(self._con)
        except Exception:
            return None
        return None if state is None else bool(state)

    def _reset(self, force: bool = False) -> None:
        """Roll back if forced or a transaction was begun; skipped if the driver says idle.
        Never raises (see :meth:`_rollback`)."""
        if self._closed or not (force or self._transaction):
            return
        if not self._transaction and self._driver_in_transaction() is False:
            return
        self._rollback()

    def _rollback(self) -> Exception | None:
        """Roll back; after one of ``failures``, reconnect for the next use. Returns the
        error instead of raising it: pools returning a connection ignore it (one Python
        call on their hot path), :meth:`rollback` raises it."""
        if self._token != _armed[0]:
            try:
                self._check_process()
            except Exception as error:
                return error
        self._transaction = False
        try:
            self._con.rollback()
        except Exception as error:
            return self._rollback_failed(error)
        return None

    def _rollback_failed(self, error: Exception) -> Exception:
        """After the driver's rollback() raised ``error``: if it is one of ``failures``,
        reconnect for the next use. Returns ``error``."""
        if isinstance(error, self._failures):
            with suppress(Exception):
                self._try_reconnect()
        return error

    def _set_ping(self, flags: int) -> None:
        self._ping = flags
        self._plain = not flags & 6 and not self._maxusage

    def _ping_check(self, ping: int = 1, reconnect: bool = True) -> bool | None:
        """Check the connection if ``ping`` matches the flags; reconnect a dead one.

        Returns whether it is alive, or None when it was not checked. A dead connection
        is not replaced inside a transaction.
        """
        if not ping & self._ping:
            return None
        if self._token != _armed[0]:
            self._check_process()
        alive: Any
        if self._pinger is None:
            quiet = self._quiet
            if quiet is not None:
                try:
                    if quiet(self._con):
                        return True  # nothing arrived on the socket: no round trip needed
                except Exception:
                    pass
            try:
                alive = self._con.ping(False)
            except Exception as error:
                return self._ping_raised(error, reconnect)
        else:
            try:
                alive = self._pinger(self._con)
            except Exception:
                alive = False
        if alive or alive is None:
            return True
        return self._ping_dead(reconnect)

    def _ping_raised(self, error: Exception, reconnect: bool) -> bool | None:
        """The rest of :meth:`_ping_check` after the driver's ``ping(False)`` raised."""
        if isinstance(error, TypeError):  # a ping() without PyMySQL's argument
            try:
                alive = self._con.ping()
            except Exception as again:
                error = again
            else:
                return True if alive or alive is None else self._ping_dead(reconnect)
        if isinstance(error, (AttributeError, IndexError, TypeError, ValueError)):
            self._set_ping(0)  # the driver has no usable ping(): stop trying
            return None
        return self._ping_dead(reconnect)

    def _ping_dead(self, reconnect: bool) -> bool:
        """The connection failed its ping: replace it unless inside a transaction (or the
        reconnect fails); whether it was replaced."""
        return reconnect and not self._transaction and self._try_reconnect()

    # -- DB-API surface -------------------------------------------------------------

    def __enter__(self) -> SteadyDBConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        """Commit if the block succeeded, roll back if it raised. Does not close."""
        if exc[0] is None:
            self.commit()
        else:
            self.rollback()

    def dbapi(self) -> Any:
        """Return the DB-API 2 module of the driver."""
        if self._dbapi is None:
            raise AttributeError(
                "could not determine the DB-API 2 module; give the creator a dbapi attribute"
            )
        return self._dbapi

    @property
    def dbapi_connection(self) -> Any:
        """The driver connection itself (bypasses failover and usage counting)."""
        return self._con

    def threadsafety(self) -> int:
        """Return the driver's DB-API thread safety level."""
        if self._threadsafety is None:
            if self._dbapi is None:
                raise AttributeError(
                    "could not determine threadsafety; give the creator a dbapi or"
                    " threadsafety attribute"
                )
            return 0
        return self._threadsafety

    def _fatal_check(self, error: Exception) -> bool:
        return self._isfatal is None or bool(self._isfatal(error))

    def close(self) -> None:
        """Close the connection, or, if it is not closeable, only end its transaction.

        Never complains when called twice. A non-closeable connection is rolled back
        when a transaction was begun or the driver reports one open, so it never sits
        *idle in transaction* holding locks.
        """
        if self._closeable:
            self._close()
        elif (
            not self._closed
            and self._pid == (fork.cached_pid if _page[0] else fork.getpid())
            and (
                self._transaction
                or (self._in_transaction is not None and self._driver_in_transaction() is True)
            )
        ):
            self._reset(force=True)

    def begin(self, *args: Any, **kwargs: Any) -> None:
        """Start a transaction: until commit/rollback, errors are raised, never retried."""
        self._check_process()
        self._transaction = True
        begin = getattr(self._con, "begin", None)
        if begin is not None:
            begin(*args, **kwargs)

    def commit(self) -> None:
        """Commit; if the commit fails, reconnect for the next use and raise the error."""
        if self._token != _armed[0]:
            self._check_process()
        self._transaction = False
        try:
            self._con.commit()
        except self._failures:
            self._try_reconnect()
            raise

    def rollback(self) -> None:
        """Roll back; if that fails, reconnect for the next use and raise the error."""
        error = self._rollback()
        if error is not None:
            raise error

    def cancel(self) -> None:
        """Cancel a long-running statement, where the driver supports it. Refused in a
        process that did not open the connection: a driver's cancel (libpq's) reaches
        the session through a socket of its own, which discarding cannot blind."""
        self._check_process()
        self._transaction = False
        cancel = getattr(self._con, "cancel", None)
        if cancel is not None:
            cancel()

    def ping(self, *args: Any, **kwargs: Any) -> Any:
        """Call the driver's ``ping()``."""
        self._check_process()
        return self._con.ping(*args, **kwargs)

    def _cursor(self, *args: Any, **kwargs: Any) -> Any:
        """Make a driver cursor, reconnecting once if the connection turned out dead."""
        if self._token != _armed[0]:
            self._check_process()
        transaction = self._transaction
        if not transaction and self._ping & 2:
            self._ping_check(2)
        if self._maxusage and self._usage >= self._maxusage and not transaction:
            return self._cursor_failed(self._failure(), args, kwargs, overused=True)
        try:
            return self._con.cursor(*args, **kwargs)
        except self._failures as error:
            return self._cursor_failed(error, args, kwargs, overused=False)

    def _cursor_failed(self, error: Exception, args: Any, kwargs: Any, overused: bool) -> Any:
        """After ``cursor()`` failed (or ``maxusage`` was reached): reconnect and retry once
        outside a transaction; inside one, reconnect for the next use and raise."""
        if not overused and not self._fatal_check(error):
            raise error
        transaction = self._transaction
        try:
            con = self._create()
        except Exception:
            pass
        else:
            try:
                cursor = con.cursor(*args, **kwargs)
            except Exception:
                pass
            else:
                self._replace(con)
                if transaction:
                    raise error from None
                return cursor
            with suppress(Exception):
                con.close()
        if transaction:
            self._transaction = False
        raise error from None

    def cursor(self, *args: Any, **kwargs: Any) -> SteadyDBCursor:
        """Return a tough cursor (see :class:`SteadyDBCursor`)."""
        if args or kwargs:
            return SteadyDBCursor(self, *args, **kwargs)
        cls = self._cursor_class
        if not self._plain or self._token != _armed[0]:
            return cls(self)
        # No ping or usage limit applies: SteadyDBCursor.__init__'s fast path without the
        # __init__ call (hot path; pooled proxies inline this too). The first cursor of a
        # connection, or one of a new driver cursor type, switches to the class made for
        # its type (_adopt).
        try:
            cursor = self._con.cursor()
        except self._failures as error:
            cursor = self._cursor_failed(error, (), {}, overused=False)
        steady = _new_cursor(cls)
        steady._con = self
        steady._sized = False
        if type(cursor) is cls._made_for:
            steady._cursor = cursor
            steady._closed = False
        else:
            steady._adopt(cursor, True)
        return steady

    def __del__(self) -> None:
        life = self._pool_life
        if life is not None and life[0] and not self._closed and self._pid == fork.getpid():
            # Collected while checked out, in a reference cycle with its proxy, whose
            # finaliser gives it back to its pool (before or after this one runs): closed
            # here, it could close under a thread that took it from the pool meanwhile.
            # A pool that is collected too closes it (PooledDB.__del__ and cache()); a
            # pool closes what it drops; else the driver's own finaliser closes it.
            return
        with suppress(Exception):
            self._close()


class SteadyDBCursor:
    """A hardened DB-API 2 cursor: ``execute*``/``callproc*`` fail over like the connection.

    Every other attribute is the driver cursor's, as in DBUtils. Instances take a subclass
    made for their driver's cursor type, which forwards by descriptors
    (:mod:`forksafe.forwarding`) every name the type lists, every name its Python
    methods assign to, PEP 249's cursor attributes and the names its first cursor had.
    A driver cursor type whose names cannot be listed (it has a ``__getattr__`` of its
    own, or its methods set attributes with ``setattr()`` or through ``__dict__``) is
    forwarded by ``__getattr__``, which subclasses of this class get unless they define
    their own. A name set on a driver cursor only by code outside its class, or by C
    code, is not listed: read it from ``dbapi_cursor``, the driver cursor itself.

    Dropping a steady cursor leaves its driver cursor to the driver's own finaliser.
    """

    # What the hot paths read live in slots (see forksafe.speedups); every way of making
    # a steady cursor sets them.
    __slots__ = ("__dict__", "__weakref__", "_closed", "_con", "_cursor", "_sized")

    _con: SteadyDBConnection
    _cursor: Any
    _closed: bool
    _sized: bool  # sizes were set for the next execute*() (one check for its fast path)
    _args: tuple[Any, ...] = ()  # the arguments of cursor(), reused for a new driver cursor
    _kwargs: Mapping[str, Any] = types.MappingProxyType({})
    _no_failover = 0
    _inputsizes: Any = None
    _outputsizes: dict[Any, Any] | None = None
    _made_for: type | None = None  # the driver cursor type of a per-driver subclass

    def __init_subclass__(cls, forwarding: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not forwarding and not hasattr(cls, "__getattr__"):
            cls.__getattr__ = _forward_by_name  # type: ignore[attr-defined]

    def __init__(self, con: SteadyDBConnection, *args: Any, **kwargs: Any) -> None:
        self._cursor = None
        self._closed = True
        self._sized = False
        if not isinstance(con, SteadyDBConnection):
            raise TypeError(f"{con!r} is not a SteadyDBConnection")
        self._con = con
        self._args, self._kwargs = args, kwargs
        if con._plain and con._token == _armed[0]:
            try:  # the fast path of con._cursor()
                cursor = con._con.cursor(*args, **kwargs)
            except con._failures as error:
                cursor = con._cursor_failed(error, args, kwargs, overused=False)
        else:
            cursor = con._cursor(*args, **kwargs)
        self._adopt(cursor, not args and not kwargs)

    def _adopt(self, cursor: Any, plain: bool) -> None:
        """Take ``cursor``, the first driver cursor, and the class made for its type."""
        self._cursor = cursor
        self._closed = False
        made_for = self._made_for
        if made_for is not type(cursor) and (made_for is not None or type(self) is SteadyDBCursor):
            # Not made as the class for this driver cursor type: switch (once per
            # connection for plain cursor() calls, which then make the right class).
            cls = _cursor_classes.get(type(cursor)) or _cursor_class(cursor)
            self.__class__ = cls
            if plain:
                self._con._cursor_class = cls

    def _live(self, name: str) -> Any:
        """The driver cursor, or InvalidCursorError naming the attribute wanted, or
        ForkedConnectionError in a process that did not open the connection (its fetches,
        scrolls and the like would read the other process's session)."""
        cursor = self._cursor
        if cursor is None:
            raise InvalidCursorError(f"cursor has no driver cursor; cannot get {name!r}")
        con = self._con
        if con._token != _armed[0]:
            con._check_process()
        return cursor

    def _bind(self, cursor: Any) -> None:
        """Make ``cursor`` (the first, or a replacement after failover) the driver cursor."""
        self._cursor = cursor
        self._closed = False

    def __enter__(self) -> SteadyDBCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        cursor = self._live("__iter__")
        rows: Iterator[Any]
        try:
            rows = iter(cursor)
        except TypeError:
            rows = iter(cursor.fetchone, None)
        if drivers.fetches_from_server(cursor):
            # Each row may be a read of the session: checked, like fetchone(), in case
            # the iterator outlives a fork. Client-side rows are only memory.
            return _rows_of_this_process(self._con, rows)
        return rows

    @property
    def dbapi_cursor(self) -> Any:
        """The driver cursor itself (bypasses failover and usage counting)."""
        if not self._cursor:
            raise InvalidCursorError("this cursor has no driver cursor")
        return self._cursor

    @contextmanager
    def no_failover(self) -> Iterator[SteadyDBCursor]:
        """Inside this block, failed statements are raised at once, never retried."""
        self._no_failover += 1
        try:
            yield self
        finally:
            self._no_failover -= 1

    def setinputsizes(self, sizes: Any) -> None:
        """Remember input sizes, so they can be set again on a reopened cursor."""
        self._inputsizes = sizes
        self._sized = True

    def setoutputsize(self, size: int, column: Any = None) -> None:
        """Remember an output size, so it can be set again on a reopened cursor."""
        if self._outputsizes is None:
            self._outputsizes = {}
        self._outputsizes[column] = size
        self._sized = True

    def _setsizes(self, cursor: Any) -> None:
        if self._inputsizes:
            cursor.setinputsizes(self._inputsizes)
        for column, size in (self._outputsizes or {}).items():
            if column is None:
                cursor.setoutputsize(size)
            else:
                cursor.setoutputsize(size, column)

    def close(self) -> None:
        """Close the cursor; never complains when called twice. In a process that did
        not open the connection, only forgets the driver cursor (closing a server-side
        one would talk to the other process's session)."""
        if not self._closed:
            self._closed = True
            con = self._con
            if con._token != _armed[0] and con._pid != fork.getpid():
                return
            try:  # noqa: SIM105 - hot path
                self._cursor.close()
            except Exception:
                pass

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        """Execute a statement; retried once on a fresh connection outside a transaction."""
        con = self._con
        if con._plain and con._token == _armed[0] and not self._sized:
            # Fast path of _call for the common case; failures take the full path.
            try:
                result = self._cursor.execute(*args, **kwargs)
            except con._failures as error:
                return self._execute_failed(error, args, kwargs)
            return result  # not counted: a plain connection has no maxusage to reach
        return self._call("execute", args, kwargs, True)

    def _execute_failed(self, error: Exception, args: Any, kwargs: Any) -> Any:
        """The fast path of :meth:`execute` after the driver raised one of ``failures``."""
        if self._no_failover or not self._con._fatal_check(error):
            raise error
        return self._failover("execute", args, kwargs, error, overused=False)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        """Execute a statement for many parameter sets, with the same failover."""
        return self._call("executemany", args, kwargs, True)

    def callproc(self, *args: Any, **kwargs: Any) -> Any:
        """Call a stored procedure, with the same failover."""
        return self._call("callproc", args, kwargs, False)

    def fetchone(self) -> Any:
        """Fetch the next row."""
        con = self._con
        if con._token != _armed[0]:
            return self._live("fetchone").fetchone()
        return self._cursor.fetchone()

    def fetchmany(self, *args: Any, **kwargs: Any) -> Any:
        """Fetch the next rows."""
        return self._live("fetchmany").fetchmany(*args, **kwargs)

    def fetchall(self) -> Any:
        """Fetch all remaining rows."""
        return self._live("fetchall").fetchall()

    def _call(self, name: str, args: Any, kwargs: Any, execute: bool) -> Any:
        con = self._con
        transaction = con._transaction
        if con._token != _armed[0]:
            con._check_process()
        if not transaction and con._ping & 4:
            con._ping_check(4)
        try:
            if con._maxusage and con._usage >= con._maxusage and not transaction:
                raise _Overused
            sized = execute and self._sized
            if sized:
                self._setsizes(self._cursor)
            result = getattr(self._cursor, name)(*args, **kwargs)
            if sized:
                self._inputsizes = self._outputsizes = None
                self._sized = False
        except _Overused:
            return self._failover(name, args, kwargs, con._failure(), overused=True)
        except con._failures as error:
            if self._no_failover or not con._fatal_check(error):
                raise
            return self._failover(name, args, kwargs, error, overused=False)
        con._usage += 1
        return result

    def _run(self, cursor: Any, name: str, args: Any, kwargs: Any) -> Any:
        execute = name.startswith("execute")
        if execute:
            self._setsizes(cursor)
        result = getattr(cursor, name)(*args, **kwargs)
        if execute:
            self._inputsizes = self._outputsizes = None
            self._sized = False
        return result

    def _failover(self, name: str, args: Any, kwargs: Any, error: Exception, overused: bool) -> Any:
        """After a failure: retry on a new cursor, then on a new connection (DBUtils' order)."""
        con = self._con
        transaction = con._transaction
        if not transaction and not overused:
            try:
                cursor2 = con._cursor(*self._args, **self._kwargs)
            except Exception:
                pass
            else:
                try:
                    result = self._run(cursor2, name, args, kwargs)
                except Exception:
                    with suppress(Exception):
                        cursor2.close()
                else:
                    self.close()
                    self._bind(cursor2)
                    con._usage += 1
                    return result
        try:
            con2 = con._create()
        except Exception:
            pass
        else:
            try:
                cursor2 = con2.cursor(*self._args, **self._kwargs)
            except Exception:
                pass
            else:
                if transaction:
                    self.close()
                    con._replace(con2)
                    self._bind(cursor2)
                    raise error
                error2: Exception | None = None
                try:
                    result = self._run(cursor2, name, args, kwargs)
                except error.__class__:
                    use2 = False
                    error2 = error
                except Exception as other:
                    use2 = True
                    error2 = other
                else:
                    use2 = True
                if use2:
                    self.close()
                    con._replace(con2)
                    self._bind(cursor2)
                    con._usage += 1
                    if error2 is not None:
                        raise error2
                    return result
                with suppress(Exception):
                    cursor2.close()
            with suppress(Exception):
                con2.close()
        if transaction:
            con._transaction = False
        raise error


# Makes a steady cursor without running its __init__ (a Python call); see
# SteadyDBConnection.cursor().
_new_cursor = object.__new__


def _rows_of_this_process(con: SteadyDBConnection, rows: Iterator[Any]) -> Iterator[Any]:
    """The rows of ``rows``, each read only in the process that opened ``con``."""
    while True:
        if con._token != _armed[0]:
            con._check_process()
        try:
            row = next(rows)
        except StopIteration:
            return
        yield row


def _failover_call(cursor: SteadyDBCursor, name: str) -> Callable[..., Any]:
    """The driver's ``execute*``/``call*`` method ``name``, with the steady failover."""
    execute = name.startswith("execute")
    return lambda *args, **kwargs: cursor._call(name, args, kwargs, execute)


def _forward_by_name(self: SteadyDBCursor, name: str) -> Any:
    """The driver cursor's attribute ``name``, its ``execute*``/``call*`` methods with the
    steady failover. Also the ``__getattr__`` of steady cursors whose driver attributes
    cannot be listed."""
    value = getattr(self._live(name), name)
    if callable(value) and name.startswith(("execute", "call")):
        return _failover_call(self, name)
    return value


class _ForwardCall(forwarding.Forward):
    """Forwards a driver's ``execute*``/``call*`` attribute: a method gets the steady
    failover, anything else (a flag named ``executed``, say) is read as it is."""

    __slots__ = ()

    def __get__(self, wrapper: Any, owner: type | None = None) -> Any:
        if wrapper is None:
            return self
        return _forward_by_name(wrapper, self.name)


def _forwarder(name: str) -> forwarding.Forward:
    if name.startswith(("execute", "call")):
        return _ForwardCall(name)
    return forwarding.Forward(name)


# Driver cursor type -> the SteadyDBCursor subclass its cursors get.
_cursor_classes: dict[type, type[SteadyDBCursor]] = {}


# PEP 249's cursor attributes, its optional extensions included: forwarded whether or
# not a driver's cursor type lists them.
_DBAPI_CURSOR_NAMES = (
    "arraysize",
    "connection",
    "description",
    "errorhandler",
    "lastrowid",
    "messages",
    "rowcount",
    "rownumber",
)


def _cursor_class(cursor: Any) -> type[SteadyDBCursor]:
    """Make (once per driver cursor type) the steady cursor class for cursors like this."""
    kind = type(cursor)
    names = None if hasattr(kind, "__getattr__") else forwarding.names_of(kind)
    namespace = {
        "__module__": __name__,
        "__qualname__": SteadyDBCursor.__qualname__,
        "_made_for": kind,
    }
    cls = types.new_class(
        SteadyDBCursor.__name__,
        (SteadyDBCursor,),
        {"forwarding": names is not None},
        lambda ns: ns.update(namespace),
    )
    if names is not None:
        had = getattr(cursor, "__dict__", ())  # names its first cursor had
        forwarding.forward(cls, names.union(_DBAPI_CURSOR_NAMES, had), make=_forwarder)
    _cursor_classes[kind] = cls
    return cls


class _Overused(Exception):
    """Internal signal: ``maxusage`` reached, reopen the connection before executing."""
