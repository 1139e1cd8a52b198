"""The LDAP directory against a real slapd (tests/ldapserver.py): the contract, bind authentication, hostile input,
server faults and failover, the connection pool, TLS, and the configuration.

Every directory here is built from conf.d/examples/ldap-openldap.toml through the real configuration loader, with
the fixture's URL, base DN and service account (and, per test, a few more keys) merged over it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailroster.backends import ldap_client
from mailroster.backends.errors import TemporaryFailure
from mailroster.backends.ldap import BindAuthenticator, LdapDirectory, LdapDirectoryConfig
from mailroster.backends.ldap_client import Entry
from mailroster.backends.ldap_config import Template
from mailroster.backends.ldap_query import LdapQueries, escape
from mailroster.backends.model import Expansion, Mailbox, PrincipalType
from mailroster.backends.outcome import AuthStatus
from mailroster.daemon import config as config_module
from mailroster.daemon.accounts import AccountService
from mailroster.daemon.config import AuthConfig, ConfigError, LookupConfig, UserdbConfig
from mailroster.daemon.lookups import LookupService

from contract import JANE, DirectoryContract, Run
from ldapserver import (  # noqa: F401 - fixtures
    AUTH_BASE,
    CONTRACT_BASE,
    SERVICE_DN,
    SERVICE_PASSWORD,
    Slapd,
    dead_url,
    slapd,
    slapd_factory,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "conf.d" / "examples"
OPENLDAP_EXAMPLE = EXAMPLES / "ldap-openldap.toml"
AD_EXAMPLE = EXAMPLES / "ldap-active-directory.toml"
CONFIG_CLASS = "mailroster.backends.ldap:LdapDirectoryConfig"
METHODS = ["default", "template", "lookup"]

Overrides = dict[str, object]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)  # strings and arrays of strings: JSON's escapes are TOML's


def load_config(overrides: Overrides, example: Path = OPENLDAP_EXAMPLE, table: str = "ldap") -> Any:
    """The example file with ``overrides`` (dotted keys under ``[directory.<table>]``) merged over it."""
    text = f"[directory.{table}]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in overrides.items())
    with tempfile.TemporaryDirectory() as folder, pytest.MonkeyPatch.context() as patch:
        path = Path(folder) / "zz-test.toml"
        path.write_text(text)
        patch.setitem(config_module.DIRECTORY_TYPES, "ldap", CONFIG_CLASS)
        return config_module.load_config([example, path]).directory[table]


def server_keys(urls: list[str], base: str, **more: object) -> Overrides:
    """What each test replaces in the example: where the server is, and its service account."""
    keys: Overrides = {"url": urls, "base-dn": base, "tls.enable": False, "bind.dn": SERVICE_DN}
    return {**keys, "bind.secret": SERVICE_PASSWORD, **more}


class Directories:
    """Opens LDAP directories on one event loop and closes them all at the end."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.opened: list[LdapDirectory] = []

    def __call__(self, overrides: Overrides, *, retry_after: float = ldap_client.RETRY_AFTER) -> LdapDirectory:
        config = load_config(overrides)
        assert isinstance(config, LdapDirectoryConfig)
        directory = LdapDirectory(config, retry_after=retry_after)
        self.opened.append(directory)
        return directory

    def close(self) -> None:
        for directory in self.opened:
            self.runner.run(directory.close())


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for the module: pooled connections belong to the loop that opened them."""
    with asyncio.Runner() as loop_runner:
        yield loop_runner


@pytest.fixture(scope="module")
def module_directories(runner: asyncio.Runner) -> Iterator[Directories]:
    opened = Directories(runner)
    yield opened
    opened.close()


@pytest.fixture
def directories(runner: asyncio.Runner) -> Iterator[Directories]:
    opened = Directories(runner)
    yield opened
    opened.close()


def method_keys(method: str, base: str) -> Overrides:
    if method == "default":
        return {}
    keys: Overrides = {"bind.auth.method": method}
    if method == "template":
        keys["bind.auth.template"] = f"uid=?,ou=people,{base}"
    return keys


# The contract, on each slapd variant, with each bind.auth.method.


def contract_keys(server: Slapd, method: str) -> Overrides:
    # With memberOf from the overlay, the Stalwart 0.15 way: memberships from attributes.groups alone. Without
    # it, the example's reverse group search (filter.members) finds them.
    variant: Overrides = {"filter.members": ""} if server.memberof else {}
    return server_keys([server.url], CONTRACT_BASE, **variant, **method_keys(method, CONTRACT_BASE))


class TestLdapDirectoryContract(DirectoryContract):
    @pytest.fixture(scope="class", params=METHODS)
    @classmethod
    def directory(cls, request: pytest.FixtureRequest, slapd: Slapd, module_directories: Directories) -> LdapDirectory:  # noqa: F811
        return module_directories(contract_keys(slapd, request.param))

    @pytest.fixture
    def run(self, runner: asyncio.Runner) -> Run:
        return runner.run


@pytest.fixture(scope="module")
def contract_directory(slapd: Slapd, module_directories: Directories) -> LdapDirectory:  # noqa: F811
    return module_directories(contract_keys(slapd, "default"))


def test_only_stalwart_015_keys_derive_domains_members_and_the_user_list(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    server = slapd_factory(memberof=True)  # group members by memberOf need the overlay
    # No filter.domains, .members, .list, .expand; the group's member attribute ignored: members by memberOf.
    keys = {f"filter.{name}": "" for name in ("domains", "members", "list", "expand")}
    directory = directories(server_keys([server.url], CONTRACT_BASE, **keys, **{"attributes.members": []}))
    assert runner.run(directory.is_local_domain("example.org"))
    assert runner.run(directory.is_local_domain("example.com"))  # from an alias
    assert not runner.run(directory.is_local_domain("example.net"))  # no address there: only a domain entry
    assert not runner.run(directory.is_local_domain("org"))
    expansion = runner.run(directory.recipient("sales@example.org"))
    assert isinstance(expansion, Expansion)
    assert set(expansion.addresses) == {JANE, "john.doe@example.org"}
    assert set(runner.run(directory.sender_logins("sales@example.org"))) == {"jane", "john.doe"}

    async def names() -> list[str]:
        return [name async for name in directory.individuals()]

    assert sorted(runner.run(names())) == ["bill", "jane", "john.doe", "postmaster"]


def test_group_and_list_members_are_names_and_external_addresses(
    contract_directory: LdapDirectory, runner: asyncio.Runner
) -> None:
    sales = runner.run(contract_directory.principal("sales"))
    assert sales is not None
    assert set(sales.members) == {"jane", "john.doe"}
    announce = runner.run(contract_directory.principal("announce"))
    assert announce is not None
    assert announce.members == ("partner@external.test",)
    assert runner.run(contract_directory.sender_logins("announce@example.org")) == ()  # a list's, not a group's


def test_a_disabled_account_is_neither_login_nor_recipient(
    contract_directory: LdapDirectory, runner: asyncio.Runner
) -> None:
    assert runner.run(contract_directory.principal("olduser")) is None
    assert runner.run(contract_directory.recipient("olduser@example.org")) is None


# Authentication: default (the caller verifies the hashes), template and lookup (slapd verifies by a bind).

PASSWORDS = {
    "alice": "alice-ssha-8Pq",
    "carol": "carol-crypt-4Zw",
    "dave": "dave-clear-2Mn",
    "smith, j": "smith-ssha-1Xc",
}
AUTH_FILTERS: Overrides = {
    "filter.name": "(|(&(objectClass=inetOrgPerson)(!(employeeType=disabled))(uid=?))"
    "(&(|(objectClass=groupOfNames)(objectClass=posixGroup))(cn=?)))",
    "filter.email": "(&(|(objectClass=inetOrgPerson)(objectClass=groupOfNames)(objectClass=posixGroup))"
    "(!(employeeType=disabled))(mail=?))",
    # Both kinds of group without memberOf: groupOfNames by the member's DN, posixGroup by its login name.
    "filter.members": "(|(&(objectClass=groupOfNames)(member=?))(&(objectClass=posixGroup)(memberUid={name})))",
}


@pytest.fixture(scope="module")
def auth(slapd: Slapd, module_directories: Directories) -> dict[str, LdapDirectory]:  # noqa: F811
    """One directory on ou=auth per bind.auth.method."""
    return {
        method: module_directories(
            server_keys([slapd.url], AUTH_BASE, **AUTH_FILTERS, **method_keys(method, AUTH_BASE))
        )
        for method in METHODS
    }


def accounts(directory: LdapDirectory) -> AccountService:
    return AccountService(directory, LookupService(directory, LookupConfig()), AuthConfig(), UserdbConfig())


@pytest.mark.parametrize("login", PASSWORDS)
def test_default_method_verifies_slapd_hashes_locally(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, login: str
) -> None:
    service = accounts(auth["default"])
    assert not auth["default"].authenticates_by_bind
    ok = runner.run(service.authenticate(login, PASSWORDS[login], service="imap"))
    assert (ok.status, ok.user) == (AuthStatus.OK, login)
    wrong = runner.run(service.authenticate(login, PASSWORDS[login] + "x", service="imap"))
    assert wrong.status is AuthStatus.FAILED
    assert runner.run(service.authenticate(login, "", service="imap")).status is AuthStatus.FAILED


@pytest.mark.parametrize(("login", "name"), [("alice@auth.example", "alice"), ("DAVE@auth.example", "dave")])
def test_default_method_logs_in_by_address(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, login: str, name: str
) -> None:
    outcome = runner.run(accounts(auth["default"]).authenticate(login, PASSWORDS[name], service="imap"))
    assert (outcome.status, outcome.user) == (AuthStatus.OK, name)


def test_default_method_refuses_a_disabled_account(auth: dict[str, LdapDirectory], runner: asyncio.Runner) -> None:
    outcome = runner.run(accounts(auth["default"]).authenticate("eve", "eve-clear-6Jk", service="imap"))
    assert outcome.status is AuthStatus.FAILED


@pytest.mark.parametrize("method", ["template", "lookup"])
@pytest.mark.parametrize("login", PASSWORDS)
def test_bind_checks_the_password(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, method: str, login: str
) -> None:
    directory = auth[method]
    assert isinstance(directory, BindAuthenticator)
    assert directory.authenticates_by_bind
    principal = runner.run(directory.authenticate_bind(login, PASSWORDS[login]))
    assert principal is not None
    assert principal.name == login
    assert principal.type is PrincipalType.INDIVIDUAL
    assert runner.run(directory.authenticate_bind(login, PASSWORDS[login] + "x")) is None
    assert runner.run(directory.authenticate_bind(login, PASSWORDS[login].upper())) is None


@pytest.mark.parametrize("method", ["template", "lookup"])
@pytest.mark.parametrize("login", PASSWORDS)
def test_account_service_authenticates_by_bind(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, method: str, login: str
) -> None:
    """Through the daemon's AccountService, a bind directory checks the password itself."""
    assert auth[method].verifies_passwords
    service = accounts(auth[method])
    ok = runner.run(service.authenticate(login, PASSWORDS[login], service="smtp"))
    assert (ok.status, ok.user) == (AuthStatus.OK, login)
    wrong = runner.run(service.authenticate(login, PASSWORDS[login] + "x", service="smtp"))
    assert wrong.status is AuthStatus.FAILED
    assert runner.run(service.authenticate(login, "", service="smtp")).status is AuthStatus.FAILED


