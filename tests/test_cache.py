"""CachedDirectory: LRU, separate positive/negative TTLs, failures never cached, stale served on failure.

Time is a fake clock advanced by hand; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.model import Expansion, Mailbox, Principal, Recipient
from mailroster.backends.settings import CacheConfig, CacheTtl, Duration

from conftest import FakeClock

POSITIVE_TTL = 3600
NEGATIVE_TTL = 600

# Every Directory method, with what the fake answers when it finds something and when it does not.
METHODS: dict[str, tuple[object, object]] = {
    "principal": (Principal("jane", emails=("jane@example.org",)), None),
    "recipient": (Mailbox(("jane",)), None),
    "is_local_domain": (True, False),
    "email_to_names": (("jane",), ()),
    "sender_logins": (("jane", "john"), ()),
    "vrfy": (("jane@example.org",), ()),
    "expn": (("a@example.org", "b@example.org"), ()),
}


class FakeDirectory(Directory):
    """Counts calls per method; answers from ``answers`` (default: not found), or raises ``error``.

    With ``suspend`` set, every call yields to the event loop once before answering, as a real backend would.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.answers: dict[tuple[str, str], object] = {}
        self.error: Exception | None = None
        self.suspend = False
        self.closed = False

    async def _answer(self, method: str, key: str) -> Any:
        self.calls[method] += 1
        if self.suspend:
            await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        return self.answers.get((method, key), METHODS[method][1])

    async def principal(self, name: str) -> Principal | None:
        return await self._answer("principal", name)  # type: ignore[no-any-return]

    async def recipient(self, address: str) -> Recipient | None:
        return await self._answer("recipient", address)  # type: ignore[no-any-return]

    async def is_local_domain(self, domain: str) -> bool:
        return await self._answer("is_local_domain", domain)  # type: ignore[no-any-return]

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return await self._answer("email_to_names", address)  # type: ignore[no-any-return]

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        return await self._answer("sender_logins", address)  # type: ignore[no-any-return]

    async def vrfy(self, address: str) -> tuple[str, ...]:
        return await self._answer("vrfy", address)  # type: ignore[no-any-return]

    async def expn(self, address: str) -> tuple[str, ...]:
        return await self._answer("expn", address)  # type: ignore[no-any-return]

    async def individuals(self) -> AsyncIterator[str]:
        self.calls["individuals"] += 1
        for name in ("alice", "bob"):
            yield name

    async def close(self) -> None:
        self.closed = True


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make_cache(entries: int = 100) -> tuple[CachedDirectory, FakeDirectory, FakeClock]:
    inner = FakeDirectory()
    clock = FakeClock()
    ttl = CacheTtl(positive=Duration(POSITIVE_TTL), negative=Duration(NEGATIVE_TTL))
    config = CacheConfig(entries=entries, ttl=ttl)
    return CachedDirectory(inner, config, clock=clock), inner, clock


def lookup(cache: Directory, method: str, key: str) -> Any:
    return run(getattr(cache, method)(key))


JANE = Principal("jane", emails=("jane@example.org",))


# Hits and misses.


def test_hit_does_not_call_inner_directory() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 1
    assert lookup(cache, "principal", "jane") is JANE
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses) == (2, 1)


def test_different_keys_are_cached_separately() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    assert lookup(cache, "principal", "jane") is JANE
    assert lookup(cache, "principal", "john") is None
    assert inner.calls["principal"] == 2
    assert lookup(cache, "principal", "jane") is JANE
    assert lookup(cache, "principal", "john") is None
    assert inner.calls["principal"] == 2


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_caches_a_found_answer(method: str) -> None:
    cache, inner, _ = make_cache()
    found = METHODS[method][0]
    inner.answers[method, "key@example.org"] = found
    assert lookup(cache, method, "key@example.org") == found
    assert lookup(cache, method, "key@example.org") == found
    assert inner.calls[method] == 1
    assert sum(inner.calls.values()) == 1  # went to the matching inner method, and only to it
    assert cache.stats().positive_entries == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_caches_a_not_found_answer(method: str) -> None:
    cache, inner, _ = make_cache()
    not_found = METHODS[method][1]
    assert lookup(cache, method, "key@example.org") == not_found
    assert lookup(cache, method, "key@example.org") == not_found
    assert inner.calls[method] == 1
    stats = cache.stats()
    assert (stats.positive_entries, stats.negative_entries) == (0, 1)


