"""SQLite store (aiosqlite): a file under the state directory, WAL mode, a small pool of connections.

WAL lets readers go on while one writer commits; ``busy_timeout`` makes a connection wait for a lock instead of
failing at once, and every statement also runs under the store's ``timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from typing import ClassVar, Literal

import aiosqlite

from .errors import PermanentFailure, TemporaryFailure
from .pool import ConnectionPool
from .store import ConstraintViolation, Executor, Rows, SqliteStoreConfig, Store, translate
from .tasks import ensure_task


def _fault(exc: sqlite3.Error) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        return ConstraintViolation(f"constraint violated: {exc}")
    if isinstance(exc, sqlite3.OperationalError) and any(
        word in str(exc) for word in ("locked", "busy", "unable to open", "disk I/O")
    ):
        return TemporaryFailure(f"sqlite: {exc}")
    return PermanentFailure(f"sqlite: {exc}")


#: Queries whose column names a store remembers (configured queries are few; only ad-hoc ones could fill it).
COLUMN_CACHE_SIZE = 256


class _Connection:
    """One aiosqlite connection: statements with timeouts and error mapping.

    A query is one trip to the connection's thread (``execute_fetchall``), not three (execute, fetch, close): each
    trip is two thread switches, most of an indexed lookup's cost. Rows come as :class:`sqlite3.Row`, which name
    their columns; the names are remembered per query text (``columns``, shared by the store's connections), so
    that a query answered with no rows still names them. Only the first empty answer of a query not seen before
    takes the long way.
    """

    def __init__(self, conn: aiosqlite.Connection, timeout: float, columns: dict[str, tuple[str, ...]]) -> None:
        self.conn = conn
        self.timeout = timeout
        self.columns = columns

    async def query(self, sql: str, *params: object) -> Rows:
        text, args = translate(sql, params, "qmark")
        try:
            async with asyncio.timeout(self.timeout):
                rows: list[sqlite3.Row] = list(await self.conn.execute_fetchall(text, args))
                columns = self.columns.get(text)
                if columns is None:
                    if rows:
                        columns = tuple(name.lower() for name in rows[0].keys())  # noqa: SIM118 - a Row iterates values
                    else:
                        cursor = await self.conn.execute(text, args)
                        columns = tuple(d[0].lower() for d in cursor.description or ())
                        await cursor.close()
                    if len(self.columns) >= COLUMN_CACHE_SIZE:
                        self.columns.clear()
                    self.columns[text] = columns
        except TimeoutError:
            raise TemporaryFailure("sqlite: statement timed out") from None
        except sqlite3.Error as exc:
            raise _fault(exc) from None
        return Rows(columns, [tuple(r) for r in rows])

    async def execute(self, sql: str, *params: object) -> int:
        text, args = translate(sql, params, "qmark")
        try:
            async with asyncio.timeout(self.timeout):
                cursor = await self.conn.execute(text, args)
                count = cursor.rowcount
                await cursor.close()
        except TimeoutError:
            raise TemporaryFailure("sqlite: statement timed out") from None
        except sqlite3.Error as exc:
            raise _fault(exc) from None
        return count


class SqliteStore(Store):
    dialect: ClassVar[Literal["sqlite"]] = "sqlite"

    def __init__(self, path: str, config: SqliteStoreConfig) -> None:
        self.path = path
        self._timeout = float(config.timeout)
        self._columns: dict[str, tuple[str, ...]] = {}
        self._pool: ConnectionPool[_Connection] = ConnectionPool(
            f"sqlite {path}", config.pool, self._connect, self._disconnect
        )

    @classmethod
    def from_config(cls, config: SqliteStoreConfig, state_dir: str) -> SqliteStore:
        return cls(os.path.join(state_dir, config.path), config)

    async def _connect(self) -> _Connection:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        try:
            # isolation_level=None: autocommit; transactions are begun explicitly below.
            conn = await aiosqlite.connect(self.path, timeout=self._timeout, isolation_level=None)
            conn.row_factory = sqlite3.Row
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA foreign_keys=ON")
            await conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
        except sqlite3.Error as exc:
            raise TemporaryFailure(f"sqlite: cannot open {self.path}: {exc}") from None
        return _Connection(conn, self._timeout, self._columns)

    @staticmethod
    async def _disconnect(conn: _Connection) -> None:
        await conn.conn.close()

    async def query(self, sql: str, *params: object) -> Rows:
        await ensure_task()
        async with self._pool.connection() as conn:
            return await conn.query(sql, *params)

    async def execute(self, sql: str, *params: object) -> int:
        await ensure_task()
        async with self._pool.connection() as conn:
            return await conn.execute(sql, *params)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Executor]:
        await ensure_task()
        async with self._pool.connection() as conn:
            # IMMEDIATE takes the write lock up front: two writers queue on busy_timeout instead of deadlocking.
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await conn.conn.rollback()
                raise
            await conn.execute("COMMIT")

    async def close(self) -> None:
        await self._pool.close()
