"""The LDAP directory's questions as blocking functions of one bound connection (a :class:`Reader`).

Entries become principals as in Stalwart's ``entry_to_principal``: the first value of the first name attribute
(lower-cased) is the name, else the value of the entry's RDN; the class values give the type; the first value of
the email attributes is the primary address, further values and the alias attributes are aliases (lower-cased);
the secret attribute's values are the secrets; the first description value and a positive integer quota count.

Memberships, both ways:

- an entry's groups: the values of ``attributes.groups`` (a value with ``=`` is a group's DN, whose name is read;
  anything else is a group name), plus, when ``filter.members`` is set, the groups that search finds for the
  entry's DN (the reverse search for directories without memberOf);
- a group's or list's members: the values of ``attributes.members`` on its entry (DNs, addresses, login names);
  when it has none, the entries whose ``attributes.groups`` holds the group's DN. Member entries are read through
  ``filter.name`` with ``*``, so that an account the login filter excludes (disabled) is neither a recipient of a
  group's mail nor allowed to send as the group.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from ldap3.utils.conv import escape_filter_chars

from .address import normalize_address
from .errors import PermanentFailure
from .ldap_client import Entry, Reader, dn_value, is_dn
from .ldap_config import LdapDirectoryConfig, Template
from .model import Expansion, Mailbox, Principal, PrincipalType, Recipient

log = logging.getLogger(__name__)

# objectClass values (lower-cased) -> type. Stalwart's mapping, plus nisMailAlias (misc.schema, the mail alias
# and list entries of Postfix's LDAP_README) and "list" for lists. A list wins over a group, a group over an
# individual; an entry with no known class is an individual, as in Stalwart.
_CLASSES = {
    "posixaccount": PrincipalType.INDIVIDUAL,
    "individual": PrincipalType.INDIVIDUAL,
    "person": PrincipalType.INDIVIDUAL,
    "inetorgperson": PrincipalType.INDIVIDUAL,
    "posixgroup": PrincipalType.GROUP,
    "groupofuniquenames": PrincipalType.GROUP,
    "groupofnames": PrincipalType.GROUP,
    "group": PrincipalType.GROUP,
    "nismailalias": PrincipalType.LIST,
    "list": PrincipalType.LIST,
}
_PRECEDENCE = (PrincipalType.LIST, PrincipalType.GROUP, PrincipalType.INDIVIDUAL)


def escape(value: str) -> str:
    """RFC 4515 escaping of a value put into a filter: ``*``, ``(``, ``)``, ``\\`` and NUL."""
    return str(escape_filter_chars(value))


def _usable(key: str) -> bool:
    """Whether a key can match anything. A NUL is escaped (``\\00``), but slapd ends IA5 values such as mail
    at it, so that ``jane@example.org<NUL>`` would find jane: no key with a NUL is sent at all."""
    return bool(key) and "\0" not in key


def _unique(items: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


@dataclass(frozen=True, slots=True)
class Member:
    """A member of a group or list: a principal (name, type, primary address) or an external address."""

    name: str | None
    type: PrincipalType | None
    primary: str | None


class LdapQueries:
    """Filters and attribute lists from the configuration, and one method per directory question."""

    def __init__(self, config: LdapDirectoryConfig) -> None:
        self.config = config
        attrs, filters = config.attributes, config.filter
        self.name_filter = Template.parse(filters.name)
        self.email_filter = Template.parse(filters.email)
        self.verify_filter = Template.parse(filters.verify) if filters.verify else self.email_filter
        self.expand_filter = Template.parse(filters.expand) if filters.expand else None
        self.domains_filter = Template.parse(filters.domains) if filters.domains else None
        self.members_filter = Template.parse(filters.members, member=True) if filters.members else None
        # Every entry filter.name could match: member entries are read through it (see the module docstring).
        self.any_principal = self.name_filter.match_all()
        self.list_filter = filters.list or self.any_principal
        self.name_attributes = [*attrs.name, *attrs.class_]
        self.member_attributes = [*self.name_attributes, *attrs.email]
        self.owner_attributes = [*self.member_attributes, *attrs.members]
        self.principal_attributes = [
            *self.owner_attributes,
            *attrs.groups,
            *attrs.description,
            *attrs.secret,
            *attrs.email_alias,
            *attrs.quota,
        ]

    # Entries -> model.

    def name_as_stored(self, entry: Entry) -> str | None:
        return entry.first(self.config.attributes.name) or entry.rdn_value()

    def name_of(self, entry: Entry) -> str | None:
        name = self.name_as_stored(entry)
        return name.lower() if name else None

    def type_of(self, entry: Entry) -> PrincipalType:
        found = {_CLASSES.get(c.lower()) for c in entry.values(self.config.attributes.class_)}
        return next((t for t in _PRECEDENCE if t in found), PrincipalType.INDIVIDUAL)

    def emails_of(self, entry: Entry) -> tuple[str, ...]:
        attrs = self.config.attributes
        return _unique(_address(v) for v in entry.values([*attrs.email, *attrs.email_alias]))

    def primary_of(self, entry: Entry) -> str | None:
        return next((a for a in (_address(v) for v in entry.values(self.config.attributes.email)) if a), None)

    def member_of_entry(self, entry: Entry) -> Member | None:
        name = self.name_of(entry)
        return Member(name, self.type_of(entry), self.primary_of(entry)) if name else None

    def principal_of(self, entry: Entry) -> Principal | None:
        """The principal an entry describes, without memberships (see :meth:`complete`); None without a name."""
        name = self.name_of(entry)
        if name is None:
            return None
        attrs = self.config.attributes
        quota = next((int(v) for v in entry.values(attrs.quota) if v.strip().isdigit()), 0)
        secrets = []
        for value in entry.raw(attrs.secret):
            try:
                secrets.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                log.warning("LDAP entry %s: a secret value is not UTF-8 text; ignored", entry.dn)
        return Principal(
            name=name,
            type=self.type_of(entry),
            secrets=tuple(s for s in secrets if s),
            emails=self.emails_of(entry),
            description=entry.first(attrs.description) or "",
            quota=quota or None,
        )

    # Memberships.

    def complete(self, reader: Reader, entry: Entry, principal: Principal) -> Principal:
        """``principal`` with its groups and, for a group or list, its members."""
        names: dict[str, str | None] = {}  # group DN (lower-cased) -> name: the same group twice is read once
        member_of: list[str | None] = []
        for value in entry.values(self.config.attributes.groups):
            if not is_dn(value):
                member_of.append(value.lower())
                continue
            key = value.lower()
            if key not in names:
                group = reader.read(value, "(objectClass=*)", self.name_attributes)
                names[key] = self.name_of(group) if group is not None else None
            member_of.append(names[key])
        if self.members_filter is not None:
            # {name} as the entry spells it: posixGroup's memberUid matches case-exactly.
            search = self.members_filter.fill(entry.dn, escape, name=self.name_as_stored(entry) or principal.name)
            member_of.extend(self.name_of(g) for g in reader.search(search, self.name_attributes))
        members: tuple[str, ...] = ()
        if principal.type is not PrincipalType.INDIVIDUAL:
            members = _unique(m.name if m.name else m.primary for m in self.members(reader, entry))
        return dataclasses.replace(principal, member_of=_unique(member_of), members=members)

    def members(self, reader: Reader, group: Entry) -> list[Member]:
        """The members of a group or list entry (see the module docstring)."""
        found: list[Member] = []
        any_value = False
        seen: dict[str, Member | None] = {}
        for value in group.values(self.config.attributes.members):
            any_value = True
            member = self._member(reader, value, seen)
            if member is not None:
                found.append(member)
        groups_attributes = self.config.attributes.groups
        if not any_value and groups_attributes:
            assertion = "".join(f"({a}={escape(group.dn)})" for a in groups_attributes)
            search = f"(&{self.any_principal}(|{assertion}))"
            found.extend(m for e in reader.search(search, self.member_attributes) if (m := self.member_of_entry(e)))
        return found

    def _member(self, reader: Reader, value: str, seen: dict[str, Member | None]) -> Member | None:
        if "@" in value and "," not in value:  # rfc822MailMember, or an address in a members attribute
            address = _address(value)
            return Member(None, None, address) if address else None
        key = value.lower()
        if key in seen:
            return seen[key]
        member: Member | None = None
        if "=" in value:
            entry = reader.read(dn_value(value), self.any_principal, self.member_attributes)
            member = self.member_of_entry(entry) if entry is not None else None
        else:  # posixGroup's memberUid: a login name
            entries = reader.search(self.name_filter.fill(value, escape), self.member_attributes)
            member = next((m for e in entries if (m := self.member_of_entry(e))), None)
        seen[key] = member
        return member

    # The directory's questions.

    def principal_entry(self, reader: Reader, name: str) -> tuple[Entry, Principal] | None:
        """The entry whose login is ``name``, and its principal with memberships (see :meth:`_login_entry`)."""
        found = self._login_entry(reader, name)
        return (found[0], self.complete(reader, *found)) if found is not None else None

    def _login_entry(self, reader: Reader, name: str) -> tuple[Entry, Principal] | None:
        """The entry whose login is ``name``, and its principal without memberships. An individual wins over a
        group of the same name; two individuals (or two groups) are a data error that no answer would be right
        for."""
        if not _usable(name):
            return None
        found = [
            (e, p)
            for e in reader.search(self.name_filter.fill(name, escape), self.principal_attributes)
            if (p := self.principal_of(e))
        ]
        if not found:
            return None
        best = next(t for t in _PRECEDENCE[::-1] if any(p.type is t for _, p in found))
        chosen = [(e, p) for e, p in found if p.type is best]
        if len({e.dn.lower() for e, _ in chosen}) > 1:
            raise PermanentFailure(
                f"LDAP: the login {name!r} matches {len(chosen)} entries; filter.name must match one"
            )
        return chosen[0]

    def principal(self, reader: Reader, name: str) -> Principal | None:
        found = self.principal_entry(reader, name)
        return found[1] if found is not None else None

    def principal_at(self, reader: Reader, dn: str) -> Principal | None:
        """The principal of the entry ``dn``, if filter.name can match it (a bound user's own entry)."""
        entry = reader.read(dn, self.any_principal, self.principal_attributes)
        principal = self.principal_of(entry) if entry is not None else None
        return self.complete(reader, entry, principal) if entry is not None and principal is not None else None

    def login_entry(self, reader: Reader, login: str, *, by_email: bool) -> tuple[str, Principal] | None:
        """DN and principal of the individual that logs in as ``login``: by name, else (``by_email``) by the one
        individual that has the address ``login``."""
        found = self.principal_entry(reader, login)
        if found is None and by_email and "@" in login and _usable(login):
            try:
                address = normalize_address(login)
            except ValueError:
                return None
            owners = [
                (e, p)
                for e in reader.search(self.email_filter.fill(address, escape), self.principal_attributes)
                if (p := self.principal_of(e)) and p.type is PrincipalType.INDIVIDUAL
            ]
            if len(owners) == 1:  # an address shared by several accounts names no single login
                found = owners[0][0], self.complete(reader, *owners[0])
        if found is None or found[1].type is not PrincipalType.INDIVIDUAL:
            return None
        return found[0].dn, found[1]

    def _owners(self, reader: Reader, address: str) -> list[tuple[Entry, Member]]:
        entries = reader.search(self.email_filter.fill(address, escape), self.owner_attributes)
        return [(e, m) for e in entries if (m := self.member_of_entry(e))]

    def recipient(self, reader: Reader, address: str) -> Recipient | None:
        if not _usable(address):
            return None
        owners = self._owners(reader, address)
        mailboxes = _unique(m.name for _, m in owners if m.type is PrincipalType.INDIVIDUAL)
        if mailboxes:
            # The primaries, as principal() would give them (the same search by name, without the memberships it
            # would also read), so that the mailbox and alias maps need no second trip. Any doubt: leave them out.
            logins = [self._login_entry(reader, name) for name in mailboxes]
            if all(found is not None and found[1].name == name for found, name in zip(logins, mailboxes, strict=True)):
                return Mailbox(mailboxes, tuple(found[1].primary_email for found in logins if found is not None))
            return Mailbox(mailboxes)
        addresses = [m.primary for e, _ in owners for m in self.members(reader, e)]
        found = bool(owners)
        if self.expand_filter is not None:
            subscribers = reader.search(self.expand_filter.fill(address, escape), self.member_attributes)
            found = found or bool(subscribers)
            addresses.extend(self.primary_of(e) for e in subscribers)
        return Expansion(_unique(addresses)) if found else None

    def is_local_domain(self, reader: Reader, domain: str) -> bool:
        if not _usable(domain):
            return False
        if self.domains_filter is not None:
            search = self.domains_filter.fill(domain, escape)
        else:  # Stalwart 0.15 has no domains filter: any address in the domain makes it local
            attrs = self.config.attributes
            search = "(|" + "".join(f"({a}=*@{escape(domain)})" for a in [*attrs.email, *attrs.email_alias]) + ")"
        return bool(reader.search(search, [], size_limit=1))

    def email_to_names(self, reader: Reader, address: str) -> tuple[str, ...]:
        if not _usable(address):
            return ()
        entries = reader.search(self.email_filter.fill(address, escape), self.name_attributes)
        return _unique(self.name_of(e) for e in entries)

    def sender_logins(self, reader: Reader, address: str) -> tuple[str, ...]:
        if not _usable(address):
            return ()
        logins: list[str | None] = []
        for entry, owner in self._owners(reader, address):
            if owner.type is PrincipalType.INDIVIDUAL:
                logins.append(owner.name)
            elif owner.type is PrincipalType.GROUP:  # a group's members may send as the group; a list's may not
                logins.extend(m.name for m in self.members(reader, entry) if m.type is PrincipalType.INDIVIDUAL)
        return _unique(logins)

    def vrfy(self, reader: Reader, address: str) -> tuple[str, ...]:
        if not _usable(address):
            return ()
        entries = reader.search(self.verify_filter.fill(address, escape), self.member_attributes)
        return _unique(self.primary_of(e) for e in entries if self.type_of(e) is PrincipalType.INDIVIDUAL)

    def expn(self, reader: Reader, address: str) -> tuple[str, ...]:
        found = self.recipient(reader, address)
        return found.addresses if isinstance(found, Expansion) else ()

    def individuals(self, reader: Reader) -> list[str]:
        entries = reader.search_paged(self.list_filter, self.name_attributes)
        return list(_unique(self.name_of(e) for e in entries if self.type_of(e) is PrincipalType.INDIVIDUAL))


def _address(value: str) -> str | None:
    """An address attribute value, normalised. Active Directory's proxyAddresses carry a type: ``SMTP:`` (the
    primary) and ``smtp:`` values are addresses, other types (``X500:``, ``SIP:``) are not."""
    kind, colon, rest = value.partition(":")
    if colon and "@" not in kind and kind.isalnum():
        if kind.lower() != "smtp":
            return None
        value = rest
    try:
        return normalize_address(value.strip())
    except ValueError:
        return None
