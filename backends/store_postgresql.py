"""PostgreSQL store (asyncpg): asyncpg's own connection pool, created on first use, under the ``pool.*`` timeouts.

The pool keeps no connection it does not need (``min_size=0``) and is created lazily, so a daemon starts while its
database is down: queries fail as temporary failures until the server is back, then the next one connects. A
connection whose statement failed in a way that leaves its state unknown (lost connection, timeout, cancellation)
is terminated rather than returned, so nothing stale outlives a server restart.

Three budgets, as :mod:`.pool` defines them: waiting for a free connection is bounded by ``pool.timeout.wait``
(a semaphore in front of asyncpg's pool, because asyncpg's ``acquire(timeout=)`` would count connecting against
the same budget), opening one by ``pool.timeout.create``, each statement by ``timeout`` (asyncpg's
``command_timeout``, which also cancels the statement on the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar, Literal, TypeVar

import asyncpg  # type: ignore[import-untyped]

from .errors import DirectoryError, PermanentFailure, TemporaryFailure
from .store import ConstraintViolation, Executor, PostgresStoreConfig, Rows, Store, TlsConfig, translate
from .tasks import ensure_task

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Column names remembered per query text, for queries that return no rows (see :meth:`_Session.query`).
COLUMN_CACHE_SIZE = 256

_errors = asyncpg.exceptions


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """An asyncpg connection that skips the session reset on release.

    The reset asyncpg runs on every release (``RESET ALL``, ``UNLISTEN *``, ...) undoes session state the store
    never creates: skipping it saves a round trip per query. An open transaction is still rolled back by asyncpg
    before it asks for the reset query.
    """

    def get_reset_query(self) -> str:
        return ""


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | bool:
    """``False`` (plain TCP, not libpq's "prefer") unless TLS is enabled; then verified unless allowed not to be."""
    if not tls.enable:
        return False
    context = ssl.create_default_context()
    if tls.allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _describe(exc: Exception) -> str:
    """The first line of a message: asyncpg appends DETAIL and HINT lines, which quote row values."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _fault(exc: Exception, name: str, *, connection_closed: bool) -> DirectoryError:
    """The store's failure for an asyncpg (or socket) exception raised by a statement.

    SQLSTATE classes decide for server errors: 23 (integrity) is a constraint violation; 42 (syntax, undefined
    table or column, privileges), 22 (data: a value the type refuses, a NUL byte in text) and 0A (not supported)
    are errors in the query as configured; everything else (08 connection, 57 shutdown/cancel, 53 resources,
    40 serialization, 28 authentication, ...) may pass, so it is temporary. Messages are the server's: they never
    hold the password.
    """
    if isinstance(exc, _errors.IntegrityConstraintViolationError):
        return ConstraintViolation(f"{name}: {_describe(exc)}")
    if isinstance(exc, _errors.SyntaxOrAccessError | _errors.DataError | _errors.FeatureNotSupportedError):
        return PermanentFailure(f"{name}: {_describe(exc)}")
    if isinstance(exc, _errors.PostgresError):
        return TemporaryFailure(f"{name}: {type(exc).__name__}: {_describe(exc)}")
    if isinstance(exc, TimeoutError):  # before OSError, of which it is a subclass
        return TemporaryFailure(f"{name}: statement timed out")
    if isinstance(exc, OSError):
        return TemporaryFailure(f"{name}: {exc.strerror or exc}")
    if isinstance(exc, _errors.InterfaceError) and not connection_closed:
        # Raised before anything reached the server: a parameter of the wrong type or count for the query.
        return PermanentFailure(f"{name}: {_describe(exc)}")
    return TemporaryFailure(f"{name}: {type(exc).__name__}: {_describe(exc)}")


def _row_count(status: str) -> int:
    """The count in a command tag: ``INSERT 0 3`` -> 3, ``UPDATE 2`` -> 2, ``CREATE TABLE`` -> 0."""
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _Session:
    """Statements on one pooled connection; remembers whether the connection may be reused afterwards."""

    def __init__(self, pool: Any, conn: Any, name: str, columns: dict[str, tuple[str, ...]]) -> None:
        self.pool = pool
        self.conn = conn
        self.name = name
        self.columns = columns
        self.broken = False
        self._transaction: Any = None

    async def query(self, sql: str, *params: object) -> Rows:
        text, args = translate(sql, params, "dollar")

        async def run() -> Rows:
            # fetch() runs asyncpg's cached prepared statement in one round trip, but its records carry the
            # column names only when there are rows. For an empty result, ask the statement once (a prepared
            # statement cannot be kept: asyncpg invalidates it when the connection goes back to the pool).
            records = await self.conn.fetch(text, *args)
            if records:
                columns = tuple(str(key).lower() for key in records[0].keys())  # noqa: SIM118 - values otherwise
                self._remember(text, columns)
            elif (known := self.columns.get(text)) is not None:
                columns = known
            else:
                statement = await self.conn.prepare(text)
                columns = tuple(attribute.name.lower() for attribute in statement.get_attributes())
                self._remember(text, columns)
            return Rows(columns, [tuple(record) for record in records])

        return await self._run(run)

    def _remember(self, text: str, columns: tuple[str, ...]) -> None:
        if text not in self.columns and len(self.columns) >= COLUMN_CACHE_SIZE:
            self.columns.clear()  # configured queries are few; only ad-hoc ones could fill it
        self.columns[text] = columns

    async def execute(self, sql: str, *params: object) -> int:
        text, args = translate(sql, params, "dollar")
        status: str = await self._run(lambda: self.conn.execute(text, *args))
        return _row_count(status)

    def closed(self) -> bool:
        """Whether the connection is gone.

        When the server drops a connection, asyncpg hands it back to the pool by itself, even while we hold it,
        and detaches our proxy: every method of the proxy then raises InterfaceError.
        """
        try:
            return bool(self.conn.is_closed())
        except _errors.InterfaceError:
            return True

    def terminate(self) -> None:
        with contextlib.suppress(_errors.InterfaceError):  # already detached: asyncpg has closed it
            self.conn.terminate()

    async def begin(self) -> None:
        self._transaction = self.conn.transaction()
        await self._run(self._transaction.start)

    async def commit(self) -> None:
        await self._run(self._transaction.commit)

    async def rollback(self) -> None:
        """Roll back if the connection can still be spoken to; a broken one is terminated, which rolls back."""
        if self.broken or self.closed():
            return
        with contextlib.suppress(DirectoryError):
            await self._run(self._transaction.rollback)

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except asyncio.CancelledError:
            # Cancelled mid-statement: the server may still be answering it. Do not hand the connection on.
            self.broken = True
            raise
        except Exception as exc:  # noqa: BLE001 - every driver fault becomes the store's own failure below
            fault = _fault(exc, self.name, connection_closed=self.closed())
            if isinstance(fault, TemporaryFailure):
                self.broken = True
            raise fault from None


class _LoopPool:
    """The asyncpg pool and the semaphore in front of it, which belong to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: int) -> None:
        self.loop = loop
        self.slots = asyncio.Semaphore(slots)
        self.lock = asyncio.Lock()
        self.pool: Any = None


