"""AccountService: passwords, the auth cache, master users, userdb and passdb records.

A real memory directory behind the real cache (a fake clock moves its time), real password hashes, and the spy on
:func:`secrets.verify` only counts calls. Then the real daemon asked by ``doveadm auth test`` for a master-user
login, and the ``auth`` and ``hash-password`` commands run as a user runs them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import os
import subprocess
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from mailroster.backends import secrets
from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.memory import MemoryDirectory
from mailroster.backends.model import Principal, PrincipalType
from mailroster.backends.outcome import NOT_FOUND, AuthOutcome, AuthStatus, TempFail, UserFields
from mailroster.backends.settings import CacheConfig, CacheTtl, Duration, Secret
from mailroster.daemon.accounts import AccountService
from mailroster.daemon.config import AuthConfig, LookupConfig, MasterUserConfig, UserdbConfig
from mailroster.daemon.lookups import LookupService

from conftest import MAILROSTER, FakeClock, RunningDaemon, require_tool, server_toml
from inprocess import FailingDirectory

Run = Callable[[Coroutine[Any, Any, Any]], Any]

JANE_PW = "Jane-Horse-42"
APP_PW = "phone-app-secret-9"
SLOW_PW = "Slow-Battery-17"
MASTER_PW = "Master-Staple-3"
SHARED_PW = "Shared-Pass-5"
WRONG = "Wrong-Horse-42"

# Hashed once, by the project's own hash_password (SHA512-CRYPT: a real slow hash at doveadm's 5000 rounds).
JANE_HASH = secrets.hash_password(JANE_PW, "SHA512-CRYPT")
APP_SECRET = "$app$phone$" + secrets.hash_password(APP_PW, "SSHA512")
SLOW_HASH = secrets.hash_password(SLOW_PW, "SHA512-CRYPT")
MASTER_HASH = secrets.hash_password(MASTER_PW, "SHA512-CRYPT")
SHARED_HASH = secrets.hash_password(SHARED_PW, "SSHA256")

POSITIVE_TTL = 60.0
NEGATIVE_TTL = 10.0
FAILED = AuthOutcome(AuthStatus.FAILED)
MASTER = MasterUserConfig(user="admin", secret=Secret(MASTER_HASH))

PRINCIPALS = [
    Principal(
        "jane",
        secrets=(JANE_HASH, APP_SECRET),
        emails=("jane@example.org", "j.doe@example.org"),
        quota=2 << 30,
    ),
    Principal("slow", secrets=(SLOW_HASH,), emails=("slow@example.org",)),
    Principal("off", secrets=(JANE_HASH,), emails=("off@example.org",), enabled=False),
    Principal("nosecret", emails=("nosecret@example.org",)),
    Principal("bob", secrets=(SHARED_HASH,), emails=("bob@example.org", "shared@example.org")),
    Principal("carol", secrets=(SHARED_HASH,), emails=("carol@example.org", "shared@example.org")),
    Principal("team", type=PrincipalType.GROUP, secrets=(SHARED_HASH,), emails=("team@example.org",)),
    Principal("news", type=PrincipalType.LIST, secrets=(SHARED_HASH,), emails=("news@example.org",)),
    Principal("apponly", secrets=(APP_SECRET,), emails=("apponly@example.org",)),
    # An app password first, then Stalwart's untagged crypt form and a plaintext one.
    Principal("mixed", secrets=(APP_SECRET, JANE_HASH.removeprefix("{SHA512-CRYPT}"), "plain-text-pw")),
    Principal("plain", secrets=("plain-text-pw",), emails=("plain@example.org",)),
    Principal("local-only"),  # no address: {local} is its name, {domain} empty
]


@dataclasses.dataclass
class Setup:
    accounts: AccountService
    cache: CachedDirectory | None
    clock: FakeClock


def memory() -> MemoryDirectory:
    return MemoryDirectory(PRINCIPALS)


def build(
    auth: AuthConfig | None = None,
    userdb: UserdbConfig | None = None,
    *,
    inner: Directory | None = None,
    cached: bool = True,
    entries: int = 1000,
) -> Setup:
    """An AccountService over the memory directory (or ``inner``), behind a CachedDirectory unless ``cached`` is off."""
    clock = FakeClock()
    backend = inner if inner is not None else memory()
    cache = None
    directory: Directory = backend
    if cached:
        ttl = CacheTtl(positive=Duration(POSITIVE_TTL), negative=Duration(NEGATIVE_TTL))
        cache = CachedDirectory(backend, CacheConfig(entries=entries, ttl=ttl), clock=clock)
        directory = cache
    service = AccountService(
        directory, LookupService(directory, LookupConfig()), auth or AuthConfig(), userdb or UserdbConfig()
    )
    return Setup(service, cache, clock)


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


@pytest.fixture
def run(runner: asyncio.Runner) -> Run:
    return runner.run


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stored secrets ``secrets.verify`` was asked to check, in order (the real function still checks them)."""
    calls: list[str] = []
    real = secrets.verify

    async def spy(secret: str, password: str) -> bool:
        calls.append(secret)
        return await real(secret, password)

    monkeypatch.setattr(secrets, "verify", spy)
    return calls


