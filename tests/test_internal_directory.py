"""The internal directory: the directory contract, answers identical to the memory directory's, the schema, and
management (refusals, change counter, import/export).

The ``store_config`` fixture is parametrized over the store types: SQLite, and PostgreSQL and MariaDB through the
private servers of tests/dbservers.py (a fresh database per test). Only :func:`test_lookups_use_indexes`, which
reads SQLite's query plans, is particular to one of them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from test_memory_directory import memory_directory

from mailroster.backends import internal as internal_module
from mailroster.backends import internal_manage
from mailroster.backends.address import normalize_address
from mailroster.backends.directory import Directory
from mailroster.backends.errors import PermanentFailure
from mailroster.backends.internal import SQL_CHANGES, InternalDirectory
from mailroster.backends.internal_checks import ManagementError
from mailroster.backends.internal_io import dump_export, parse_import
from mailroster.backends.internal_manage import DirectoryData, InternalManager, PrincipalRecord, PrincipalUpdate
from mailroster.backends.internal_schema import MIGRATIONS, SCHEMA_VERSION, VERSION_TABLE, ensure_schema, schema_version
from mailroster.backends.model import Expansion, Mailbox, PrincipalType
from mailroster.backends.outcome import Found
from mailroster.backends.store import STORE_BACKENDS, Rows, SqliteStoreConfig, Store, StoreConfig, translate
from mailroster.daemon.config import LookupConfig
from mailroster.daemon.directories import load_class
from mailroster.daemon.lookups import LookupService

from contract import DOMAINS, PRINCIPALS, DirectoryContract

Run = Callable[..., Any]
DATA_FILE = Path(__file__).parent / "data" / "directory.toml"


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    """One event loop per test: pooled connections belong to the loop that opened them (asyncpg's do)."""
    with asyncio.Runner() as loop_runner:
        yield loop_runner


#: Store params served by a private database server: the fixture (tests/dbservers.py) of a fresh database on it.
SERVER_DATABASES = {"postgresql": "postgres_db", "mariadb": "mariadb_db"}


@pytest.fixture(params=["sqlite", *SERVER_DATABASES])
def store_config(request: pytest.FixtureRequest) -> StoreConfig:
    """The store under test, empty: a SQLite file in tmp_path, or a fresh database on a private server."""
    if request.param == "sqlite":
        return SqliteStoreConfig(type="sqlite", path="internal.sqlite3")
    database = request.getfixturevalue(SERVER_DATABASES[request.param])
    config: StoreConfig = database.store_config()
    return config


@pytest.fixture
def open_store(store_config: StoreConfig, tmp_path: Path, runner: asyncio.Runner) -> Iterator[Callable[[], Store]]:
    """Opens stores on the test's database; each call is a new pool, as another daemon or the CLI would have."""
    opened: list[Store] = []

    def open_one() -> Store:
        store: Store = load_class(STORE_BACKENDS[store_config.type]).from_config(store_config, str(tmp_path))
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        runner.run(store.close())


@pytest.fixture
def manager(open_store: Callable[[], Store]) -> InternalManager:
    return InternalManager(open_store())


def import_text(principals: list[dict[str, Any]], domains: list[str] = ()) -> str:  # type: ignore[assignment]
    """Memory-directory TOML for ``principals`` (Stalwart's keys), as an administrator would write it."""
    return tomli_w.dumps({"domains": list(domains), "principals": principals})


def load(
    runner: asyncio.Runner, manager: InternalManager, principals: list[dict[str, Any]], domains: list[str]
) -> None:
    runner.run(manager.import_data(parse_import(import_text(principals, domains))))


@pytest.fixture
def contract_manager(runner: asyncio.Runner, manager: InternalManager) -> InternalManager:
    """A manager of a store loaded with the contract's data, through the import API."""
    load(runner, manager, PRINCIPALS, DOMAINS)
    return manager


@pytest.fixture
def internal(contract_manager: InternalManager, open_store: Callable[[], Store]) -> InternalDirectory:
    """The internal directory on the contract's data, on its own store (pool) as a daemon would be."""
    return InternalDirectory(open_store())


class TestInternalDirectoryContract(DirectoryContract):
    @pytest.fixture
    def run(self, runner: asyncio.Runner) -> Run:
        return runner.run

    @pytest.fixture
    def directory(self, internal: InternalDirectory) -> Directory:
        return internal


# The same answers as the memory directory, order included, for two data sets.


def _data_file() -> tuple[list[dict[str, Any]], list[str]]:
    main = tomllib.loads(DATA_FILE.read_text())["directory"]["main"]
    return main["principals"], main.get("domains", [])


def _keys(principals: list[dict[str, Any]]) -> tuple[set[str], set[str], set[str]]:
    names = {p["name"].lower() for p in principals} | {"nobody", "example.org", ""}
    addresses = {"nobody@example.org", "partner@external.test", "@example.com", "x@unknown.test"}
    for p in principals:
        for key in ("email", "email-list", "members"):
            addresses |= {normalize_address(a) for a in p.get(key, []) if "@" in a}
    domains = {a.rpartition("@")[2] for a in addresses} | {"example.net", "unknown.test", "org"}
    return names, addresses, domains


@pytest.mark.parametrize("dataset", ["contract", "data-file"])
def test_answers_equal_the_memory_directory(
    dataset: str, runner: asyncio.Runner, manager: InternalManager, open_store: Callable[[], Store]
) -> None:
    principals, domains = (PRINCIPALS, DOMAINS) if dataset == "contract" else _data_file()
    load(runner, manager, principals, domains)
    internal = InternalDirectory(open_store())
    memory = memory_directory(principals, domains)
    names, addresses, domain_keys = _keys(principals)

    async def individuals(directory: Directory) -> list[str]:
        return [name async for name in directory.individuals()]

    assert runner.run(individuals(internal)) == runner.run(individuals(memory))
    for name in sorted(names):
        assert runner.run(internal.principal(name)) == runner.run(memory.principal(name)), name
    for address in sorted(addresses):
        for method in ("recipient", "email_to_names", "sender_logins", "vrfy", "expn"):
            got = runner.run(getattr(internal, method)(address))
            assert got == runner.run(getattr(memory, method)(address)), (method, address)
            if isinstance(got, Mailbox):  # the primaries it carries are the principals' own
                primaries = tuple(runner.run(memory.principal(name)).primary_email for name in got.names)
                assert got.primaries == primaries, address
    for domain in sorted(domain_keys):
        assert runner.run(internal.is_local_domain(domain)) == runner.run(memory.is_local_domain(domain)), domain


def test_disabled_principal_is_kept_but_sends_as_nobody(internal: InternalDirectory, runner: asyncio.Runner) -> None:
    old = runner.run(internal.principal("olduser"))
    assert old is not None
    assert not old.enabled
    assert runner.run(internal.sender_logins("olduser@example.org")) == ()


def test_domains_are_not_principals_to_lookups(internal: InternalDirectory, runner: asyncio.Runner) -> None:
    assert runner.run(internal.principal("example.org")) is None
    assert runner.run(internal.recipient("example.org")) is None


def test_empty_group_address_is_an_empty_expansion(manager: InternalManager, runner: asyncio.Runner) -> None:
    load(runner, manager, [{"name": "g", "class": "group", "email": ["g@example.org"]}], [])
    directory = InternalDirectory(manager.store)
    assert runner.run(directory.recipient("g@example.org")) == Expansion(())


def test_individuals_are_listed_in_pages(manager: InternalManager, runner: asyncio.Runner) -> None:
    principals = [{"name": f"user{i:04}"} for i in range(2001)] + [{"name": "team", "class": "group"}]
    load(runner, manager, principals, [])
    directory = InternalDirectory(manager.store)

    async def names() -> list[str]:
        return [name async for name in directory.individuals()]

    assert runner.run(names()) == [f"user{i:04}" for i in range(2001)]


def test_mailbox_and_alias_maps_take_one_query(internal: InternalDirectory, runner: asyncio.Runner) -> None:
    """Uncached, the mailbox and alias maps of an individual's address cost one query: the owner's row carries the
    name and primary address the answers are made of."""
    queries: list[str] = []
    query = internal.store.query

    async def counting(sql: str, *params: object) -> Rows:
        queries.append(sql)
        return await query(sql, *params)

    lookups = LookupService(internal, LookupConfig())
    runner.run(internal.principal("jane"))  # the schema check, done once
    internal.store.query = counting  # type: ignore[method-assign]
    try:
        assert runner.run(lookups.lookup("mailbox", "Jane.Example@example.org")) == Found("example.org/jane/")
        assert queries == [internal_module.SQL_OWNER]
        queries.clear()
        assert runner.run(lookups.lookup("alias", "jane.example@example.org")) == Found("jane@example.org")
        assert queries == [internal_module.SQL_OWNER]
    finally:
        del internal.store.query


@pytest.mark.parametrize("store_config", ["sqlite"], indirect=True)
def test_lookups_use_indexes(
    internal: InternalDirectory, runner: asyncio.Runner, tmp_path: Path, store_config: StoreConfig
) -> None:
    """Every lookup query is answered from indexes: none scans a whole table (so 1e6 principals cost as 1e3)."""
    # SQLite only: it is the one whose query plans are read here.
    runner.run(internal.principal("jane"))  # the schema exists
    queries = [getattr(internal_module, name) for name in dir(internal_module) if name.startswith("SQL_")]
    assert len(queries) >= 9
    with sqlite3.connect(tmp_path / "internal.sqlite3") as db:
        for sql in queries:
            count = max((n for n in (1, 2) if f"${n}" in sql), default=0)
            text, params = translate(sql, ("x", "y")[:count], "qmark")
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + text, params)]
            scans = [step for step in plan if step.startswith("SCAN") and "USING" not in step]
            assert not scans, (sql, plan)


