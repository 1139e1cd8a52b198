"""A bounded pool of connections to a backend server, with the timeouts of Stalwart's ``pool.*`` keys.

``pool.max-connections`` bounds the connections open at once; ``pool.timeout.create`` bounds opening one,
``pool.timeout.wait`` bounds waiting for a free one, ``pool.timeout.recycle`` bounds the health check an idle
connection passes before it is reused. Running out of time anywhere is a :class:`TemporaryFailure`, never a hang:
a SIGSTOPped server completes TCP handshakes and then answers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import TemporaryFailure
from .settings import Duration

log = logging.getLogger(__name__)

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class PoolTimeouts:
    create: Duration = Duration(30)
    wait: Duration = Duration(30)
    recycle: Duration = Duration(30)


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """``pool = { max-connections = 10, timeout = { create = "30s", wait = "30s", recycle = "30s" } }``."""

    max_connections: int = 10
    timeout: PoolTimeouts = field(default_factory=PoolTimeouts)


class ConnectionPool(Generic[C]):
    """Hands out connections made by ``create``; ``check`` (optional) vets an idle one before reuse.

    A connection whose user raised is assumed broken and closed; a clean exit returns it to the idle list.
    """

    def __init__(
        self,
        name: str,
        config: PoolConfig,
        create: Callable[[], Awaitable[C]],
        close: Callable[[C], Awaitable[None]],
        check: Callable[[C], Awaitable[bool]] | None = None,
    ) -> None:
        self.name = name
        self._config = config
        self._create = create
        self._close = close
        self._check = check
        self._slots = asyncio.Semaphore(max(1, config.max_connections))
        self._idle: list[C] = []
        self._open = 0
        self._closed = False

    @property
    def size(self) -> int:
        """Connections open now, idle or in use."""
        return self._open

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[C]:
        if self._closed:
            raise TemporaryFailure(f"{self.name}: shutting down")
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), float(self._config.timeout.wait))
            except TimeoutError:
                raise TemporaryFailure(f"{self.name}: no free connection (pool exhausted)") from None
        else:
            # A free slot is taken at once; wait_for would wrap the acquisition in a task of its own (Python 3.11),
            # a third of an uncached SQLite lookup's cost.
            await self._slots.acquire()
        try:
            conn = await self._take()
            try:
                yield conn
            except BaseException:
                await self._discard(conn)
                raise
            await self._give_back(conn)
        finally:
            self._slots.release()

    async def _give_back(self, conn: C) -> None:
        if self._closed:  # closed while the connection was in use
            await self._discard(conn)
        else:
            self._idle.append(conn)

    async def _take(self) -> C:
        while self._idle:
            conn = self._idle.pop()
            try:
                healthy = self._check is None or await self._healthy(conn)
            except BaseException:  # cancelled during the check: the connection is neither idle nor ours
                await asyncio.shield(self._discard(conn))
                raise
            if healthy:
                return conn
            await self._discard(conn)
        try:
            conn = await asyncio.wait_for(self._create(), float(self._config.timeout.create))
        except TimeoutError:
            raise TemporaryFailure(f"{self.name}: connecting timed out") from None
        except TemporaryFailure:
            raise
        except (OSError, ConnectionError) as exc:
            raise TemporaryFailure(f"{self.name}: cannot connect: {exc.strerror or exc}") from None
        self._open += 1
        return conn

    async def _healthy(self, conn: C) -> bool:
        assert self._check is not None
        try:
            return await asyncio.wait_for(self._check(conn), float(self._config.timeout.recycle))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed check means a dead connection, whatever raised
            log.info("%s: discarding a connection that failed its health check: %s", self.name, type(exc).__name__)
            return False

    async def _discard(self, conn: C) -> None:
        self._open -= 1
        try:
            await asyncio.wait_for(self._close(conn), float(self._config.timeout.recycle))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - closing a broken connection may fail in any way
            log.debug("%s: closing a connection failed: %s", self.name, type(exc).__name__)

    async def close(self) -> None:
        """Close idle connections now and the others as they are returned."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn)