def login(run: Run, setup: Setup, user: str, password: str, authzid: str = "") -> AuthOutcome:
    outcome: AuthOutcome = run(setup.accounts.authenticate(user, password, service="imap", authzid=authzid))
    return outcome


def ok(user: str) -> AuthOutcome:
    return AuthOutcome(AuthStatus.OK, user=user)


# authenticate(): passwords.


def test_good_password_logs_in_as_the_canonical_name(run: Run) -> None:
    setup = build()
    assert login(run, setup, "jane", JANE_PW) == ok("jane")
    assert login(run, setup, "JaNe", JANE_PW) == ok("jane")
    assert login(run, setup, "Slow", SLOW_PW) == ok("slow")


def test_wrong_password_unknown_user_and_no_secret_are_the_same_failure(run: Run) -> None:
    setup = build()
    outcomes = [
        login(run, setup, "jane", WRONG),
        login(run, setup, "jane", JANE_PW.lower()),  # the password is case-sensitive
        login(run, setup, "jane", ""),
        login(run, setup, "nobody", JANE_PW),
        login(run, setup, "nobody@example.org", JANE_PW),
        login(run, setup, "nosecret", ""),
        login(run, setup, "nosecret", JANE_PW),
        login(run, setup, "", JANE_PW),
    ]
    assert outcomes == [FAILED] * len(outcomes)  # no user name, no reason: nothing tells them apart


@pytest.mark.parametrize("user", ["jane@example.org", "JANE@Example.ORG", "j.doe@example.org"])
def test_login_by_address_and_alias(run: Run, user: str) -> None:
    assert login(run, build(), user, JANE_PW) == ok("jane")
    assert login(run, build(), user, WRONG) == FAILED


def test_login_by_address_is_refused_when_off(run: Run) -> None:
    setup = build(AuthConfig(login_by_email=False))
    assert login(run, setup, "jane@example.org", JANE_PW) == FAILED
    assert login(run, setup, "j.doe@example.org", JANE_PW) == FAILED
    assert login(run, setup, "jane", JANE_PW) == ok("jane")


def test_an_address_shared_by_two_principals_logs_in_nobody(run: Run) -> None:
    setup = build()
    assert login(run, setup, "shared@example.org", SHARED_PW) == FAILED
    assert login(run, setup, "bob@example.org", SHARED_PW) == ok("bob")
    assert login(run, setup, "carol", SHARED_PW) == ok("carol")


@pytest.mark.parametrize("user", ["team", "team@example.org", "news", "News@example.org"])
def test_groups_and_lists_cannot_log_in(run: Run, user: str) -> None:
    assert login(run, build(), user, SHARED_PW) == FAILED


def test_malformed_address_login_fails_quietly(run: Run) -> None:
    setup = build()
    for user in ("@", "jane@", "@example.org", "a@b@c", "jane@exa mple.org"):
        assert login(run, setup, user, JANE_PW) == FAILED, user


def test_disabled_principal_is_disabled_only_with_the_right_password(run: Run) -> None:
    setup = build()
    assert login(run, setup, "off", JANE_PW) == AuthOutcome(AuthStatus.DISABLED, user="off")
    assert login(run, setup, "off@example.org", JANE_PW) == AuthOutcome(AuthStatus.DISABLED, user="off")
    assert login(run, setup, "off", WRONG) == FAILED == login(run, setup, "nobody", WRONG)