# The schema.


def test_schema_is_created_on_first_use(runner: asyncio.Runner, open_store: Callable[[], Store]) -> None:
    store = open_store()
    assert runner.run(schema_version(store)) is None
    directory = InternalDirectory(store)
    assert runner.run(directory.change_counter()) == 0
    assert runner.run(directory.is_local_domain("example.org")) is False
    assert runner.run(schema_version(store)) == SCHEMA_VERSION
    one_row = {"schema_version", "changes"}
    for table in [VERSION_TABLE, *MIGRATIONS[-1].tables]:
        count = runner.run(store.query(f"SELECT COUNT(*) FROM {table.name}")).rows[0][0]
        assert count == (1 if table.name in one_row else 0), table.name


@pytest.mark.filterwarnings("ignore:Table '.*' already exists")  # MySQL's note on CREATE TABLE IF NOT EXISTS
def test_schema_migration_is_idempotent(contract_manager: InternalManager, runner: asyncio.Runner) -> None:
    store = contract_manager.store
    before = runner.run(contract_manager.export_data())
    assert runner.run(ensure_schema(store)) == SCHEMA_VERSION
    assert runner.run(ensure_schema(store)) == SCHEMA_VERSION

    async def replay_every_statement() -> None:
        # What a crash half-way through a MySQL migration (DDL commits implicitly) leaves to run again.
        for statement in VERSION_TABLE.ddl(store.dialect):
            await store.execute(statement)
        for migration in MIGRATIONS:
            async with store.transaction() as tx:
                for table in migration.tables:
                    for statement in table.ddl(store.dialect):
                        await tx.execute(statement)
                if migration.data is not None:
                    await migration.data(tx)

    runner.run(replay_every_statement())
    assert runner.run(contract_manager.export_data()) == before
    assert runner.run(store.query("SELECT COUNT(*) FROM changes")).rows == [(1,)]


