"""The SQL directory: an existing database (PostfixAdmin, Stalwart's SQL schema, one's own) read with the
administrator's own queries, Stalwart's pre-0.10.7 query set plus ``list``.

```toml
[directory.sql]
type = "sql"
store = "pg"                       # a [store.<id>]
[directory.sql.query]              # each takes one parameter, written $1 whatever the driver
name = "SELECT name, type, secret, description, quota FROM accounts WHERE name = $1 AND active = true"
secrets = "..."                    # more secrets of a login (app passwords)
members = "SELECT member_of FROM group_members WHERE name = $1"        # groups a principal is in
emails = "SELECT address FROM emails WHERE name = $1 ORDER BY type DESC"  # primary first
recipients = "SELECT name FROM emails WHERE address = $1"              # who owns an address
expand = "..."                     # addresses a list or group address expands to
verify = "..."                     # SMTP VRFY
domains = "SELECT 1 FROM emails WHERE address LIKE CONCAT('%@', $1) LIMIT 1"
list = "SELECT name FROM accounts WHERE type = 'individual' AND active = true"
[directory.sql.columns]            # column names in the name query's result, matched case-insensitively
class = "type"
secret = "secret"
description = "description"
email = "address"
quota = "quota"
```

The queries decide what exists: a name query that filters ``active = true`` makes disabled accounts unknown.
Every value is a bound parameter; a query that is not configured answers "nothing".
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .address import normalize_address
from .directory import Directory
from .errors import PermanentFailure
from .model import Expansion, Mailbox, Principal, PrincipalType, Recipient
from .settings import CacheConfig
from .store import Rows, Store

_SEPARATORS = re.compile(r"[\s,]+")
_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")

#: Values of ``columns.class`` and the principal types they mean (Stalwart's, plus "list").
_CLASSES = {
    "individual": PrincipalType.INDIVIDUAL,
    "person": PrincipalType.INDIVIDUAL,
    "user": PrincipalType.INDIVIDUAL,
    "admin": PrincipalType.INDIVIDUAL,
    "administrator": PrincipalType.INDIVIDUAL,
    "superuser": PrincipalType.INDIVIDUAL,
    "group": PrincipalType.GROUP,
    "list": PrincipalType.LIST,
}


@dataclass(frozen=True, slots=True)
class SqlQueries:
    name: str = ""
    secrets: str = ""
    members: str = ""
    emails: str = ""
    recipients: str = ""
    verify: str = ""
    expand: str = ""
    domains: str = ""
    list: str = ""


@dataclass(frozen=True, slots=True)
class SqlColumns:
    class_: str = ""
    secret: str = ""
    description: str = ""
    email: str = ""
    quota: str = ""


@dataclass(frozen=True, slots=True)
class SqlDirectoryConfig:
    type: Literal["sql"]
    store: str
    query: SqlQueries = field(default_factory=SqlQueries)
    columns: SqlColumns = field(default_factory=SqlColumns)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not self.query.name:
            raise ValueError("query.name is required: it is how a login becomes a principal")
        for key in ("name", "secrets", "members", "emails", "recipients", "verify", "expand", "domains"):
            sql = getattr(self.query, key)
            if sql and "$1" not in sql:
                raise ValueError(f"query.{key} must use its parameter as $1")


def _text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return "" if value is None else str(value)


def _first_row(rows: Rows) -> Callable[[str], Any]:
    """A reader of the first row's configured columns: ``None`` for a column not configured or not in the result."""
    row = rows.rows[0]

    def col(key: str) -> Any:
        index = rows.column(key) if key else None
        return row[index] if index is not None else None

    return col


def _first_address(values: list[str]) -> str | None:
    """The first of ``values`` that is an address, normalised (principal()'s primary, from the same values)."""
    for value in values:
        if value:
            try:
                return normalize_address(value)
            except ValueError:
                continue
    return None


def _first_column(rows: Rows) -> list[str]:
    return [_text(row[0]) for row in rows.rows if row and row[0] is not None]


