"""The lookup service: the maps that Postfix (socketmap, tcp_table) and Dovecot (dict) query.

| map         | key              | value when found                                               |
|-------------|------------------|----------------------------------------------------------------|
| ``domain``    | domain           | the domain (virtual_mailbox_domains)                           |
| ``mailbox``   | address          | ``[lookup] mailbox-path`` of the owner (virtual_mailbox_maps)   |
| ``alias``     | address          | comma-separated targets (virtual_alias_maps)                   |
| ``sender``    | address          | comma-separated logins that may send as it (sender login maps) |
| ``recipient`` | address          | ``OK`` (relay_recipient_maps)                                  |
| ``quota``     | address or login | quota in bytes, ``0`` for none                                 |

Postfix sends these keys verbatim, so case folding, IDNA, ``+detail`` stripping and the ``@domain`` catch-all
are done here, once, for every backend. A backend fault becomes :class:`TempFail`, never "not found".

When the directory is a :class:`CachedDirectory`, each map's *answer* is what gets cached, under the key exactly as
the client sent it: a hit costs one dict lookup (:meth:`LookupService.cached`, synchronous, for the protocols' hot
path). Answers are computed from the backend behind the cache, so no answer is ever older than the TTL; a found
answer past its TTL is served while the backend fails, as for every cache entry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from mailroster.backends.address import (
    candidates,
    normalize_address,
    normalize_domain,
    split_address,
)
from mailroster.backends.cache import MISS, CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.model import Expansion, Mailbox, Principal, PrincipalType, Recipient
from mailroster.backends.outcome import NOT_FOUND, Found, Outcome, PermFail, TempFail

from .config import MAP_NAMES, LookupConfig

log = logging.getLogger(__name__)

_MAX_MAP_NAME = 32


class LookupService:
    """Answers every lookup map from one directory (usually a :class:`CachedDirectory`)."""

    def __init__(self, directory: Directory, config: LookupConfig) -> None:
        self.rebind(directory, config)
        self._maps: dict[str, Callable[[str], Awaitable[Outcome]]] = {
            "domain": self._domain,
            "mailbox": self._mailbox,
            "alias": self._alias,
            "sender": self._sender,
            "recipient": self._recipient,
            "quota": self._quota,
        }
        assert set(self._maps) == set(MAP_NAMES)
        # Cache namespaces, apart from those of the Directory methods.
        self._kinds = {name: f"map.{name}" for name in self._maps}

    def rebind(self, directory: Directory, config: LookupConfig) -> None:
        """Answer from ``directory`` as ``config`` says from now on (a reload): sessions keep this object."""
        # Answers are cached whole; they are computed from the backend itself (see the module docstring).
        self._cache = directory if isinstance(directory, CachedDirectory) else None
        self.directory = directory.inner if isinstance(directory, CachedDirectory) else directory
        self._separator = config.separator if config.subaddressing else ""
        self._catch_all = config.catch_all
        self._mailbox_path = config.mailbox_path

    def cached(self, map_name: str, key: str) -> Outcome | None:
        """The cached answer, if there is a fresh one: synchronous, for the protocols' hot path."""
        if self._cache is None:
            return None
        kind = self._kinds.get(map_name)
        if kind is None:
            return None
        value = self._cache.peek(kind, key)
        return None if value is MISS else value

    async def lookup(self, map_name: str, key: str) -> Outcome:
        """Look ``key`` up in ``map_name``; never raises."""
        handler = self._maps.get(map_name)
        if handler is None:
            return PermFail(f"unknown map {map_name[:_MAX_MAP_NAME]!r}")
        cache, kind = self._cache, self._kinds[map_name]
        if cache is not None:
            hit = cache.peek(kind, key)
            if hit is not MISS:
                return hit  # type: ignore[no-any-return]
        try:
            outcome = await handler(key)
        except TemporaryFailure as exc:
            if cache is not None:
                stale = cache.stale(kind, key)
                if stale is not MISS:
                    return stale  # type: ignore[no-any-return]
            return TempFail(str(exc) or "directory unavailable")
        except PermanentFailure as exc:
            log.error("map=%s directory misconfigured: %s", map_name, exc)
            return PermFail(str(exc) or "directory misconfigured")
        except ValueError:
            # The key cannot be a domain or an address (bad IDNA, no '@'): it exists nowhere.
            outcome = NOT_FOUND
        if cache is not None:
            cache.store(kind, key, outcome, found=isinstance(outcome, Found))
        return outcome

    # Helpers shared by the maps.

    async def _resolve(self, key: str, catch_all: bool) -> tuple[str, Recipient] | None:
        """The first candidate of ``key`` (itself, without detail, ``@domain``) that the directory knows."""
        for candidate in candidates(normalize_address(key), self._separator, catch_all):
            found = await self.directory.recipient(candidate)
            if found is not None:
                return candidate, found
        return None

    async def _mailbox_primaries(self, mailbox: Mailbox) -> list[tuple[str, str | None]]:
        """(name, primary address) of each principal of ``mailbox`` that exists: from the mailbox itself when the
        backend sent them along, else from ``principal()``."""
        if mailbox.primaries is not None:
            return list(zip(mailbox.names, mailbox.primaries, strict=True))
        found = []
        for name in mailbox.names:
            principal = await self.directory.principal(name)
            if principal is not None:
                found.append((principal.name, principal.primary_email))
        return found

    async def _principal_by_login_or_address(self, key: str) -> Principal | None:
        if "@" not in key:
            return await self.directory.principal(key.lower())
        for candidate in candidates(normalize_address(key), self._separator, catch_all=False):
            names = await self.directory.email_to_names(candidate)
            if names:
                return await self.directory.principal(names[0])
        return None

    # The maps.

    async def _domain(self, key: str) -> Outcome:
        domain = normalize_domain(key)
        return Found(domain) if await self.directory.is_local_domain(domain) else NOT_FOUND

    async def _mailbox(self, key: str) -> Outcome:
        # No catch-all here: the alias map rewrites unknown addresses to the catch-all's owner, whose own
        # address then resolves as a mailbox. Lists and groups are not mailboxes.
        resolved = await self._resolve(key, catch_all=False)
        if resolved is None or not isinstance(resolved[1], Mailbox):
            return NOT_FOUND
        for name, primary in await self._mailbox_primaries(resolved[1]):
            local, domain = split_address(primary or resolved[0])
            return Found(self._mailbox_path.format(name=name, local=local, domain=domain))
        return NOT_FOUND

    async def _alias(self, key: str) -> Outcome:
        resolved = await self._resolve(key, self._catch_all)
        if resolved is None:
            return NOT_FOUND
        candidate, found = resolved
        if isinstance(found, Expansion):
            targets = list(found.addresses)
        else:
            targets = [primary for _name, primary in await self._mailbox_primaries(found) if primary]
            if targets == [candidate]:
                return NOT_FOUND  # a mailbox's own primary address is not an alias
        return Found(",".join(targets)) if targets else NOT_FOUND

    async def _sender(self, key: str) -> Outcome:
        for candidate in candidates(normalize_address(key), self._separator, catch_all=False):
            logins = await self.directory.sender_logins(candidate)
            if logins:
                return Found(",".join(logins))
        return NOT_FOUND

    async def _recipient(self, key: str) -> Outcome:
        return Found("OK") if await self._resolve(key, self._catch_all) is not None else NOT_FOUND

    async def _quota(self, key: str) -> Outcome:
        principal = await self._principal_by_login_or_address(key)
        if principal is None or principal.type is not PrincipalType.INDIVIDUAL:
            return NOT_FOUND
        return Found(str(principal.quota or 0))
