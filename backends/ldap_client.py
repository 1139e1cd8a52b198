"""LDAP connections for the LDAP directory: servers with failover, opening and binding, blocking searches.

Everything here blocks (ldap3's synchronous strategy) and runs in the directory's worker threads, never on the
event loop. Each network wait is bounded by ldap3's ``connect_timeout`` and ``receive_timeout``: a SIGSTOPped
server completes TCP handshakes and then answers nothing, so only a socket timeout gets a thread back.
"""

from __future__ import annotations

import logging
import math
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import ldap3
from ldap3.core.exceptions import LDAPCommunicationError, LDAPException, LDAPInvalidDnError
from ldap3.utils.dn import parse_dn

from .errors import TemporaryFailure
from .ldap_config import LdapTlsConfig

log = logging.getLogger(__name__)

RETRY_AFTER = 30.0
"""Seconds a server that failed is passed over while another one is available."""

PAGE_SIZE = 500

# Result codes (RFC 4511, 4.1.9) a simple bind answers for credentials it refuses, as opposed to a server in
# trouble: inappropriateAuthentication, invalidCredentials, insufficientAccessRights, unwillingToPerform (locked
# or expired accounts under slapd's ppolicy and Active Directory).
REFUSED = frozenset({48, 49, 50, 53})
_SUCCESS, _SIZE_LIMIT_EXCEEDED, _NO_SUCH_OBJECT, _INVALID_DN_SYNTAX = 0, 4, 32, 34
_PAGED_RESULTS = "1.2.840.113556.1.4.319"
_UNIQUE_MEMBER_UID = "#'"  # uniqueMember values may end with "#'0101'B", the entry's optional UID


