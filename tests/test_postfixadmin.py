"""PostfixAdmin's own MySQL schema, read as it is by the shipped example (conf.d/examples/sql-postfixadmin.toml),
on a private MariaDB: every lookup map and authentication, as Postfix and Dovecot would ask."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailroster.backends import secrets
from mailroster.backends.outcome import NOT_FOUND, AuthStatus, Found, Outcome
from mailroster.backends.sql import SqlDirectory, SqlDirectoryConfig
from mailroster.backends.store_mysql import MysqlStore
from mailroster.daemon.accounts import AccountService
from mailroster.daemon.config import AuthConfig, LookupConfig, UserdbConfig, load_config
from mailroster.daemon.lookups import LookupService

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf.d" / "examples" / "sql-postfixadmin.toml"
SCHEMA = ROOT / "tests" / "data" / "sql" / "postfixadmin.sql"

DOMAINS = [("example.org", 0, 1), ("backup.example", 1, 1), ("old.example", 0, 0)]  # domain, backupmx, active
MAILBOXES = [  # username, password, quota, active
    ("alice@example.org", secrets.hash_password("alice-pw-1", "SHA512-CRYPT"), 1073741824, 1),
    # PostfixAdmin's md5crypt setting stores the crypt string untagged.
    ("bob@example.org", secrets.hash_password("bob-pw-2", "MD5-CRYPT").removeprefix("{MD5-CRYPT}"), 0, 1),
    ("carol@example.org", secrets.hash_password("carol-pw-3", "SHA512-CRYPT"), 0, 0),
]
ALIASES = [
    ("alice@example.org", "alice@example.org"),
    ("bob@example.org", "bob@example.org"),
    ("carol@example.org", "carol@example.org"),
    ("postmaster@example.org", "alice@example.org"),
    ("info@example.org", "alice@example.org,bob@example.org"),
    ("fwd@example.org", "someone@external.test"),
    ("@example.org", "bob@example.org"),
]
CASES: list[tuple[str, str, str | None]] = [
    ("domain", "example.org", "example.org"),
    ("domain", "backup.example", None),
    ("domain", "old.example", None),
    ("mailbox", "alice@example.org", "example.org/alice/"),
    ("mailbox", "Postmaster@Example.org", "example.org/alice/"),
    ("mailbox", "alice+tag@example.org", "example.org/alice/"),
    ("mailbox", "carol@example.org", None),
    ("mailbox", "info@example.org", None),
    ("alias", "postmaster@example.org", "alice@example.org"),
    ("alias", "info@example.org", "alice@example.org,bob@example.org"),
    ("alias", "fwd@example.org", "someone@external.test"),
    ("alias", "nobody@example.org", "bob@example.org"),
    ("alias", "alice@example.org", None),
    ("sender", "postmaster@example.org", "alice@example.org"),
    ("sender", "info@example.org", None),
    ("recipient", "info@example.org", "OK"),
    ("recipient", "nobody@example.org", "OK"),
    ("recipient", "nobody@old.example", None),
    ("quota", "alice@example.org", "1073741824"),
    ("quota", "bob@example.org", "0"),
]


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def services(mariadb_server, runner: asyncio.Runner) -> Iterator[tuple[LookupService, AccountService]]:  # type: ignore[no-untyped-def]
    store = MysqlStore(mariadb_server.store_config(database=mariadb_server.create_database()))

    async def load() -> None:
        text = "\n".join(line for line in SCHEMA.read_text().splitlines() if not line.startswith("--"))
        await store.executescript([s.strip() for s in text.split(";") if s.strip()])
        async with store.transaction() as tx:
            for domain, backupmx, active in DOMAINS:
                await tx.execute(
                    "INSERT INTO domain (domain, backupmx, active) VALUES ($1, $2, $3)", domain, backupmx, active
                )
            for username, password, quota, active in MAILBOXES:
                local, _, domain = username.partition("@")
                await tx.execute(
                    "INSERT INTO mailbox (username, password, quota, local_part, domain, maildir, active) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    username, password, quota, local, domain, f"{domain}/{local}/", active,
                )  # fmt: skip
            for address, goto in ALIASES:
                domain = address.partition("@")[2]
                await tx.execute("INSERT INTO alias (address, goto, domain) VALUES ($1, $2, $3)", address, goto, domain)

    runner.run(load())
    config = load_config([EXAMPLE]).directory["postfixadmin"]
    assert isinstance(config, SqlDirectoryConfig)
    directory = SqlDirectory(store, config)
    lookups = LookupService(directory, LookupConfig())
    yield lookups, AccountService(directory, lookups, AuthConfig(), UserdbConfig())
    runner.run(store.close())


@pytest.mark.parametrize(("map_name", "key", "expected"), CASES, ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_maps(services, runner: asyncio.Runner, map_name: str, key: str, expected: str | None) -> None:  # type: ignore[no-untyped-def]
    outcome: Outcome = runner.run(services[0].lookup(map_name, key))
    assert outcome == (Found(expected) if expected is not None else NOT_FOUND)


@pytest.mark.parametrize(
    ("login", "password", "status"),
    [
        ("alice@example.org", "alice-pw-1", AuthStatus.OK),
        ("Alice@Example.org", "alice-pw-1", AuthStatus.OK),
        ("bob@example.org", "bob-pw-2", AuthStatus.OK),
        ("alice@example.org", "bob-pw-2", AuthStatus.FAILED),
        ("carol@example.org", "carol-pw-3", AuthStatus.FAILED),  # inactive mailbox
        ("nobody@example.org", "alice-pw-1", AuthStatus.FAILED),
    ],
)
def test_authentication(services, runner: asyncio.Runner, login: str, password: str, status: AuthStatus) -> None:  # type: ignore[no-untyped-def]
    outcome = runner.run(services[1].authenticate(login, password, service="smtp"))
    assert outcome.status is status
    if status is AuthStatus.OK:
        assert outcome.user == login.lower()