def test_every_secret_is_tried_main_and_app_passwords(run: Run) -> None:
    setup = build()
    assert login(run, setup, "jane", JANE_PW) == ok("jane")
    assert login(run, setup, "jane", APP_PW) == ok("jane")
    assert login(run, setup, "apponly", APP_PW) == ok("apponly")
    assert login(run, setup, "mixed", JANE_PW) == ok("mixed")  # untagged $6$ after an app password
    assert login(run, setup, "mixed", "plain-text-pw") == ok("mixed")  # untagged plaintext
    assert login(run, setup, "mixed", APP_PW) == ok("mixed")
    assert login(run, setup, "apponly", JANE_PW) == FAILED
    # An app password is the password, not "$app$phone$" plus it, nor its stored hash.
    assert login(run, setup, "apponly", APP_SECRET) == FAILED
    assert login(run, setup, "jane", JANE_HASH) == FAILED


@pytest.mark.parametrize(("user", "password"), [("jane", "ab\udcff"), ("ja\udcffne", JANE_PW)])
def test_undecodable_credentials_fail_rather_than_raise(run: Run, user: str, password: str) -> None:
    # backends.secrets takes such passwords (surrogateescape); the CLI reads them so from stdin in a C.UTF-8 locale.
    assert login(run, build(), user, password) == FAILED


def test_mechanisms_come_from_the_configuration() -> None:
    assert tuple(build().accounts.mechanisms()) == ("PLAIN", "LOGIN")
    assert tuple(build(AuthConfig(mechanisms=["PLAIN", "CRAM-MD5"])).accounts.mechanisms()) == ("PLAIN", "CRAM-MD5")


def test_cram_md5_checks_plaintext_secrets_only(run: Run) -> None:
    challenge = b"<1896.697170952@postoffice.example.net>"

    def digest(password: str) -> bytes:
        return hmac.new(password.encode(), challenge, hashlib.md5).digest()

    off = Principal("offplain", secrets=("plain-text-pw",), enabled=False)
    accounts = build(inner=MemoryDirectory([*PRINCIPALS, off])).accounts

    def cram(user: str, password: str) -> AuthOutcome:
        outcome: AuthOutcome = run(accounts.cram_md5(user, challenge, digest(password), service="smtp"))
        return outcome

    assert cram("Plain", "plain-text-pw") == ok("plain")
    assert cram("plain@example.org", "plain-text-pw") == ok("plain")
    assert cram("mixed", "plain-text-pw") == ok("mixed")  # the plaintext among its secrets
    assert cram("offplain", "plain-text-pw") == AuthOutcome(AuthStatus.DISABLED, user="offplain")
    failures = [
        cram("plain", WRONG),
        cram("offplain", WRONG),
        cram("jane", JANE_PW),  # a one-way hash cannot answer a challenge
        cram("nobody", "plain-text-pw"),
        cram("team", SHARED_PW),
    ]
    assert failures == [FAILED] * len(failures)


def test_scram_credentials_come_from_plaintext_secrets(run: Run) -> None:
    accounts = build().accounts
    outcome, credentials = run(accounts.scram_credentials("PLAIN", "SHA-256", service="imap"))
    assert outcome == ok("plain")
    assert credentials == secrets.scram_credentials("plain-text-pw", "SHA-256", user="plain")
    for user in ("jane", "nobody", "team"):
        assert run(accounts.scram_credentials(user, "SHA-256", service="imap")) == (FAILED, None), user


# Backend faults.


@pytest.mark.parametrize("cached", [True, False])
def test_backend_fault_is_tempfail_everywhere(run: Run, cached: bool) -> None:
    setup = build(AuthConfig(master=MASTER), inner=FailingDirectory(), cached=cached)
    accounts = setup.accounts
    for user, password, authzid in [
        ("jane", JANE_PW, ""),
        ("jane", WRONG, ""),
        ("jane@example.org", JANE_PW, ""),
        ("nobody", JANE_PW, ""),
        ("jane*admin", MASTER_PW, ""),
        ("admin", MASTER_PW, "jane"),
    ]:
        outcome = login(run, setup, user, password, authzid)
        assert outcome.status is AuthStatus.TEMPFAIL, (user, outcome)
        assert outcome.reason == "backend unavailable"
        assert password not in repr(outcome)
        assert outcome.user == ""
    for user in ("jane", "jane@example.org", "nobody"):
        cram = run(accounts.cram_md5(user, b"<1.2@x>", bytes(16), service="smtp"))
        assert cram == AuthOutcome(AuthStatus.TEMPFAIL, reason="backend unavailable")
        scram = run(accounts.scram_credentials(user, "SHA-256", service="imap"))
        assert scram == (AuthOutcome(AuthStatus.TEMPFAIL, reason="backend unavailable"), None)
        assert run(accounts.userdb(user)) == TempFail("backend unavailable")
        assert run(accounts.passdb(user, with_password=True)) == TempFail("backend unavailable")
        assert run(accounts.passdb(user, with_password=False)) == TempFail("backend unavailable")


