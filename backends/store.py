"""SQL stores (``[store.<id>]``): one small asynchronous interface over SQLite, PostgreSQL and MySQL/MariaDB.

Queries are written once with PostgreSQL's ``$1``, ``$2`` placeholders, whatever the driver; :func:`translate`
rewrites them for drivers that use ``?`` or ``%s``. Parameters are always bound, never interpolated.

Driver faults reach callers as :class:`TemporaryFailure` (server down, timeout, pool exhausted, locked database),
:class:`ConstraintViolation` (a unique or foreign key constraint refused a write) or :class:`PermanentFailure`
(a query the server rejects: misconfiguration). Every call has a timeout.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

from .errors import PermanentFailure
from .pool import PoolConfig
from .settings import Duration, Secret


class ConstraintViolation(PermanentFailure):
    """A write broke a unique or foreign key constraint."""


@dataclass(frozen=True, slots=True)
class Rows:
    """A query's result: lower-cased column names and the rows, as tuples."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def column(self, name: str) -> int | None:
        """Index of a column, matched case-insensitively."""
        try:
            return self.columns.index(name.lower())
        except ValueError:
            return None


class Executor(Protocol):
    """What runs statements: a store, or a transaction of one."""

    async def query(self, sql: str, *params: object) -> Rows: ...

    async def execute(self, sql: str, *params: object) -> int: ...


class Store(abc.ABC):
    """A connection pool to one database."""

    dialect: ClassVar[Literal["sqlite", "postgresql", "mysql"]]

    @abc.abstractmethod
    async def query(self, sql: str, *params: object) -> Rows:
        """Run a statement that returns rows."""

    @abc.abstractmethod
    async def execute(self, sql: str, *params: object) -> int:
        """Run a statement; return the number of rows it changed."""

    @abc.abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Executor]:
        """A transaction: committed when the block ends normally, rolled back when it raises."""

    async def executescript(self, statements: Sequence[str]) -> None:
        """Run DDL statements in one transaction (where the database allows DDL in transactions)."""
        async with self.transaction() as tx:
            for statement in statements:
                await tx.execute(statement)

    async def close(self) -> None:  # noqa: B027 - optional
        """Close every connection."""


# Configuration: each store type has its own dataclass; `type` selects it (daemon.config STORE_TYPES).


@dataclass(frozen=True, slots=True)
class TlsConfig:
    enable: bool = False
    allow_invalid_certs: bool = False


@dataclass(frozen=True, slots=True)
class SqliteStoreConfig:
    """``type = "sqlite"``: a file (relative to ``server.state-dir``), in WAL mode."""

    type: Literal["sqlite"]
    path: str = "directory.sqlite3"
    timeout: Duration = Duration(5)
    pool: PoolConfig = field(default_factory=lambda: PoolConfig(max_connections=4))


@dataclass(frozen=True, slots=True)
class ServerStoreConfig:
    """The keys of a store on a database server (:mod:`.store_server`); each server type names its own ``type``
    and default ``port``."""

    type: Literal["postgresql", "mysql"]
    database: str
    host: str = "127.0.0.1"
    port: int = 0
    user: str = ""
    password: Secret | None = None
    timeout: Duration = Duration(5)
    tls: TlsConfig = field(default_factory=TlsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)


@dataclass(frozen=True, slots=True)
class PostgresStoreConfig(ServerStoreConfig):
    """``type = "postgresql"``."""

    type: Literal["postgresql"]
    port: int = 5432


@dataclass(frozen=True, slots=True)
class MysqlStoreConfig(ServerStoreConfig):
    """``type = "mysql"``: MySQL or MariaDB."""

    type: Literal["mysql"]
    port: int = 3306


StoreConfig = SqliteStoreConfig | PostgresStoreConfig | MysqlStoreConfig

#: store ``type`` -> "module:Class" of its Store implementation, imported only when configured.
STORE_BACKENDS: dict[str, str] = {
    "sqlite": "mailroster.backends.store_sqlite:SqliteStore",
    "postgresql": "mailroster.backends.store_postgresql:PostgresStore",
    "mysql": "mailroster.backends.store_mysql:MysqlStore",
}

_PLACEHOLDER = re.compile(r"\$(\d+)")


def translate(
    sql: str, params: Sequence[object], style: Literal["dollar", "qmark", "format"]
) -> tuple[str, tuple[object, ...]]:
    """Rewrite ``$n`` placeholders for a driver and order the parameters to match.

    ``dollar`` (asyncpg) keeps the text; ``qmark`` (sqlite3) uses ``?n``; ``format`` (PyMySQL) uses ``%s`` in
    order of appearance, with parameters repeated and reordered accordingly, and every literal ``%`` doubled
    (``LIKE '%@' || $1`` keeps its wildcard). A ``$n`` beyond the parameters given is a PermanentFailure.
    """
    numbers = [int(n) for n in _PLACEHOLDER.findall(sql)]
    if any(n < 1 or n > len(params) for n in numbers):
        raise PermanentFailure(f"query uses ${max(numbers)} but has {len(params)} parameter(s)")
    if style == "dollar":
        return sql, tuple(params)
    if style == "qmark":
        return _PLACEHOLDER.sub(lambda m: "?" + m.group(1), sql), tuple(params)
    return _PLACEHOLDER.sub("%s", sql.replace("%", "%%")), tuple(params[n - 1] for n in numbers)
