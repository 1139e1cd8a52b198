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
    """The address is delivered to the mailbox of these principals (usually one).

    ``primaries``, when the backend learnt them in the same query, are the principals' primary addresses in the
    order of ``names`` (``None`` for one without any), so that the mailbox and alias maps need no ``principal()``
    call; ``None`` when it did not. Not part of equality: it only saves a trip to the backend.
    """

    names: tuple[str, ...]
    primaries: tuple[str | None, ...] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Expansion:
    """The address is a list or a group: mail goes to these addresses."""

    addresses: tuple[str, ...]


Recipient = Mailbox | Expansion
"""What :meth:`Directory.recipient` answers when the address exists; ``None`` means invalid."""