def test_keys_of_different_methods_do_not_collide() -> None:
    cache, inner, _ = make_cache()
    key = "jane"
    for method, (found, _) in METHODS.items():
        inner.answers[method, key] = found
    # Every method in turn, twice: each answer is its own method's, and each method reached the backend once.
    for _ in range(2):
        for method, (found, _) in METHODS.items():
            assert lookup(cache, method, key) == found, method
    assert inner.calls == Counter(dict.fromkeys(METHODS, 1))
    assert cache.stats().positive_entries == len(METHODS)


def test_principal_and_email_to_names_with_the_same_key() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane@example.org"] = JANE
    # email_to_names has no answer for the key: a not-found must not hide principal's found, nor the reverse.
    assert lookup(cache, "email_to_names", "jane@example.org") == ()
    assert lookup(cache, "principal", "jane@example.org") is JANE
    assert lookup(cache, "email_to_names", "jane@example.org") == ()
    assert lookup(cache, "principal", "jane@example.org") is JANE
    assert inner.calls == Counter({"principal": 1, "email_to_names": 1})


# LRU.


def test_lru_evicts_the_least_recently_inserted_when_untouched() -> None:
    cache, inner, _ = make_cache(entries=2)
    for name in ("a", "b", "c"):
        inner.answers["principal", name] = Principal(name)
        lookup(cache, "principal", name)
    assert cache.stats().evictions == 1
    assert cache.stats().positive_entries == 2
    lookup(cache, "principal", "b")
    lookup(cache, "principal", "c")
    assert inner.calls["principal"] == 3
    lookup(cache, "principal", "a")  # evicted: back to the backend
    assert inner.calls["principal"] == 4


def test_lru_evicts_the_least_recently_used() -> None:
    cache, inner, _ = make_cache(entries=2)
    for name in ("a", "b", "c"):
        inner.answers["principal", name] = Principal(name)
    lookup(cache, "principal", "a")
    lookup(cache, "principal", "b")
    assert lookup(cache, "principal", "a") == Principal("a")  # a hit makes "a" the most recently used
    assert inner.calls["principal"] == 2
    lookup(cache, "principal", "c")  # evicts "b", not "a"
    assert cache.stats().evictions == 1
    lookup(cache, "principal", "a")
    assert inner.calls["principal"] == 3  # "a" survived
    lookup(cache, "principal", "b")
    assert inner.calls["principal"] == 4  # "b" did not


def test_negative_store_is_lru_bounded_too() -> None:
    cache, inner, _ = make_cache(entries=2)
    for name in ("x", "y", "z"):
        assert lookup(cache, "principal", name) is None
    stats = cache.stats()
    assert (stats.negative_entries, stats.evictions) == (2, 1)
    lookup(cache, "principal", "z")
    assert inner.calls["principal"] == 3
    lookup(cache, "principal", "x")
    assert inner.calls["principal"] == 4


def test_positive_and_negative_stores_are_bounded_separately() -> None:
    # The module documents each store as bounded by ``entries``: a flood of not-found keys cannot push out
    # the positive answers.
    cache, inner, _ = make_cache(entries=1)
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    lookup(cache, "principal", "ghost1")
    lookup(cache, "principal", "ghost2")
    stats = cache.stats()
    assert (stats.positive_entries, stats.negative_entries, stats.evictions) == (1, 1, 1)
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 3


# TTLs.


def test_positive_and_negative_ttl_are_separate() -> None:
    cache, inner, clock = make_cache()
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    lookup(cache, "principal", "ghost")
    assert inner.calls["principal"] == 2

    clock.advance(NEGATIVE_TTL - 1)
    lookup(cache, "principal", "jane")
    lookup(cache, "principal", "ghost")
    assert inner.calls["principal"] == 2  # both still fresh

    clock.advance(2)  # 601 s: the negative entry expired, the positive one did not
    assert lookup(cache, "principal", "ghost") is None
    assert inner.calls["principal"] == 3
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 3

    clock.advance(POSITIVE_TTL - NEGATIVE_TTL - 2)  # 3599 s after jane was cached
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 3
    clock.advance(2)  # 3601 s
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 4


def test_boolean_answers_use_the_matching_ttl() -> None:
    cache, inner, clock = make_cache()
    inner.answers["is_local_domain", "example.org"] = True
    assert lookup(cache, "is_local_domain", "example.org") is True
    assert lookup(cache, "is_local_domain", "example.com") is False
    clock.advance(NEGATIVE_TTL + 1)
    assert lookup(cache, "is_local_domain", "example.org") is True
    assert lookup(cache, "is_local_domain", "example.com") is False
    assert inner.calls["is_local_domain"] == 3  # only the False answer was asked again


