"""The directory contract: one canonical test directory and the answers every backend must give for it.

The directory is written as memory-directory data with Stalwart's keys (``name``, ``class``, ``secret``,
``description``, ``quota``, ``email``, ``email-list``, ``member-of``, ``members``, plus ``enabled``), and a
top-level ``domains`` list. A backend's test module loads :data:`PRINCIPALS` and :data:`DOMAINS` into its own
store (memory config, SQL rows, LDAP entries, the internal directory's import) and subclasses
:class:`DirectoryContract` with a ``directory`` fixture that yields the built
:class:`~mailroster.backends.directory.Directory`::

    class TestSqliteDirectory(DirectoryContract):
        @pytest.fixture
        def directory(self, tmp_path): ...

Directory methods are coroutines; the contract runs each one through the ``run`` fixture, ``asyncio.run`` by
default. A backend whose connections belong to one event loop overrides ``run`` with a runner on that loop.

Keys passed to the directory are already normalised (lower-case, IDNA), as the Directory interface says: the
data below is deliberately mixed-case in places ("John.Doe"), and the backend must answer the lower-cased key.
Answers whose order is not part of the contract (members of an expansion, sender logins) are compared as sets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from mailroster.backends.directory import Directory
from mailroster.backends.model import Expansion, Mailbox, PrincipalType

Run = Callable[[Coroutine[Any, Any, Any]], Any]

DOMAINS: list[str] = ["example.net"]
"""Local domains besides those of the addresses; example.net has no address at all."""

PRINCIPALS: list[dict[str, Any]] = [
    {
        "name": "jane",
        "class": "individual",
        "secret": "{PLAIN}jane-password-7Qx",
        "description": "Jane Example",
        "quota": 1073741824,
        "email": ["jane@example.org", "jane.example@example.org", "jane@example.com"],
        "email-list": ["info@example.org", "announce@example.org"],
        "member-of": ["sales"],
    },
    {
        "name": "John.Doe",
        "class": "individual",
        "secret": ["{PLAIN}john-password-9Kz", "{PLAIN}john-app-password-3Wm"],
        "description": "John Doe",
        "quota": 524288000,
        "email": ["John.Doe@Example.org", "jd@example.org"],
        "email-list": ["announce@example.org"],
        "member-of": ["sales"],
    },
    {
        "name": "bill",
        "class": "individual",
        "secret": "{PLAIN}bill-password-5Rt",
        "description": "Bill Example",
        "email": ["bill@example.org"],
        "email-list": ["info@example.org"],
    },
    {
        "name": "postmaster",
        "class": "individual",
        "secret": "{PLAIN}postmaster-password-2Lp",
        "description": "Postmaster and catch-all",
        "email": ["postmaster@example.org", "@example.org"],
    },
    {
        "name": "sales",
        "class": "group",
        "description": "Sales team",
        "email": ["sales@example.org"],
    },
    {
        "name": "announce",
        "class": "list",
        "description": "Announcements",
        "email": ["announce@example.org"],
        "members": ["partner@external.test"],
    },
    {
        "name": "olduser",
        "class": "individual",
        "secret": "{PLAIN}olduser-password-8Hv",
        "description": "Left the company",
        "email": ["olduser@example.org"],
        "enabled": False,
    },
]

JANE = "jane@example.org"
JOHN = "john.doe@example.org"
BILL = "bill@example.org"
PARTNER = "partner@external.test"


def secrets_of(name: str) -> list[str]:
    """The secrets the data gives ``name`` (a string or a list in Stalwart's syntax)."""
    secret = next(p for p in PRINCIPALS if p["name"] == name).get("secret", [])
    return [secret] if isinstance(secret, str) else list(secret)


class DirectoryContract:
    """What every Directory answers for :data:`PRINCIPALS`. Subclasses provide the ``directory`` fixture."""

    @pytest.fixture
    def run(self) -> Run:
        return asyncio.run

    # principal()

    def test_is_a_directory(self, directory: Directory) -> None:
        assert isinstance(directory, Directory)

    def test_principal_found(self, directory: Directory, run: Run) -> None:
        jane = run(directory.principal("jane"))
        assert jane is not None
        assert jane.name == "jane"
        assert jane.type is PrincipalType.INDIVIDUAL
        assert jane.primary_email == JANE
        assert jane.emails[0] == JANE
        assert set(jane.emails) == {JANE, "jane.example@example.org", "jane@example.com"}
        assert jane.description == "Jane Example"
        assert jane.quota == 1073741824
        assert jane.member_of == ("sales",)
        assert jane.enabled
        assert set(jane.secrets) == set(secrets_of("jane"))

    def test_principal_mixed_case_in_data_is_found_lower_cased(self, directory: Directory, run: Run) -> None:
        john = run(directory.principal("john.doe"))
        assert john is not None
        assert john.name == "john.doe"
        assert john.primary_email == JOHN
        assert set(john.emails) == {JOHN, "jd@example.org"}
        assert john.quota == 524288000
        assert set(john.secrets) == set(secrets_of("John.Doe"))  # several secrets: password and app password

    def test_principal_without_quota(self, directory: Directory, run: Run) -> None:
        bill = run(directory.principal("bill"))
        assert bill is not None
        assert bill.quota is None
        assert bill.member_of == ()

    def test_principal_group_and_list(self, directory: Directory, run: Run) -> None:
        sales = run(directory.principal("sales"))
        assert sales is not None
        assert sales.type is PrincipalType.GROUP
        assert sales.primary_email == "sales@example.org"
        assert sales.secrets == ()
        announce = run(directory.principal("announce"))
        assert announce is not None
        assert announce.type is PrincipalType.LIST
        assert PARTNER in announce.members

    @pytest.mark.parametrize("name", ["nobody", "jane@example.org", "jan", "jane2", ""])
    def test_principal_not_found(self, directory: Directory, run: Run, name: str) -> None:
        assert run(directory.principal(name)) is None

    def test_disabled_principal_cannot_be_used(self, directory: Directory, run: Run) -> None:
        # Either answer is fine for a backend (SQL's name query usually filters `active = true`), but a
        # disabled principal is never handed out as an enabled one.
        old = run(directory.principal("olduser"))
        assert old is None or not old.enabled

    def test_individuals_lists_every_login_and_no_group_or_list(self, directory: Directory, run: Run) -> None:
        async def names() -> list[str]:
            return [name async for name in directory.individuals()]

        listed = set(run(names()))
        assert {"jane", "john.doe", "bill", "postmaster"} <= listed
        assert not listed & {"sales", "announce"}
        assert listed <= {"jane", "john.doe", "bill", "postmaster", "olduser"}

    @pytest.mark.parametrize("name", ["jane", "john.doe", "bill"])
    def test_secrets_not_in_repr(self, directory: Directory, run: Run, name: str) -> None:
        principal = run(directory.principal(name))
        assert principal is not None
        assert principal.secrets
        text = repr(principal)
        for secret in principal.secrets:
            assert secret not in text
        assert "password" not in text

    # recipient()

    @pytest.mark.parametrize(
        ("address", "owner"),
        [
            (JANE, "jane"),
            ("jane.example@example.org", "jane"),
            ("jane@example.com", "jane"),
            (JOHN, "john.doe"),
            ("jd@example.org", "john.doe"),
            (BILL, "bill"),
            ("postmaster@example.org", "postmaster"),
        ],
    )
    def test_recipient_mailbox(self, directory: Directory, run: Run, address: str, owner: str) -> None:
        found = run(directory.recipient(address))
        assert found == Mailbox((owner,))
        if found.primaries is not None:  # a backend that sends primaries along sends the principals' own
            principal = run(directory.principal(owner))
            assert found.primaries == (principal.primary_email,)

    @pytest.mark.parametrize(
        ("address", "members"),
        [
            ("sales@example.org", {JANE, JOHN}),  # group: members by member-of
            ("announce@example.org", {JANE, JOHN, PARTNER}),  # list: email-list carriers plus external members
            ("info@example.org", {JANE, BILL}),  # an email-list address with no principal of its own
        ],
    )
    def test_recipient_expansion(self, directory: Directory, run: Run, address: str, members: set[str]) -> None:
        found = run(directory.recipient(address))
        assert isinstance(found, Expansion)
        assert set(found.addresses) == members
        assert len(found.addresses) == len(members)  # no duplicates

    def test_recipient_catch_all_key(self, directory: Directory, run: Run) -> None:
        assert run(directory.recipient("@example.org")) == Mailbox(("postmaster",))

    @pytest.mark.parametrize(
        "address",
        [
            "nobody@example.org",  # the directory does no catch-all fallback: the caller does
            "jane+tag@example.org",  # nor sub-address stripping
            "@example.com",  # no catch-all for this domain
            "jane@unknown.test",
            PARTNER,  # an external member is not a recipient of ours
            "sales@example.com",
        ],
    )
    def test_recipient_unknown(self, directory: Directory, run: Run, address: str) -> None:
        assert run(directory.recipient(address)) is None

    # is_local_domain()

    @pytest.mark.parametrize("domain", ["example.org", "example.com", "example.net"])
    def test_local_domains(self, directory: Directory, run: Run, domain: str) -> None:
        assert run(directory.is_local_domain(domain)) is True

    @pytest.mark.parametrize("domain", ["unknown.test", "external.test", "org", "sub.example.org", ""])
    def test_not_local_domains(self, directory: Directory, run: Run, domain: str) -> None:
        assert run(directory.is_local_domain(domain)) is False

    # email_to_names()

    @pytest.mark.parametrize(
        ("address", "names"),
        [
            (JANE, ("jane",)),
            ("jane.example@example.org", ("jane",)),
            (JOHN, ("john.doe",)),
            ("jd@example.org", ("john.doe",)),
            ("sales@example.org", ("sales",)),
            ("@example.org", ("postmaster",)),
        ],
    )
    def test_email_to_names(self, directory: Directory, run: Run, address: str, names: tuple[str, ...]) -> None:
        assert run(directory.email_to_names(address)) == names

    @pytest.mark.parametrize("address", ["nobody@example.org", "jane+tag@example.org", PARTNER])
    def test_email_to_names_unknown(self, directory: Directory, run: Run, address: str) -> None:
        assert run(directory.email_to_names(address)) == ()

    # sender_logins()

    @pytest.mark.parametrize(
        ("address", "logins"),
        [
            (JANE, {"jane"}),
            ("jane.example@example.org", {"jane"}),
            ("jd@example.org", {"john.doe"}),
            ("sales@example.org", {"jane", "john.doe"}),  # a group's address: its members
        ],
    )
    def test_sender_logins(self, directory: Directory, run: Run, address: str, logins: set[str]) -> None:
        found = run(directory.sender_logins(address))
        assert set(found) == logins
        assert len(found) == len(logins)

    @pytest.mark.parametrize("address", ["nobody@example.org", "jane@unknown.test", PARTNER])
    def test_sender_logins_unknown(self, directory: Directory, run: Run, address: str) -> None:
        assert run(directory.sender_logins(address)) == ()

    # vrfy() and expn()

    @pytest.mark.parametrize(
        ("address", "primary"),
        [
            (JANE, JANE),
            ("jane.example@example.org", JANE),
            ("jd@example.org", JOHN),
            ("@example.org", "postmaster@example.org"),
        ],
    )
    def test_vrfy(self, directory: Directory, run: Run, address: str, primary: str) -> None:
        assert run(directory.vrfy(address)) == (primary,)

    @pytest.mark.parametrize("address", ["nobody@example.org", "jane@unknown.test"])
    def test_vrfy_unknown(self, directory: Directory, run: Run, address: str) -> None:
        assert run(directory.vrfy(address)) == ()

    @pytest.mark.parametrize(
        ("address", "members"),
        [
            ("sales@example.org", {JANE, JOHN}),
            ("announce@example.org", {JANE, JOHN, PARTNER}),
            ("info@example.org", {JANE, BILL}),
        ],
    )
    def test_expn(self, directory: Directory, run: Run, address: str, members: set[str]) -> None:
        assert set(run(directory.expn(address))) == members

    @pytest.mark.parametrize("address", ["nobody@example.org", JANE])
    def test_expn_not_a_list(self, directory: Directory, run: Run, address: str) -> None:
        assert run(directory.expn(address)) == ()
