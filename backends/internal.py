"""The internal directory: principals kept in a SQL store (SQLite, PostgreSQL, MySQL/MariaDB) by mailroster itself,
managed with ``mailroster domain|principal|import|export`` (see :mod:`.internal_manage`, :mod:`.internal_io`).

```toml
[directory.default]
type = "internal"
store = "sqlite"                     # a [store.<id>]
```

mailroster creates and upgrades the schema (:mod:`.internal_schema`) on first use. Every answer is what the memory
directory would give for the same data, from a fixed number of indexed queries per call (one to three), so a lookup
costs the same at a thousand principals as at a million. An address belongs to one principal at most (management
refuses a second owner), and a domain is local when a domain principal of that name exists, which management
guarantees for the domain of every address.

:meth:`InternalDirectory.change_counter` reads a counter that every write increments in its own transaction:
polling it is how a daemon learns that its cache is stale.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from .directory import Directory
from .errors import PermanentFailure
from .internal_schema import ensure_schema
from .model import Expansion, Mailbox, Principal, PrincipalType, Recipient
from .settings import CacheConfig
from .store import Executor, Store


@dataclass(frozen=True, slots=True)
class InternalDirectoryConfig:
    """``[directory.<id>]`` with ``type = "internal"``: the data lives in the ``[store.<id>]`` named by ``store``."""

    type: Literal["internal"]
    store: str
    cache: CacheConfig = field(default_factory=CacheConfig)


#: A principal by name (domains are not principals to the Directory interface). Unique index on name.
SQL_PRINCIPAL: Final = (
    "SELECT id, name, type, description, quota, enabled FROM principals WHERE name = $1 AND type <> 'domain'"
)

#: Everything else about principal $1, in one round trip: part 1 secrets, 2 addresses, 3 groups, 4 own members.
SQL_PRINCIPAL_DETAILS: Final = (
    "SELECT 1 AS part, seq, secret AS value FROM secrets WHERE principal_id = $1"
    " UNION ALL SELECT 2, seq, address FROM addresses WHERE principal_id = $1"
    " UNION ALL SELECT 3, m.seq, g.name FROM memberships m JOIN principals g ON g.id = m.group_id"
    " WHERE m.member_id = $1"
    " UNION ALL SELECT 4, l.seq, COALESCE(l.address, p.name) FROM members l LEFT JOIN principals p"
    " ON p.id = l.member_id WHERE l.principal_id = $1"
    " ORDER BY 1, 2"
)

# The primary address of a principal is its address with the lowest seq: a correlated subquery on index
# addresses_principal, written out in each query below.

#: The owner of address $1 (at most one), with what recipient/vrfy/sender_logins need of it. Primary key lookup.
SQL_OWNER: Final = (
    "SELECT p.id, p.name, p.type, p.enabled,"
    " (SELECT f.address FROM addresses f WHERE f.principal_id = p.id ORDER BY f.seq LIMIT 1) AS primary_address"
    " FROM addresses a JOIN principals p ON p.id = a.principal_id WHERE a.address = $1"
)

#: What the group or list $1 (0: none) and the subscribers of address $2 expand to, in the memory directory's
#: order: members by member-of (creation order), the list's own members (their order), then the principals that
#: carry $2 in their email-list (creation order). A NULL target is a member without any address.
SQL_EXPANSION: Final = (
    "SELECT 1 AS part, p.id AS seq,"
    " (SELECT f.address FROM addresses f WHERE f.principal_id = p.id ORDER BY f.seq LIMIT 1) AS target"
    " FROM memberships m JOIN principals p ON p.id = m.member_id WHERE m.group_id = $1"
    " UNION ALL SELECT 2, l.seq, COALESCE(l.address,"
    " (SELECT f.address FROM addresses f WHERE f.principal_id = l.member_id ORDER BY f.seq LIMIT 1))"
    " FROM members l WHERE l.principal_id = $1"
    " UNION ALL SELECT 3, s.principal_id,"
    " (SELECT f.address FROM addresses f WHERE f.principal_id = s.principal_id ORDER BY f.seq LIMIT 1)"
    " FROM subscriptions s WHERE s.address = $2"
    " ORDER BY 1, 2"
)

#: Enabled members of group $1, for sender_logins. Index memberships_group.
SQL_GROUP_SENDERS: Final = (
    "SELECT p.name FROM memberships m JOIN principals p ON p.id = m.member_id"
    " WHERE m.group_id = $1 AND p.enabled = $2 ORDER BY p.id"
)

SQL_NAMES_OF_ADDRESS: Final = (
    "SELECT p.name FROM addresses a JOIN principals p ON p.id = a.principal_id WHERE a.address = $1"
)
SQL_IS_DOMAIN: Final = "SELECT 1 FROM principals WHERE name = $1 AND type = 'domain'"
SQL_CHANGES: Final = "SELECT counter FROM changes WHERE id = 1"

#: One page of individuals after id $1 (keyset paging on index principals_type_id: no OFFSET scans).
SQL_INDIVIDUALS_PAGE: Final = (
    "SELECT id, name FROM principals WHERE type = 'individual' AND id > $1 ORDER BY id LIMIT 1000"
)
_PAGE = 1000  # the LIMIT above


def text(value: object) -> str:
    """A text column as str (MySQL drivers may hand back bytes for binary-collated columns)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8")
    return str(value)