def test_backend_down_after_the_ttl_serves_known_users_stale_never_failed(run: Run) -> None:
    """The cache's promise, seen through logins: an expired record is served while the backend is down; an
    unknown user, whose "not found" expired, is a temporary failure rather than a wrong password."""
    backend = FailingDirectory(memory())
    backend.down = False
    setup = build(inner=backend)
    assert login(run, setup, "jane", JANE_PW) == ok("jane")
    assert login(run, setup, "nobody", JANE_PW) == FAILED
    setup.clock.advance(POSITIVE_TTL + 1)
    backend.down = True
    assert login(run, setup, "jane", JANE_PW) == ok("jane")
    assert login(run, setup, "jane", WRONG) == FAILED  # the stale record's hash still decides
    assert login(run, setup, "nobody", JANE_PW).status is AuthStatus.TEMPFAIL


# Master user.


def test_master_user_logs_in_as_the_target(run: Run, verified: list[str]) -> None:
    setup = build(AuthConfig(master=MASTER))
    assert login(run, setup, "jane*admin", MASTER_PW) == ok("jane")
    assert login(run, setup, "JANE*Admin", MASTER_PW) == ok("jane")
    assert login(run, setup, "j.doe@example.org*admin", MASTER_PW) == ok("jane")
    assert login(run, setup, "admin", MASTER_PW, authzid="jane") == ok("jane")  # SASL PLAIN authzid
    assert login(run, setup, "admin", MASTER_PW, authzid="jane@example.org") == ok("jane")
    assert verified == [MASTER_HASH] * 5  # the master's secret, never jane's
    # An authzid equal to the login asks for nothing: an ordinary login.
    assert login(run, setup, "jane", JANE_PW, authzid="Jane") == ok("jane")


def test_master_user_refusals(run: Run) -> None:
    setup = build(AuthConfig(master=MASTER))
    assert login(run, setup, "jane*admin", WRONG) == FAILED
    assert login(run, setup, "jane*admin", JANE_PW) == FAILED  # the target's own password is not the master's
    assert login(run, setup, "admin", WRONG, authzid="jane") == FAILED
    assert login(run, setup, "jane*other", MASTER_PW) == FAILED
    assert login(run, setup, "jane", MASTER_PW, authzid="bob") == FAILED  # jane is no master
    assert login(run, setup, "admin", MASTER_PW) == FAILED  # the master user is no principal
    assert login(run, setup, "nobody*admin", MASTER_PW) == FAILED
    assert login(run, setup, "team*admin", MASTER_PW) == FAILED
    assert login(run, setup, "shared@example.org*admin", MASTER_PW) == FAILED
    assert login(run, setup, "*admin", MASTER_PW) == FAILED
    assert login(run, setup, "off*admin", MASTER_PW) == AuthOutcome(AuthStatus.DISABLED, user="off")
    assert login(run, setup, "off*admin", WRONG) == FAILED
    assert login(run, setup, "admin", MASTER_PW, authzid="off") == AuthOutcome(AuthStatus.DISABLED, user="off")
    # Ordinary logins still work beside the master.
    assert login(run, setup, "jane", JANE_PW) == ok("jane")


def test_without_a_master_a_separator_is_part_of_an_ordinary_login(run: Run) -> None:
    odd = Principal("odd*name", secrets=(JANE_HASH,))
    setup = build(inner=MemoryDirectory([*PRINCIPALS, odd]))
    assert login(run, setup, "jane*admin", MASTER_PW) == FAILED
    assert login(run, setup, "jane*admin", JANE_PW) == FAILED
    assert login(run, setup, "admin", MASTER_PW, authzid="jane") == FAILED
    assert login(run, setup, "odd*name", JANE_PW) == ok("odd*name")


