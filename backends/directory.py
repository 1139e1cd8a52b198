"""The Directory interface every backend implements (Stalwart's pre-0.10.7 query surface).

Keys reach a directory already normalised (see :mod:`.address`): addresses and domains lower-cased and
IDNA-encoded, login names lower-cased. A directory answers exactly the key it is given; sub-address stripping and
the catch-all fallback are done once, by the caller, for every backend alike.

Every method raises :class:`~.errors.TemporaryFailure` when the backend cannot answer now. "Not found" is ``None``
or an empty tuple, and is only ever returned when the backend really answered so.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator

from .model import Principal, Recipient


class Directory(abc.ABC):
    """Asynchronous, read-only view of a directory of principals."""

    @abc.abstractmethod
    async def principal(self, name: str) -> Principal | None:
        """The principal whose login name is ``name``."""

    @abc.abstractmethod
    async def recipient(self, address: str) -> Recipient | None:
        """Where mail for ``address`` goes: a mailbox, an expansion (list/group), or ``None`` (invalid)."""

    @abc.abstractmethod
    async def is_local_domain(self, domain: str) -> bool:
        """Whether the directory receives mail for ``domain``."""

    @abc.abstractmethod
    async def email_to_names(self, address: str) -> tuple[str, ...]:
        """Names of the principals that have ``address`` among their addresses (primary or alias)."""

    @abc.abstractmethod
    async def sender_logins(self, address: str) -> tuple[str, ...]:
        """Login names allowed to send as ``address``: its owners, and for a group's address its members."""

    @abc.abstractmethod
    async def vrfy(self, address: str) -> tuple[str, ...]:
        """Primary addresses of the mailboxes that ``address`` names (SMTP VRFY)."""

    @abc.abstractmethod
    async def expn(self, address: str) -> tuple[str, ...]:
        """Addresses that the list or group ``address`` expands to (SMTP EXPN)."""

    @abc.abstractmethod
    def individuals(self) -> AsyncIterator[str]:
        """Login names of every individual, for Dovecot's user listing (LIST, dict iteration). Not cached."""

    @property
    def verifies_passwords(self) -> bool:
        """Whether the backend checks passwords itself (an LDAP bind, a remote IMAP login) instead of handing out
        stored hashes for the caller to verify."""
        return False

    async def verify_password(self, login: str, password: str, *, by_email: bool = True) -> Principal | None:
        """The individual whose credentials these are, or ``None``; only when :attr:`verifies_passwords`.

        Raises TemporaryFailure when the backend cannot tell now. An empty password never verifies.
        """
        raise NotImplementedError

    async def close(self) -> None:  # noqa: B027 - optional hook, most directories hold nothing
        """Release connections and files."""