def principal_from_rows(row: tuple[Any, ...], details: list[tuple[Any, ...]]) -> Principal:
    """Build the model from a :data:`SQL_PRINCIPAL` row and its :data:`SQL_PRINCIPAL_DETAILS` rows."""
    parts: dict[int, list[str]] = {1: [], 2: [], 3: [], 4: []}
    for part, _seq, value in details:
        parts[int(part)].append(text(value))
    _id, name, kind, description, quota, enabled = row
    return Principal(
        name=text(name),
        type=PrincipalType(text(kind)),
        secrets=tuple(parts[1]),
        emails=tuple(parts[2]),
        description=text(description),
        quota=int(quota) if quota is not None else None,
        member_of=tuple(parts[3]),
        members=tuple(parts[4]),
        enabled=bool(enabled),
    )


async def fetch_principal(executor: Executor, name: str) -> Principal | None:
    """Principal ``name`` (not a domain) read through ``executor``: a store or a transaction. Two queries."""
    rows = await executor.query(SQL_PRINCIPAL, name)
    if not rows.rows:
        return None
    row = rows.rows[0]
    details = await executor.query(SQL_PRINCIPAL_DETAILS, int(row[0]))
    return principal_from_rows(row, details.rows)


@dataclass(frozen=True, slots=True)
class _Owner:
    id: int
    name: str
    type: PrincipalType
    enabled: bool
    primary: str | None


class InternalDirectory(Directory):
    """The Directory interface over the internal schema of one :class:`Store`, which it owns and closes."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._schema_checked = False

    @classmethod
    def from_config(cls, config: InternalDirectoryConfig, stores: Mapping[str, Store]) -> InternalDirectory:
        """The directory on ``stores[config.store]`` (built by the daemon from the ``[store.<id>]`` tables)."""
        try:
            return cls(stores[config.store])
        except KeyError:
            raise PermanentFailure(f"no store named {config.store!r}") from None

    async def open(self) -> None:
        """Create or upgrade the schema if needed, or refuse a newer one. Done once, on first use."""
        if not self._schema_checked:
            # No lock: concurrent first calls each run the (idempotent, serialised) check.
            await ensure_schema(self.store)
            self._schema_checked = True

    async def _ready(self) -> None:
        """Everything a store call needs: the schema checked (the stores see to running inside a task)."""
        if not self._schema_checked:
            await self.open()

    async def _query(self, sql: str, *params: object) -> list[tuple[Any, ...]]:
        await self._ready()
        return (await self.store.query(sql, *params)).rows

    async def change_counter(self) -> int:
        """The store's change counter: it grows with every write made through management. One primary-key read."""
        rows = await self._query(SQL_CHANGES)
        return int(rows[0][0]) if rows else 0

    async def _owner(self, address: str) -> _Owner | None:
        rows = await self._query(SQL_OWNER, address)
        if not rows:
            return None
        pid, name, kind, enabled, primary = rows[0]
        return _Owner(
            int(pid), text(name), PrincipalType(text(kind)), bool(enabled), text(primary) if primary else None
        )

    async def _expansion(self, group_id: int, address: str) -> Expansion | None:
        """What ``group_id``'s members and ``address``'s subscribers expand to; None when there are neither."""
        rows = await self._query(SQL_EXPANSION, group_id, address)
        if not rows:
            return None
        return Expansion(tuple(dict.fromkeys(text(target) for _part, _seq, target in rows if target)))

    # The Directory interface.

    async def principal(self, name: str) -> Principal | None:
        await self._ready()
        return await fetch_principal(self.store, name)

    async def recipient(self, address: str) -> Recipient | None:
        owner = await self._owner(address)
        if owner is None:
            return await self._expansion(0, address)
        if owner.type is PrincipalType.INDIVIDUAL:
            return Mailbox((owner.name,), (owner.primary,))
        # A group's or a list's address exists even when nobody is in it yet: an empty expansion, not invalid.
        return await self._expansion(owner.id, address) or Expansion(())

    async def is_local_domain(self, domain: str) -> bool:
        return bool(await self._query(SQL_IS_DOMAIN, domain))

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return tuple(text(name) for (name,) in await self._query(SQL_NAMES_OF_ADDRESS, address))

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        owner = await self._owner(address)
        if owner is None:
            return ()
        if owner.type is PrincipalType.INDIVIDUAL:
            return (owner.name,) if owner.enabled else ()
        if owner.type is PrincipalType.GROUP:
            rows = await self._query(SQL_GROUP_SENDERS, owner.id, True)
            return tuple(dict.fromkeys(text(name) for (name,) in rows))
        return ()

    async def vrfy(self, address: str) -> tuple[str, ...]:
        owner = await self._owner(address)
        if owner is not None and owner.type is PrincipalType.INDIVIDUAL and owner.primary:
            return (owner.primary,)
        return ()

    async def expn(self, address: str) -> tuple[str, ...]:
        found = await self.recipient(address)
        return found.addresses if isinstance(found, Expansion) else ()

    async def individuals(self) -> AsyncIterator[str]:
        # Pages, so that listing a million users neither holds one huge result nor a transaction open.
        last = 0
        while True:
            rows = await self._query(SQL_INDIVIDUALS_PAGE, last)
            for _id, name in rows:
                yield text(name)
            if len(rows) < _PAGE:
                return
            last = int(rows[-1][0])

    async def close(self) -> None:
        await self.store.close()
