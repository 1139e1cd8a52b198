"""The SQL directory on Stalwart's sample schema, with the example configuration shipped in conf.d/examples."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroster.backends.sql import SqlDirectory, SqlDirectoryConfig
from mailroster.backends.store import SqliteStoreConfig, Store
from mailroster.backends.store_sqlite import SqliteStore
from mailroster.daemon.config import ConfigError, load_config

from contract import DirectoryContract
from sqldata import load_contract_data

EXAMPLE = Path(__file__).resolve().parent.parent / "conf.d" / "examples" / "sql-stalwart.toml"


def example_config(tmp_path: Path) -> SqlDirectoryConfig:
    """The shipped example, loaded by the real config loader, with its store swapped for a local one."""
    config = load_config([EXAMPLE])
    directory = config.directory["stalwart"]
    assert isinstance(directory, SqlDirectoryConfig)
    return directory


def sqlite_store(tmp_path: Path) -> Store:
    return SqliteStore.from_config(SqliteStoreConfig(type="sqlite", path="stalwart.sqlite3"), str(tmp_path))


class TestSqlDirectoryOnSqlite(DirectoryContract):
    @pytest.fixture
    def directory(self, tmp_path: Path) -> Iterator[SqlDirectory]:
        async def setup() -> SqlDirectory:
            store = sqlite_store(tmp_path)
            await load_contract_data(store)
            return SqlDirectory(store, example_config(tmp_path))

        directory = asyncio.run(setup())
        yield directory
        asyncio.run(directory.store.close())


def test_example_parses_and_its_store_is_postgresql() -> None:
    config = load_config([EXAMPLE])
    assert config.store["stalwart"].type == "postgresql"
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
