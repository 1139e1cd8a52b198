"""The management commands, run as an administrator runs them: the real ``mailroster`` on a temporary config whose
default directory is internal, with its exit codes, outputs and refusals; then ``auth`` and ``lookup`` on the same
configuration see what was written.

The stores are parametrized over SQLite, and PostgreSQL and MariaDB through the private servers of
tests/dbservers.py; each test gets two empty databases of its own (the default directory's and a copy's).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tomli_w

from mailroster.backends.internal_schema import SCHEMA_VERSION
from mailroster.daemon.config import load_config
from mailroster.daemon.directories import build_stores

from conftest import MAILROSTER, RunningDaemon
from contract import DOMAINS, PRINCIPALS

Cli = Callable[..., subprocess.CompletedProcess[str]]


#: Store kinds served by a private database server (tests/dbservers.py): the session fixture of that server.
SERVERS = {"postgresql": "postgres_server", "mariadb": "mariadb_server"}


@pytest.fixture(scope="module", params=["sqlite", *SERVERS])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def new_stores_toml(kind: str, request: pytest.FixtureRequest) -> str:
    """``[store.db]`` and ``[store.copy]`` tables for two new, empty databases of ``kind``."""
    if kind == "sqlite":
        return (
            '[store.db]\ntype = "sqlite"\npath = "directory.sqlite3"\n'
            '[store.copy]\ntype = "sqlite"\npath = "copy.sqlite3"\n'
        )
    server = request.getfixturevalue(SERVERS[kind])
    server.start()
    stores = {}
    for ident in ("db", "copy"):
        store = server.store_config(database=server.create_database())
        stores[ident] = {
            "type": store.type,
            "host": store.host,
            "port": store.port,
            "database": store.database,
            "user": store.user,
            "password": store.password.value,
        }
    return tomli_w.dumps({"store": stores})


@pytest.fixture
def store_toml(store_kind: str, request: pytest.FixtureRequest) -> str:
    return new_stores_toml(store_kind, request)


def write_config(path: Path, state_dir: Path, store_toml: str) -> Path:
    path.write_text(
        f"[server]\nstate-dir = {json.dumps(str(state_dir))}\n"
        '[storage]\ndirectory = "main"\n'
        '[directory.main]\ntype = "internal"\nstore = "db"\n'
        "[directory.main.cache]\nentries = 0\n"
        '[directory.copy]\ntype = "internal"\nstore = "copy"\n'
        '[directory.static]\ntype = "memory"\ndomains = ["static.test"]\n' + store_toml
    )
    return path


@pytest.fixture
def config(tmp_path: Path, store_toml: str) -> Path:
    return write_config(tmp_path / "mailroster.toml", tmp_path / "state", store_toml)


def run_cli(config: Path) -> Cli:
    def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        # Options after the positionals: argparse takes them anywhere after the subcommand.
        return subprocess.run(
            [MAILROSTER, *args, "-c", str(config)], input=stdin, capture_output=True, text=True, timeout=60
        )

    return cli


@pytest.fixture
def cli(config: Path) -> Cli:
    return run_cli(config)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def load_contract(cli: Cli, directory: Path) -> Cli:
    data = directory / "contract.toml"
    data.write_text(tomli_w.dumps({"domains": DOMAINS, "principals": PRINCIPALS}))
    assert ok(cli("import", str(data))) == "imported 7 principal(s), created 3 domain(s)\n"
    return cli


@pytest.fixture
def loaded(cli: Cli, tmp_path: Path) -> Cli:
    """The CLI on a directory holding the contract's data, imported with ``mailroster import``."""
    return load_contract(cli, tmp_path)


@pytest.fixture(scope="module")
def loaded_once(tmp_path_factory: pytest.TempPathFactory, store_kind: str, request: pytest.FixtureRequest) -> Cli:
    """Like ``loaded``, shared by the tests that must change nothing (each checks that it did not)."""
    base = tmp_path_factory.mktemp("refusals")
    stores = new_stores_toml(store_kind, request)
    return load_contract(run_cli(write_config(base / "mailroster.toml", base / "state", stores)), base)


