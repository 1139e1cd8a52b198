"""The memory directory: the directory contract, plus what is particular to building it from configuration."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mailroster.backends.memory import MemoryDirectory, MemoryDirectoryConfig, MemoryPrincipalConfig
from mailroster.backends.model import Expansion, Mailbox
from mailroster.backends.settings import Size

from contract import DOMAINS, PRINCIPALS, DirectoryContract

# Stalwart's TOML keys -> MemoryPrincipalConfig fields.
_FIELDS = {"class": "class_", "email-list": "email_list", "member-of": "member_of"}


def principal_config(entry: dict[str, Any]) -> MemoryPrincipalConfig:
    """One ``[[principals]]`` table as the TOML loader would turn it into a config dataclass."""
    fields = {_FIELDS.get(key, key): value for key, value in entry.items()}
    if isinstance(fields.get("secret"), str):
        fields["secret"] = [fields["secret"]]
    if fields.get("quota") is not None:
        fields["quota"] = Size.parse(fields["quota"])
    for key in ("secret", "email", "email_list", "member_of", "members"):
        if key in fields:
            fields[key] = list(fields[key])
    return MemoryPrincipalConfig(**fields)


def memory_directory(principals: list[dict[str, Any]], domains: list[str] = ()) -> MemoryDirectory:  # type: ignore[assignment]
    config = MemoryDirectoryConfig(
        type="memory", principals=[principal_config(p) for p in principals], domains=list(domains)
    )
    return MemoryDirectory.from_config(config)


class TestMemoryDirectoryContract(DirectoryContract):
    @pytest.fixture
    def directory(self) -> MemoryDirectory:
        return memory_directory(PRINCIPALS, DOMAINS)


# Particular to the memory directory.


def test_disabled_principal_is_kept_with_enabled_false() -> None:
    directory = memory_directory(PRINCIPALS, DOMAINS)
    old = asyncio.run(directory.principal("olduser"))
    assert old is not None
    assert not old.enabled
    assert asyncio.run(directory.sender_logins("olduser@example.org")) == ()


def test_answers_never_suspend() -> None:
    directory = memory_directory(PRINCIPALS, DOMAINS)
    coro = directory.recipient("sales@example.org")
    with pytest.raises(StopIteration) as finished:
        coro.send(None)
    assert isinstance(finished.value.value, Expansion)


def test_quota_written_as_size_string() -> None:
    directory = memory_directory([{"name": "q", "email": ["q@example.org"], "quota": "500M"}])
    q = asyncio.run(directory.principal("q"))
    assert q is not None
    assert q.quota == 500 * 1024 * 1024


def test_extra_domains_are_normalised() -> None:
    directory = memory_directory([], ["Example.NET.", "BÜCHER.example"])
    assert asyncio.run(directory.is_local_domain("example.net"))
    assert asyncio.run(directory.is_local_domain("xn--bcher-kva.example"))
    assert not asyncio.run(directory.is_local_domain("bücher.example"))


def test_addresses_in_data_are_normalised() -> None:
    directory = memory_directory(
        [{"name": "Hans", "email": ["Hans@BÜCHER.example"], "email-list": ["Info@BÜCHER.example"]}]
    )
    assert asyncio.run(directory.recipient("hans@xn--bcher-kva.example")) == Mailbox(("hans",))
    assert asyncio.run(directory.recipient("info@xn--bcher-kva.example")) == Expansion(("hans@xn--bcher-kva.example",))
    assert asyncio.run(directory.is_local_domain("xn--bcher-kva.example"))


def test_duplicate_addresses_of_one_principal_collapse() -> None:
    directory = memory_directory([{"name": "jane", "email": ["jane@example.org", "Jane@Example.org"]}])
    jane = asyncio.run(directory.principal("jane"))
    assert jane is not None
    assert jane.emails == ("jane@example.org",)


def test_address_shared_by_two_individuals_is_one_mailbox_for_both() -> None:
    directory = memory_directory(
        [
            {"name": "a", "email": ["a@example.org", "shared@example.org"]},
            {"name": "b", "email": ["b@example.org", "shared@example.org"]},
        ]
    )
    assert asyncio.run(directory.recipient("shared@example.org")) == Mailbox(("a", "b"))
    assert asyncio.run(directory.vrfy("shared@example.org")) == ("a@example.org", "b@example.org")
    assert set(asyncio.run(directory.sender_logins("shared@example.org"))) == {"a", "b"}
