"""MySQL and MariaDB store (aiomysql): aiomysql's connection pool, shared and bounded as :mod:`.store_server` describes.

Budgets: ``pool.timeout.create`` bounds the whole acquire (aiomysql's ``connect_timeout`` covers only the TCP
connect, and a SIGSTOPped server completes the handshake and then never greets); ``timeout`` bounds each statement
here, aiomysql having no statement timeout of its own.

Dialect notes: PyMySQL interpolates parameters client-side (escaped for the connection's utf8mb4 charset and
the server's ``NO_BACKSLASH_ESCAPES`` mode); placeholders become ``%s`` through :func:`translate`. In MariaDB and
MySQL ``||`` is logical OR unless ``PIPES_AS_CONCAT`` is set: queries concatenate with ``CONCAT()``. The session
reports rows *matched* by an UPDATE (``CLIENT.FOUND_ROWS``), as PostgreSQL and SQLite do, not rows changed.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar, Literal

import aiomysql  # type: ignore[import-untyped]
import pymysql  # type: ignore[import-untyped]
from pymysql.constants import CLIENT  # type: ignore[import-untyped]

from .errors import DirectoryError, PermanentFailure, TemporaryFailure
from .store import ConstraintViolation, MysqlStoreConfig, Rows, translate
from .store_server import LoopPool, ServerSession, ServerStore, ssl_context

_errors = pymysql.err


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


class _Session(ServerSession):
    """Statements on one pooled aiomysql connection, each under the store's ``timeout``."""

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

    def closed(self) -> bool:
        return bool(self.conn.closed)

    async def begin(self) -> None:
        await self._run(self.conn.begin)

    async def commit(self) -> None:
        await self._run(self.conn.commit)

    async def _rollback(self) -> None:
        await self._run(self.conn.rollback)

    def _fault(self, exc: Exception) -> DirectoryError:
        return _fault(exc, self.name)


class MysqlStore(ServerStore[MysqlStoreConfig, _Session]):
    dialect: ClassVar[Literal["mysql"]] = "mysql"

    def __init__(self, config: MysqlStoreConfig) -> None:
        super().__init__(config)
        self._ssl = ssl_context(config.tls)

    async def _create_pool(self) -> Any:
        # minsize=0: creating the pool connects nothing, so it cannot fail because the server is down.
        return await aiomysql.create_pool(
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

    async def _connect(self, pool: Any) -> _Session:
        async with asyncio.timeout(self._create):
            conn = await pool.acquire()
        return _Session(pool, conn, self.name, self._timeout)

    def _connect_failure(self, exc: Exception) -> str | None:
        if isinstance(exc, _errors.MySQLError):
            # Refused, access denied, unknown database, too many connections...: the server may come back.
            return _describe(exc)[1]
        if isinstance(exc, OSError):
            return str(exc.strerror or exc)
        return None

    async def _release(self, state: LoopPool, session: _Session) -> None:
        if session.broken:
            session.conn.close()  # the pool drops a closed connection instead of keeping it
        try:
            # Not awaited: the future only wakes waiters, under the pool's lock, which a connect in progress
            # may hold for up to pool.timeout.create.
            session.pool.release(session.conn)
        except Exception as exc:  # noqa: BLE001 - the pool's bookkeeping is off: do not trust it any more
            session.conn.close()
            self._discard_pool(state, session.pool, exc)

    async def _close_pool(self, pool: Any) -> None:
        pool.close()
        await pool.wait_closed()