def test_ttl_counts_from_when_the_answer_arrived() -> None:
    cache, inner, clock = make_cache()
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    clock.advance(POSITIVE_TTL + 1)
    lookup(cache, "principal", "jane")  # refreshed now
    clock.advance(POSITIVE_TTL - 1)
    lookup(cache, "principal", "jane")
    assert inner.calls["principal"] == 2


# Failures.


def test_temporary_failure_is_never_cached() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    inner.error = TemporaryFailure("backend down")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "principal", "jane")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "principal", "jane")
    assert inner.calls["principal"] == 2
    stats = cache.stats()
    assert (stats.positive_entries, stats.negative_entries) == (0, 0)
    inner.error = None
    assert lookup(cache, "principal", "jane") is JANE
    assert inner.calls["principal"] == 3


def test_permanent_failure_is_never_cached() -> None:
    cache, inner, _ = make_cache()
    inner.error = PermanentFailure("misconfigured")
    with pytest.raises(PermanentFailure):
        lookup(cache, "recipient", "jane@example.org")
    inner.error = None
    inner.answers["recipient", "jane@example.org"] = Mailbox(("jane",))
    assert lookup(cache, "recipient", "jane@example.org") == Mailbox(("jane",))
    assert inner.calls["recipient"] == 2


def test_expired_positive_entry_is_served_when_backend_fails() -> None:
    cache, inner, clock = make_cache()
    inner.answers["recipient", "sales@example.org"] = Expansion(("a@example.org",))
    lookup(cache, "recipient", "sales@example.org")
    clock.advance(POSITIVE_TTL + 1)
    inner.error = TemporaryFailure("backend down")
    assert lookup(cache, "recipient", "sales@example.org") == Expansion(("a@example.org",))
    assert cache.stats().stale == 1
    assert inner.calls["recipient"] == 2  # the backend was asked first
    # The failure was not cached either: the next call asks the backend again, and is served stale again.
    assert lookup(cache, "recipient", "sales@example.org") == Expansion(("a@example.org",))
    assert (inner.calls["recipient"], cache.stats().stale) == (3, 2)
    # Back up: the fresh answer replaces the stale one.
    inner.error = None
    inner.answers["recipient", "sales@example.org"] = Expansion(("b@example.org",))
    assert lookup(cache, "recipient", "sales@example.org") == Expansion(("b@example.org",))
    assert lookup(cache, "recipient", "sales@example.org") == Expansion(("b@example.org",))
    assert inner.calls["recipient"] == 4


def test_expired_negative_entry_is_not_served_when_backend_fails() -> None:
    cache, inner, clock = make_cache()
    assert lookup(cache, "recipient", "new@example.org") is None
    clock.advance(NEGATIVE_TTL + 1)
    inner.error = TemporaryFailure("backend down")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "recipient", "new@example.org")
    assert cache.stats().stale == 0
    assert inner.calls["recipient"] == 2


def test_fresh_negative_entry_is_served_without_asking_a_failing_backend() -> None:
    cache, inner, _ = make_cache()
    assert lookup(cache, "sender_logins", "x@example.org") == ()
    inner.error = TemporaryFailure("backend down")
    assert lookup(cache, "sender_logins", "x@example.org") == ()
    assert inner.calls["sender_logins"] == 1


def test_nothing_stale_to_serve_after_flush() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    cache.flush()
    inner.error = TemporaryFailure("backend down")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "principal", "jane")


# Answers that change.


def test_found_then_not_found_moves_to_the_negative_store() -> None:
    cache, inner, clock = make_cache()
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    assert (cache.stats().positive_entries, cache.stats().negative_entries) == (1, 0)

    del inner.answers["principal", "jane"]
    clock.advance(POSITIVE_TTL + 1)
    assert lookup(cache, "principal", "jane") is None
    assert (cache.stats().positive_entries, cache.stats().negative_entries) == (0, 1)
    assert lookup(cache, "principal", "jane") is None  # a hit on the negative entry
    assert inner.calls["principal"] == 2

    # The old positive answer is really gone: once the negative entry expires, a failure is not papered over
    # with the principal that no longer exists.
    clock.advance(NEGATIVE_TTL + 1)
    inner.error = TemporaryFailure("backend down")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "principal", "jane")
    assert cache.stats().stale == 0