def test_a_newer_schema_is_refused_naming_both_versions(
    contract_manager: InternalManager, runner: asyncio.Runner, open_store: Callable[[], Store]
) -> None:
    runner.run(contract_manager.store.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1))
    directory = InternalDirectory(open_store())
    with pytest.raises(PermanentFailure) as refused:
        runner.run(directory.principal("jane"))
    message = str(refused.value)
    assert f"version {SCHEMA_VERSION + 1}" in message
    assert f"version {SCHEMA_VERSION} " in message
    with pytest.raises(PermanentFailure, match=f"version {SCHEMA_VERSION + 1}"):
        runner.run(InternalManager(open_store()).add_domain("example.com"))


def test_each_migration_ends_at_the_current_version() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def test_ddl_is_written_for_every_dialect() -> None:
    for dialect in ("sqlite", "postgresql", "mysql"):
        statements = [s for m in MIGRATIONS for t in m.tables for s in t.ddl(dialect)]  # type: ignore[arg-type]
        assert all("IF NOT EXISTS" in s for s in statements)
        assert all("{" not in s for s in statements)
    mysql = "\n".join(s for t in MIGRATIONS[0].tables for s in t.ddl("mysql"))
    assert "CREATE INDEX" not in mysql  # MySQL has no CREATE INDEX IF NOT EXISTS: indexes are inline
    assert "utf8mb4_bin" in mysql  # names and addresses compare exactly, not case- or accent-insensitively