class BindRefused(Exception):
    """The server refused the credentials of a bind (as opposed to failing to answer)."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"bind refused: {description} ({code})")
        self.code = code


class LdapResultError(TemporaryFailure):
    """An operation came back with an error result code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ServerList:
    """The configured URLs in order. A URL that failed is tried only after the others, for ``retry_after`` s.

    ``failed_since(url, t)`` lets the pool's health check throw away, without a round trip, every idle connection
    opened to a server before that server failed.

    Each connection gets a new ``ldap3.Server``: one that failed to connect would otherwise refuse its address
    for a while by itself ("invalid server address"), in the way of a server that is back and of this failover.
    """

    def __init__(
        self,
        urls: Sequence[str],
        tls: LdapTlsConfig,
        timeout: float,
        *,
        retry_after: float = RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.urls = list(urls)
        self._tls = ldap3.Tls(validate=ssl.CERT_NONE if tls.allow_invalid_certs else ssl.CERT_REQUIRED)
        self._timeout = timeout
        self._retry_after = retry_after
        self._clock = clock
        self._failed_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def candidates(self) -> list[str]:
        """Healthy URLs in configured order, then the ones that failed recently (a last resort, not a skip)."""
        now = self._clock()
        with self._lock:
            down = {url for url, at in self._failed_at.items() if now - at < self._retry_after}
        return [u for u in self.urls if u not in down] + [u for u in self.urls if u in down]

    def server(self, url: str) -> ldap3.Server:
        return ldap3.Server(url, get_info=ldap3.NONE, connect_timeout=self._timeout, tls=self._tls)

    def mark_failed(self, url: str) -> None:
        now = self._clock()
        with self._lock:
            before = self._failed_at.get(url)
            self._failed_at[url] = now
        if before is None or now - before >= self._retry_after:  # once per outage, not once per lookup
            log.warning("LDAP server %s failed; trying the others first for %gs", url, self._retry_after)

    def mark_working(self, url: str) -> None:
        with self._lock:
            failed = self._failed_at.pop(url, None)
        if failed is not None:
            log.info("LDAP server %s answers again", url)

    def failed_since(self, url: str, since: float) -> bool:
        with self._lock:
            at = self._failed_at.get(url)
        return at is not None and at >= since


@dataclass(eq=False)
class LdapConnection:
    """A bound ldap3 connection, the URL it goes to, and whether a thread is using it now.

    A connection that the pool throws away while a thread still waits on it (a lookup that outlived its
    deadline) is not closed under that thread: ``release`` closes it when the thread is done.
    """

    conn: ldap3.Connection
    url: str
    opened_at: float
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _busy: bool = False
    _abandoned: bool = False

    def acquire(self) -> None:
        with self._lock:
            self._busy = True

    def release(self) -> None:
        with self._lock:
            self._busy = False
            close = self._abandoned
        if close:
            unbind_quietly(self.conn)

    def abandon(self) -> bool:
        """Mark the connection as thrown away; True when nobody uses it, so that the caller closes it now."""
        with self._lock:
            self._abandoned = True
            return not self._busy


def unbind_quietly(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception as exc:  # noqa: BLE001 - a broken connection may fail to close in any way
        log.debug("closing an LDAP connection failed: %s", type(exc).__name__)


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the server or the network failed (rather than a request being bad)."""
    return isinstance(exc, LDAPCommunicationError | OSError)


def describe(exc: BaseException) -> str:
    """A message for operators: the exception's class and text, which never include a password."""
    return f"{type(exc).__name__}: {exc}"


def connect(servers: ServerList, user: str, password: str, *, timeout: float, starttls: bool) -> LdapConnection:
    """Open a connection to the first server that answers and bind (anonymously when ``user`` is empty).

    Raises :class:`BindRefused` when a server refuses the credentials (no other server is tried: they share the
    directory), :class:`TemporaryFailure` when no server could be reached or bound.
    """
    if user and not password:
        # An LDAP simple bind with a DN and no password is an "unauthenticated" bind that many servers accept as
        # anonymous (RFC 4513, 5.1.2): it would prove nothing.
        raise BindRefused(49, "empty password")
    problems: list[str] = []
    for url in servers.candidates():
        server = servers.server(url)
        conn = ldap3.Connection(
            server,
            user=user or None,
            password=password or None,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC,
            auto_bind=ldap3.AUTO_BIND_NONE,
            # ldap3 packs this into a struct timeval as an integer: a float fails. The exact value is set below.
            receive_timeout=math.ceil(timeout),
            raise_exceptions=False,
            read_only=True,
            auto_referrals=False,
            auto_escape=False,  # values are escaped once, by us: ldap3 would second-guess escaped ones
            auto_encode=False,
            check_names=False,
        )
        try:
            conn.open()
            conn.socket.settimeout(timeout)  # what bounds every wait for an answer on this connection
            if starttls and not server.ssl and not conn.start_tls():
                raise TemporaryFailure(f"STARTTLS refused: {conn.result.get('description')}")
            if not conn.bind():
                code, description = conn.result.get("result"), conn.result.get("description")
                unbind_quietly(conn)
                if code in REFUSED:
                    raise BindRefused(code, str(description))
                raise TemporaryFailure(f"bind failed: {description} ({code})")
        except BindRefused:
            raise
        except (LDAPException, OSError, TemporaryFailure) as exc:
            unbind_quietly(conn)
            servers.mark_failed(url)
            problems.append(f"{url}: {exc if isinstance(exc, TemporaryFailure) else describe(exc)}")
            continue
        servers.mark_working(url)
        return LdapConnection(conn, url, time.monotonic())
    raise TemporaryFailure("no LDAP server answered: " + "; ".join(problems))


def who_am_i(connection: LdapConnection) -> bool:
    """The pool's health check: one round trip that touches no data (RFC 4532)."""
    connection.conn.extend.standard.who_am_i()
    return bool(connection.conn.result.get("result") == _SUCCESS)


@dataclass(frozen=True, slots=True)
class Entry:
    """A search result: its DN and its attributes, names lower-cased and without options (``member;range=..``)."""

    dn: str
    attributes: dict[str, list[bytes]]

    @classmethod
    def from_response(cls, item: dict[str, object]) -> Entry:
        attributes: dict[str, list[bytes]] = {}
        raw = item.get("raw_attributes") or {}
        assert isinstance(raw, Mapping)  # ldap3's CaseInsensitiveDict
        for name, values in raw.items():
            key = str(name).split(";", 1)[0].lower()
            attributes.setdefault(key, []).extend(v for v in values if isinstance(v, bytes))
        return cls(str(item.get("dn", "")), attributes)

    def raw(self, names: Sequence[str]) -> Iterator[bytes]:
        """Values of the attributes ``names``, attribute by attribute in that order."""
        for name in names:
            yield from self.attributes.get(name.lower(), ())

    def values(self, names: Sequence[str]) -> list[str]:
        """The values as text; a value that is not UTF-8 is left out (it names nothing we could look up)."""
        out = []
        for value in self.raw(names):
            try:
                out.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                continue
        return out

    def first(self, names: Sequence[str]) -> str | None:
        return next(iter(self.values(names)), None)

    def rdn_value(self) -> str | None:
        """The value of the entry's first RDN (``cn=sales,ou=groups,...`` -> ``sales``)."""
        try:
            return str(parse_dn(self.dn)[0][1]) if self.dn else None
        except (LDAPInvalidDnError, IndexError):
            return None


def dn_value(value: str) -> str:
    """A DN from a member attribute value, without uniqueMember's optional ``#'<bits>'B`` UID."""
    if value.endswith("'B") and _UNIQUE_MEMBER_UID in value:
        return value[: value.rindex(_UNIQUE_MEMBER_UID)]
    return value


def is_dn(value: str) -> bool:
    if "=" not in value:
        return False
    try:
        parse_dn(value)
    except LDAPInvalidDnError:
        return False
    return True


class Reader:
    """Blocking searches over one bound connection, under ``base_dn``; error results raise TemporaryFailure."""

    def __init__(self, conn: ldap3.Connection, base_dn: str) -> None:
        self._conn = conn
        self._base_dn = base_dn

    @staticmethod
    def _attributes(names: Sequence[str]) -> list[str]:
        unique = list({n.lower(): n for n in names}.values())
        return unique or ["1.1"]  # RFC 4511: "1.1" asks for no attributes

    def search(self, search_filter: str, attributes: Sequence[str], *, size_limit: int = 0) -> list[Entry]:
        """Entries under base-dn that match. A size limit hit (ours or the server's) keeps what came back."""
        self._conn.search(
            self._base_dn, search_filter, ldap3.SUBTREE, attributes=self._attributes(attributes), size_limit=size_limit
        )
        code = self._conn.result.get("result")
        if code == _SIZE_LIMIT_EXCEEDED and not size_limit:
            log.warning("LDAP server's size limit reached: answer truncated for %s", search_filter)
        elif code == _NO_SUCH_OBJECT:
            raise LdapResultError(f"base-dn {self._base_dn} does not exist on the server", code)
        elif code not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise LdapResultError(f"LDAP search failed: {self._conn.result.get('description')} ({code})", code)
        return self._entries()

    def read(self, dn: str, search_filter: str, attributes: Sequence[str]) -> Entry | None:
        """The entry ``dn`` if it exists and matches ``search_filter`` (a base search; a dangling DN is None)."""
        try:
            self._conn.search(dn, search_filter, ldap3.BASE, attributes=self._attributes(attributes))
        except LDAPInvalidDnError:
            return None
        code = self._conn.result.get("result")
        if code in (_NO_SUCH_OBJECT, _INVALID_DN_SYNTAX):
            return None
        if code != _SUCCESS:
            raise LdapResultError(f"LDAP read failed: {self._conn.result.get('description')} ({code})", code)
        entries = self._entries()
        return entries[0] if entries else None

    def search_paged(self, search_filter: str, attributes: Sequence[str]) -> list[Entry]:
        """Every matching entry, in pages (RFC 2696), past the server's size limit."""
        entries: list[Entry] = []
        cookie: bytes | None = None
        while True:
            self._conn.search(
                self._base_dn,
                search_filter,
                ldap3.SUBTREE,
                attributes=self._attributes(attributes),
                paged_size=PAGE_SIZE,
                paged_cookie=cookie,
            )
            code = self._conn.result.get("result")
            if code != _SUCCESS:
                raise LdapResultError(f"LDAP search failed: {self._conn.result.get('description')} ({code})", code)
            entries.extend(self._entries())
            controls = self._conn.result.get("controls") or {}
            cookie = controls.get(_PAGED_RESULTS, {}).get("value", {}).get("cookie")
            if not cookie:
                return entries

    def _entries(self) -> list[Entry]:
        # searchResRef items (referrals to other servers, as Active Directory sends) are not followed.
        return [Entry.from_response(item) for item in self._conn.response or () if item.get("type") == "searchResEntry"]
