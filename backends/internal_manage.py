"""Management of the internal directory: domains, principals, import and export, each one transaction.

Every write runs in a single transaction that also increments the store's change counter, so daemons sharing the
store see it at once (see :meth:`.internal.InternalDirectory.change_counter`). A refusal raises
:class:`ManagementError` from inside the transaction: the transaction rolls back and nothing is changed.

Refused, each with a message naming what is wrong: an invalid name, domain or address; an address whose domain is
not a local domain (import creates the domains it needs instead); an address that already belongs to another
principal; adding a principal or a domain whose name exists; an unknown principal or group; a ``member-of`` naming
anything but a group; a password or members for a principal type that cannot have them; deleting a domain that
still has addresses, unless forced, which deletes those addresses (and email-list subscriptions in the domain) but
keeps the principals that had them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field

from .errors import TemporaryFailure
from .internal import fetch_principal, text
from .internal_checks import ManagementError, check_address, check_domain, check_name, check_secret, domain_of
from .internal_schema import ensure_schema
from .model import PrincipalType
from .store import ConstraintViolation, Executor, Store

# These type names are the CLI's and the import format's (`class`): a domain is not managed as a principal.
PRINCIPAL_TYPES = ("individual", "group", "list")


@dataclass(frozen=True, slots=True)
class PrincipalRecord:
    """A principal as management reads and writes it: the model's fields plus ``email_list`` (Stalwart's
    ``email-list``: list addresses the principal receives). ``secrets`` are stored forms (hashes)."""

    name: str
    type: PrincipalType = PrincipalType.INDIVIDUAL
    secrets: tuple[str, ...] = field(default=(), repr=False)
    emails: tuple[str, ...] = ()
    email_list: tuple[str, ...] = ()
    member_of: tuple[str, ...] = ()
    members: tuple[str, ...] = ()
    description: str = ""
    quota: int | None = None
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class PrincipalUpdate:
    """Changes to one principal; ``None`` and empty tuples leave a field as it is. ``secret`` replaces the
    passwords but keeps app passwords (``$app$...``) and TOTP secrets; ``quota = 0`` removes the quota."""

    secret: str | None = field(default=None, repr=False)
    add_emails: tuple[str, ...] = ()
    remove_emails: tuple[str, ...] = ()
    add_member_of: tuple[str, ...] = ()
    remove_member_of: tuple[str, ...] = ()
    add_members: tuple[str, ...] = ()
    remove_members: tuple[str, ...] = ()
    quota: int | None = None
    description: str | None = None
    enabled: bool | None = None

    def is_empty(self) -> bool:
        return self == PrincipalUpdate()


@dataclass(frozen=True, slots=True)
class DirectoryData:
    """A whole directory (or the part an import adds): extra local domains and principals, in creation order."""

    domains: tuple[str, ...] = ()
    principals: tuple[PrincipalRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class ImportSummary:
    principals: int
    domains_created: int


_BUMP = "UPDATE changes SET counter = counter + 1 WHERE id = 1"
_COUNTER = "SELECT counter FROM changes WHERE id = 1"
_FIND = "SELECT id, type FROM principals WHERE name = $1"
_INSERT_PRINCIPAL = "INSERT INTO principals (name, type, description, quota, enabled) VALUES ($1, $2, $3, $4, $5)"
_OWNER_OF = (
    "SELECT a.principal_id, p.name FROM addresses a JOIN principals p ON p.id = a.principal_id WHERE a.address = $1"
)
_SUBSCRIBERS_OF = "SELECT address FROM subscriptions WHERE principal_id = $1 ORDER BY seq"
_COUNT_DOMAINS = "SELECT COUNT(*) FROM principals WHERE type = 'domain'"


def _quota(quota: int | None) -> int | None:
    if quota is not None and quota < 0:
        raise ManagementError("a quota cannot be negative")
    return quota or None  # 0 means none, as in the memory directory


class InternalManager:
    """Reads and changes the internal directory kept in ``store`` (the CLI's back end)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._schema_checked = False

    async def _ready(self) -> None:
        if not self._schema_checked:
            await ensure_schema(self.store)
            self._schema_checked = True

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[Executor]:
        """A transaction that bumps the change counter (undone if the block raises).

        The bump comes first: its row lock queues management writers one behind the other (SQLite's BEGIN
        IMMEDIATE does the same), so the checks each write makes see every write committed before it.
        """
        await self._ready()
        try:
            async with self.store.transaction() as tx:
                await tx.execute(_BUMP)
                yield tx
        except ConstraintViolation as exc:
            # The checks should have refused it first: a write by something other than mailroster, or a bug.
            raise ManagementError(f"the database refused the change: {exc}") from None

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[Executor]:
        await self._ready()
        async with self.store.transaction() as tx:
            yield tx

    async def change_counter(self) -> int:
        async with self._read() as tx:
            return await _count(tx, _COUNTER)

    # Domains.

    async def add_domain(self, domain: str) -> str:
        """Add a local domain; returns its normalised name."""
        name = check_domain(domain)
        async with self._write() as tx:
            await _create_domain(tx, name, exist_ok=False)
        return name

    async def delete_domain(self, domain: str, *, force: bool = False) -> int:
        """Delete a domain; with ``force`` also its addresses and email-list entries (how many is returned)."""
        name = check_domain(domain)
        async with self._write() as tx:
            domain_id = await _domain_id(tx, name)
            if domain_id is None:
                raise ManagementError(f"unknown domain {name}")
            addresses = await _count(tx, "SELECT COUNT(*) FROM addresses WHERE domain_id = $1", domain_id)
            subscriptions = await _count(tx, "SELECT COUNT(*) FROM subscriptions WHERE domain_id = $1", domain_id)
            if (addresses or subscriptions) and not force:
                raise ManagementError(
                    f"domain {name} still has {addresses} address(es) and {subscriptions} email-list entries: "
                    "remove them first, or force the deletion to delete them with the domain (principals are kept)"
                )
            await tx.execute("DELETE FROM addresses WHERE domain_id = $1", domain_id)
            await tx.execute("DELETE FROM subscriptions WHERE domain_id = $1", domain_id)
            await tx.execute("DELETE FROM principals WHERE id = $1", domain_id)
        return addresses + subscriptions

    async def list_domains(self) -> list[str]:
        async with self._read() as tx:
            rows = await tx.query("SELECT name FROM principals WHERE type = 'domain' ORDER BY name")
        return [text(name) for (name,) in rows.rows]

    # Principals.

    async def add_principal(self, record: PrincipalRecord) -> str:
        """Add a principal (its groups and members must exist); returns its normalised name."""
        async with self._write() as tx:
            principal_id = await _insert(tx, record, create_domains=False)
            await _link(tx, principal_id, record)
        return check_name(record.name)

    async def update_principal(self, name: str, update: PrincipalUpdate) -> None:
        if update.is_empty():
            raise ManagementError("nothing to change")
        folded = check_name(name)
        async with self._write() as tx:
            principal_id, kind = await _require(tx, folded)
            await _update(tx, principal_id, folded, kind, update)

    async def delete_principal(self, name: str) -> None:
        async with self._write() as tx:
            principal_id, _ = await _require(tx, check_name(name))
            # Foreign keys cascade: secrets, addresses, subscriptions, memberships and list entries go with it.
            await tx.execute("DELETE FROM principals WHERE id = $1", principal_id)

    async def show_principal(self, name: str) -> PrincipalRecord:
        folded = check_name(name)
        async with self._read() as tx:
            principal_id, _ = await _require(tx, folded)
            principal = await fetch_principal(tx, folded)
            subscribed = await tx.query(_SUBSCRIBERS_OF, principal_id)
        assert principal is not None  # it was there a statement ago, in the same transaction
        return PrincipalRecord(
            name=principal.name,
            type=principal.type,
            secrets=principal.secrets,
            emails=principal.emails,
            email_list=tuple(text(a) for (a,) in subscribed.rows),
            member_of=principal.member_of,
            members=principal.members,
            description=principal.description,
            quota=principal.quota,
            enabled=principal.enabled,
        )

    async def list_principals(self, kind: PrincipalType | None = None) -> list[PrincipalRecord]:
        """Every principal (not domains), or those of one type, in creation order."""
        principals = (await self.export_data()).principals
        return [p for p in principals if kind is None or p.type is kind]

    # Import and export.

    async def import_data(self, data: DirectoryData) -> ImportSummary:
        """Add every domain and principal of ``data`` in one transaction: all of it, or nothing.

        Principals may come in any order (a member-of may name a group defined later). The domains of their
        addresses are created as needed, besides ``data.domains``. An error names the entry that caused it.
        """
        async with self._write() as tx:
            domains_before = await _count(tx, _COUNT_DOMAINS)
            for i, domain in enumerate(data.domains):
                try:
                    await _create_domain(tx, check_domain(domain), exist_ok=True)
                except ManagementError as exc:
                    raise ManagementError(f"domains[{i}]: {exc}") from None
            ids: list[int] = []
            seen: set[str] = set()
            for i, record in enumerate(data.principals):
                with _entry(i, record):
                    name = check_name(record.name)
                    if name in seen:
                        raise ManagementError(f"principal {name} is defined twice")
                    seen.add(name)
                    ids.append(await _insert(tx, record, create_domains=True))
            # Second pass: every principal exists now, whatever the order of the file.
            for i, (record, principal_id) in enumerate(zip(data.principals, ids, strict=True)):
                with _entry(i, record):
                    await _link(tx, principal_id, record)
            created = await _count(tx, _COUNT_DOMAINS) - domains_before
        return ImportSummary(len(ids), created)

    async def export_data(self) -> DirectoryData:
        """The whole directory, in a form :meth:`import_data` turns back into the same directory.

        Read with several statements; under PostgreSQL's READ COMMITTED each sees the latest commit, so the read
        is repeated when the change counter moved meanwhile (SQLite and MySQL read one snapshot anyway).
        """
        for _attempt in range(5):
            async with self._read() as tx:
                before = await _count(tx, _COUNTER)
                domains = [text(n) for (n,) in (await tx.query(_ALL["domains"])).rows]
                principals = (await tx.query(_ALL["principals"])).rows
                lists: dict[str, dict[int, list[str]]] = {}
                for key in ("secrets", "addresses", "subscriptions", "memberships", "members"):
                    by_id: dict[int, list[str]] = defaultdict(list)
                    for principal_id, value in (await tx.query(_ALL[key])).rows:
                        by_id[int(principal_id)].append(text(value))
                    lists[key] = by_id
                if await _count(tx, _COUNTER) == before:
                    break
        else:
            raise TemporaryFailure("the directory kept changing while it was being read")
        records = []
        for pid, name, kind, description, quota, enabled in principals:
            i = int(pid)
            records.append(
                PrincipalRecord(
                    name=text(name),
                    type=PrincipalType(text(kind)),
                    secrets=tuple(lists["secrets"][i]),
                    emails=tuple(lists["addresses"][i]),
                    email_list=tuple(lists["subscriptions"][i]),
                    member_of=tuple(lists["memberships"][i]),
                    members=tuple(lists["members"][i]),
                    description=text(description),
                    quota=int(quota) if quota is not None else None,
                    enabled=bool(enabled),
                )
            )
        return DirectoryData(tuple(domains), tuple(records))


# Bulk reads for export, each one ordered scan of a table.
_ALL = {
    "domains": "SELECT name FROM principals WHERE type = 'domain' ORDER BY name",
    "principals": (
        "SELECT id, name, type, description, quota, enabled FROM principals WHERE type <> 'domain' ORDER BY id"
    ),
    "secrets": "SELECT principal_id, secret FROM secrets ORDER BY principal_id, seq",
    "addresses": "SELECT principal_id, address FROM addresses ORDER BY principal_id, seq",
    "subscriptions": "SELECT principal_id, address FROM subscriptions ORDER BY principal_id, seq",
    "memberships": (
        "SELECT m.member_id, g.name FROM memberships m JOIN principals g ON g.id = m.group_id"
        " ORDER BY m.member_id, m.seq"
    ),
    "members": (
        "SELECT l.principal_id, COALESCE(l.address, p.name) FROM members l LEFT JOIN principals p"
        " ON p.id = l.member_id ORDER BY l.principal_id, l.seq"
    ),
}


@contextlib.contextmanager
def _entry(index: int, record: PrincipalRecord) -> Iterator[None]:
    """Prefix a refusal with the import entry it is about."""
    try:
        yield
    except ManagementError as exc:
        raise ManagementError(f"principals[{index}] (name {record.name!r}): {exc}") from None


# Steps of a write, each given the open transaction.


async def _count(tx: Executor, sql: str, *params: object) -> int:
    return int((await tx.query(sql, *params)).rows[0][0])


async def _find(tx: Executor, name: str) -> tuple[int, PrincipalType] | None:
    rows = (await tx.query(_FIND, name)).rows
    return (int(rows[0][0]), PrincipalType(text(rows[0][1]))) if rows else None


async def _require(tx: Executor, name: str) -> tuple[int, PrincipalType]:
    """A principal that must exist and is not a domain."""
    found = await _find(tx, name)
    if found is None:
        raise ManagementError(f"unknown principal {name}")
    if found[1] is PrincipalType.DOMAIN:
        raise ManagementError(f"{name} is a domain, not a principal: see `mailroster domain`")
    return found


async def _domain_id(tx: Executor, domain: str) -> int | None:
    found = await _find(tx, domain)
    return found[0] if found is not None and found[1] is PrincipalType.DOMAIN else None


async def _create_domain(tx: Executor, name: str, *, exist_ok: bool) -> None:
    """Create domain ``name`` (already checked); an existing one is fine with ``exist_ok``."""
    found = await _find(tx, name)
    if found is not None:
        if found[1] is not PrincipalType.DOMAIN:
            raise ManagementError(f"cannot add domain {name}: a principal has that name")
        if exist_ok:
            return
        raise ManagementError(f"domain {name} already exists")
    await tx.execute(_INSERT_PRINCIPAL, name, PrincipalType.DOMAIN.value, "", None, True)


async def _next_seq(tx: Executor, sql: str, principal_id: int) -> int:
    rows = (await tx.query(sql, principal_id)).rows
    return int(rows[0][0]) + 1 if rows and rows[0][0] is not None else 0


async def _address_domain(tx: Executor, address: str, *, create: bool) -> int:
    domain = domain_of(address)
    domain_id = await _domain_id(tx, domain)
    if domain_id is None and create:
        await _create_domain(tx, domain, exist_ok=False)
        domain_id = await _domain_id(tx, domain)
    if domain_id is None:
        raise ManagementError(
            f"{domain} is not a local domain: add it first (mailroster domain add {domain}) to use {address}"
        )
    return domain_id


async def _add_addresses(tx: Executor, principal_id: int, addresses: Iterable[str], *, create_domains: bool) -> None:
    seq = await _next_seq(tx, "SELECT MAX(seq) FROM addresses WHERE principal_id = $1", principal_id)
    for raw in addresses:
        address = check_address(raw, catch_all=True)
        domain_id = await _address_domain(tx, address, create=create_domains)
        owner = (await tx.query(_OWNER_OF, address)).rows
        if owner:
            if int(owner[0][0]) == principal_id:
                continue  # already this principal's: adding it again changes nothing
            raise ManagementError(f"address {address} already belongs to {text(owner[0][1])}")
        await tx.execute(
            "INSERT INTO addresses (address, principal_id, domain_id, seq) VALUES ($1, $2, $3, $4)",
            address,
            principal_id,
            domain_id,
            seq,
        )
        seq += 1


async def _insert(tx: Executor, record: PrincipalRecord, *, create_domains: bool) -> int:
    """Insert a principal with its secrets, addresses and subscriptions; links to others come in :func:`_link`."""
    name = check_name(record.name)
    kind = record.type
    if kind is PrincipalType.DOMAIN:
        raise ManagementError("a domain is not added as a principal: see `mailroster domain add`")
    found = await _find(tx, name)
    if found is not None:
        what = "domain" if found[1] is PrincipalType.DOMAIN else "principal"
        raise ManagementError(f"{what} {name} already exists")
    if record.secrets and kind is not PrincipalType.INDIVIDUAL:
        raise ManagementError(f"a {kind.value} has no password: only individuals log in")
    if record.members and kind is PrincipalType.INDIVIDUAL:
        raise ManagementError("only groups and lists have members")
    secrets = [check_secret(s) for s in record.secrets]
    await tx.execute(_INSERT_PRINCIPAL, name, kind.value, record.description, _quota(record.quota), record.enabled)
    principal_id = int((await tx.query(_FIND, name)).rows[0][0])
    for seq, secret in enumerate(secrets):
        await tx.execute(
            "INSERT INTO secrets (principal_id, seq, secret) VALUES ($1, $2, $3)", principal_id, seq, secret
        )
    await _add_addresses(tx, principal_id, record.emails, create_domains=create_domains)
    for seq, address in enumerate(dict.fromkeys(check_address(a) for a in record.email_list)):
        domain_id = await _address_domain(tx, address, create=create_domains)
        await tx.execute(
            "INSERT INTO subscriptions (address, principal_id, domain_id, seq) VALUES ($1, $2, $3, $4)",
            address,
            principal_id,
            domain_id,
            seq,
        )
    return principal_id


async def _link(tx: Executor, principal_id: int, record: PrincipalRecord) -> None:
    name = check_name(record.name)
    await _add_member_of(tx, principal_id, name, record.member_of)
    await _add_members(tx, principal_id, record.members)


async def _add_member_of(tx: Executor, principal_id: int, name: str, groups: Iterable[str]) -> None:
    seq = await _next_seq(tx, "SELECT MAX(seq) FROM memberships WHERE member_id = $1", principal_id)
    for raw in groups:
        group = check_name(raw)
        found = await _find(tx, group)
        if found is None:
            raise ManagementError(f"unknown group {group}")
        group_id, kind = found
        if kind is not PrincipalType.GROUP:
            raise ManagementError(f"{group} is not a group (it is a {kind.value}): member-of names groups only")
        if group_id == principal_id:
            raise ManagementError(f"{name} cannot be a member of itself")
        present = await tx.query(
            "SELECT 1 FROM memberships WHERE member_id = $1 AND group_id = $2", principal_id, group_id
        )
        if present.rows:
            continue
        await tx.execute(
            "INSERT INTO memberships (member_id, group_id, seq) VALUES ($1, $2, $3)", principal_id, group_id, seq
        )
        seq += 1


async def _member(tx: Executor, principal_id: int, member: str) -> tuple[int | None, str | None]:
    """A member as stored: ``(principal id, None)`` for a name, ``(None, address)`` for an address (an ``@``
    makes an address, as in the memory directory)."""
    if "@" in member:
        return None, check_address(member)
    name = check_name(member)
    found = await _find(tx, name)
    if found is None:
        raise ManagementError(f"unknown principal {name} (an external member is written as an address)")
    if found[1] is PrincipalType.DOMAIN:
        raise ManagementError(f"{name} is a domain, not a principal")
    if found[0] == principal_id:
        raise ManagementError(f"{name} cannot be a member of itself")
    return found[0], None


async def _add_members(tx: Executor, principal_id: int, members: Iterable[str]) -> None:
    seq = await _next_seq(tx, "SELECT MAX(seq) FROM members WHERE principal_id = $1", principal_id)
    for raw in members:
        member_id, address = await _member(tx, principal_id, raw)
        if member_id is not None:
            present = await tx.query(
                "SELECT 1 FROM members WHERE principal_id = $1 AND member_id = $2", principal_id, member_id
            )
        else:
            present = await tx.query(
                "SELECT 1 FROM members WHERE principal_id = $1 AND address = $2", principal_id, address
            )
        if present.rows:
            continue
        await tx.execute(
            "INSERT INTO members (principal_id, seq, member_id, address) VALUES ($1, $2, $3, $4)",
            principal_id,
            seq,
            member_id,
            address,
        )
        seq += 1


async def _update(tx: Executor, principal_id: int, name: str, kind: PrincipalType, update: PrincipalUpdate) -> None:
    if update.secret is not None:
        if kind is not PrincipalType.INDIVIDUAL:
            raise ManagementError(f"a {kind.value} has no password: only individuals log in")
        await _replace_password(tx, principal_id, check_secret(update.secret))
    for raw in update.remove_emails:
        address = check_address(raw, catch_all=True)
        if not await tx.execute(
            "DELETE FROM addresses WHERE address = $1 AND principal_id = $2", address, principal_id
        ):
            raise ManagementError(f"{address} is not an address of {name}")
    await _add_addresses(tx, principal_id, update.add_emails, create_domains=False)
    for raw in update.remove_member_of:
        group = check_name(raw)
        group_found = await _find(tx, group)
        if group_found is None:
            raise ManagementError(f"unknown group {group}")
        if not await tx.execute(
            "DELETE FROM memberships WHERE member_id = $1 AND group_id = $2", principal_id, group_found[0]
        ):
            raise ManagementError(f"{name} is not a member of {group}")
    await _add_member_of(tx, principal_id, name, update.add_member_of)
    if (update.add_members or update.remove_members) and kind is PrincipalType.INDIVIDUAL:
        raise ManagementError("only groups and lists have members")
    for raw in update.remove_members:
        member_id, member_address = await _member(tx, principal_id, raw)
        if member_id is not None:
            removed = await tx.execute(
                "DELETE FROM members WHERE principal_id = $1 AND member_id = $2", principal_id, member_id
            )
        else:
            removed = await tx.execute(
                "DELETE FROM members WHERE principal_id = $1 AND address = $2", principal_id, member_address
            )
        if not removed:
            raise ManagementError(f"{raw} is not a member of {name}")
    await _add_members(tx, principal_id, update.add_members)
    if update.quota is not None:
        await tx.execute("UPDATE principals SET quota = $1 WHERE id = $2", _quota(update.quota), principal_id)
    if update.description is not None:
        await tx.execute("UPDATE principals SET description = $1 WHERE id = $2", update.description, principal_id)
    if update.enabled is not None:
        await tx.execute("UPDATE principals SET enabled = $1 WHERE id = $2", update.enabled, principal_id)


def _is_password(secret: str) -> bool:
    """Whether a stored secret is a password that a new password replaces (not an app password nor a TOTP)."""
    return not secret.startswith(("$app$", "otpauth://"))


async def _replace_password(tx: Executor, principal_id: int, secret: str) -> None:
    rows = await tx.query("SELECT secret FROM secrets WHERE principal_id = $1 ORDER BY seq", principal_id)
    kept = [text(s) for (s,) in rows.rows if not _is_password(text(s))]
    await tx.execute("DELETE FROM secrets WHERE principal_id = $1", principal_id)
    for seq, value in enumerate([secret, *kept]):
        await tx.execute(
            "INSERT INTO secrets (principal_id, seq, secret) VALUES ($1, $2, $3)", principal_id, seq, value
        )
