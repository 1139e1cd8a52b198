"""What the stores on a database server share (:mod:`.store_postgresql`, :mod:`.store_mysql`): the pooling, the
timeouts, transactions and shutting down. Each driver module adds only what differs: creating its pool, taking
and giving back a connection, running statements on it, and sorting its exceptions into the store's failures.

The driver's pool keeps no connection it does not need (minimum size 0) and is created lazily, so a daemon starts
while its database is down: queries fail as temporary failures until the server is back, then the next one
connects. A connection whose statement failed in a way that leaves its state unknown (lost connection, timeout,
cancellation) is closed rather than returned, so nothing stale outlives a server restart; a pool that fails in an
unexpected way is discarded and rebuilt on the next query.

Three budgets, as :mod:`.pool` defines them: waiting for a free connection is bounded by ``pool.timeout.wait`` (a
semaphore in front of the driver's pool, so that connecting is not counted against the same budget), opening one
by ``pool.timeout.create``, each statement by ``timeout``, which also bounds how long :meth:`ServerStore.close`
waits for connections in use.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, Self, TypeVar

from .errors import DirectoryError, TemporaryFailure
from .store import Executor, Rows, ServerStoreConfig, Store, TlsConfig
from .tasks import ensure_task

log = logging.getLogger(__name__)

T = TypeVar("T")


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """None (plain TCP) unless TLS is enabled; then verified unless allowed not to be."""
    if not tls.enable:
        return None
    context = ssl.create_default_context()
    if tls.allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ServerSession(abc.ABC):
    """Statements on one pooled connection; remembers whether the connection may be reused afterwards.

    ``timeout`` bounds each statement, for a driver that has no statement timeout of its own (None: no bound here).
    """

    def __init__(self, pool: Any, conn: Any, name: str, timeout: float | None = None) -> None:
        self.pool = pool
        self.conn = conn
        self.name = name
        self.timeout = timeout
        self.broken = False

    @abc.abstractmethod
    async def query(self, sql: str, *params: object) -> Rows: ...

    @abc.abstractmethod
    async def execute(self, sql: str, *params: object) -> int: ...

    @abc.abstractmethod
    async def begin(self) -> None: ...

    @abc.abstractmethod
    async def commit(self) -> None: ...

    @abc.abstractmethod
    async def _rollback(self) -> None:
        """Roll the transaction back, through :meth:`_run`."""

    @abc.abstractmethod
    def closed(self) -> bool:
        """Whether the connection is gone."""

    @abc.abstractmethod
    def _fault(self, exc: Exception) -> DirectoryError:
        """The store's failure for a driver (or socket, or timeout) exception raised by a statement."""

    async def rollback(self) -> None:
        """Roll back if the connection can still be spoken to; a broken one is closed on release, which rolls back."""
        if self.broken or self.closed():
            return
        with contextlib.suppress(DirectoryError):
            await self._rollback()

    async def _run(self, call: Callable[[], Awaitable[T]]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await call()
        except asyncio.CancelledError:
            # Cancelled mid-statement: the server may still be answering it on this connection. Do not hand it on.
            # (Our own timeout arrives below as TimeoutError, and marks the connection broken too.)
            self.broken = True
            raise
        except Exception as exc:  # noqa: BLE001 - every driver fault becomes the store's own failure below
            fault = self._fault(exc)
            if isinstance(fault, TemporaryFailure):
                self.broken = True
            raise fault from None


class LoopPool:
    """The driver's pool and the semaphore in front of it, which belong to one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: int) -> None:
        self.loop = loop
        self.slots = asyncio.Semaphore(slots)
        self.lock = asyncio.Lock()
        self.pool: Any = None


ConfigT = TypeVar("ConfigT", bound=ServerStoreConfig)
SessionT = TypeVar("SessionT", bound=ServerSession)


class ServerStore(Store, Generic[ConfigT, SessionT]):
    """A store on a database server, through a driver's connection pool; a subclass per driver fills in the hooks."""

    def __init__(self, config: ConfigT) -> None:
        # For messages and logs: never the password.
        self.name = f"{self.dialect} {config.user}@{config.host}:{config.port}/{config.database}"
        self._config = config
        self._timeout = float(config.timeout)
        self._wait = float(config.pool.timeout.wait)
        self._create = float(config.pool.timeout.create)
        self._max = max(1, config.pool.max_connections)
        self._state: LoopPool | None = None
        self._closed = False

    @classmethod
    def from_config(cls, config: ConfigT, state_dir: str) -> Self:
        """``state_dir`` is unused: the data lives on the server."""
        return cls(config)

    # What each driver supplies.

    @abc.abstractmethod
    async def _create_pool(self) -> Any:
        """A new pool of the driver's, of up to ``self._max`` connections; creating it connects nothing, so it
        cannot fail because the server is down."""

    @abc.abstractmethod
    async def _connect(self, pool: Any) -> SessionT:
        """A session on a connection from ``pool``, taken within ``pool.timeout.create``; exceptions pass through."""

    @abc.abstractmethod
    def _connect_failure(self, exc: Exception) -> str | None:
        """Why the server refused a connection (refused, reset, authentication, unknown database, too many
        connections...: it may come back), or None when ``exc`` is not the server's doing but the pool's."""

    @abc.abstractmethod
    async def _release(self, state: LoopPool, session: SessionT) -> None:
        """Give the connection back to its pool; close a broken one instead, so that the pool opens a new one."""

    @abc.abstractmethod
    async def _close_pool(self, pool: Any) -> None:
        """Close the pool once the connections in use come back (the wait is bounded by the caller)."""

    # The pool of the running loop.

    def _loop_pool(self) -> LoopPool:
        # One daemon runs one loop; tests may run the same store under successive asyncio.run() calls, and a
        # driver's pool (its futures, conditions and connections, like a semaphore with waiters) belongs to the
        # loop that made it: a new loop gets its own. The old loop's connections are abandoned to the garbage
        # collector: close() the store before its loop ends to avoid that.
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            self._state = LoopPool(loop, self._max)
        return self._state

    async def _pool(self, state: LoopPool) -> Any:
        async with state.lock:
            if state.pool is None:
                state.pool = await self._create_pool()
            return state.pool

    async def _acquire(self, state: LoopPool) -> SessionT:
        pool = await self._pool(state)
        try:
            return await self._connect(pool)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            raise TemporaryFailure(f"{self.name}: connecting timed out") from None
        except Exception as exc:  # noqa: BLE001 - the server's trouble or the pool's, both temporary
            detail = self._connect_failure(exc)
            if detail is not None:
                raise TemporaryFailure(f"{self.name}: cannot connect: {detail}") from None
            self._discard_pool(state, pool, exc)
            raise TemporaryFailure(f"{self.name}: connection pool failed") from None

    def _discard_pool(self, state: LoopPool, pool: Any, exc: Exception) -> None:
        """Forget a pool that misbehaved (aiomysql asserts on its bookkeeping); the next query builds a new one."""
        log.warning("%s: discarding the connection pool after %s: %s", self.name, type(exc).__name__, exc)
        if state.pool is pool:
            state.pool = None
        with contextlib.suppress(Exception):
            pool.terminate()

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[SessionT]:
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
                await self._release(state, session)
        finally:
            state.slots.release()

    # The Store interface.

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
            await asyncio.wait_for(self._close_pool(state.pool), self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - a pool that does not close in time is terminated
            state.pool.terminate()
