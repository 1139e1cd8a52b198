"""A Directory that caches another Directory's answers.

Two LRU stores, one for answers that found something (kept ``ttl.positive``) and one for "not found" (kept
``ttl.negative``), each bounded by ``entries``. Failures are never cached. When the backend fails, an expired
positive answer is served instead of the failure (Dovecot's auth cache does the same); an expired negative answer
is not, because a stale "not found" bounces mail for an address that may have been created since, while a
temporary failure only defers it.

A cache hit completes without suspending, so a caller that drives the coroutine eagerly answers it without
scheduling a task.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from .directory import Directory
from .errors import TemporaryFailure
from .model import Principal, Recipient
from .settings import CacheConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What :meth:`CachedDirectory.peek` and :meth:`CachedDirectory.stale` return when they have nothing.
MISS: Final[Any] = object()
_Key = tuple[str, Hashable]  # (namespace, key): a name, an address, a MAC


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0
    positive_entries: int = 0
    negative_entries: int = 0


class CachedDirectory(Directory):
    """LRU cache with separate positive and negative TTLs in front of ``inner``."""

    def __init__(
        self,
        inner: Directory,
        config: CacheConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self._entries = config.entries
        self._ttl_positive = float(config.ttl.positive)
        self._ttl_negative = float(config.ttl.negative)
        self._clock = clock
        # key -> (expires_at, value); insertion order is recency order (last = most recent).
        self._positive: OrderedDict[_Key, tuple[float, Any]] = OrderedDict()
        self._negative: OrderedDict[_Key, tuple[float, Any]] = OrderedDict()
        self._hits = self._misses = self._stale = self._evictions = 0

    def peek(self, kind: str, key: Hashable) -> Any:
        """The fresh cached value of ``key`` in namespace ``kind``, or :data:`MISS`. Synchronous: the hot path."""
        k = (kind, key)
        now = self._clock()
        entry = self._positive.get(k)
        if entry is None:
            entry = self._negative.get(k)
            if entry is None or entry[0] <= now:
                return MISS
            self._negative.move_to_end(k)
        elif entry[0] <= now:
            return MISS
        else:
            self._positive.move_to_end(k)
        self._hits += 1
        return entry[1]

    def stale(self, kind: str, key: Hashable) -> Any:
        """An expired *positive* value to serve while the backend fails, or :data:`MISS`.

        Called after a failed trip to the backend, which counts as a miss, as a completed one does in :meth:`store`.
        """
        self._misses += 1
        entry = self._positive.get((kind, key))
        if entry is None:
            return MISS
        self._stale += 1
        log.warning("directory failed, serving expired cache entry kind=%s", kind)
        return entry[1]

    def store(self, kind: str, key: Hashable, value: object, *, found: bool | None = None) -> None:
        """Remember ``value`` just loaded from the backend (a miss); ``found`` (default: the value's truth) picks the
        positive or the negative store."""
        self._misses += 1
        if self._entries <= 0:
            return
        k = (kind, key)
        if found if found is not None else bool(value):
            store, other, ttl = self._positive, self._negative, self._ttl_positive
        else:
            store, other, ttl = self._negative, self._positive, self._ttl_negative
        other.pop(k, None)
        store[k] = (self._clock() + ttl, value)
        store.move_to_end(k)
        if len(store) > self._entries:
            store.popitem(last=False)
            self._evictions += 1

    async def _get(self, kind: str, key: str, load: Callable[[str], Awaitable[T]]) -> T:
        value = self.peek(kind, key)
        if value is not MISS:
            return value  # type: ignore[no-any-return]
        try:
            value = await load(key)
        except TemporaryFailure:
            value = self.stale(kind, key)
            if value is MISS:
                raise
            return value  # type: ignore[no-any-return]
        self.store(kind, key, value)
        return value

    # The Directory interface, every method through the cache.

    async def principal(self, name: str) -> Principal | None:
        return await self._get("principal", name, self.inner.principal)

    async def recipient(self, address: str) -> Recipient | None:
        return await self._get("recipient", address, self.inner.recipient)

    async def is_local_domain(self, domain: str) -> bool:
        return await self._get("domain", domain, self.inner.is_local_domain)

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return await self._get("names", address, self.inner.email_to_names)

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        return await self._get("sender", address, self.inner.sender_logins)

    async def vrfy(self, address: str) -> tuple[str, ...]:
        return await self._get("vrfy", address, self.inner.vrfy)

    async def expn(self, address: str) -> tuple[str, ...]:
        return await self._get("expn", address, self.inner.expn)

    def individuals(self) -> AsyncIterator[str]:
        return self.inner.individuals()

    async def close(self) -> None:
        await self.inner.close()

    # Management.

    def flush(self) -> None:
        """Forget every cached answer, e.g. after the directory changed."""
        self._positive.clear()
        self._negative.clear()

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self._hits,
            misses=self._misses,
            stale=self._stale,
            evictions=self._evictions,
            positive_entries=len(self._positive),
            negative_entries=len(self._negative),
        )