def test_another_master_separator(run: Run) -> None:
    setup = build(AuthConfig(master=MASTER, master_separator="%"))
    assert login(run, setup, "jane%admin", MASTER_PW) == ok("jane")
    assert login(run, setup, "jane*admin", MASTER_PW) == FAILED  # now an ordinary login of "jane*admin"
    assert login(run, setup, "jane%admin", WRONG) == FAILED


def test_master_logins_are_never_cached(run: Run, verified: list[str]) -> None:
    setup = build(AuthConfig(master=MASTER))
    for _ in range(3):
        assert login(run, setup, "jane*admin", MASTER_PW) == ok("jane")
    assert verified == [MASTER_HASH] * 3


# The auth cache.


def test_successful_login_is_verified_once_then_cached(run: Run, verified: list[str]) -> None:
    setup = build()
    for _ in range(5):
        assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH]


def test_login_case_variants_share_the_cached_entry(run: Run, verified: list[str]) -> None:
    setup = build()
    for user in ("slow", "SLOW", "Slow", "sLoW"):
        assert login(run, setup, user, SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH]
    assert login(run, setup, "slow", SLOW_PW.upper()) == FAILED  # the password's case is not folded
    assert verified == [SLOW_HASH] * 2


def test_cached_login_expires_with_the_positive_ttl(run: Run, verified: list[str]) -> None:
    setup = build()
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    setup.clock.advance(POSITIVE_TTL - 1)
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH]
    setup.clock.advance(2)
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH] * 2
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")  # cached afresh
    assert verified == [SLOW_HASH] * 2


def test_failed_logins_are_never_cached(run: Run, verified: list[str]) -> None:
    setup = build()
    assert login(run, setup, "slow", WRONG) == FAILED
    assert login(run, setup, "slow", WRONG) == FAILED
    assert verified == [SLOW_HASH] * 2
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert login(run, setup, "slow", WRONG) == FAILED  # a cached success lets no other password in
    assert verified == [SLOW_HASH] * 4
    assert setup.cache is not None
    assert setup.cache.stats().negative_entries == 0  # not even as a "not found"


def test_a_disabled_login_is_never_cached(run: Run, verified: list[str]) -> None:
    setup = build()
    for _ in range(2):
        assert login(run, setup, "off", JANE_PW) == AuthOutcome(AuthStatus.DISABLED, user="off")
    assert verified == [JANE_HASH] * 2


def test_flush_forgets_cached_logins(run: Run, verified: list[str]) -> None:
    setup = build()
    assert setup.cache is not None
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    setup.cache.flush()
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH] * 2


@pytest.mark.parametrize("variant", ["no cache", "cache of 0 entries"])
def test_without_a_cache_every_login_verifies(run: Run, verified: list[str], variant: str) -> None:
    setup = build(cached=False) if variant == "no cache" else build(entries=0)
    for _ in range(3):
        assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert verified == [SLOW_HASH] * 3


def _entries(cache: CachedDirectory) -> list[tuple[tuple[str, Any], Any]]:
    """Every (key, value) in the cache's positive and negative stores (its internals: what memory holds)."""
    stores = (cache._positive, cache._negative)
    return [(key, value) for store in stores for key, (_, value) in store.items()]


