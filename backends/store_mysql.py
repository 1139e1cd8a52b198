"""MySQL and MariaDB store (aiomysql): aiomysql's connection pool, created on first use, under the ``pool.*`` timeouts.

As in :mod:`.store_postgresql`: no connection is opened until a query needs one (``minsize=0``), so a daemon starts
while its database is down; a connection whose statement failed in a way that leaves its state unknown is closed
rather than returned, and a pool that fails in an unexpected way is discarded and rebuilt on the next query.

Budgets: ``pool.timeout.wait`` for a free connection (a semaphore in front of the pool), ``pool.timeout.create``
for opening one (aiomysql's ``connect_timeout`` covers only the TCP connect, and a SIGSTOPped server completes the
handshake and then never greets: the whole acquire runs under the timeout), ``timeout`` for each statement.

Dialect notes: PyMySQL interpolates parameters client-side (escaped for the connection's utf8mb4 charset and
the server's ``NO_BACKSLASH_ESCAPES`` mode); placeholders become ``%s`` through :func:`translate`. In MariaDB and
MySQL ``||`` is logical OR unless ``PIPES_AS_CONCAT`` is set: queries concatenate with ``CONCAT()``. The session
reports rows *matched* by an UPDATE (``CLIENT.FOUND_ROWS``), as PostgreSQL and SQLite do, not rows changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Literal, TypeVar

import aiomysql  # type: ignore[import-untyped]
import pymysql  # type: ignore[import-untyped]
from pymysql.constants import CLIENT  # type: ignore[import-untyped]

from .errors import DirectoryError, PermanentFailure, TemporaryFailure
from .store import ConstraintViolation, Executor, MysqlStoreConfig, Rows, Store, TlsConfig, translate
from .tasks import ensure_task

log = logging.getLogger(__name__)

T = TypeVar("T")

_errors = pymysql.err


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """None (plain TCP) unless TLS is enabled; then verified unless allowed not to be."""
    if not tls.enable:
        return None
    context = ssl.create_default_context()
    if tls.allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _describe(exc: Exception) -> tuple[int, str, str]:
    """Error number, first line of the message, SQLSTATE (empty when the server sent none)."""
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    first = message.splitlines()[0] if message else type(exc).__name__
    return code, f"({code}) {first}", str(getattr(exc, "sqlstate", None) or "")


def _fault(exc: Exception, name: str) -> DirectoryError:
    """The store's failure for a PyMySQL (or socket) exception raised by a statement.

    PyMySQL's classes are not enough: it raises OperationalError for any server error it has no mapping for,
    "unknown column" (1054) included. The SQLSTATE decides, as for PostgreSQL: 23 is a constraint violation;
    42 (syntax, unknown table or column, access to them), 22 (data the column refuses) and 0A are errors in the
    query as configured. Client-side errors (2000-2999: cannot connect, server gone away, lost connection),
    deadlocks, lock waits, too many connections, authentication... may pass: temporary.
    """
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        return TemporaryFailure(f"{name}: statement timed out")
    if isinstance(exc, _errors.MySQLError):
        code, text, sqlstate = _describe(exc)
        if isinstance(exc, _errors.IntegrityError) or sqlstate.startswith("23"):
            return ConstraintViolation(f"{name}: {text}")
        if isinstance(exc, _errors.InterfaceError) or 2000 <= code < 3000:
            return TemporaryFailure(f"{name}: {text}")
        permanent = _errors.ProgrammingError | _errors.DataError | _errors.NotSupportedError
        if isinstance(exc, permanent) or sqlstate[:2] in ("42", "22", "0A"):
            return PermanentFailure(f"{name}: {text}")
        return TemporaryFailure(f"{name}: {text}")
    if isinstance(exc, OSError):
        return TemporaryFailure(f"{name}: {exc.strerror or exc}")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return TemporaryFailure(f"{name}: {type(exc).__name__}: {first}")


class _Session:
    """Statements on one pooled connection; remembers whether the connection may be reused afterwards."""

    def __init__(self, pool: Any, conn: Any, name: str, timeout: float) -> None:
        self.pool = pool
        self.conn = conn
        self.name = name
        self.timeout = timeout
        self.broken = False

    async def query(self, sql: str, *params: object) -> Rows:
        text, args = translate(sql, params, "format")

        async def run() -> Rows:
            async with self.conn.cursor() as cursor:
                # Always a tuple, even empty: PyMySQL only turns the doubled %% back into % when it formats.
                await cursor.execute(text, args)
                rows = await cursor.fetchall()
                columns = tuple(str(column[0]).lower() for column in cursor.description or ())
            return Rows(columns, [tuple(row) for row in rows])

        return await self._run(run)

    async def execute(self, sql: str, *params: object) -> int:
        text, args = translate(sql, params, "format")

        async def run() -> int:
            async with self.conn.cursor() as cursor:
                await cursor.execute(text, args)
                return max(0, int(cursor.rowcount))

        return await self._run(run)

    async def begin(self) -> None:
        await self._run(self.conn.begin)

    async def commit(self) -> None:
        await self._run(self.conn.commit)

    async def rollback(self) -> None:
        """Roll back if the connection can still be spoken to; a broken one is closed, which rolls back."""
        if self.broken or self.conn.closed:
            return
        with contextlib.suppress(DirectoryError):
            await self._run(self.conn.rollback)

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except asyncio.CancelledError:
            # Cancelled mid-statement: the reply may still arrive on this connection. Do not hand it on. (Our own
            # timeout arrives below as TimeoutError, and marks the connection broken too.)
            self.broken = True
            raise
        except Exception as exc:  # noqa: BLE001 - every driver fault becomes the store's own failure below
            fault = _fault(exc, self.name)
            if isinstance(fault, TemporaryFailure):
                self.broken = True
            raise fault from None


class _LoopPool:
    """The aiomysql pool and the semaphore in front of it, which belong to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: int) -> None:
        self.loop = loop
        self.slots = asyncio.Semaphore(slots)
        self.lock = asyncio.Lock()
        self.pool: Any = None