# Domains.


def test_domain_add_list_delete(cli: Cli) -> None:
    assert ok(cli("domain", "add", "Example.ORG")) == "domain example.org added\n"
    ok(cli("domain", "add", "bücher.example"))
    assert ok(cli("domain", "list")) == "example.org\nxn--bcher-kva.example\n"
    assert json.loads(ok(cli("domain", "list", "--json"))) == ["example.org", "xn--bcher-kva.example"]
    ok(cli("principal", "add", "jane", "--email", "jane@example.org"))
    refused = cli("domain", "delete", "example.org")
    assert (refused.returncode, refused.stdout) == (1, "")
    assert "still has 1 address(es)" in refused.stderr
    assert ok(cli("domain", "delete", "example.org", "--force")) == "domain example.org deleted with 1 address(es)\n"
    assert ok(cli("domain", "list")) == "xn--bcher-kva.example\n"
    assert json.loads(ok(cli("principal", "show", "jane", "--json")))["emails"] == []


# Principals.


def test_principal_add_show_list_set_delete(cli: Cli) -> None:
    ok(cli("domain", "add", "example.org"))
    ok(cli("principal", "add", "sales", "--type", "group", "--email", "sales@example.org"))
    added = cli(
        "principal",
        "add",
        "Jane",
        "--email",
        "Jane@Example.org",
        "--email",
        "@example.org",
        "--member-of",
        "sales",
        "--quota",
        "2G",
        "--description",
        "Jane Example",
    )
    assert ok(added) == "principal jane added\n"
    shown = json.loads(ok(cli("principal", "show", "JANE", "--json")))
    assert shown == {
        "name": "jane",
        "type": "individual",
        "emails": ["jane@example.org", "@example.org"],
        "member_of": ["sales"],
        "quota": 2 << 30,
        "description": "Jane Example",
        "enabled": True,
    }
    text = ok(cli("principal", "show", "jane"))
    assert "emails: jane@example.org, @example.org\n" in text
    assert "quota: 2147483648\n" in text
    assert ok(cli("principal", "list")) == "sales\njane\n"
    assert ok(cli("principal", "list", "--type", "group")) == "sales\n"
    listed = json.loads(ok(cli("principal", "list", "--json")))
    assert [p["name"] for p in listed] == ["sales", "jane"]
    assert listed[1] == shown

    ok(cli("principal", "add", "news", "--type", "list", "--email", "news@example.org", "--member", "jane"))
    changes = [
        ("--add-email", "j@example.org", "--remove-email", "@example.org"),
        ("--remove-member-of", "sales", "--quota", "0", "--description", "changed", "--disable"),
    ]
    for change in changes:
        assert ok(cli("principal", "set", "jane", *change)) == "principal jane changed\n"
    shown = json.loads(ok(cli("principal", "show", "jane", "--json")))
    assert shown == {
        "name": "jane",
        "type": "individual",
        "emails": ["jane@example.org", "j@example.org"],
        "member_of": [],
        "quota": None,
        "description": "changed",
        "enabled": False,
    }
    ok(cli("principal", "set", "jane", "--enable", "--add-member-of", "sales"))
    assert json.loads(ok(cli("principal", "show", "jane", "--json")))["enabled"] is True
    ok(cli("principal", "set", "news", "--add-member", "friend@external.test", "--remove-member", "jane"))
    assert "members: friend@external.test\n" in ok(cli("principal", "show", "news"))

    assert ok(cli("principal", "delete", "jane")) == "principal jane deleted\n"
    gone = cli("principal", "show", "jane")
    assert (gone.returncode, gone.stderr) == (1, "error: unknown principal jane\n")
    assert ok(cli("principal", "list")) == "sales\nnews\n"


