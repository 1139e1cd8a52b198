"""The principal model and the results of directory operations."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class PrincipalType(enum.Enum):
    """Stalwart's principal classes that matter to a mail directory."""

    INDIVIDUAL = "individual"
    GROUP = "group"
    LIST = "list"
    DOMAIN = "domain"


@dataclass(frozen=True, slots=True)
class Principal:
    """An account, group, mailing list or domain.

    ``emails[0]`` is the primary address, the rest are aliases. ``members`` holds, for lists and groups,
    principal names or external addresses. Secrets never appear in ``repr``.
    """

    name: str
    type: PrincipalType = PrincipalType.INDIVIDUAL
    secrets: tuple[str, ...] = field(default=(), repr=False)
    emails: tuple[str, ...] = ()
    description: str = ""
    quota: int | None = None
    member_of: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    enabled: bool = True

    @property
    def primary_email(self) -> str | None:
        return self.emails[0] if self.emails else None


@dataclass(frozen=True, slots=True)
class Mailbox:
    """The address is delivered to the mailbox of these principals (usually one)."""

    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Expansion:
    """The address is a list or a group: mail goes to these addresses."""

    addresses: tuple[str, ...]


Recipient = Mailbox | Expansion
"""What :meth:`Directory.recipient` answers when the address exists; ``None`` means invalid."""
