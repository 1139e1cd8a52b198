"""The SQL store contract on SQLite, PostgreSQL and MariaDB; server faults and pool limits on the two servers.

Every backend runs the same statements, written once with ``$n`` placeholders; only string concatenation is
written per dialect (``||`` is logical OR in MariaDB). PostgreSQL and MariaDB are private servers started once per
session (``dbservers``); each test gets a fresh database. Tests that stop or freeze a server restore it before
they end, and poll with a deadline for the store to recover rather than sleeping.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.pool import PoolConfig, PoolTimeouts
from mailroster.backends.settings import Duration
from mailroster.backends.store import (
    ConstraintViolation,
    MysqlStoreConfig,
    PostgresStoreConfig,
    Rows,
    SqliteStoreConfig,
    Store,
)
from mailroster.backends.store_mysql import MysqlStore
from mailroster.backends.store_postgresql import PostgresStore
from mailroster.backends.store_sqlite import SqliteStore

from dbservers import ServerDatabase

SCHEMA = [
    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name VARCHAR(100) NOT NULL UNIQUE, "
    "email VARCHAR(255) NOT NULL, quota BIGINT)",
    "CREATE INDEX accounts_email ON accounts (email)",
]
ACCOUNTS = [
    (1, "jane", "jane@example.org", 1073741824),
    (2, "john", "john.doe@example.org", None),
    (3, "bill", "bill@example.com", 0),
]
INSERT = "INSERT INTO accounts (id, name, email, quota) VALUES ($1, $2, $3, $4)"

#: Values that would change a query if they were pasted into it rather than bound.
INJECTIONS = [
    "' OR '1'='1",
    "' OR 1=1 --",
    '"; DROP TABLE accounts; --',
    "'; DROP TABLE accounts; --",
    "\\'; DROP TABLE accounts; --",
    "\\",
    "%",
    "_",
    "j%",
    "$1",
    "%s",
    "a\x00b",
]


@dataclass
class Backend:
    """One store type under test: how to make its stores, and its server when it has one."""

    name: str  # "sqlite", "postgresql" or "mariadb"
    make: Callable[..., Store]  # make(timeout=5.0, pool=None, password=None)
    server: ServerDatabase | None = None

    def concat(self, *parts: str) -> str:
        """SQL concatenating ``parts`` in this dialect."""
        return f"CONCAT({', '.join(parts)})" if self.name == "mariadb" else " || ".join(parts)

    def run(self, scenario: Callable[[Store], Awaitable[None]], **config: object) -> None:
        """Run ``scenario`` with a new store on a new event loop; close the store whatever happens."""

        async def main() -> None:
            store = self.make(**config)
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(main())


def pool_config(max_connections: int = 10, wait: float = 5, create: float = 5) -> PoolConfig:
    return PoolConfig(
        max_connections=max_connections,
        timeout=PoolTimeouts(create=Duration(create), wait=Duration(wait), recycle=Duration(create)),
    )


def _server_backend(name: str, db: ServerDatabase) -> Backend:
    def make(timeout: float = 5, pool: PoolConfig | None = None, password: str | None = None) -> Store:
        config = db.store_config(timeout=timeout, pool=pool, password=password)
        if isinstance(config, PostgresStoreConfig):
            return PostgresStore.from_config(config, "/nonexistent")
        assert isinstance(config, MysqlStoreConfig)
        return MysqlStore.from_config(config, "/nonexistent")

    return Backend(name, make, db)


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every store type; the servers start only when a test of theirs runs."""
    if request.param == "sqlite":

        def make(timeout: float = 5, pool: PoolConfig | None = None, password: str | None = None) -> Store:
            config = SqliteStoreConfig(
                type="sqlite", path="store.sqlite3", timeout=Duration(timeout), pool=pool or pool_config(4)
            )
            return SqliteStore.from_config(config, str(tmp_path))

        return Backend("sqlite", make)
    fixture = "postgres_db" if request.param == "postgresql" else "mariadb_db"
    return _server_backend(request.param, request.getfixturevalue(fixture))


@pytest.fixture(params=["postgresql", "mariadb"])
def server_backend(request: pytest.FixtureRequest) -> Backend:
    """The store types that talk to a server, which the tests may stop or freeze."""
    fixture = "postgres_db" if request.param == "postgresql" else "mariadb_db"
    return _server_backend(request.param, request.getfixturevalue(fixture))


async def load(store: Store) -> None:
    await store.executescript(SCHEMA)
    for account in ACCOUNTS:
        assert await store.execute(INSERT, *account) == 1


async def count(store: Store) -> int:
    rows = await store.query("SELECT COUNT(*) AS n FROM accounts")
    return int(rows.rows[0][0])