def test_sql_is_portable() -> None:
    """Queries use $n placeholders only and no dialect-specific syntax the three databases do not share."""
    texts = [getattr(internal_module, n) for n in dir(internal_module) if n.startswith("SQL_")]
    texts += list(internal_manage._ALL.values())
    for sql in texts:
        assert "?" not in sql
        assert "%s" not in sql
        assert "RETURNING" not in sql
        assert "ILIKE" not in sql
        assert "`" not in sql


# Management: refusals change nothing.

GROUP, LIST = PrincipalType.GROUP, PrincipalType.LIST
Refusal = Callable[[InternalManager], Any]

REFUSALS: list[tuple[str, Refusal, str]] = [
    ("invalid domain", lambda m: m.add_domain("not a domain"), "invalid domain 'not a domain'"),
    ("one-label domain", lambda m: m.add_domain("localhost"), "invalid domain"),
    ("domain exists", lambda m: m.add_domain("Example.ORG"), "domain example.org already exists"),
    ("domain named like a principal", lambda m: m.add_domain("team.example"), "a principal has that name"),
    (
        "domain has addresses",
        lambda m: m.delete_domain("example.org"),
        "example.org still has 10 address(es) and 4 email-list",
    ),
    ("unknown domain", lambda m: m.delete_domain("nowhere.test"), "unknown domain nowhere.test"),
    ("principal exists", lambda m: m.add_principal(PrincipalRecord("Jane")), "principal jane already exists"),
    ("name of a domain", lambda m: m.add_principal(PrincipalRecord("example.org")), "domain example.org already"),
    ("invalid name", lambda m: m.add_principal(PrincipalRecord("new user")), "invalid principal name"),
    ("comma in name", lambda m: m.add_principal(PrincipalRecord("a,b")), "invalid principal name"),
    (
        "address of a foreign domain",
        lambda m: m.add_principal(PrincipalRecord("new", emails=("new@unknown.test",))),
        "unknown.test is not a local domain",
    ),
    (
        "address of another principal",
        lambda m: m.add_principal(PrincipalRecord("new", emails=("new@example.org", "JANE@example.org"))),
        "address jane@example.org already belongs to jane",
    ),
    (
        "invalid address",
        lambda m: m.add_principal(PrincipalRecord("new", emails=("new user@example.org",))),
        "invalid address",
    ),
    (
        "catch-all in email-list",
        lambda m: m.add_principal(PrincipalRecord("new", email_list=("@example.org",))),
        "catch-all @domain is not allowed here",
    ),
    (
        "unknown group",
        lambda m: m.add_principal(PrincipalRecord("new", member_of=("nosuch",))),
        "unknown group nosuch",
    ),
    (
        "member-of a list",
        lambda m: m.add_principal(PrincipalRecord("new", member_of=("announce",))),
        "announce is not a group (it is a list)",
    ),
    (
        "member-of an individual",
        lambda m: m.add_principal(PrincipalRecord("new", member_of=("jane",))),
        "jane is not a group (it is a individual)",
    ),
    (
        "group with a password",
        lambda m: m.add_principal(PrincipalRecord("g2", type=GROUP, secrets=("{PLAIN}x",))),
        "a group has no password",
    ),
    (
        "individual with members",
        lambda m: m.add_principal(PrincipalRecord("new", members=("jane",))),
        "only groups and lists have members",
    ),
    (
        "unknown list member",
        lambda m: m.add_principal(PrincipalRecord("l2", type=LIST, members=("nosuch",))),
        "unknown principal nosuch",
    ),
    (
        "unknown secret scheme",
        lambda m: m.add_principal(PrincipalRecord("new", secrets=("{NOPE}x",))),
        "cannot store this secret",
    ),
    ("set unknown", lambda m: m.update_principal("nosuch", PrincipalUpdate(quota=1)), "unknown principal nosuch"),
    ("set a domain", lambda m: m.update_principal("example.org", PrincipalUpdate(quota=1)), "is a domain"),
    ("set nothing", lambda m: m.update_principal("jane", PrincipalUpdate()), "nothing to change"),
    (
        "add another's address",
        lambda m: m.update_principal("jane", PrincipalUpdate(description="x", add_emails=("bill@example.org",))),
        "address bill@example.org already belongs to bill",
    ),
    (
        "add a foreign address",
        lambda m: m.update_principal("jane", PrincipalUpdate(quota=5, add_emails=("jane@unknown.test",))),
        "unknown.test is not a local domain",
    ),
    (
        "remove another's address",
        lambda m: m.update_principal("jane", PrincipalUpdate(remove_emails=("bill@example.org",))),
        "bill@example.org is not an address of jane",
    ),
    (
        "add member-of a list",
        lambda m: m.update_principal("jane", PrincipalUpdate(add_member_of=("announce",))),
        "announce is not a group",
    ),
    (
        "remove member-of unknown",
        lambda m: m.update_principal("jane", PrincipalUpdate(remove_member_of=("nosuch",))),
        "unknown group nosuch",
    ),
    (
        "remove member-of not a member",
        lambda m: m.update_principal("bill", PrincipalUpdate(remove_member_of=("sales",))),
        "bill is not a member of sales",
    ),
    (
        "group member of itself",
        lambda m: m.update_principal("sales", PrincipalUpdate(add_member_of=("sales",))),
        "sales cannot be a member of itself",
    ),
    (
        "password for a group",
        lambda m: m.update_principal("sales", PrincipalUpdate(secret="{PLAIN}x")),
        "a group has no password",
    ),
    (
        "members for an individual",
        lambda m: m.update_principal("jane", PrincipalUpdate(add_members=("bill",))),
        "only groups and lists have members",
    ),
    (
        "remove a non-member",
        lambda m: m.update_principal("announce", PrincipalUpdate(remove_members=("bill",))),
        "bill is not a member of announce",
    ),
    ("negative quota", lambda m: m.update_principal("jane", PrincipalUpdate(quota=-1)), "cannot be negative"),
    ("delete unknown", lambda m: m.delete_principal("nosuch"), "unknown principal nosuch"),
    ("delete a domain", lambda m: m.delete_principal("example.org"), "example.org is a domain"),
    ("show unknown", lambda m: m.show_principal("nosuch"), "unknown principal nosuch"),
    (
        "import an existing principal",
        lambda m: m.import_data(DirectoryData(("new.example",), (PrincipalRecord("new"), PrincipalRecord("bill")))),
        "principals[1] (name 'bill'): principal bill already exists",
    ),
]


