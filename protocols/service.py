"""What a protocol session needs from the daemon: the lookup service interface, and a connection observer.

The daemon's ``LookupService`` implements :class:`MapService`; sessions never see which directory answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from mailroster.backends.outcome import AuthOutcome, Outcome, ScramCredentials, UserOutcome


class MapService(Protocol):
    """Answers the lookup maps (domain, mailbox, alias, sender, recipient, quota)."""

    def cached(self, map_name: str, key: str) -> Outcome | None:
        """A fresh cached answer, or ``None``: synchronous, so that a hit costs no coroutine at all."""
        ...

    def lookup(self, map_name: str, key: str) -> Coroutine[Any, Any, Outcome]:
        """Look ``key`` up in ``map_name``. Never raises: failures are :class:`TempFail` / :class:`PermFail`."""
        ...


class AuthService(Protocol):
    """Authenticates logins for the Dovecot auth-client protocol (SASL).

    Every method answers an outcome and never raises; a backend fault is ``AuthStatus.TEMPFAIL``. Unknown user and
    wrong password are the same ``FAILED``. The session, not the service, applies the failure delay.
    """

    def mechanisms(self) -> Sequence[str]:
        """SASL mechanisms to offer, upper-case, e.g. ``("PLAIN", "LOGIN")``; CRAM-MD5 and SCRAM-* only when the
        stored secrets allow them (configured)."""
        ...

    def cached_login(self, login: bytes, password: bytes) -> str | None:
        """The canonical user name when a successful check of these credentials (the UTF-8 bytes of a PLAIN
        message without authorization identity) is cached, else ``None``: synchronous, so that a cached login costs
        no coroutine at all (as :meth:`MapService.cached`)."""
        ...

    async def authenticate(self, login: str, password: str, *, service: str, authzid: str = "") -> AuthOutcome:
        """Check a plaintext password (PLAIN, LOGIN). A non-empty ``authzid`` different from ``login`` is a master
        user login: ``login`` is the master, ``authzid`` the user to log in as."""
        ...

    async def cram_md5(self, login: str, challenge: bytes, digest: bytes, *, service: str) -> AuthOutcome:
        """Check a CRAM-MD5 response: ``digest`` is the client's HMAC-MD5 of ``challenge`` (raw 16 bytes)."""
        ...

    async def scram_credentials(
        self, login: str, algorithm: str, *, service: str
    ) -> tuple[AuthOutcome, ScramCredentials | None]:
        """The stored SCRAM keys of ``login`` for ``algorithm`` (``"SHA-1"`` or ``"SHA-256"``).

        Credentials come with status OK (or DISABLED: report it only once the proof checked out). FAILED comes with
        no credentials; the session must still run the exchange with made-up ones, so that it does not tell
        whether the user exists.
        """
        ...


class UserService(Protocol):
    """Serves Dovecot userdb and passdb lookups (auth-master protocol, dict proxy)."""

    def cached_userdb(self, login: str) -> UserOutcome | None:
        """A cached userdb answer for ``login``, or ``None``: synchronous, like :meth:`AuthService.cached_login`."""
        ...

    async def userdb(self, login: str, *, service: str = "") -> UserOutcome:
        """The user's canonical name and userdb fields (uid, gid, home, mail, quota_rule, ...)."""
        ...

    async def passdb(self, login: str, *, with_password: bool, service: str = "") -> UserOutcome:
        """The user's passdb fields; with ``with_password``, a ``password`` field holding the stored
        ``{SCHEME}hash`` (for Dovecot's dict passdb, which verifies it itself)."""
        ...

    def users(self) -> AsyncIterator[str]:
        """Every login that can log in (individuals), for LIST and dict iteration. Raises TemporaryFailure."""
        ...


class DictService(MapService, UserService, Protocol):
    """What a Dovecot dict proxy name (a directory) answers: user and passdb records, and the lookup maps."""


class PolicyService(Protocol):
    """Decides Postfix policy delegation requests."""

    def decide(self, request: Mapping[str, str]) -> Coroutine[Any, Any, Outcome]:
        """The action for one request (its attributes by name): ``Found(action)``, e.g. ``Found("DUNNO")``;
        :class:`TempFail` when the directory cannot answer. Never raises."""
        ...


class Connection(Protocol):
    """What the daemon sees of one client connection."""

    last_active: float

    @property
    def busy(self) -> bool:
        """Whether a request is being answered (draining waits for it)."""
        ...

    def close(self) -> None:
        """Close after the replies already written have been sent."""
        ...


class ConnectionObserver(Protocol):
    """Tracks live connections for the connection limit, idle timeouts and draining."""

    def opened(self, conn: Connection) -> bool:
        """Register a new connection; ``False`` means refuse it (over the limit, or shutting down)."""
        ...

    def closed(self, conn: Connection) -> None:
        """The connection is gone."""
        ...

    def idle(self, conn: Connection) -> None:
        """The connection has answered every request it had; a draining daemon may close it now."""
        ...
