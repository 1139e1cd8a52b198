"""The SQL directory on Stalwart's sample schema, with the example configuration shipped in conf.d/examples."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroster.backends.errors import TemporaryFailure
from mailroster.backends.sql import SqlDirectory, SqlDirectoryConfig
from mailroster.backends.store import SqliteStoreConfig, Store
from mailroster.backends.store_mysql import MysqlStore
from mailroster.backends.store_postgresql import PostgresStore
from mailroster.backends.store_sqlite import SqliteStore
from mailroster.daemon.config import ConfigError, load_config

from contract import DirectoryContract, Run
from sqldata import load_contract_data

EXAMPLES = Path(__file__).resolve().parent.parent / "conf.d" / "examples"
EXAMPLE = EXAMPLES / "sql-stalwart.toml"
EXAMPLE_MYSQL = EXAMPLES / "sql-stalwart-mysql.toml"


def example_config(tmp_path: Path, example: Path = EXAMPLE) -> SqlDirectoryConfig:
    """The shipped example, loaded by the real config loader; the test supplies the store."""
    config = load_config([example])
    directory = config.directory["stalwart"]
    assert isinstance(directory, SqlDirectoryConfig)
    return directory


def sqlite_store(tmp_path: Path) -> Store:
    return SqliteStore.from_config(SqliteStoreConfig(type="sqlite", path="stalwart.sqlite3"), str(tmp_path))


class TestSqlDirectory(DirectoryContract):
    """The contract on SQLite, PostgreSQL and MariaDB, each with its dialect's example configuration."""

    @pytest.fixture
    def runner(self) -> Iterator[asyncio.Runner]:
        # One event loop for the whole test: a pooled connection belongs to the loop that opened it.
        with asyncio.Runner() as runner:
            yield runner

    @pytest.fixture
    def run(self, runner: asyncio.Runner) -> Run:
        return runner.run

    @pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
    def directory(
        self, request: pytest.FixtureRequest, tmp_path: Path, runner: asyncio.Runner
    ) -> Iterator[SqlDirectory]:
        example = EXAMPLE
        if request.param == "sqlite":
            store: Store = sqlite_store(tmp_path)
        elif request.param == "postgresql":
            store = PostgresStore(request.getfixturevalue("postgres_db").store_config())
        else:
            store = MysqlStore(request.getfixturevalue("mariadb_db").store_config())
            example = EXAMPLE_MYSQL

        async def setup() -> SqlDirectory:
            await load_contract_data(store)
            return SqlDirectory(store, example_config(tmp_path, example))

        directory = runner.run(setup())
        yield directory
        runner.run(store.close())


def test_close_closes_the_store(tmp_path: Path) -> None:
    """The daemon closes its directories at shutdown: the store's connections go with them (and a closed store
    answers with a temporary failure, never "not found")."""

    async def main() -> None:
        store = sqlite_store(tmp_path)
        await load_contract_data(store)
        directory = SqlDirectory(store, example_config(tmp_path))
        assert (await directory.principal("jane")) is not None
        await directory.close()
        with pytest.raises(TemporaryFailure):
            await directory.principal("jane")
        with pytest.raises(TemporaryFailure):
            await store.query("SELECT 1")

    asyncio.run(main())


@pytest.mark.parametrize(("example", "store_type"), [(EXAMPLE, "postgresql"), (EXAMPLE_MYSQL, "mysql")])
def test_examples_parse(example: Path, store_type: str) -> None:
    config = load_config([example])
    assert config.store["stalwart"].type == store_type
    assert config.directory["stalwart"].query.name.startswith("SELECT name, type")


def test_queries_must_use_their_parameter(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    text = EXAMPLE.read_text().replace("WHERE LOWER(name) = $1 AND active", "WHERE name = 'x' AND active")
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config([path])
    assert "directory.stalwart: query.name must use its parameter as $1" in str(error.value)


@pytest.mark.parametrize(
    "hostile",
    ["*", "jane' OR '1'='1", "jane'; DROP TABLE accounts; --", "%", "_ane", "jane\x00", "' UNION SELECT 1 --"],
)
def test_injection_attempts_find_nothing(tmp_path: Path, hostile: str) -> None:
    async def main() -> None:
        store = sqlite_store(tmp_path)
        await load_contract_data(store)
        directory = SqlDirectory(store, example_config(tmp_path))
        assert await directory.principal(hostile) is None
        assert await directory.recipient(hostile + "@example.org") is None
        assert await directory.is_local_domain(hostile) is False
        assert (await store.query("SELECT count(*) FROM accounts")).rows[0][0] == 7
        await store.close()

    asyncio.run(main())


def test_example_is_valid_toml() -> None:
    assert tomllib.loads(EXAMPLE.read_text())["directory"]["stalwart"]["type"] == "sql"
