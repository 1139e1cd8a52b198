"""The memory directory: principals written in the configuration, with Stalwart's keys.

```toml
[directory.static]
type = "memory"
domains = ["example.org"]            # optional, added to the domains of every address
[[directory.static.principals]]
name = "jane"
class = "individual"                 # individual | admin | group | list
secret = "{ARGON2ID}$argon2id$..."   # string or list
email = ["jane@example.org", "jane.doe@example.org"]   # first is primary
email-list = ["info@example.org"]    # list addresses jane receives
member-of = ["sales"]
quota = "5G"
```
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from .address import normalize_address, normalize_domain
from .directory import Directory
from .model import Expansion, Mailbox, Principal, PrincipalType, Recipient
from .settings import CacheConfig, Size

_CLASSES = {
    "individual": PrincipalType.INDIVIDUAL,
    "admin": PrincipalType.INDIVIDUAL,
    "group": PrincipalType.GROUP,
    "list": PrincipalType.LIST,
}


@dataclass(frozen=True, slots=True)
class MemoryPrincipalConfig:
    name: str
    class_: Literal["individual", "admin", "group", "list"] = "individual"
    secret: list[str] = field(default_factory=list, repr=False)
    description: str = ""
    quota: Size | None = None
    email: list[str] = field(default_factory=list)
    email_list: list[str] = field(default_factory=list)
    member_of: list[str] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class MemoryDirectoryConfig:
    type: Literal["memory"]
    principals: list[MemoryPrincipalConfig] = field(default_factory=list)
    domains: list[str] = field(default_factory=list)
    cache: CacheConfig = field(default_factory=CacheConfig)


def principal_from_config(entry: MemoryPrincipalConfig) -> Principal:
    """Build the model from one ``[[principals]]`` entry, normalising names and addresses."""
    return Principal(
        name=entry.name.lower(),
        type=_CLASSES[entry.class_],
        secrets=tuple(entry.secret),
        emails=tuple(dict.fromkeys(normalize_address(e) for e in entry.email)),
        description=entry.description,
        quota=int(entry.quota) if entry.quota else None,
        member_of=tuple(m.lower() for m in entry.member_of),
        members=tuple(m.lower() for m in entry.members),
        enabled=entry.enabled,
    )


class MemoryDirectory(Directory):
    """Every answer comes from indexes built once, at start-up; nothing here ever fails or suspends."""

    def __init__(self, principals: list[Principal], domains: list[str] = ()) -> None:  # type: ignore[assignment]
        self._by_name: dict[str, Principal] = {}
        self._owners: dict[str, list[str]] = defaultdict(list)
        self._list_subscribers: dict[str, list[str]] = defaultdict(list)
        self._group_members: dict[str, list[str]] = defaultdict(list)
        self._domains: set[str] = {normalize_domain(d) for d in domains}
        for p in principals:
            self._by_name[p.name] = p
            for address in p.emails:
                self._owners[address].append(p.name)
                self._domains.add(address.rpartition("@")[2])
            for group in p.member_of:
                self._group_members[group].append(p.name)

    @classmethod
    def from_config(cls, config: MemoryDirectoryConfig) -> MemoryDirectory:
        principals = [principal_from_config(p) for p in config.principals]
        directory = cls(principals, config.domains)
        for entry in config.principals:
            for address in entry.email_list:
                normalized = normalize_address(address)
                directory._list_subscribers[normalized].append(entry.name.lower())
                directory._domains.add(normalized.rpartition("@")[2])
        return directory

    def _primary(self, member: str) -> str | None:
        """A member name's primary address; an external address (with ``@``) stands for itself."""
        if "@" in member:
            return member
        p = self._by_name.get(member)
        return p.primary_email if p is not None else None

    def _expand(self, members: list[str] | tuple[str, ...]) -> Expansion:
        addresses = (self._primary(m) for m in members)
        return Expansion(tuple(dict.fromkeys(a for a in addresses if a)))

    async def principal(self, name: str) -> Principal | None:
        return self._by_name.get(name)

    async def recipient(self, address: str) -> Recipient | None:
        owners = self._owners.get(address)
        if owners:
            individuals = tuple(n for n in owners if self._by_name[n].type is PrincipalType.INDIVIDUAL)
            if individuals:
                return Mailbox(individuals)
            # A group's or a list's address: its members (by member-of or listed), and list subscribers.
            owner = self._by_name[owners[0]]
            members = [*self._group_members.get(owner.name, ()), *owner.members]
            return self._expand(members + self._list_subscribers.get(address, []))
        subscribers = self._list_subscribers.get(address)
        if subscribers:
            return self._expand(subscribers)
        return None

    async def is_local_domain(self, domain: str) -> bool:
        return domain in self._domains

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return tuple(self._owners.get(address, ()))

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        logins: list[str] = []
        for name in self._owners.get(address, ()):
            owner = self._by_name[name]
            if owner.type is PrincipalType.INDIVIDUAL:
                logins.append(name)
            elif owner.type is PrincipalType.GROUP:
                logins.extend(self._group_members.get(name, ()))
        return tuple(dict.fromkeys(n for n in logins if self._by_name[n].enabled))

    async def individuals(self) -> AsyncIterator[str]:
        for principal in list(self._by_name.values()):
            if principal.type is PrincipalType.INDIVIDUAL:
                yield principal.name

    async def vrfy(self, address: str) -> tuple[str, ...]:
        found = await self.recipient(address)
        if isinstance(found, Mailbox):
            return tuple(a for a in (self._primary(n) for n in found.names) if a)
        return ()

    async def expn(self, address: str) -> tuple[str, ...]:
        found = await self.recipient(address)
        return found.addresses if isinstance(found, Expansion) else ()