def _text(value: Any) -> str:
    """Everything a cached value holds, secrets included (Principal's repr hides them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return repr(dataclasses.astuple(value))
    return repr(value)


def test_the_cache_holds_neither_the_password_nor_a_reusable_hash(run: Run) -> None:
    setup = build()
    assert setup.cache is not None
    assert login(run, setup, "slow", SLOW_PW) == ok("slow")
    assert login(run, setup, "slow@example.org", SLOW_PW) == ok("slow")
    entries = _entries(setup.cache)
    auth = [(key, value) for key, value in entries if key[0] == "auth"]
    assert len(auth) == 2
    assert all(value == "slow" for _, value in auth)  # the name: nothing of the password or the hash
    digests = [
        hashlib.sha256(SLOW_PW.encode()).digest(),
        hashlib.blake2b(SLOW_PW.encode(), digest_size=16).digest(),
        hashlib.blake2b(f"slow\0{SLOW_PW}".encode(), digest_size=16).digest(),
    ]
    unkeyed = {*digests, *(d.hex() for d in digests)}  # what an unkeyed hash would make, raw or in hex
    for (_, key), _ in auth:
        assert key not in unkeyed
        raw = key if isinstance(key, bytes) else str(key).encode()
        assert SLOW_PW.encode() not in raw and SLOW_HASH.encode() not in raw
    for key, value in entries:
        text = repr(key) + _text(value)
        assert SLOW_PW not in text and repr(SLOW_PW.encode()) not in text, key
    # The stored hash sits only in the directory's own record of the principal, as the backend holds it.
    assert [key for key, value in entries if SLOW_HASH in _text(value)] == [("principal", "slow")]


def test_the_cache_key_is_drawn_at_start_up(run: Run, verified: list[str]) -> None:
    """Two services (two starts) over one cache neither share nor can predict each other's entries."""
    first = build()
    assert first.cache is not None
    second = AccountService(first.cache, LookupService(first.cache, LookupConfig()), AuthConfig(), UserdbConfig())
    assert login(run, first, "slow", SLOW_PW) == ok("slow")
    assert run(second.authenticate("slow", SLOW_PW, service="imap")) == ok("slow")
    assert verified == [SLOW_HASH] * 2
    assert len({key for key, _ in _entries(first.cache) if key[0] == "auth"}) == 2


# userdb and passdb.

USERDB = UserdbConfig(
    uid="5000",
    gid="{domain}",
    home="/srv/vmail/{domain}/{local}",
    mail="maildir:~/{name}",
    extra={"sieve": "/srv/sieve/{user}.sieve", "acl_groups": "{domain}"},
)


def test_userdb_fills_in_the_templates(run: Run) -> None:
    accounts = build(userdb=USERDB).accounts
    assert run(accounts.userdb("J.Doe@Example.org")) == UserFields(
        "jane",
        (
            ("uid", "5000"),
            ("gid", "example.org"),
            ("home", "/srv/vmail/example.org/jane"),  # the primary address, whichever was given
            ("mail", "maildir:~/jane"),
            ("quota_rule", "*:bytes=2147483648"),
            ("sieve", "/srv/sieve/J.Doe@Example.org.sieve"),  # {user}: the login as given
            ("acl_groups", "example.org"),
        ),
    )


def test_userdb_leaves_empty_results_out(run: Run) -> None:
    accounts = build(userdb=USERDB).accounts
    assert run(accounts.userdb("local-only")) == UserFields(
        "local-only",
        (
            ("uid", "5000"),
            ("home", "/srv/vmail//local-only"),
            ("mail", "maildir:~/local-only"),
            ("sieve", "/srv/sieve/local-only.sieve"),
        ),
    )
    assert run(build().accounts.userdb("slow")) == UserFields("slow", ())  # no templates, no quota: no fields


def test_userdb_quota_rule_template_wins_over_the_quota(run: Run) -> None:
    accounts = build(userdb=UserdbConfig(quota_rule="*:storage=1G:{name}")).accounts
    assert run(accounts.userdb("jane")) == UserFields("jane", (("quota_rule", "*:storage=1G:jane"),))
    assert run(accounts.userdb("slow")) == UserFields("slow", (("quota_rule", "*:storage=1G:slow"),))


@pytest.mark.parametrize("user", ["nobody", "nobody@example.org", "off", "off@example.org", "team", "news"])
def test_userdb_and_passdb_do_not_find_unknown_disabled_groups_and_lists(run: Run, user: str) -> None:
    accounts = build(userdb=USERDB).accounts
    assert run(accounts.userdb(user)) is NOT_FOUND
    assert run(accounts.passdb(user, with_password=True)) is NOT_FOUND
    assert run(accounts.passdb(user, with_password=False)) is NOT_FOUND


def test_cached_userdb_answers_as_userdb_does(run: Run) -> None:
    setup = build(userdb=USERDB)
    accounts = setup.accounts
    assert accounts.cached_userdb("jane") is None  # nothing cached yet
    for user in ("jane", "Jane", "off", "team"):
        full = run(accounts.userdb(user))
        assert accounts.cached_userdb(user) == full, user
    assert accounts.cached_userdb("JANE") == run(accounts.userdb("JANE"))
    run(accounts.userdb("jane@example.org"))
    assert accounts.cached_userdb("jane@example.org") is None  # by address: the full path
    run(accounts.userdb("nobody"))
    assert accounts.cached_userdb("nobody") is None
    assert build(cached=False).accounts.cached_userdb("jane") is None