@pytest.mark.parametrize("method", ["template", "lookup"])
@pytest.mark.parametrize(
    ("login", "password"),
    [
        ("nobody", "alice-ssha-8Pq"),
        ("eve", "eve-clear-6Jk"),  # slapd accepts the bind; the filters exclude the account
        ("staff", "alice-ssha-8Pq"),  # a group cannot log in
        ("devs", ""),
    ],
)
def test_bind_refuses_unknown_disabled_and_groups(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, method: str, login: str, password: str
) -> None:
    assert runner.run(auth[method].authenticate_bind(login, password)) is None


@pytest.mark.parametrize("method", ["template", "lookup"])
@pytest.mark.parametrize("password", ["", "\0", "alice-ssha-8Pq\0"])
def test_an_empty_password_never_binds(
    auth: dict[str, LdapDirectory],
    runner: asyncio.Runner,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    password: str,
) -> None:
    # An LDAP simple bind with a DN and an empty password is an anonymous bind that succeeds: never send one.
    directory = auth[method]
    binds: list[str] = []
    real_connect = directory._connect

    def spy(user: str, secret: str) -> ldap_client.LdapConnection:
        binds.append(user)
        return real_connect(user, secret)

    monkeypatch.setattr(directory, "_connect", spy)
    assert runner.run(directory.authenticate_bind("alice", password)) is None
    assert binds == []
    assert runner.run(directory.authenticate_bind("alice", PASSWORDS["alice"])) is not None
    assert f"uid=alice,ou=people,{AUTH_BASE}" in binds  # the check really is a bind as the user