class PostgresStore(Store):
    dialect: ClassVar[Literal["postgresql"]] = "postgresql"

    def __init__(self, config: PostgresStoreConfig) -> None:
        # For messages and logs: never the password.
        self.name = f"postgresql {config.user}@{config.host}:{config.port}/{config.database}"
        self._config = config
        self._timeout = float(config.timeout)
        self._wait = float(config.pool.timeout.wait)
        self._create = float(config.pool.timeout.create)
        self._max = max(1, config.pool.max_connections)
        self._ssl = ssl_context(config.tls)
        self._state: _LoopPool | None = None
        self._columns: dict[str, tuple[str, ...]] = {}
        self._closed = False

    @classmethod
    def from_config(cls, config: PostgresStoreConfig, state_dir: str) -> PostgresStore:
        """``state_dir`` is unused: the data lives on the server."""
        return cls(config)

    def _loop_pool(self) -> _LoopPool:
        # One daemon runs one loop; tests may run the same store under successive asyncio.run() calls, and an
        # asyncpg pool (like a semaphore with waiters) cannot move between loops: a new loop gets its own.
        # The old loop's connections are abandoned to the garbage collector: close() the store before its loop
        # ends to avoid that.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = _LoopPool(loop, self._max)
        return self._state

    async def _pool(self, state: _LoopPool) -> Any:
        async with state.lock:
            if state.pool is None:
                password = self._config.password.value if self._config.password is not None else None
                # min_size=0: creating the pool connects nothing, so it cannot fail because the server is down.
                state.pool = await asyncpg.create_pool(
                    host=self._config.host,
                    port=self._config.port,
                    user=self._config.user or None,
                    password=password,
                    database=self._config.database,
                    ssl=self._ssl,
                    min_size=0,
                    max_size=self._max,
                    timeout=self._create,
                    command_timeout=self._timeout,
                    connection_class=_Connection,
                    server_settings={"application_name": "mailroster"},
                )
            return state.pool

    async def _acquire(self, state: _LoopPool) -> _Session:
        pool = await self._pool(state)
        try:
            return _Session(pool, await pool.acquire(timeout=self._create), self.name, self._columns)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            raise TemporaryFailure(f"{self.name}: connecting timed out") from None
        except (OSError, _errors.PostgresError, _errors.InterfaceError) as exc:
            # Refused, reset, authentication failed, "the database system is starting up", unknown database...
            detail = (exc.strerror if isinstance(exc, OSError) else None) or _describe(exc)
            raise TemporaryFailure(f"{self.name}: cannot connect: {detail}") from None
        except Exception as exc:  # noqa: BLE001 - anything else is the pool's own trouble
            # The pool itself misbehaved: discard it; the next query builds a new one.
            log.warning("%s: discarding the connection pool after %s: %s", self.name, type(exc).__name__, exc)
            if state.pool is pool:
                state.pool = None
            pool.terminate()
            raise TemporaryFailure(f"{self.name}: connection pool failed") from None

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
                await self._release(session)
        finally:
            state.slots.release()

    async def _release(self, session: _Session) -> None:
        if session.broken:
            session.terminate()  # the pool sees it closed and opens a new one next time
        try:
            await session.pool.release(session.conn, timeout=self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - asyncpg terminated the connection already; nothing to do
            log.debug("%s: releasing a connection failed: %s", self.name, type(exc).__name__)

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
        try:
            # Waits for connections in use to come back; bounded, then cut.
            await asyncio.wait_for(state.pool.close(), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a pool that does not close in time is terminated
            state.pool.terminate()