class MysqlStore(Store):
    dialect: ClassVar[Literal["mysql"]] = "mysql"

    def __init__(self, config: MysqlStoreConfig) -> None:
        # For messages and logs: never the password.
        self.name = f"mysql {config.user}@{config.host}:{config.port}/{config.database}"
        self._config = config
        self._timeout = float(config.timeout)
        self._wait = float(config.pool.timeout.wait)
        self._create = float(config.pool.timeout.create)
        self._max = max(1, config.pool.max_connections)
        self._ssl = ssl_context(config.tls)
        self._state: _LoopPool | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: MysqlStoreConfig, state_dir: str) -> MysqlStore:
        """``state_dir`` is unused: the data lives on the server."""
        return cls(config)

    def _loop_pool(self) -> _LoopPool:
        # One daemon runs one loop; tests may run the same store under successive asyncio.run() calls, and the
        # pool's condition and connections belong to the loop that made them: a new loop gets its own.
        # The old loop's connections are abandoned to the garbage collector: close() the store before its loop
        # ends to avoid that.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopPool(loop, self._max)
        return self._state

    async def _pool(self, state: _LoopPool) -> Any:
        async with state.lock:
            if state.pool is None:
                # minsize=0: creating the pool connects nothing, so it cannot fail because the server is down.
                state.pool = await aiomysql.create_pool(
                    minsize=0,
                    maxsize=self._max,
                    host=self._config.host,
                    port=self._config.port,
                    user=self._config.user or None,
                    password=self._config.password.value if self._config.password is not None else "",
                    db=self._config.database,
                    charset="utf8mb4",
                    autocommit=True,
                    connect_timeout=self._create,
                    ssl=self._ssl,
                    client_flag=CLIENT.FOUND_ROWS,
                )
            return state.pool

    async def _acquire(self, state: _LoopPool) -> _Session:
        pool = await self._pool(state)
        try:
            async with asyncio.timeout(self._create):
                conn = await pool.acquire()
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            raise TemporaryFailure(f"{self.name}: connecting timed out") from None
        except _errors.MySQLError as exc:
            # Refused, access denied, unknown database, too many connections...: the server may come back.
            raise TemporaryFailure(f"{self.name}: cannot connect: {_describe(exc)[1]}") from None
        except OSError as exc:
            raise TemporaryFailure(f"{self.name}: cannot connect: {exc.strerror or exc}") from None
        except Exception as exc:  # noqa: BLE001 - anything else is the pool's own trouble
            self._discard_pool(state, pool, exc)
            raise TemporaryFailure(f"{self.name}: connection pool failed") from None
        return _Session(pool, conn, self.name, self._timeout)

    def _discard_pool(self, state: _LoopPool, pool: Any, exc: Exception) -> None:
        """Forget a pool that misbehaved (aiomysql asserts on its bookkeeping); the next query builds a new one."""
        log.warning("%s: discarding the connection pool after %s: %s", self.name, type(exc).__name__, exc)
        if state.pool is pool:
            state.pool = None
        with contextlib.suppress(Exception):
            pool.terminate()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[_Session]:
        if self._closed:
            raise TemporaryFailure(f"{self.name}: shutting down")
        state = self._loop_pool()
        try:
            # asyncio.timeout rather than wait_for: with a zero wait, a free slot is still taken.
            async with asyncio.timeout(self._wait):
                await state.slots.acquire()
        except TimeoutError:
            raise TemporaryFailure(f"{self.name}: no free connection (pool exhausted)") from None
        try:
            session = await self._acquire(state)
            try:
                yield session
            finally:
                self._release(state, session)
        finally:
            state.slots.release()

    def _release(self, state: _LoopPool, session: _Session) -> None:
        if session.broken:
            session.conn.close()  # the pool drops a closed connection instead of keeping it
        try:
            # Not awaited: the future only wakes waiters, under the pool's lock, which a connect in progress
            # may hold for up to pool.timeout.create.
            session.pool.release(session.conn)
        except Exception as exc:  # noqa: BLE001 - the pool's bookkeeping is off: do not trust it any more
            session.conn.close()
            self._discard_pool(state, session.pool, exc)

    async def query(self, sql: str, *params: object) -> Rows:
        await ensure_task()
        async with self._session() as session:
            return await session.query(sql, *params)

    async def execute(self, sql: str, *params: object) -> int:
        await ensure_task()
        async with self._session() as session:
            return await session.execute(sql, *params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        await ensure_task()
        async with self._session() as session:
            await session.begin()
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            await session.commit()

    async def close(self) -> None:
        self._closed = True
        state, self._state = self._state, None
        if state is None or state.pool is None:
            return
        state.pool.close()
        try:
            # Waits for connections in use to come back; bounded, then cut.
            await asyncio.wait_for(state.pool.wait_closed(), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a pool that does not close in time is terminated
            state.pool.terminate()