def test_passdb_hands_dovecot_a_tagged_password_never_an_app_password(run: Run) -> None:
    accounts = build().accounts
    assert run(accounts.passdb("J.Doe@example.org", with_password=True)) == UserFields(
        "jane", (("password", JANE_HASH),)
    )
    assert run(accounts.passdb("jane", with_password=False)) == UserFields("jane", ())
    mixed = run(accounts.passdb("mixed", with_password=True))
    assert mixed == UserFields("mixed", (("password", JANE_HASH),))  # untagged $6$ given its tag
    assert run(accounts.passdb("plain", with_password=True)) == UserFields(
        "plain", (("password", "{PLAIN}plain-text-pw"),)
    )
    assert run(accounts.passdb("apponly", with_password=True)) is NOT_FOUND  # never "nopassword", never the app one
    assert run(accounts.passdb("apponly", with_password=False)) == UserFields("apponly", ())
    assert run(accounts.passdb("nosecret", with_password=True)) is NOT_FOUND


def test_passdb_password_is_readable_by_dovecot(run: Run) -> None:
    doveadm = require_tool("doveadm")
    accounts = build().accounts
    for user, password in (("jane", JANE_PW), ("mixed", JANE_PW), ("plain", "plain-text-pw")):
        outcome = run(accounts.passdb(user, with_password=True))
        assert isinstance(outcome, UserFields)
        stored = dict(outcome.fields)["password"]
        checked = subprocess.run(
            [doveadm, "-c", "/dev/null", "pw", "-t", stored, "-p", password], capture_output=True, text=True, timeout=30
        )
        assert checked.returncode == 0, (user, checked.stdout + checked.stderr)
        assert "(verified)" in checked.stdout


def test_users_lists_the_individuals(run: Run) -> None:
    async def collect(accounts: AccountService) -> list[str]:
        return [name async for name in accounts.users()]

    names = run(collect(build().accounts))
    assert sorted(names) == sorted(p.name for p in PRINCIPALS if p.type is PrincipalType.INDIVIDUAL)


# The real daemon and doveadm.

DAEMON_CONFIG = (
    server_toml({"auth": "dovecot-auth"})
    + """
[auth]
failure-delay = "0s"
master = { user = "admin", secret = %(master)s }
[storage]
directory = "main"
[directory.main]
type = "memory"
[[directory.main.principals]]
name = "jane"
email = ["jane@example.org"]
secret = %(jane)s
[[directory.main.principals]]
name = "off"
secret = %(jane)s
enabled = false
"""
)


def doveadm_pw(doveadm: str, scheme: str, password: str) -> str:
    result = subprocess.run(
        [doveadm, "-c", "/dev/null", "pw", "-s", scheme, "-p", password], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_doveadm_master_user_login_through_the_daemon(daemon_factory: Callable[..., RunningDaemon]) -> None:
    doveadm = require_tool("doveadm")
    master = doveadm_pw(doveadm, "SHA512-CRYPT", MASTER_PW)
    jane = doveadm_pw(doveadm, "ARGON2ID", JANE_PW)
    daemon = daemon_factory(
        DAEMON_CONFIG % {"master": json.dumps(master), "jane": json.dumps(jane)}, wait_for=("auth",)
    )

    def auth_test(user: str, password: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [doveadm, "-c", "/dev/null", "auth", "test", "-a", daemon.socket("auth"), user, password],
            capture_output=True,
            text=True,
            timeout=60,
        )

    good = auth_test("jane*admin", MASTER_PW)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "  user=jane\n" in good.stdout
    by_address = auth_test("jane@example.org*admin", MASTER_PW)
    assert by_address.returncode == 0, by_address.stdout + by_address.stderr
    assert "  user=jane\n" in by_address.stdout
    for user, password in [("jane*admin", WRONG), ("jane*admin", JANE_PW), ("off*admin", MASTER_PW)]:
        bad = auth_test(user, password)
        assert bad.returncode == 77, (user, bad.stdout + bad.stderr)
        assert "  user=jane\n" not in bad.stdout  # doveadm echoes the login as user=jane*admin
    assert auth_test("jane", JANE_PW).returncode == 0
    assert daemon.stop() == 0
    log = daemon.log()
    assert MASTER_PW not in log and JANE_PW not in log and master not in log


# The command line.


def mailroster(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILROSTER, *args], input=stdin, capture_output=True, text=True, timeout=60)