def test_not_found_then_found_moves_to_the_positive_store() -> None:
    cache, inner, clock = make_cache()
    assert lookup(cache, "email_to_names", "new@example.org") == ()
    inner.answers["email_to_names", "new@example.org"] = ("new",)
    clock.advance(NEGATIVE_TTL + 1)
    assert lookup(cache, "email_to_names", "new@example.org") == ("new",)
    assert (cache.stats().positive_entries, cache.stats().negative_entries) == (1, 0)
    clock.advance(NEGATIVE_TTL + 1)  # longer than the negative TTL: the positive one applies now
    assert lookup(cache, "email_to_names", "new@example.org") == ("new",)
    assert inner.calls["email_to_names"] == 2


# Configuration and management.


def test_zero_entries_disables_caching() -> None:
    cache, inner, clock = make_cache(entries=0)
    inner.answers["principal", "jane"] = JANE
    for _ in range(3):
        assert lookup(cache, "principal", "jane") is JANE
        assert lookup(cache, "principal", "ghost") is None
    assert inner.calls["principal"] == 6
    stats = cache.stats()
    assert (stats.hits, stats.evictions, stats.positive_entries, stats.negative_entries) == (0, 0, 0, 0)
    # Nothing cached means nothing to serve stale either.
    clock.advance(POSITIVE_TTL + 1)
    inner.error = TemporaryFailure("backend down")
    with pytest.raises(TemporaryFailure):
        lookup(cache, "principal", "jane")


def test_flush_empties_both_stores() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    lookup(cache, "principal", "jane")
    lookup(cache, "principal", "ghost")
    cache.flush()
    stats = cache.stats()
    assert (stats.positive_entries, stats.negative_entries) == (0, 0)
    lookup(cache, "principal", "jane")
    lookup(cache, "principal", "ghost")
    assert inner.calls["principal"] == 4


def test_stats_count_hits_misses_and_evictions() -> None:
    cache, inner, clock = make_cache(entries=2)
    assert cache.stats() == type(cache.stats())()
    inner.answers["vrfy", "a@example.org"] = ("a@example.org",)
    lookup(cache, "vrfy", "a@example.org")  # miss
    lookup(cache, "vrfy", "a@example.org")  # hit
    lookup(cache, "vrfy", "b@example.org")  # miss (negative)
    lookup(cache, "vrfy", "b@example.org")  # hit
    lookup(cache, "vrfy", "c@example.org")  # miss (negative)
    lookup(cache, "vrfy", "d@example.org")  # miss (negative), evicts b
    clock.advance(POSITIVE_TTL + 1)
    lookup(cache, "vrfy", "a@example.org")  # miss (expired)
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.stale) == (2, 5, 1, 0)
    assert (stats.positive_entries, stats.negative_entries) == (1, 2)


def test_close_closes_the_inner_directory() -> None:
    cache, inner, _ = make_cache()
    run(cache.close())
    assert inner.closed


# Eagerness: a hit never suspends, so protocols answer it without creating a task.


def test_cache_hit_completes_without_suspending() -> None:
    cache, inner, _ = make_cache()
    inner.answers["principal", "jane"] = JANE
    inner.suspend = True

    miss = cache.principal("jane")
    assert miss.send(None) is None  # the backend suspended: a miss does suspend here
    with pytest.raises(StopIteration) as finished:
        miss.send(None)
    assert finished.value.value is JANE

    hit = cache.principal("jane")
    with pytest.raises(StopIteration) as finished:
        hit.send(None)
    assert finished.value.value is JANE
    assert inner.calls["principal"] == 1


@pytest.mark.parametrize("method", sorted(METHODS))
def test_negative_hit_completes_without_suspending(method: str) -> None:
    cache, inner, _ = make_cache()
    lookup(cache, method, "ghost@example.org")
    inner.suspend = True
    coro = getattr(cache, method)("ghost@example.org")
    with pytest.raises(StopIteration) as finished:
        coro.send(None)
    assert finished.value.value == METHODS[method][1]
    assert inner.calls[method] == 1


def test_individuals_are_listed_by_the_backend_every_time() -> None:
    """Listing is never cached: Dovecot's LIST must see accounts created a second ago."""
    cache, inner, _ = make_cache()

    async def names() -> list[str]:
        return [name async for name in cache.individuals()]

    assert run(names()) == ["alice", "bob"]
    assert run(names()) == ["alice", "bob"]
    assert inner.calls["individuals"] == 2