class SqlDirectory(Directory):
    """A Directory answered by SQL queries on a :class:`Store`."""

    def __init__(self, store: Store, config: SqlDirectoryConfig) -> None:
        self.store = store
        self._q = config.query
        self._c = config.columns

    @classmethod
    def from_config(cls, config: SqlDirectoryConfig, stores: Mapping[str, Store]) -> SqlDirectory:
        try:
            return cls(stores[config.store], config)
        except KeyError:
            raise PermanentFailure(f"no store named {config.store!r}") from None

    async def close(self) -> None:
        """Close the store's connections (a store shared with other directories is closed once, at shutdown)."""
        await self.store.close()

    async def _rows(self, sql: str, value: str) -> Rows:
        if not sql:
            return Rows((), [])
        return await self.store.query(sql, value)

    async def _values(self, sql: str, value: str) -> list[str]:
        return _first_column(await self._rows(sql, value))

    async def _targets(self, address: str) -> list[str]:
        """What ``expand`` gives for ``address``: one address a row, or, as PostfixAdmin's ``alias.goto`` and
        Postfix's own alias tables hold them, several in one value separated by commas or white space."""
        return [t for value in await self._values(self._q.expand, address) for t in _SEPARATORS.split(value) if t]

    # Directory.

    async def principal(self, name: str) -> Principal | None:
        rows = await self.store.query(self._q.name, name)
        if not rows.rows:
            return None
        col = _first_row(rows)
        # Stalwart's rule: a class that is none of the known words leaves the default, individual.
        kind = _CLASSES.get(_text(col(self._c.class_)).lower(), PrincipalType.INDIVIDUAL)
        canonical = _text(col("name")) or name
        secrets = [_text(col(self._c.secret))] if _text(col(self._c.secret)) else []
        for value in await self._values(self._q.secrets, name):
            if value and value not in secrets:
                secrets.append(value)
        emails: list[str] = []
        primary = _text(col(self._c.email))
        for address in [primary, *await self._values(self._q.emails, name)]:
            if address:
                try:
                    normalized = normalize_address(address)
                except ValueError:
                    continue
                if normalized not in emails:
                    emails.append(normalized)
        quota_value = col(self._c.quota)
        quota = int(quota_value) if isinstance(quota_value, int | float) and quota_value > 0 else None
        groups = tuple(g.lower() for g in await self._values(self._q.members, name))
        members: tuple[str, ...] = ()
        if kind is PrincipalType.LIST and emails:
            members = tuple(a.lower() for a in await self._targets(emails[0]))
        return Principal(
            name=canonical.lower(),
            type=kind,
            secrets=tuple(secrets),
            emails=tuple(emails),
            description=_text(col(self._c.description)),
            quota=quota,
            member_of=groups,
            members=members,
        )

    async def _individual(self, name: str) -> tuple[str, str | None] | None:
        """(canonical name, primary address) of ``name`` if it is an individual: what :meth:`principal` would say of
        it, from the name query and, only when that has no usable address, the emails query (two queries at most,
        not principal()'s four or five)."""
        rows = await self.store.query(self._q.name, name)
        if not rows.rows:
            return None
        col = _first_row(rows)
        if _CLASSES.get(_text(col(self._c.class_)).lower(), PrincipalType.INDIVIDUAL) is not PrincipalType.INDIVIDUAL:
            return None
        canonical = (_text(col("name")) or name).lower()
        primary = _first_address([_text(col(self._c.email))])
        if primary is None:
            primary = _first_address(await self._values(self._q.emails, name))
        return canonical, primary

    async def recipient(self, address: str) -> Recipient | None:
        names = [n.lower() for n in await self._values(self._q.recipients, address)]
        individuals: dict[str, str | None] = {}
        for name in names:
            found = await self._individual(name)
            if found is not None:
                individuals.setdefault(*found)
        if individuals:
            return Mailbox(tuple(individuals), tuple(individuals.values()))
        expanded = [normalize_address(a) for a in await self._targets(address) if "@" in a]
        if expanded:
            return Expansion(tuple(dict.fromkeys(expanded)))
        if names:  # a group or list with no member yet still exists
            return Expansion(())
        return None

    async def is_local_domain(self, domain: str) -> bool:
        # Administrators' domain queries often match with LIKE '%@' || $1: a key holding LIKE wildcards (% or _,
        # neither valid in a mail domain) would widen that search, so such keys exist nowhere.
        if not _DOMAIN.fullmatch(domain):
            return False
        return bool((await self._rows(self._q.domains, domain)).rows)

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n.lower() for n in await self._values(self._q.recipients, address)))

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        logins: list[str] = []
        for name in await self.email_to_names(address):
            principal = await self.principal(name)
            if principal is None:
                continue
            if principal.type is PrincipalType.INDIVIDUAL:
                logins.append(principal.name)
            elif principal.type is PrincipalType.GROUP:
                # A group's members may send as the group: members are found through the group's expansion.
                for member_address in await self._targets(address):
                    owners = await self._values(self._q.recipients, member_address.lower())
                    logins.extend(n.lower() for n in owners)
        return tuple(dict.fromkeys(logins))

    async def vrfy(self, address: str) -> tuple[str, ...]:
        if self._q.verify:
            return tuple(dict.fromkeys(a.lower() for a in await self._values(self._q.verify, address)))
        found = await self.recipient(address)
        if not isinstance(found, Mailbox):
            return ()
        primaries = []
        for name in found.names:
            principal = await self.principal(name)
            if principal is not None and principal.primary_email:
                primaries.append(principal.primary_email)
        return tuple(primaries)

    async def expn(self, address: str) -> tuple[str, ...]:
        found = await self.recipient(address)
        return found.addresses if isinstance(found, Expansion) else ()

    async def individuals(self) -> AsyncIterator[str]:
        if not self._q.list:
            return
        rows = await self.store.query(self._q.list)
        for value in _first_column(rows):
            yield value.lower()
