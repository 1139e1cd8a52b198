"""What the remote directories share: IMAP (:mod:`.imap`), SMTP and LMTP (:mod:`.smtp`) servers that mailroster
authenticates against (and, for SMTP/LMTP, asks whether a recipient exists), as Stalwart's ``imap``, ``smtp`` and
``lmtp`` directories did (STALWART.md §1.5).

A remote server knows no principals, groups or domains: local domains come from ``lookup.domains``; a successful
login is an individual named by its login (lower-cased), with the login as its address when it is one; the questions
a remote server cannot answer (a principal by name, the owner of an address, the logins of a sender) are a
:class:`PermanentFailure` -- a misconfiguration, which every protocol reports as a temporary failure, never as
"not found".
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .address import normalize_address
from .directory import Directory
from .errors import PermanentFailure
from .model import Principal, PrincipalType, Recipient
from .pool import ConnectionPool, PoolConfig

C = TypeVar("C")


@dataclass(frozen=True, slots=True)
class RemoteTlsConfig:
    """``tls``: ``enable`` speaks TLS from the first byte (imaps, smtps); without it the connection is plain and
    upgraded with STARTTLS when the server offers it. ``allow-invalid-certs`` skips certificate checks."""

    enable: bool = False
    allow_invalid_certs: bool = False


@dataclass(frozen=True, slots=True)
class RemoteLookupConfig:
    """``lookup``: ``domains`` are the local domains (the ``domain`` map), as a remote server cannot say."""

    domains: list[str] = field(default_factory=list)


def tls_context(tls: RemoteTlsConfig) -> ssl.SSLContext:
    """The context for implicit TLS or STARTTLS: verified, unless ``allow-invalid-certs``."""
    context = ssl.create_default_context()
    if tls.allow_invalid_certs:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class RemoteDirectory(Directory, Generic[C]):
    """The part of the Directory interface a remote server cannot answer, the local domains, and the pool of
    connections to the server (``C``: one connection) that a subclass opens, closes and checks."""

    kind = "remote"

    def __init__(
        self,
        name: str,
        domains: list[str],
        pool: PoolConfig,
        *,
        connect: Callable[[], Awaitable[C]],
        disconnect: Callable[[C], Awaitable[None]],
        check: Callable[[C], Awaitable[bool]],
    ) -> None:
        self._name = name
        self._domains = frozenset(d.lower().rstrip(".") for d in domains)
        self._pool: ConnectionPool[C] = ConnectionPool(name, pool, connect, disconnect, check)

    @property
    def pool_size(self) -> int:
        """Pooled connections open now, idle or in use."""
        return self._pool.size

    async def close(self) -> None:
        await self._pool.close()

    @staticmethod
    def never_valid(login: str, password: str) -> bool:
        """Credentials no server is asked about: empty, or with a NUL (SASL PLAIN's separator)."""
        return not login or not password or "\0" in login or "\0" in password

    def _unsupported(self, what: str) -> PermanentFailure:
        return PermanentFailure(f"a {self.kind} directory cannot look up {what}: it only authenticates")

    @property
    def verifies_passwords(self) -> bool:
        return True

    @staticmethod
    def logged_in(login: str) -> Principal:
        """The principal of a login the server accepted: an individual named by the login."""
        name = login.lower()
        try:
            emails: tuple[str, ...] = (normalize_address(name),) if "@" in name else ()
        except ValueError:
            emails = ()
        return Principal(name=name, type=PrincipalType.INDIVIDUAL, emails=emails)

    async def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self._domains

    async def principal(self, name: str) -> Principal | None:
        raise self._unsupported("principals")

    async def recipient(self, address: str) -> Recipient | None:
        raise self._unsupported("recipients")

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        raise self._unsupported("the owners of addresses")

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        raise self._unsupported("the logins of senders")

    async def vrfy(self, address: str) -> tuple[str, ...]:
        raise self._unsupported("addresses (VRFY)")

    async def expn(self, address: str) -> tuple[str, ...]:
        raise self._unsupported("lists (EXPN)")

    async def individuals(self) -> AsyncIterator[str]:
        nothing: tuple[str, ...] = ()
        for name in nothing:  # an async generator that fails when iterated, as a backend fault would
            yield name
        raise self._unsupported("the list of users")