CLI_CONFIG = f"""
[storage]
directory = "main"
[auth]
master = {{ user = "admin", secret = {json.dumps(MASTER_HASH)} }}
[directory.main]
type = "memory"
[[directory.main.principals]]
name = "Jane"
email = ["jane@example.org"]
secret = [{json.dumps(JANE_HASH)}, {json.dumps(APP_SECRET)}]
[[directory.main.principals]]
name = "off"
secret = {json.dumps(JANE_HASH)}
enabled = false
"""


@pytest.fixture
def cli_config(tmp_path: Path) -> Path:
    (tmp_path / "mailroster.toml").write_text(CLI_CONFIG)
    return tmp_path


@pytest.mark.parametrize(
    ("user", "password"),
    [("jane", JANE_PW), ("JANE@example.org", JANE_PW), ("jane", APP_PW), ("jane*admin", MASTER_PW)],
)
def test_cli_auth_success(cli_config: Path, user: str, password: str) -> None:
    result = mailroster("auth", "-c", str(cli_config), user, stdin=password + "\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "authenticated as jane\n", "")


def test_cli_auth_failures_look_alike(cli_config: Path) -> None:
    results = [
        mailroster("auth", "-c", str(cli_config), user, stdin=password + "\n")
        for user, password in [
            ("jane", WRONG),
            ("nobody", JANE_PW),
            ("off", JANE_PW),
            ("off", WRONG),
            ("jane*admin", WRONG),
            ("jane", JANE_PW + " "),  # only one trailing newline is dropped, not spaces
        ]
    ]
    for result in results:
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "authentication failed\n")


def test_cli_auth_password_that_is_not_utf8_fails_cleanly(cli_config: Path) -> None:
    result = subprocess.run(
        [MAILROSTER, "auth", "-c", str(cli_config), "jane"],
        input=b"ab\xff\n",
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONUTF8": "1"},  # stdin decodes with surrogateescape, whatever the locale
    )
    assert (result.returncode, result.stdout, result.stderr) == (1, b"", b"authentication failed\n")


def test_cli_auth_temporary_failure(tmp_path: Path) -> None:
    """An internal directory whose state directory cannot be made (a file stands in its way): the SQLite store
    cannot open its database, a TemporaryFailure, so exit 75, not "wrong password"."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    (tmp_path / "c.toml").write_text(
        f"[server]\nstate-dir = {json.dumps(str(blocker / 'state'))}\n"
        '[storage]\ndirectory = "main"\n'
        '[store.db]\ntype = "sqlite"\npath = "directory.sqlite3"\n'
        '[directory.main]\ntype = "internal"\nstore = "db"\n'
    )
    result = mailroster("auth", "-c", str(tmp_path / "c.toml"), "jane", stdin=JANE_PW + "\n")
    assert result.returncode == 75, result.stdout + result.stderr
    assert result.stderr.startswith("temporary failure: ")
    assert JANE_PW not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "tag"),
    [
        ((), "{ARGON2ID}$argon2id$"),
        (("--scheme", "SHA512-CRYPT"), "{SHA512-CRYPT}$6$"),
        (("--scheme", "ssha512"), "{SSHA512}"),
    ],
)
def test_cli_hash_password(args: tuple[str, ...], tag: str) -> None:
    result = mailroster("hash-password", *args, stdin=JANE_PW + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
    stored = result.stdout.strip()
    assert stored.startswith(tag)
    assert JANE_PW not in result.stdout
    assert secrets.verify_sync(stored, JANE_PW)  # the trailing newline was not hashed
    assert not secrets.verify_sync(stored, JANE_PW + "\n")
    assert not secrets.verify_sync(stored, WRONG)


def test_cli_hash_password_refusals() -> None:
    empty = mailroster("hash-password", stdin="\n")
    assert (empty.returncode, empty.stdout) == (64, "")
    assert "empty password" in empty.stderr
    unknown = mailroster("hash-password", "--scheme", "NO-SUCH-SCHEME", stdin=JANE_PW + "\n")
    assert (unknown.returncode, unknown.stdout) == (64, "")
    assert unknown.stderr.startswith("error: ")
    assert JANE_PW not in unknown.stderr