def test_show_never_prints_secrets(loaded: Cli) -> None:
    for args in (("principal", "show", "john.doe"), ("principal", "show", "john.doe", "--json")):
        assert "password" not in ok(loaded(*args))
    assert "password" not in ok(loaded("principal", "list", "--json"))


def test_password_from_stdin_then_auth(cli: Cli) -> None:
    ok(cli("domain", "add", "example.org"))
    ok(cli("principal", "add", "jane", "--email", "jane@example.org", "--password-stdin", stdin="s3cret pass \n"))
    assert ok(cli("auth", "jane", stdin="s3cret pass \n")) == "authenticated as jane\n"
    assert ok(cli("auth", "Jane@Example.org", stdin="s3cret pass ")) == "authenticated as jane\n"
    assert cli("auth", "jane", stdin="s3cret pass\n").returncode == 1  # the trailing space is part of it
    exported = ok(cli("export"))
    assert "{ARGON2ID}$argon2id$" in exported  # hashed with the default scheme
    ok(cli("principal", "set", "jane", "--password-stdin", stdin="new one\n"))
    assert cli("auth", "jane", stdin="s3cret pass \n").returncode == 1
    ok(cli("auth", "jane", stdin="new one\n"))
    ok(cli("principal", "set", "jane", "--disable"))
    assert cli("auth", "jane", stdin="new one\n").returncode == 1


def test_imported_hash_then_auth(cli: Cli) -> None:
    hashed = ok(
        subprocess.run(
            [MAILROSTER, "hash-password", "--scheme", "SHA512-CRYPT"], input="pw\n", capture_output=True, text=True
        )
    )
    ok(cli("principal", "add", "bill", "--hash", hashed.strip().splitlines()[-1]))
    assert ok(cli("auth", "bill", stdin="pw\n")) == "authenticated as bill\n"
    ok(cli("principal", "set", "bill", "--hash", "{PLAIN}plain-on-purpose"))
    ok(cli("auth", "bill", stdin="plain-on-purpose\n"))


def test_lookup_sees_the_data(loaded: Cli) -> None:
    expected = {
        ("mailbox", "John.Doe+tag@example.org"): "example.org/john.doe/",
        ("alias", "sales@example.org"): "jane@example.org,john.doe@example.org",
        ("alias", "whoever@example.org"): "postmaster@example.org",  # the catch-all
        ("domain", "example.net"): "example.net",
        ("quota", "jane"): "1073741824",
        ("sender", "jd@example.org"): "john.doe",
    }
    for (map_name, key), value in expected.items():
        assert ok(loaded("lookup", map_name, key)) == value + "\n", (map_name, key)
    assert loaded("lookup", "mailbox", "nobody@unknown.test").returncode == 1
    assert ok(loaded("lookup", "alias", "jane.example@example.org")) == "jane@example.org\n"
    ok(loaded("principal", "set", "jane", "--remove-email", "jane.example@example.org"))
    assert ok(loaded("lookup", "alias", "jane.example@example.org")) == "postmaster@example.org\n"  # the catch-all
    ok(loaded("principal", "delete", "postmaster"))
    assert loaded("lookup", "alias", "jane.example@example.org").returncode == 1


# Import and export.


def test_export_imports_into_another_directory_identically(loaded: Cli, tmp_path: Path) -> None:
    exported = ok(loaded("export"))
    (tmp_path / "export.toml").write_text(exported)
    ok(loaded("import", str(tmp_path / "export.toml"), "--directory", "copy"))
    assert ok(loaded("export", "--directory", "copy")) == exported


def test_import_from_stdin_any_order(cli: Cli) -> None:
    text = (
        '[[principals]]\nname = "a"\nemail = ["a@one.test"]\nmember-of = ["team"]\n\n'
        '[[principals]]\nname = "team"\nclass = "group"\n'
    )
    assert ok(cli("import", "-", stdin=text)) == "imported 2 principal(s), created 1 domain(s)\n"
    assert json.loads(ok(cli("principal", "show", "a", "--json")))["member_of"] == ["team"]


