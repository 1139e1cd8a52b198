"""LookupService: failures become outcomes, and each map's answer is cached whole."""

from __future__ import annotations

import asyncio

import pytest

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.errors import PermanentFailure
from mailroster.backends.memory import MemoryDirectory
from mailroster.backends.model import Principal
from mailroster.backends.outcome import NOT_FOUND, Found, PermFail, TempFail
from mailroster.backends.settings import CacheConfig, CacheTtl, Duration
from mailroster.daemon.config import LookupConfig
from mailroster.daemon.lookups import LookupService

from inprocess import FailingDirectory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Counting(FailingDirectory):
    """The memory directory, counting the calls that reach it, and able to go down."""

    def __init__(self) -> None:
        super().__init__(MemoryDirectory([Principal("alice", emails=("alice@example.org", "al@example.org"))]))
        self.down = False
        self.calls = 0

    def _check(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super()._check()


def make(ttl_positive: float = 3600, ttl_negative: float = 600) -> tuple[LookupService, Counting, Clock]:
    backend, clock = Counting(), Clock()
    config = CacheConfig(entries=100, ttl=CacheTtl(Duration(ttl_positive), Duration(ttl_negative)))
    return LookupService(CachedDirectory(backend, config, clock=clock), LookupConfig()), backend, clock


def test_a_cached_answer_is_served_synchronously_without_the_backend() -> None:
    service, backend, _ = make()
    assert service.cached("mailbox", "al@example.org") is None
    assert asyncio.run(service.lookup("mailbox", "al@example.org")) == Found("example.org/alice/")
    calls = backend.calls
    assert service.cached("mailbox", "al@example.org") == Found("example.org/alice/")
    assert asyncio.run(service.lookup("mailbox", "al@example.org")) == Found("example.org/alice/")
    assert backend.calls == calls


def test_answers_expire_with_their_ttl_and_not_found_with_the_negative_one() -> None:
    service, _backend, clock = make(ttl_positive=3600, ttl_negative=60)
    asyncio.run(service.lookup("mailbox", "al@example.org"))
    asyncio.run(service.lookup("mailbox", "nobody@example.org"))
    clock.now += 61
    assert service.cached("mailbox", "al@example.org") == Found("example.org/alice/")
    assert service.cached("mailbox", "nobody@example.org") is None
    clock.now += 3600
    assert service.cached("mailbox", "al@example.org") is None


def test_an_answer_is_never_older_than_the_ttl() -> None:
    """Answers are computed from the backend, not from per-method entries that may be nearly expired already."""
    service, backend, clock = make(ttl_positive=100)
    asyncio.run(service.lookup("quota", "alice"))  # caches nothing the mailbox map could reuse
    clock.now += 90
    calls = backend.calls
    asyncio.run(service.lookup("mailbox", "al@example.org"))
    assert backend.calls > calls


def test_backend_down_gives_tempfail_never_not_found_and_is_not_cached() -> None:
    service, backend, _clock = make()
    backend.down = True
    for map_name in ("domain", "mailbox", "alias", "sender", "recipient", "quota"):
        assert asyncio.run(service.lookup(map_name, "alice@example.org")) == TempFail("backend unavailable")
        assert service.cached(map_name, "alice@example.org") is None
    backend.down = False
    assert asyncio.run(service.lookup("mailbox", "alice@example.org")) == Found("example.org/alice/")


def test_expired_found_answer_is_served_while_the_backend_is_down_but_not_an_expired_not_found() -> None:
    service, backend, clock = make(ttl_positive=10, ttl_negative=10)
    asyncio.run(service.lookup("mailbox", "alice@example.org"))
    asyncio.run(service.lookup("mailbox", "nobody@example.org"))
    clock.now += 11
    backend.down = True
    assert asyncio.run(service.lookup("mailbox", "alice@example.org")) == Found("example.org/alice/")
    assert asyncio.run(service.lookup("mailbox", "nobody@example.org")) == TempFail("backend unavailable")


def test_unknown_map_and_misconfiguration_are_permfail() -> None:
    service, _, _ = make()
    assert asyncio.run(service.lookup("nosuch", "x")) == PermFail("unknown map 'nosuch'")
    assert service.cached("nosuch", "x") is None

    class Misconfigured(Counting):
        def _check(self):  # type: ignore[no-untyped-def]
            raise PermanentFailure("query 'recipients' is not configured")

    broken = LookupService(Misconfigured(), LookupConfig())
    assert asyncio.run(broken.lookup("alias", "a@example.org")) == PermFail("query 'recipients' is not configured")


@pytest.mark.parametrize(("map_name", "key"), [("domain", "bad..ü"), ("mailbox", "no-at-sign"), ("alias", "@")])
def test_keys_that_cannot_exist_are_not_found(map_name: str, key: str) -> None:
    service, _, _ = make()
    assert asyncio.run(service.lookup(map_name, key)) is NOT_FOUND


def test_without_a_cache_every_lookup_reaches_the_backend() -> None:
    backend = Counting()
    service = LookupService(backend, LookupConfig())
    assert service.cached("mailbox", "al@example.org") is None
    asyncio.run(service.lookup("mailbox", "al@example.org"))
    calls = backend.calls
    asyncio.run(service.lookup("mailbox", "al@example.org"))
    assert backend.calls == 2 * calls


def test_subaddressing_and_catch_all_can_be_turned_off() -> None:
    directory = MemoryDirectory(
        [
            Principal("alice", emails=("alice@example.org",)),
            Principal("bob", emails=("bob@example.org", "@example.org")),
        ]
    )
    on = LookupService(directory, LookupConfig())
    off = LookupService(directory, LookupConfig(subaddressing=False, catch_all=False))
    assert asyncio.run(on.lookup("mailbox", "alice+x@example.org")) == Found("example.org/alice/")
    assert asyncio.run(off.lookup("mailbox", "alice+x@example.org")) is NOT_FOUND
    assert asyncio.run(on.lookup("alias", "zed@example.org")) == Found("bob@example.org")
    assert asyncio.run(off.lookup("alias", "zed@example.org")) is NOT_FOUND
    dash = LookupService(directory, LookupConfig(separator="-+"))
    assert asyncio.run(dash.lookup("mailbox", "alice-x@example.org")) == Found("example.org/alice/")
    custom = LookupService(directory, LookupConfig(mailbox_path="/srv/{domain}/{name}/Maildir/"))
    assert asyncio.run(custom.lookup("mailbox", "alice@example.org")) == Found("/srv/example.org/alice/Maildir/")