@pytest.mark.parametrize(("refusal", "message"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_say_why_and_change_nothing(
    contract_manager: InternalManager, runner: asyncio.Runner, refusal: Refusal, message: str
) -> None:
    runner.run(contract_manager.add_principal(PrincipalRecord("team.example")))
    before, counter = runner.run(contract_manager.export_data()), runner.run(contract_manager.change_counter())
    with pytest.raises(ManagementError) as refused:
        runner.run(refusal(contract_manager))
    assert message in str(refused.value)
    assert runner.run(contract_manager.export_data()) == before
    assert runner.run(contract_manager.change_counter()) == counter


def test_every_write_bumps_the_change_counter_once(
    manager: InternalManager, runner: asyncio.Runner, open_store: Callable[[], Store]
) -> None:
    directory = InternalDirectory(open_store())  # another pool: a daemon watching the store
    writes = [
        manager.add_domain("example.org"),
        manager.add_principal(PrincipalRecord("jane", secrets=("{PLAIN}x",), emails=("jane@example.org",))),
        manager.add_principal(PrincipalRecord("team", type=GROUP, emails=("team@example.org",))),
        manager.update_principal("jane", PrincipalUpdate(add_member_of=("team",), quota=10)),
        manager.import_data(DirectoryData((), (PrincipalRecord("bob", emails=("bob@example.com",)),))),
        manager.delete_principal("bob"),
        manager.delete_domain("example.com"),
        manager.delete_domain("example.org", force=True),
    ]
    assert runner.run(directory.change_counter()) == 0
    for expected, write in enumerate(writes, start=1):
        runner.run(write)
        assert runner.run(directory.change_counter()) == expected
    assert runner.run(directory.store.query(SQL_CHANGES)).rows == [(len(writes),)]


# Management: what succeeds.


def test_added_principal_is_served_at_once(
    contract_manager: InternalManager, runner: asyncio.Runner, internal: InternalDirectory
) -> None:
    record = PrincipalRecord(
        "Alice",
        secrets=("{PLAIN}pw",),
        emails=("Alice@Example.org", "@example.com"),
        member_of=("sales",),
        description="Alice",
        quota=2 << 30,
    )
    runner.run(contract_manager.add_principal(record))
    alice = runner.run(internal.principal("alice"))
    assert alice is not None
    assert (alice.emails, alice.member_of, alice.quota) == (("alice@example.org", "@example.com"), ("sales",), 2 << 30)
    assert runner.run(internal.recipient("@example.com")) == Mailbox(("alice",))
    assert "alice@example.org" in runner.run(internal.expn("sales@example.org"))
    assert runner.run(contract_manager.show_principal("ALICE")).emails == alice.emails


def test_update_principal(contract_manager: InternalManager, runner: asyncio.Runner) -> None:
    app = "$app$phone${PLAIN}app-password"
    runner.run(contract_manager.add_principal(PrincipalRecord("u", secrets=("{PLAIN}old", app), quota=5)))
    update = PrincipalUpdate(
        secret="{PLAIN}new",
        add_emails=("u@example.org", "u2@example.org"),
        add_member_of=("sales",),
        quota=0,
        description="changed",
        enabled=False,
    )
    runner.run(contract_manager.update_principal("u", update))
    u = runner.run(contract_manager.show_principal("u"))
    assert u.secrets == ("{PLAIN}new", app)  # the password replaced, the app password kept
    assert (u.emails, u.member_of, u.quota, u.description, u.enabled) == (
        ("u@example.org", "u2@example.org"),
        ("sales",),
        None,
        "changed",
        False,
    )
    runner.run(contract_manager.update_principal("u", PrincipalUpdate(remove_emails=("U@example.org",))))
    runner.run(contract_manager.update_principal("u", PrincipalUpdate(remove_member_of=("sales",), enabled=True)))
    u = runner.run(contract_manager.show_principal("u"))
    assert (u.emails, u.member_of, u.enabled) == (("u2@example.org",), (), True)  # the alias is primary now


def test_list_members_are_managed_and_deleted_principals_leave_lists(
    contract_manager: InternalManager, runner: asyncio.Runner, internal: InternalDirectory
) -> None:
    update = PrincipalUpdate(add_members=("bill", "Someone@External.test"), remove_members=("partner@external.test",))
    runner.run(contract_manager.update_principal("announce", update))
    assert runner.run(internal.principal("announce")).members == ("bill", "someone@external.test")  # type: ignore[union-attr]
    runner.run(contract_manager.delete_principal("bill"))
    assert runner.run(internal.principal("announce")).members == ("someone@external.test",)  # type: ignore[union-attr]
    assert set(runner.run(internal.expn("info@example.org"))) == {"jane@example.org"}
    runner.run(contract_manager.delete_principal("sales"))
    assert runner.run(internal.principal("jane")).member_of == ()  # type: ignore[union-attr]
    assert runner.run(internal.recipient("sales@example.org")) is None


def test_forced_domain_deletion_removes_its_addresses_and_keeps_principals(
    contract_manager: InternalManager, runner: asyncio.Runner, internal: InternalDirectory
) -> None:
    assert runner.run(contract_manager.delete_domain("example.com", force=True)) == 1
    assert runner.run(contract_manager.delete_domain("example.net")) == 0  # no addresses: no force needed
    jane = runner.run(internal.principal("jane"))
    assert jane is not None
    assert jane.emails == ("jane@example.org", "jane.example@example.org")
    assert not runner.run(internal.is_local_domain("example.com"))
    assert runner.run(contract_manager.delete_domain("example.org", force=True)) == 14
    assert runner.run(contract_manager.list_domains()) == []
    assert runner.run(internal.principal("jane")).emails == ()  # type: ignore[union-attr]
    assert runner.run(internal.recipient("info@example.org")) is None
    assert len(runner.run(contract_manager.list_principals())) == len(PRINCIPALS)


def test_list_principals_by_type(contract_manager: InternalManager, runner: asyncio.Runner) -> None:
    names = [p.name for p in runner.run(contract_manager.list_principals())]
    assert names == [p["name"].lower() for p in PRINCIPALS]
    assert [p.name for p in runner.run(contract_manager.list_principals(GROUP))] == ["sales"]
    assert runner.run(contract_manager.list_domains()) == ["example.com", "example.net", "example.org"]


# Import and export.


def test_export_then_import_reproduces_the_directory(contract_manager: InternalManager, runner: asyncio.Runner) -> None:
    exported = runner.run(contract_manager.export_data())
    text = dump_export(exported)
    assert parse_import(text) == exported
    for principal in exported.principals:  # empty the store, then import what was exported
        runner.run(contract_manager.delete_principal(principal.name))
    for domain in exported.domains:
        runner.run(contract_manager.delete_domain(domain))
    assert runner.run(contract_manager.export_data()) == DirectoryData()
    summary = runner.run(contract_manager.import_data(parse_import(text)))
    assert (summary.principals, summary.domains_created) == (len(PRINCIPALS), 3)
    assert dump_export(runner.run(contract_manager.export_data())) == text


def test_export_is_the_memory_directory_format(contract_manager: InternalManager, runner: asyncio.Runner) -> None:
    document = tomllib.loads(dump_export(runner.run(contract_manager.export_data())))
    assert document["domains"] == ["example.com", "example.net", "example.org"]
    john = document["principals"][1]
    assert john == {
        "name": "john.doe",
        "class": "individual",
        "secret": ["{PLAIN}john-password-9Kz", "{PLAIN}john-app-password-3Wm"],
        "description": "John Doe",
        "quota": 524288000,
        "email": ["john.doe@example.org", "jd@example.org"],
        "email-list": ["announce@example.org"],
        "member-of": ["sales"],
    }
    assert document["principals"][-1]["enabled"] is False


def test_import_takes_any_order_and_creates_domains(manager: InternalManager, runner: asyncio.Runner) -> None:
    text = import_text(
        [
            {"name": "a", "email": ["a@one.test"], "member-of": ["late"], "email-list": ["news@two.test"]},
            {"name": "news", "class": "list", "members": ["b", "x@elsewhere.test"]},
            {"name": "b", "class": "admin", "quota": "1G"},
            {"name": "late", "class": "group"},
        ],
        ["three.test"],
    )
    summary = runner.run(manager.import_data(parse_import(text)))
    assert (summary.principals, summary.domains_created) == (4, 3)
    assert runner.run(manager.list_domains()) == ["one.test", "three.test", "two.test"]
    assert runner.run(manager.show_principal("a")).member_of == ("late",)
    assert runner.run(manager.show_principal("b")).quota == 1 << 30
    assert runner.run(manager.show_principal("news")).members == ("b", "x@elsewhere.test")


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"name": "a"}, {"name": "A"}], "principals[1] (name 'A'): principal a is defined twice"),
        ([{"name": "a"}, {"name": "b", "member-of": ["nosuch"]}], "principals[1] (name 'b'): unknown group nosuch"),
        ([{"name": "a", "email": ["a@x.test"]}, {"name": "b", "email": ["A@x.test"]}], "already belongs to a"),
        ([{"name": "a"}, {"name": "b", "class": "robot"}], "principals[1] (name 'b'): class: must be one of"),
        ([{"name": "a"}, {"name": "b", "quota": "lots"}], "principals[1] (name 'b'): quota:"),
        ([{"name": "a"}, {"name": "b", "mail": ["b@x.test"]}], "principals[1] (name 'b'): unknown key 'mail'"),
        ([{"name": "a"}, {"email": ["b@x.test"]}], "principals[1]: name: missing"),
        ([{"name": "a"}, {"name": "b", "email": ["b@"]}], "principals[1] (name 'b'): invalid address"),
    ],
)
def test_import_is_one_transaction(
    manager: InternalManager, runner: asyncio.Runner, entries: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ManagementError) as refused:
        runner.run(manager.import_data(parse_import(import_text(entries, ["kept.test"]))))
    assert message in str(refused.value)
    assert runner.run(manager.export_data()) == DirectoryData()
    assert runner.run(manager.change_counter()) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("principals = [", "invalid TOML"),
        ('directory = "x"', "unknown top-level key 'directory'"),
        ("domains = 3", "domains: expected a string or an array of strings"),
        ('principals = "x"', "principals: expected [[principals]] tables"),
    ],
)
def test_import_rejects_malformed_documents(text: str, message: str) -> None:
    with pytest.raises(ManagementError, match=message.replace("[", r"\[")):
        parse_import(text)