@pytest.mark.parametrize("method", ["template", "lookup"])
def test_bind_principal_carries_its_groups(auth: dict[str, LdapDirectory], runner: asyncio.Runner, method: str) -> None:
    alice = runner.run(auth[method].authenticate_bind("alice", PASSWORDS["alice"]))
    assert alice is not None
    assert set(alice.member_of) == {"staff", "devs"}  # groupOfNames by DN, posixGroup by memberUid
    assert alice.emails == ("alice@auth.example",)


def test_lookup_bind_logs_in_by_address(auth: dict[str, LdapDirectory], runner: asyncio.Runner) -> None:
    lookup = auth["lookup"]
    dave = runner.run(lookup.authenticate_bind("Dave@AUTH.example", PASSWORDS["dave"]))
    assert dave is not None
    assert dave.name == "dave"
    assert runner.run(lookup.authenticate_bind("dave@auth.example", PASSWORDS["dave"], by_email=False)) is None
    # A template makes a DN of the login as typed: uid=dave@auth.example does not exist.
    assert runner.run(auth["template"].authenticate_bind("dave@auth.example", PASSWORDS["dave"])) is None


def test_template_bind_without_search_reads_the_entry_over_the_pool(
    slapd: Slapd,  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    keys = server_keys([slapd.url], AUTH_BASE, **AUTH_FILTERS, **method_keys("template", AUTH_BASE))
    directory = directories({**keys, "bind.auth.search": False})
    carol = runner.run(directory.authenticate_bind("carol", PASSWORDS["carol"]))
    assert carol is not None
    assert carol.member_of == ("staff",)
    assert runner.run(directory.authenticate_bind("carol", "wrong")) is None


@pytest.mark.parametrize(
    ("address", "members", "senders"),
    [
        ("staff@auth.example", {"alice@auth.example", "carol@auth.example"}, {"alice", "carol"}),  # member: DNs
        ("devs@auth.example", {"alice@auth.example", "dave@auth.example"}, {"alice", "dave"}),  # memberUid: logins
    ],
)
def test_group_kinds_expand_and_send(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, address: str, members: set[str], senders: set[str]
) -> None:
    directory = auth["default"]
    found = runner.run(directory.recipient(address))
    assert isinstance(found, Expansion)
    assert set(found.addresses) == members
    assert set(runner.run(directory.sender_logins(address))) == senders


# Hostile input: escaped everywhere, never a broader match.

HOSTILE_LOGINS = [
    "*",
    "jane*",
    "*ane",
    "j*e",
    "*)(uid=*",
    "jane)(|(uid=*",
    "jane)(uid=*))(|(uid=*",
    "\\2a",
    "jane\\2a",
    "\\6aane",  # \6a is "j"
    "jane\0",
    "\0",
    "jane\\",
    "(uid=jane)",
    "uid=jane,ou=people,ou=contract,dc=example,dc=org",
    "jane,ou=people",
    "jane+cn=Jane Example",
]
HOSTILE_ADDRESSES = [
    "*@example.org",
    "jane*@example.org",
    "*",
    "*@*",
    "jane@*",
    "@*",
    "*)(mail=*",
    "jane@example.org)(mail=*",
    "*)(|(mail=*",
    "jane@example.org\0",
    "\\2a@example.org",
    "sales@example.org)(objectClass=*",
]
HOSTILE_DOMAINS = ["*", "example.*", "*.org", "*org", "org)(mail=*", "example.org)(|(mail=*", "\\2a", "example.org\0"]


@pytest.mark.parametrize("login", HOSTILE_LOGINS)
def test_hostile_logins_match_nothing(contract_directory: LdapDirectory, runner: asyncio.Runner, login: str) -> None:
    assert runner.run(contract_directory.principal(login)) is None


@pytest.mark.parametrize("address", HOSTILE_ADDRESSES)
def test_hostile_addresses_match_nothing(
    contract_directory: LdapDirectory, runner: asyncio.Runner, address: str
) -> None:
    assert runner.run(contract_directory.recipient(address)) is None
    assert runner.run(contract_directory.email_to_names(address)) == ()
    assert runner.run(contract_directory.sender_logins(address)) == ()
    assert runner.run(contract_directory.vrfy(address)) == ()
    assert runner.run(contract_directory.expn(address)) == ()


@pytest.mark.parametrize("domain", HOSTILE_DOMAINS)
def test_hostile_domains_are_not_local(contract_directory: LdapDirectory, runner: asyncio.Runner, domain: str) -> None:
    assert runner.run(contract_directory.is_local_domain(domain)) is False


@pytest.mark.parametrize("method", ["template", "lookup"])
@pytest.mark.parametrize(
    "login", [h.replace("jane", "alice") for h in HOSTILE_LOGINS] + ["al*", "alice@*", "\\61lice", "ALICE*"]
)
def test_hostile_logins_never_bind(
    auth: dict[str, LdapDirectory], runner: asyncio.Runner, method: str, login: str
) -> None:
    assert runner.run(auth[method].authenticate_bind(login, PASSWORDS["alice"])) is None


def test_every_placeholder_is_escaped_address_parts_too() -> None:
    template = Template.parse("(&(uid=?)(a={user})(b={username})(c={email})(d={local})(e={domain}))")
    hostile = "x*)(uid=*\\@y*)(\0"
    filled = template.fill(hostile, escape)
    assert filled == (
        "(&(uid=x\\2a\\29\\28uid=\\2a\\5c@y\\2a\\29\\28\\00)(a=x\\2a\\29\\28uid=\\2a\\5c@y\\2a\\29\\28\\00)"
        "(b=x\\2a\\29\\28uid=\\2a\\5c@y\\2a\\29\\28\\00)(c=x\\2a\\29\\28uid=\\2a\\5c@y\\2a\\29\\28\\00)"
        "(d=x\\2a\\29\\28uid=\\2a\\5c)(e=y\\2a\\29\\28\\00))"
    )
    assert Template.parse("(uid=?)").match_all() == "(uid=*)"
    assert Template.parse("(member=?)", member=True).fill("uid=a\\2Cb,dc=x", escape) == "(member=uid=a\\5c2Cb,dc=x)"


# Faults: a stopped or hung server is a temporary failure, never "not found"; failover; the pool's bounds.

FAST: Overrides = {
    "timeout": "1s",
    "pool.timeout.create": "1s",
    "pool.timeout.wait": "1s",
    "pool.timeout.recycle": "1s",
}


def every_question(directory: LdapDirectory) -> list[Callable[[], Coroutine[Any, Any, object]]]:
    async def listing() -> list[str]:
        return [name async for name in directory.individuals()]

    return [
        lambda: directory.principal("jane"),
        lambda: directory.recipient(JANE),
        lambda: directory.recipient("sales@example.org"),
        lambda: directory.is_local_domain("example.org"),
        lambda: directory.email_to_names(JANE),
        lambda: directory.sender_logins("sales@example.org"),
        lambda: directory.vrfy(JANE),
        lambda: directory.expn("announce@example.org"),
        lambda: directory.authenticate_bind("jane", "jane-password-7Qx"),
        listing,
    ]


def answers_again(runner: asyncio.Runner, directory: LdapDirectory, within: float) -> float:
    """Poll until the directory answers; the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            assert runner.run(directory.principal("jane")) is not None
            return time.monotonic() - start
        except TemporaryFailure:
            if time.monotonic() - start > within:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("method", METHODS)
def test_a_stopped_server_is_a_temporary_failure_until_it_is_back(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
    caplog: pytest.LogCaptureFixture,
    method: str,
) -> None:
    server = slapd_factory()
    directory = directories(server_keys([server.url], CONTRACT_BASE, **FAST, **method_keys(method, CONTRACT_BASE)))
    assert runner.run(directory.principal("jane")) is not None
    server.stop()
    caplog.set_level(logging.DEBUG)
    for question in every_question(directory):
        with pytest.raises(TemporaryFailure) as failed:
            runner.run(question())
        assert "jane-password" not in str(failed.value)
    assert "jane-password" not in caplog.text
    assert SERVICE_PASSWORD not in caplog.text
    server.start()
    assert answers_again(runner, directory, within=2) < 2
    assert runner.run(directory.recipient(JANE)) == Mailbox(("jane",))


@pytest.mark.parametrize("method", METHODS)
def test_a_hung_server_fails_within_the_timeout(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
    method: str,
) -> None:
    server = slapd_factory()
    keys = server_keys([server.url], CONTRACT_BASE, **FAST, **method_keys(method, CONTRACT_BASE))
    warm = directories(keys)
    assert runner.run(warm.principal("jane")) is not None  # an idle pooled connection, to a server about to hang
    cold = directories(keys)  # no connection yet: it will hang in the bind
    server.pause()
    try:
        for directory in (warm, cold):
            questions = every_question(directory)
            # Lookups go through the pool whatever the method: asked once; a password check with each method.
            for question in (questions[0], questions[2], questions[-2]) if method == "default" else questions[-2:-1]:
                start = time.monotonic()
                with pytest.raises(TemporaryFailure):
                    runner.run(question())
                assert time.monotonic() - start < 1.5
    finally:
        server.resume()
    assert answers_again(runner, warm, within=2.5) < 2.5


def test_failover_passes_over_a_dead_url(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    server = slapd_factory()
    directory = directories(server_keys([dead_url(), server.url], CONTRACT_BASE, **FAST))
    start = time.monotonic()
    assert runner.run(directory.principal("jane")) is not None
    assert time.monotonic() - start < 1


def test_failover_between_two_servers_and_back(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    first, second = slapd_factory(), slapd_factory()
    directory = directories(server_keys([first.url, second.url], CONTRACT_BASE, **FAST), retry_after=0.5)
    assert runner.run(directory.principal("jane")) is not None
    assert (first.open_connections(), second.open_connections()) == (1, 0)
    first.stop()
    assert runner.run(directory.principal("jane")) is not None  # no failure at all: the second one answers
    assert second.open_connections() == 1
    first.start()
    second.stop()
    time.sleep(0.6)  # past retry_after: the first server is preferred again
    assert runner.run(directory.principal("jane")) is not None
    assert first.open_connections() == 1


def test_the_pool_never_opens_more_than_max_connections(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    server = slapd_factory()
    directory = directories(server_keys([server.url], CONTRACT_BASE, **{"pool.max-connections": 3}))
    total = "cn=Total,cn=Connections,cn=Monitor"
    before = server.monitor_counter(total)

    async def burst() -> list[object]:
        return await asyncio.gather(*(directory.principal(n) for n in ["jane", "bill", "john.doe", "sales"] * 25))

    assert all(runner.run(burst()))
    assert directory.pool_size <= 3
    # Every connection slapd ever accepted, less the one that asks: the pool opened at most 3 and keeps them.
    assert server.monitor_counter(total) - before - 1 <= 3
    assert server.open_connections() <= 3


def test_waiting_too_long_for_a_connection_is_a_temporary_failure(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
) -> None:
    server = slapd_factory()
    keys = {"timeout": "2s", "pool.max-connections": 1, "pool.timeout.wait": "0.3s", "pool.timeout.recycle": "2s"}
    directory = directories(server_keys([server.url], CONTRACT_BASE, **keys))
    assert runner.run(directory.principal("jane")) is not None

    async def second_waits() -> float:
        first = asyncio.create_task(directory.principal("jane"))  # takes the only connection and hangs
        await asyncio.sleep(0.1)
        start = time.monotonic()
        with pytest.raises(TemporaryFailure, match="pool exhausted"):
            await directory.principal("bill")
        waited = time.monotonic() - start
        with pytest.raises(TemporaryFailure):
            await first
        return waited

    server.pause()
    try:
        assert 0.2 < runner.run(second_waits()) < 1
    finally:
        server.resume()


# TLS.


@pytest.mark.parametrize("form", ["starttls", "ldaps"])
def test_tls_with_an_untrusted_certificate(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    directories: Directories,
    runner: asyncio.Runner,
    form: str,
) -> None:
    server = slapd_factory(tls=True)
    url = server.url if form == "starttls" else server.ldaps_url
    keys = server_keys([url], CONTRACT_BASE, **FAST, **{"tls.enable": form == "starttls"})
    with pytest.raises(TemporaryFailure):  # self-signed: refused unless allowed
        runner.run(directories(keys).principal("jane"))
    trusting = directories({**keys, "tls.allow-invalid-certs": True})
    assert runner.run(trusting.principal("jane")) is not None


# Configuration.


def test_the_openldap_example_is_what_the_tests_load() -> None:
    config = load_config({"bind.secret": "x"})
    assert isinstance(config, LdapDirectoryConfig)
    assert config.url == ["ldap://ldap1.example.org", "ldap://ldap2.example.org"]
    assert config.tls.enable
    assert config.attributes.name == ["uid", "cn"]


def test_the_active_directory_example_loads_and_maps_proxy_addresses() -> None:
    config = load_config({"bind.secret": "x"}, AD_EXAMPLE, "ad")
    assert isinstance(config, LdapDirectoryConfig)
    assert config.bind.auth.method == "lookup"
    assert config.attributes.secret == []
    queries = LdapQueries(config)
    entry = Entry(
        "CN=Jane Example,OU=Staff,DC=corp,DC=example,DC=com",
        {
            "samaccountname": [b"Jane"],
            "objectclass": [b"top", b"person", b"organizationalPerson", b"user"],
            "mail": [b"Jane@Corp.example.com"],
            "proxyaddresses": [b"SMTP:jane@corp.example.com", b"smtp:j.example@corp.example.com", b"X500:/o=Corp/cn=j"],
        },
    )
    principal = queries.principal_of(entry)
    assert principal is not None
    assert (principal.name, principal.type) == ("jane", PrincipalType.INDIVIDUAL)
    assert principal.emails == ("jane@corp.example.com", "j.example@corp.example.com")


def test_a_single_url_and_single_attribute_strings_are_lists() -> None:
    config = load_config({"url": "ldap://127.0.0.1:389", "bind.secret": "x", "attributes.name": "uid"})
    assert config.url == ["ldap://127.0.0.1:389"]
    assert config.attributes.name == ["uid"]


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        ({"filter.name": "(uid=jane)"}, "directory.ldap.filter", "name: the filter has no placeholder"),
        ({"filter.email": "(mail=?"}, "directory.ldap.filter", "email: not a valid LDAP filter"),
        ({"filter.members": "(member={dn})"}, "directory.ldap.filter", "unknown placeholder {dn}"),
        ({"filter.email": "(mail={name})"}, "directory.ldap.filter", "{name} is only a placeholder in filter.members"),
        ({"bind.auth.method": "template"}, "directory.ldap.bind.auth", 'template: required when method = "template"'),
        ({"bind.auth.template": "uid=jane,dc=x"}, "directory.ldap.bind.auth", "template: the DN template has no"),
        ({"url": ["http://ldap.example.org"]}, "directory.ldap", "is not an ldap://HOST"),
        ({"base-dn": "not a dn"}, "directory.ldap", "base-dn: 'not a dn' is not a DN"),
        ({"attributes.email": "mail)(uid=*"}, "directory.ldap.attributes", "is not an attribute name"),
        ({"bind.secret": ""}, "directory.ldap.bind", "secret: empty"),
        ({"filter.list": "(uid=?)"}, "directory.ldap.filter", "list: lists every individual and takes no placeholder"),
        ({"attributes.email-alias": "a b"}, "directory.ldap.attributes", "email-alias: 'a b' is not an attribute"),
    ],
)
def test_configuration_errors_name_their_key(overrides: Overrides, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_config({"bind.secret": "x", **overrides})
    assert any(f"{key}: " in line and message in line for line in raised.value.errors), raised.value.errors


def test_a_bind_dn_needs_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "ldap.toml"
    path.write_text(
        '[storage]\ndirectory = "l"\n'
        '[directory.l]\ntype = "ldap"\nurl = "ldap://x"\nbase-dn = "dc=x"\nbind.dn = "cn=a,dc=x"\n'
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(config_module.DIRECTORY_TYPES, "ldap", CONFIG_CLASS)
        with pytest.raises(ConfigError, match=r"bind: secret: required with bind\.dn"):
            config_module.load_config([path])