def test_bad_import_changes_nothing(loaded: Cli, tmp_path: Path) -> None:
    before = ok(loaded("export"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[principals]]\nname = "new"\n\n[[principals]]\nname = "other"\nmember-of = ["jane"]\n')
    result = loaded("import", str(bad))
    assert result.returncode == 1
    assert result.stderr == "error: principals[1] (name 'other'): jane is not a group (it is a individual)" + (
        ": member-of names groups only\n"
    )
    assert ok(loaded("export")) == before
    missing = loaded("import", str(tmp_path / "missing.toml"))
    assert (missing.returncode, missing.stderr) == (
        66,
        f"cannot read {tmp_path / 'missing.toml'}: No such file or directory\n",
    )


# Refusals: exit 1, the reason on stderr, nothing changed.

REFUSALS = [
    (("domain", "add", "example.org"), "domain example.org already exists"),
    (("domain", "add", "not_a.domain!"), "invalid domain"),
    (("domain", "delete", "example.org"), "still has"),
    (("domain", "delete", "unknown.test"), "unknown domain unknown.test"),
    (("principal", "add", "jane"), "principal jane already exists"),
    (("principal", "add", "new", "--email", "new@unknown.test"), "unknown.test is not a local domain"),
    (("principal", "add", "new", "--email", "jd@example.org"), "address jd@example.org already belongs to john.doe"),
    (("principal", "add", "new", "--email", "no address"), "invalid address"),
    (("principal", "add", "new", "--member-of", "nosuch"), "unknown group nosuch"),
    (("principal", "add", "new", "--member-of", "announce"), "announce is not a group"),
    (("principal", "add", "new", "--hash", "plaintext"), "--hash takes a password hash"),
    (("principal", "add", "new", "--hash", "{NOPE}x"), "cannot store this secret"),
    (("principal", "add", "g", "--type", "group", "--password-stdin"), "a group has no password"),
    (("principal", "set", "nosuch", "--quota", "1G"), "unknown principal nosuch"),
    (("principal", "set", "jane"), "nothing to change"),
    (("principal", "set", "jane", "--add-email", "bill@example.org"), "already belongs to bill"),
    (("principal", "set", "jane", "--remove-email", "bill@example.org"), "is not an address of jane"),
    (("principal", "set", "jane", "--add-member-of", "bill"), "bill is not a group"),
    (("principal", "set", "bill", "--remove-member-of", "sales"), "bill is not a member of sales"),
    (("principal", "set", "sales", "--hash", "{PLAIN}x"), "a group has no password"),
    (("principal", "delete", "nosuch"), "unknown principal nosuch"),
    (("principal", "delete", "example.org"), "example.org is a domain"),
    (("principal", "show", "nosuch"), "unknown principal nosuch"),
]


@pytest.mark.parametrize(("args", "message"), REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_refusals(loaded_once: Cli, args: tuple[str, ...], message: str) -> None:
    loaded = loaded_once
    before = ok(loaded("export"))
    result = loaded(*args, stdin="pw\n")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout == ""
    assert ok(loaded("export")) == before


# The directory, the store and the configuration.


def test_directory_must_be_an_internal_one(cli: Cli) -> None:
    result = cli("domain", "list", "--directory", "static")
    assert result.returncode == 78
    assert result.stderr == "directory 'static' is a memory directory: management commands work on internal ones only\n"
    unknown = cli("export", "--directory", "nope")
    assert (unknown.returncode, unknown.stderr) == (64, "no directory named 'nope'\n")


def test_newer_schema_is_a_configuration_error(cli: Cli, config: Path) -> None:
    ok(cli("domain", "list"))  # creates the schema

    async def pretend_a_newer_mailroster_wrote() -> None:
        store = build_stores(load_config([config]), ["db"])["db"]
        try:
            await store.execute("UPDATE schema_version SET version = $1", SCHEMA_VERSION + 1)
        finally:
            await store.close()

    asyncio.run(pretend_a_newer_mailroster_wrote())
    for args in (("domain", "list"), ("lookup", "domain", "example.org")):
        result = cli(*args)
        assert result.returncode == 78, args
        assert f"version {SCHEMA_VERSION + 1}, newer than version {SCHEMA_VERSION}" in result.stderr


@pytest.mark.parametrize("store_kind", ["sqlite"], indirect=True)
def test_unreachable_store_is_a_temporary_failure(tmp_path: Path, store_kind: str, store_toml: str) -> None:
    # SQLite: an unusable state directory (the servers' stores are stopped in tests/test_stores.py).
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    cli = run_cli(write_config(tmp_path / "broken.toml", blocker / "state", store_toml))
    result = cli("domain", "add", "example.org")
    assert result.returncode == 75
    assert result.stderr.startswith("temporary failure: ")


def test_configuration_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[storage]\ndirectory = "main"\n[directory.main]\ntype = "internal"\nstore = "nowhere"\n')
    result = run_cli(bad)("domain", "list")
    assert result.returncode == 78
    assert f'{bad}: directory.main.store: no store "nowhere"; no [store.<id>] table is defined' in result.stderr


# A running daemon on the same store.


def socketmap(path: str, name: str, key: str) -> str:
    """One socketmap_table(5) query: ``name key`` as a netstring; the reply's text."""
    query = f"{name} {key}".encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b"%d:%s," % (len(query), query))
        reply = b""
        while not reply.endswith(b","):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    length, _, rest = reply.partition(b":")
    return rest[: int(length)].decode()


def answer_within(daemon: RunningDaemon, name: str, key: str, expected: str, seconds: float) -> float:
    """How long the daemon took to answer ``expected``; fails after ``seconds``."""
    start = time.monotonic()
    while (reply := socketmap(daemon.socket("socketmap"), name, key)) != expected:
        assert time.monotonic() - start < seconds, f"still {reply!r} after {seconds}s, expected {expected!r}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_running_daemon_serves_cli_changes_within_a_second(
    daemon_factory: Callable[..., RunningDaemon], store_kind: str, request: pytest.FixtureRequest
) -> None:
    # Caches that would keep every answer, found or not, for an hour: only the change counter can refresh them.
    daemon = daemon_factory(
        '[server]\nrun-dir = "{run}"\nstate-dir = "{run}/state"\n'
        '[server.listener.socketmap]\nprotocol = "socketmap"\nbind = "unix:socketmap"\n'
        'socket = { mode = "0600" }\n'
        '[storage]\ndirectory = "main"\n'
        '[directory.main]\ntype = "internal"\nstore = "db"\n'
        '[directory.main.cache]\nentries = 1000\nttl = { positive = "1h", negative = "1h" }\n'
        + new_stores_toml(store_kind, request),
        wait_for=("socketmap",),
    )
    cli = run_cli(daemon.config_dir / "mailroster.toml")
    assert socketmap(daemon.socket("socketmap"), "domain", "example.org") == "NOTFOUND ", daemon.log()
    ok(cli("domain", "add", "example.org"))
    answer_within(daemon, "domain", "example.org", "OK example.org", 1.0)
    assert socketmap(daemon.socket("socketmap"), "mailbox", "jane@example.org") == "NOTFOUND "
    ok(cli("principal", "add", "jane", "--email", "jane@example.org"))
    answer_within(daemon, "mailbox", "jane@example.org", "OK example.org/jane/", 1.0)
    ok(cli("principal", "set", "jane", "--remove-email", "jane@example.org"))
    answer_within(daemon, "mailbox", "jane@example.org", "NOTFOUND ", 1.0)
    assert "cache flushed" in daemon.log()
