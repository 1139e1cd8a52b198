"""PostgreSQL store (asyncpg): asyncpg's own connection pool, shared and bounded as :mod:`.store_server` describes.

Each statement is bounded by asyncpg's ``command_timeout`` (the store's ``timeout``), which also cancels the
statement on the server; opening a connection by ``acquire(timeout=)`` (``pool.timeout.create``). Waiting for a
free connection is left to the semaphore in front of the pool: asyncpg's ``acquire(timeout=)`` would count it
against the same budget as connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, ClassVar, Literal

import asyncpg  # type: ignore[import-untyped]

from .errors import DirectoryError, PermanentFailure, TemporaryFailure
from .store import ConstraintViolation, PostgresStoreConfig, Rows, translate
from .store_server import LoopPool, ServerSession, ServerStore, ssl_context

log = logging.getLogger(__name__)

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


class _Session(ServerSession):
    """Statements on one pooled asyncpg connection (bounded by its ``command_timeout``)."""

    def __init__(self, pool: Any, conn: Any, name: str, columns: dict[str, tuple[str, ...]]) -> None:
        super().__init__(pool, conn, name)
        self.columns = columns
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

    async def _rollback(self) -> None:
        await self._run(self._transaction.rollback)

    def _fault(self, exc: Exception) -> DirectoryError:
        return _fault(exc, self.name, connection_closed=self.closed())


class PostgresStore(ServerStore[PostgresStoreConfig, _Session]):
    dialect: ClassVar[Literal["postgresql"]] = "postgresql"

    def __init__(self, config: PostgresStoreConfig) -> None:
        super().__init__(config)
        # False: plain TCP, not libpq's "prefer".
        self._ssl = ssl_context(config.tls) or False
        self._columns: dict[str, tuple[str, ...]] = {}

    async def _create_pool(self) -> Any:
        password = self._config.password.value if self._config.password is not None else None
        # min_size=0: creating the pool connects nothing, so it cannot fail because the server is down.
        return await asyncpg.create_pool(
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

    async def _connect(self, pool: Any) -> _Session:
        return _Session(pool, await pool.acquire(timeout=self._create), self.name, self._columns)

    def _connect_failure(self, exc: Exception) -> str | None:
        # Refused, reset, authentication failed, "the database system is starting up", unknown database...
        if not isinstance(exc, OSError | _errors.PostgresError | _errors.InterfaceError):
            return None
        return (exc.strerror if isinstance(exc, OSError) else None) or _describe(exc)

    async def _release(self, state: LoopPool, session: _Session) -> None:
        if session.broken:
            session.terminate()  # the pool sees it closed and opens a new one next time
        try:
            await session.pool.release(session.conn, timeout=self._timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - asyncpg terminated the connection already; nothing to do
            log.debug("%s: releasing a connection failed: %s", self.name, type(exc).__name__)

    async def _close_pool(self, pool: Any) -> None:
        await pool.close()