async def until_answers(store: Store, within: float) -> float:
    """Seconds until ``store`` answers again, polling; fail after ``within`` seconds."""
    start = time.monotonic()
    while True:
        try:
            await store.query("SELECT 1 AS one")
            return time.monotonic() - start
        except TemporaryFailure as exc:
            if time.monotonic() - start > within:
                raise AssertionError(f"the store did not recover within {within}s: {exc}") from None
        await asyncio.sleep(0.02)


# The contract, on every backend.


def test_insert_and_select(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        rows = await store.query("SELECT id, name, email, quota FROM accounts WHERE name = $1", "jane")
        assert rows == Rows(("id", "name", "email", "quota"), [ACCOUNTS[0]])
        rows = await store.query("SELECT quota FROM accounts WHERE id = $1", 2)
        assert rows.rows == [(None,)]
        # No rows still names the columns (asyncpg's fetch alone would not).
        assert await store.query("SELECT id, name FROM accounts WHERE name = $1", "nobody") == Rows(("id", "name"), [])
        # Again, once the store has seen the query (SQLite remembers column names per query), and after rows.
        assert await store.query("SELECT id, name FROM accounts WHERE name = $1", "nobody") == Rows(("id", "name"), [])
        assert (await store.query("SELECT name, id FROM accounts WHERE name = $1", "jane")).columns == ("name", "id")
        assert await store.query("SELECT name, id FROM accounts WHERE name = $1", "x") == Rows(("name", "id"), [])
        # Beyond the BMP: MariaDB needs utf8mb4 for this, on the connection and in the table.
        assert await store.execute(INSERT, 4, "zoë 📬", "zoe@example.net", 1) == 1
        assert (await store.query("SELECT name FROM accounts WHERE id = $1", 4)).rows == [("zoë 📬",)]

    backend.run(scenario)


def test_placeholders(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        twice = "SELECT name FROM accounts WHERE name = $1 OR email = $1 ORDER BY id"
        assert (await store.query(twice, "jane")).rows == [("jane",)]
        assert (await store.query(twice, "bill@example.com")).rows == [("bill",)]
        reversed_ = "SELECT name FROM accounts WHERE email = $2 AND name = $1"
        assert (await store.query(reversed_, "john", "john.doe@example.org")).rows == [("john",)]
        assert (await store.query(reversed_, "john.doe@example.org", "john")).rows == []
        # A literal % next to placeholders: MySQL's "format" style must keep it a wildcard.
        domain = f"SELECT name FROM accounts WHERE email LIKE {backend.concat(repr('%@'), '$1')} ORDER BY id"
        assert (await store.query(domain, "example.org")).rows == [("jane",), ("john",)]
        assert (await store.query(domain, "example.net")).rows == []
        literal = "SELECT $2 AS b, '100%' AS pct, $1 AS a"
        assert (await store.query(literal, "x", "y")).rows == [("y", "100%", "x")]

    backend.run(scenario)


def test_column_names_are_lower_cased(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        rows = await store.query("SELECT name AS UserName, email AS EMail FROM accounts WHERE id = $1", 1)
        assert rows.columns == ("username", "email")
        assert rows.column("USERNAME") == 0
        assert rows.column("Email") == 1
        assert rows.column("quota") is None

    backend.run(scenario)


def test_transaction_commits(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        async with store.transaction() as tx:
            assert await tx.execute(INSERT, 10, "anna", "anna@example.org", 5) == 1
            assert await tx.execute("UPDATE accounts SET quota = $1 WHERE name = $2", 6, "anna") == 1
            assert (await tx.query("SELECT quota FROM accounts WHERE name = $1", "anna")).rows == [(6,)]
            # Other connections do not see it before the commit.
            assert await count(store) == 3
        assert (await store.query("SELECT quota FROM accounts WHERE name = $1", "anna")).rows == [(6,)]
        assert await count(store) == 4

    backend.run(scenario)


def test_transaction_rolls_back_when_the_block_raises(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        with pytest.raises(RuntimeError, match="boom"):
            async with store.transaction() as tx:
                await tx.execute(INSERT, 10, "anna", "anna@example.org", 5)
                await tx.execute("DELETE FROM accounts WHERE name = $1", "jane")
                raise RuntimeError("boom")
        # A statement failing half-way through: the earlier write goes too.
        with pytest.raises(ConstraintViolation):
            async with store.transaction() as tx:
                await tx.execute(INSERT, 11, "otto", "otto@example.org", 5)
                await tx.execute(INSERT, 12, "jane", "jane2@example.org", 5)
        rows = await store.query("SELECT name FROM accounts ORDER BY id")
        assert rows.rows == [("jane",), ("john",), ("bill",)]

    backend.run(scenario)


def test_unique_violation_changes_nothing(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        with pytest.raises(ConstraintViolation) as caught:
            await store.execute(INSERT, 10, "jane", "other@example.org", 1)
        assert isinstance(caught.value, PermanentFailure)
        with pytest.raises(ConstraintViolation):
            await store.execute(INSERT, 1, "someone", "someone@example.org", 1)
        with pytest.raises(ConstraintViolation):
            await store.execute("UPDATE accounts SET name = $1 WHERE id = $2", "jane", 2)
        rows = await store.query("SELECT id, name, email, quota FROM accounts ORDER BY id")
        assert rows.rows == ACCOUNTS

    backend.run(scenario)


def test_bad_query_is_a_permanent_failure(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        for sql in ("SELEC name FROM accounts", "SELECT nope FROM accounts", "SELECT name FROM missing"):
            with pytest.raises(PermanentFailure) as caught:
                await store.query(sql)
            assert not isinstance(caught.value, ConstraintViolation)
        # The connections that saw the errors still work.
        for _ in range(3):
            assert await count(store) == 3

    backend.run(scenario)


def test_placeholder_beyond_the_parameters(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        with pytest.raises(PermanentFailure, match=r"\$3"):
            await store.query("SELECT name FROM accounts WHERE name = $1 OR email = $3", "jane", "x")
        with pytest.raises(PermanentFailure):
            await store.execute("DELETE FROM accounts WHERE name = $3", "jane", "x")
        assert await count(store) == 3

    backend.run(scenario)


def test_injection_attempts_are_only_data(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        for number, value in enumerate(INJECTIONS, start=100):
            if "\x00" in value and backend.name == "postgresql":
                # PostgreSQL text cannot hold NUL: the server refuses the value, and that is the query's fault.
                with pytest.raises(PermanentFailure):
                    await store.query("SELECT name FROM accounts WHERE name = $1", value)
                continue
            assert (await store.query("SELECT name FROM accounts WHERE name = $1", value)).rows == [], value
            assert (await store.query("SELECT name FROM accounts WHERE email = $1 OR name = $1", value)).rows == []
            assert await store.execute("DELETE FROM accounts WHERE name = $1", value) == 0
            # Stored and read back byte for byte.
            assert await store.execute(INSERT, number, value, value, None) == 1
            rows = await store.query("SELECT name, email FROM accounts WHERE id = $1", number)
            assert rows.rows == [(value, value)], value
            assert await store.execute("DELETE FROM accounts WHERE id = $1", number) == 1
        rows = await store.query("SELECT id, name, email, quota FROM accounts ORDER BY id")
        assert rows.rows == ACCOUNTS

    backend.run(scenario)


def test_execute_counts_matched_rows(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        in_domain = f"email LIKE {backend.concat(repr('%@'), '$2')}"
        assert await store.execute(f"UPDATE accounts SET quota = $1 WHERE {in_domain}", 7, "example.org") == 2
        # The same values again: still two rows matched (MySQL would say 0 changed without CLIENT.FOUND_ROWS).
        assert await store.execute(f"UPDATE accounts SET quota = $1 WHERE {in_domain}", 7, "example.org") == 2
        assert await store.execute("UPDATE accounts SET quota = $1 WHERE name = $2", 7, "nobody") == 0
        assert await store.execute("DELETE FROM accounts WHERE id = $1", 3) == 1
        assert await store.execute("DELETE FROM accounts WHERE id = $1", 3) == 0

    backend.run(scenario)


def test_closed_store_fails_temporarily(backend: Backend) -> None:
    async def scenario(store: Store) -> None:
        await load(store)
        await store.close()
        with pytest.raises(TemporaryFailure):
            await store.query("SELECT 1 AS one")

    backend.run(scenario)


# The first loop's connections are abandoned with it; aiomysql's then complain, when collected, that their loop is
# closed. Collected here, so that the warning belongs to this test and is filtered.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_store_outlives_its_event_loop(server_backend: Backend) -> None:
    """Tests (and the directory contract's default runner) call one store from successive asyncio.run()s."""
    store = server_backend.make()
    for _ in range(2):
        assert asyncio.run(store.query("SELECT 1 AS one")).rows == [(1,)]
    asyncio.run(store.close())
    gc.collect()


# Faults of a server: down, back, hung.


def test_server_down_then_back(server_backend: Backend) -> None:
    db = server_backend.server
    assert db is not None
    fast = {"timeout": 1.0, "pool": pool_config(2, wait=1, create=1)}

    async def scenario(store: Store) -> None:
        await store.query("SELECT 1 AS one")  # a pooled connection, which the shutdown breaks
        # Stopped with the loop blocked: the store learns of it only when it uses the connection, as when a
        # server dies mid-query (asyncpg then hands the connection back to its pool behind the store's back).
        db.stop()
        try:
            start = time.monotonic()
            for _ in range(2):  # the broken pooled connection, then a refused new one
                with pytest.raises(TemporaryFailure):
                    await store.query("SELECT 1 AS one")
            assert time.monotonic() - start < 2.5
            # A daemon starting while its database is down starts, and answers "try again".
            cold = server_backend.make(**fast)
            with pytest.raises(TemporaryFailure):
                await cold.query("SELECT 1 AS one")
        finally:
            await asyncio.to_thread(db.start)
        # The same store objects answer again, without a restart, soon after the server is back.
        assert await until_answers(store, 2) < 2
        assert await until_answers(cold, 2) < 2
        await cold.close()

    server_backend.run(scenario, **fast)


def test_hung_server(server_backend: Backend) -> None:
    db = server_backend.server
    assert db is not None

    async def scenario(store: Store) -> None:
        await store.query("SELECT 1 AS one")
        with db.frozen():
            start = time.monotonic()
            with pytest.raises(TemporaryFailure, match="timed out"):  # on the pooled connection
                await store.query("SELECT 1 AS one")
            assert 0.9 < time.monotonic() - start < 2.5
            start = time.monotonic()
            with pytest.raises(TemporaryFailure, match="timed out"):  # connecting: handshake done, no greeting
                await store.query("SELECT 1 AS one")
            assert 0.9 < time.monotonic() - start < 2.5
        assert await until_answers(store, 2) < 2

    server_backend.run(scenario, timeout=1.0, pool=pool_config(2, wait=1, create=1))


# The pool: a bound on connections, and a bound on waiting for one.


def test_pool_never_exceeds_max_connections(server_backend: Backend) -> None:
    db = server_backend.server
    assert db is not None
    if server_backend.name == "postgresql":
        # Each query counts the connections to its database while it runs (its own included).
        counting = "SELECT COUNT(*) AS n FROM pg_stat_activity, pg_sleep(0.005) WHERE datname = current_database()"
        outside = f"SELECT COUNT(*) FROM pg_stat_activity WHERE datname = '{db.database}'"
    else:
        counting = (
            "SELECT (SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE()) AS n, SLEEP(0.005)"
        )
        outside = f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{db.database}'"

    async def scenario(store: Store) -> None:
        results = await asyncio.gather(*(store.query(counting) for _ in range(100)))
        seen = [int(rows.rows[0][0]) for rows in results]
        assert max(seen) == 3, seen
        # Seen by the administrator, from another database: the pool keeps its three, and no more.
        assert int((await asyncio.to_thread(db.server.sql, outside))[0][0]) == 3

    server_backend.run(scenario, pool=pool_config(3))


def test_pool_exhausted(server_backend: Backend) -> None:
    db = server_backend.server
    assert db is not None
    if server_backend.name == "postgresql":
        long_query = "SELECT 1 AS one FROM pg_sleep(1)"
        sleeping = (
            f"SELECT COUNT(*) FROM pg_stat_activity WHERE datname = '{db.database}' "
            "AND state = 'active' AND query LIKE '%pg_sleep(1)%'"
        )
    else:
        long_query = "SELECT 1 AS one FROM (SELECT SLEEP(1)) AS s"
        sleeping = (
            f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = '{db.database}' AND INFO LIKE '%SLEEP(1)%'"
        )

    async def scenario(store: Store) -> None:
        holders = [asyncio.create_task(store.query(long_query)) for _ in range(3)]
        deadline = time.monotonic() + 5
        while int((await asyncio.to_thread(db.server.sql, sleeping))[0][0]) < 3:
            assert time.monotonic() < deadline, "the three long queries did not start"
        start = time.monotonic()
        with pytest.raises(TemporaryFailure, match="pool exhausted"):
            await store.query("SELECT 1 AS one")
        assert 0.15 < time.monotonic() - start < 0.8
        assert [rows.rows for rows in await asyncio.gather(*holders)] == [[(1,)]] * 3
        assert (await store.query("SELECT 1 AS one")).rows == [(1,)]

    server_backend.run(scenario, pool=pool_config(3, wait=0.2))


def test_password_never_in_messages(server_backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    db = server_backend.server
    assert db is not None
    wrong = "Wrong-Pa55word-for-the-log"
    caplog.set_level(logging.DEBUG)

    async def scenario(store: Store) -> None:
        with pytest.raises(TemporaryFailure) as caught:
            await store.query("SELECT 1 AS one")
        assert wrong not in str(caught.value)
        good = server_backend.make()
        try:
            with pytest.raises(PermanentFailure) as failed:
                await good.query("SELECT nope FROM nowhere")
            assert db.password not in str(failed.value)
        finally:
            await good.close()

    server_backend.run(scenario, password=wrong)
    assert wrong not in caplog.text
    assert db.password not in caplog.text
    assert wrong not in repr(db.store_config(password=wrong))
