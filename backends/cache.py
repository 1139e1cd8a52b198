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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .directory import Directory
from .errors import TemporaryFailure
from .model import Principal, Recipient
from .settings import CacheConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
_Key = tuple[str, str]


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

    async def _get(self, kind: str, key: str, load: Callable[[str], Awaitable[T]]) -> T:
        k = (kind, key)
        now = self._clock()
        entry = self._positive.get(k)
        if entry is not None:
            if entry[0] > now:
                self._positive.move_to_end(k)
                self._hits += 1
                return entry[1]  # type: ignore[no-any-return]
        else:
            negative = self._negative.get(k)
            if negative is not None and negative[0] > now:
                self._negative.move_to_end(k)
                self._hits += 1
                return negative[1]  # type: ignore[no-any-return]
        self._misses += 1
        try:
            value = await load(key)
        except TemporaryFailure:
            if entry is None:
                raise
            self._stale += 1
            log.warning("directory failed, serving expired cache entry kind=%s", kind)
            return entry[1]  # type: ignore[no-any-return]
        self._store(k, value)
        return value

    def _store(self, k: _Key, value: object) -> None:
        if self._entries <= 0:
            return
        if value:
            store, other, ttl = self._positive, self._negative, self._ttl_positive
        else:
            store, other, ttl = self._negative, self._positive, self._ttl_negative
        other.pop(k, None)
        store[k] = (self._clock() + ttl, value)
        store.move_to_end(k)
        if len(store) > self._entries:
            store.popitem(last=False)
            self._evictions += 1

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
