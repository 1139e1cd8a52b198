"""The LDAP directory (``type = "ldap"``): OpenLDAP, Active Directory, 389-ds, lldap... with Stalwart's keys.

The configuration is :class:`~.ldap_config.LdapDirectoryConfig`; filters, placeholders and escaping are described
there, and entry mapping and memberships in :mod:`.ldap_query`.

How it runs: ldap3 blocks, so every LDAP exchange runs in this directory's own worker threads, on connections
from a :class:`~.pool.ConnectionPool` bound as ``bind.dn``. Each lookup as a whole (waiting for a connection,
opening one, its health check, the searches) has ``timeout`` to finish, and each network wait in the threads has
the same bound (ldap3's ``connect_timeout``/``receive_timeout``), so a hung server costs a thread no longer than
that. Every failure (refused connection, timeout, error result) is a :class:`TemporaryFailure`, never "not
found". URLs are tried in order; one that fails is passed over for 30 s while another one works.

Passwords (``bind.auth.method``): with ``default`` the caller verifies the principal's secrets itself. With
``template`` and ``lookup`` it calls :meth:`LdapDirectory.authenticate_bind`, which binds as the user on a fresh,
unpooled connection: the server checks the password, and the pool's connections stay bound as the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ldap3.core.exceptions import LDAPException
from ldap3.utils.dn import escape_rdn

from .directory import Directory
from .errors import DirectoryError, TemporaryFailure
from .ldap_client import (
    RETRY_AFTER,
    BindRefused,
    LdapConnection,
    LdapResultError,
    Reader,
    ServerList,
    connect,
    describe,
    is_communication_error,
    is_dn,
    unbind_quietly,
    who_am_i,
)
from .ldap_config import BindAuthenticator, LdapDirectoryConfig, Template
from .ldap_query import LdapQueries
from .model import Principal, PrincipalType, Recipient
from .pool import ConnectionPool
from .tasks import ensure_task

__all__ = ["BindAuthenticator", "LdapDirectory", "LdapDirectoryConfig"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# Result codes of the search that follows a template bind that mean "this user may not": Stalwart's rule.
_SEARCH_REFUSED = frozenset({49, 50})


def _escape_dn_value(value: str) -> str:
    return str(escape_rdn(value)) if value else ""


def _close_orphan(future: Future[LdapConnection]) -> None:
    """Close a connection whose opener stopped waiting for it (a lookup that hit its deadline)."""
    if not future.cancelled() and future.exception() is None:
        unbind_quietly(future.result().conn)


class LdapDirectory(Directory):
    """A :class:`Directory` over LDAP; also a :class:`BindAuthenticator` for bind.auth.method template/lookup."""

    def __init__(self, config: LdapDirectoryConfig, *, retry_after: float = RETRY_AFTER) -> None:
        self.config = config
        self._timeout = float(config.timeout)
        self._queries = LdapQueries(config)
        self._servers = ServerList(config.url, config.tls, self._timeout, retry_after=retry_after)
        self._bind_template = Template.parse(config.bind.auth.template) if config.bind.auth.template else None
        self._name = f"ldap {config.url[0]}" + (f" (+{len(config.url) - 1})" if len(config.url) > 1 else "")
        slots = max(1, config.pool.max_connections)
        # Pooled lookups and user binds each get up to `slots` threads; a thread stuck on a hung server frees
        # itself at its socket timeout.
        self._executor = ThreadPoolExecutor(max_workers=2 * slots + 2, thread_name_prefix="ldap")
        self._bind_slots = asyncio.Semaphore(slots)
        self._pool: ConnectionPool[LdapConnection] = ConnectionPool(
            self._name, config.pool, self._open_pooled, self._close_pooled, self._check_pooled
        )

    @classmethod
    def from_config(cls, config: LdapDirectoryConfig) -> LdapDirectory:
        return cls(config)

    @property
    def authenticates_by_bind(self) -> bool:
        """Whether passwords are checked by binding as the user (template, lookup) rather than by the caller."""
        return self.config.bind.auth.method != "default"

    @property
    def pool_size(self) -> int:
        """Pooled connections open now, idle or in use."""
        return self._pool.size

    # Threads, deadlines and the pool.

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        try:
            future = self._executor.submit(fn, *args)
        except RuntimeError:  # the executor is shut down
            raise TemporaryFailure(f"{self._name}: closed") from None
        return await asyncio.wrap_future(future)

    @contextlib.contextmanager
    def _deadline_failure(self) -> Iterator[None]:
        try:
            yield
        except TimeoutError:
            raise TemporaryFailure(f"{self._name}: no answer within {self._timeout:g}s") from None

    def _connect(self, user: str, password: str) -> LdapConnection:
        return connect(self._servers, user, password, timeout=self._timeout, starttls=self.config.tls.enable)

    def _connect_service(self) -> LdapConnection:
        secret = self.config.bind.secret
        try:
            return self._connect(self.config.bind.dn, secret.value if secret is not None else "")
        except BindRefused as exc:
            raise TemporaryFailure(
                f"{self._name}: the service bind (bind.dn, bind.secret) was refused: {exc}"
            ) from None

    async def _open_pooled(self) -> LdapConnection:
        try:
            future = self._executor.submit(self._connect_service)
        except RuntimeError:
            raise TemporaryFailure(f"{self._name}: closed") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_orphan)
            raise

    async def _close_pooled(self, connection: LdapConnection) -> None:
        if not connection.abandon():
            return  # the thread that still uses it closes it when done
        try:
            await self._run(unbind_quietly, connection.conn)
        except TemporaryFailure:  # closed directory, no threads left: an unbind only sends, do it here
            unbind_quietly(connection.conn)

    async def _check_pooled(self, connection: LdapConnection) -> bool:
        if self._servers.failed_since(connection.url, connection.opened_at):
            return False  # its server failed after it was opened: no round trip to find out again
        # At most half the lookup's time (or of pool.timeout.recycle): a connection to a hung server then fails its
        # check well before the lookup's deadline, which leaves a new connection the rest of the time, and never at
        # the very moment the deadline expires (Python 3.11's wait_for, in the pool, may lose that cancellation
        # and go on to open a connection: a lookup of twice its timeout).
        limit = min(float(self.config.pool.timeout.recycle), self._timeout) / 2
        try:
            async with asyncio.timeout(limit):
                return await self._run(self._use, connection, who_am_i)
        except TimeoutError:
            self._servers.mark_failed(connection.url)
            return False
        except asyncio.CancelledError:
            connection.abandon()  # the pool forgets a connection whose check is cancelled: close it when done
            raise
        except TemporaryFailure:
            return False

    def _use(self, connection: LdapConnection, op: Callable[[LdapConnection], T]) -> T:
        """Run ``op`` on a pooled connection, in a worker thread; ldap3 and socket errors become TemporaryFailure."""
        connection.acquire()
        try:
            return op(connection)
        except DirectoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ldap3 raises is a failure to answer, never "not found"
            raise self._failure(connection, exc) from None
        finally:
            connection.release()

    def _failure(self, connection: LdapConnection, exc: Exception) -> TemporaryFailure:
        """The TemporaryFailure for an exception of ldap3 or the network; its server counts as failed when the
        network failed. Anything else is a bug here, logged with its traceback, and still no "not found"."""
        if is_communication_error(exc):
            self._servers.mark_failed(connection.url)
        elif not isinstance(exc, LDAPException):
            log.error("%s: unexpected error", self._name, exc_info=exc)
        return TemporaryFailure(f"LDAP {connection.url}: {describe(exc)}")

    async def _query(self, op: Callable[[Reader], T], *, deadline: bool = True) -> T:
        """``op`` over a pooled connection, in a thread, within ``timeout`` (the whole of it, pool waits included)."""
        base_dn = self.config.base_dn
        await ensure_task()
        with self._deadline_failure():
            async with asyncio.timeout(self._timeout if deadline else None), self._pool.connection() as connection:
                return await self._run(self._use, connection, lambda c: op(Reader(c.conn, base_dn)))

    # The Directory interface.

    async def principal(self, name: str) -> Principal | None:
        return await self._query(lambda r: self._queries.principal(r, name))

    async def recipient(self, address: str) -> Recipient | None:
        return await self._query(lambda r: self._queries.recipient(r, address))

    async def is_local_domain(self, domain: str) -> bool:
        return await self._query(lambda r: self._queries.is_local_domain(r, domain))

    async def email_to_names(self, address: str) -> tuple[str, ...]:
        return await self._query(lambda r: self._queries.email_to_names(r, address))

    async def sender_logins(self, address: str) -> tuple[str, ...]:
        return await self._query(lambda r: self._queries.sender_logins(r, address))

    async def vrfy(self, address: str) -> tuple[str, ...]:
        return await self._query(lambda r: self._queries.vrfy(r, address))

    async def expn(self, address: str) -> tuple[str, ...]:
        return await self._query(lambda r: self._queries.expn(r, address))

    async def individuals(self) -> AsyncIterator[str]:
        # Fetched whole (in pages) before the first name is handed out, so that a slow consumer never holds a
        # pooled connection. No overall deadline: listing a big directory may take long; each wait is bounded.
        for name in await self._query(self._queries.individuals, deadline=False):
            yield name

    async def close(self) -> None:
        await self._pool.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # Bind authentication.

    @property
    def verifies_passwords(self) -> bool:
        return self.authenticates_by_bind

    async def verify_password(self, login: str, password: str, *, by_email: bool = True) -> Principal | None:
        return await self.authenticate_bind(login, password, by_email=by_email)

    async def authenticate_bind(self, login: str, password: str, *, by_email: bool = True) -> Principal | None:
        await ensure_task()
        """The individual ``login`` names if the server accepts ``password`` for it, else None.

        ``template``: bind as the DN ``bind.auth.template`` makes of ``login``, then read that entry (over the
        user's connection when ``bind.auth.search``, else over the pool). ``lookup`` (and ``default``, should it
        be called): find the entry over the pool by ``filter.name``, or when ``by_email`` by ``filter.email``
        when the login is one individual's address, then bind as its DN. None for an unknown login, a wrong
        password, a group or list, an entry the filters exclude (disabled), and without a bind at all for an
        empty password (a simple bind with a DN and no password is anonymous: RFC 4513, 5.1.2) or a NUL.
        TemporaryFailure when the server is down or does not answer within ``timeout``.
        """
        if not login or not password or "\0" in login or "\0" in password:
            return None
        if self.config.bind.auth.method == "template":
            assert self._bind_template is not None  # LdapAuthConfig requires a template for this method
            principal = await self._template_bind(self._bind_template.fill(login, _escape_dn_value), login, password)
        else:
            found = await self._query(lambda r: self._queries.login_entry(r, login, by_email=by_email))
            if found is None:
                return None
            dn, principal = found
            with self._deadline_failure():
                async with asyncio.timeout(self._timeout), self._bind_slots:
                    if not await self._run(self._bind_as, dn, password):
                        return None
        if principal is None or principal.type is not PrincipalType.INDIVIDUAL:
            return None
        return principal

    def _bind_as(self, dn: str, password: str) -> bool:
        """In a thread: whether the server accepts ``password`` for ``dn`` (a fresh connection, closed at once)."""
        try:
            connection = self._connect(dn, password)
        except BindRefused:
            return False
        except DirectoryError:
            raise
        except Exception as exc:
            log.error("%s: unexpected error in a bind", self._name, exc_info=exc)
            raise TemporaryFailure(f"{self._name}: {describe(exc)}") from None
        unbind_quietly(connection.conn)
        return True

    async def _template_bind(self, dn: str, login: str, password: str) -> Principal | None:
        search_as_user = self.config.bind.auth.search
        with self._deadline_failure():
            async with asyncio.timeout(self._timeout), self._bind_slots:
                outcome = await self._run(self._template_bind_sync, dn, login, password, search_as_user)
        if outcome is None or isinstance(outcome, Principal):
            return outcome
        # Bound; the entry is read over the service connections.
        if is_dn(dn):
            return await self._query(lambda r: self._queries.principal_at(r, dn))
        return await self._query(lambda r: self._queries.principal(r, login))

    def _template_bind_sync(self, dn: str, login: str, password: str, search: bool) -> Principal | bool | None:
        """In a thread: None when the bind is refused; else the principal read over the user's connection, or
        True (bound, not searched) when ``search`` is false."""
        try:
            connection = self._connect(dn, password)
        except BindRefused:
            return None
        try:
            if not search:
                return True
            reader = Reader(connection.conn, self.config.base_dn)
            # The bound entry itself when the template makes a DN; a user principal name (AD's "jane@corp") is not
            # one, so the login is looked up by filter.name instead.
            if is_dn(dn):
                return self._queries.principal_at(reader, dn)
            return self._queries.principal(reader, login)
        except LdapResultError as exc:
            if exc.code in _SEARCH_REFUSED:
                return None
            raise
        except DirectoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever ldap3 raises is a failure to answer, never "not found"
            raise self._failure(connection, exc) from None
        finally:
            unbind_quietly(connection.conn)
