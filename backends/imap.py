"""The IMAP directory (``type = "imap"``): logins checked by logging in to a remote IMAP server, as Stalwart's
``imap`` directory did (STALWART.md §1.5). It only authenticates; every other question is a
:class:`PermanentFailure` (see :mod:`.remote`).

```toml
[directory.imap]
type = "imap"
host = "imap.example.org"
port = 993                            # default: 993 with tls.enable, else 143
tls = { enable = true, allow-invalid-certs = false }
timeout = "30s"                       # bounds each password check as a whole
lookup.domains = ["example.org"]
pool = { max-connections = 10 }
```

How a password is checked: a pooled connection in the not-authenticated state (greeting read, upgraded with
STARTTLS when ``tls.enable`` is off and the server offers it, CAPABILITY known) logs in with ``AUTHENTICATE PLAIN``
when the server offers ``AUTH=PLAIN`` (with the initial response when it offers ``SASL-IR``), else with ``LOGIN``
(refused when it announces ``LOGINDISABLED``). ``OK`` is the login's principal, and the connection, now
authenticated, is logged out and closed; ``NO`` is "wrong password or unknown user" and the connection goes back to
the pool; ``NO`` with a response code that says the server cannot tell now (``UNAVAILABLE``, ``SERVERBUG``...),
``BAD``, a timeout, a refused or dropped connection are a :class:`TemporaryFailure`, never "wrong password".

The protocol is spoken here, on asyncio streams, rather than through aioimaplib: aioimaplib 2.0 has no STARTTLS and
no AUTHENTICATE PLAIN, sends the LOGIN user name unquoted, only notices a dropped connection at its timeout, and
puts a pending command's arguments (the password) into its exception messages. The few commands needed
(RFC 9051/3501: CAPABILITY, STARTTLS, AUTHENTICATE, LOGIN, NOOP, LOGOUT) fit in a small client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from .errors import TemporaryFailure
from .model import Principal
from .pool import PoolConfig
from .remote import RemoteDirectory, RemoteLookupConfig, RemoteTlsConfig, tls_context
from .settings import CacheConfig, Duration
from .tasks import ensure_task

__all__ = ["ImapDirectory", "ImapDirectoryConfig"]

log = logging.getLogger(__name__)

IMAP_PORT = 143
IMAPS_PORT = 993
# The longest response line read: a CAPABILITY line is a few hundred bytes; a server sending more is broken.
LINE_LIMIT = 64 * 1024

# Response codes of a NO that mean "the server cannot tell now", not "wrong credentials" (RFC 5530).
TEMPORARY_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "LIMIT", "INUSE", "PRIVACYREQUIRED"})

_STATUS = re.compile(r"(OK|NO|BAD|PREAUTH|BYE)(?: (.*))?", re.IGNORECASE | re.DOTALL)
_CODE = re.compile(r"\[([A-Za-z0-9-]+)(?: ([^\]]*))?\]")
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
# Characters a quoted string may carry as they are (RFC 9051 QUOTED-CHAR, without the escaped two).
_QUOTABLE = re.compile(r"[\x20-\x21\x23-\x5b\x5d-\x7e]*")


@dataclass(frozen=True, slots=True)
class ImapDirectoryConfig:
    """``[directory.<id>]`` with ``type = "imap"``. ``port`` defaults to 993 with ``tls.enable`` (implicit TLS,
    imaps), else 143 (plain, upgraded with STARTTLS when offered), as Stalwart chose."""

    type: Literal["imap"]
    host: str
    port: int | None = None
    tls: RemoteTlsConfig = field(default_factory=RemoteTlsConfig)
    timeout: Duration = Duration(30)
    lookup: RemoteLookupConfig = field(default_factory=RemoteLookupConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError('host: required, e.g. "imap.example.org"')
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.timeout <= 0:
            raise ValueError("timeout: must be more than 0s")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return IMAPS_PORT if self.tls.enable else IMAP_PORT


class _Status:
    """A tagged (or greeting) status response: ``OK``, ``NO``, ``BAD``, ``PREAUTH`` or ``BYE``, its code and text."""

    __slots__ = ("code", "kind", "text")

    def __init__(self, line: str) -> None:
        match = _STATUS.fullmatch(line)
        if match is None:
            raise ImapError(f"unexpected response {line[:100]!r}")
        self.kind = match.group(1).upper()
        self.text = match.group(2) or ""
        code = _CODE.match(self.text)
        self.code = code.group(1).upper() if code else ""


class ImapError(Exception):
    """The server broke the protocol, closed the connection, or refused what it may not (a BAD)."""


class ImapConnection:
    """One connection to the server, in the not-authenticated state until :meth:`authenticate` succeeds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.capabilities: frozenset[str] = frozenset()
        self._tag = 0

    @classmethod
    async def open(cls, host: str, port: int, tls: RemoteTlsConfig) -> ImapConnection:
        """Connect, read the greeting, upgrade with STARTTLS when offered (without implicit TLS), learn CAPABILITY.

        Not bounded here: the caller's deadline covers it."""
        context = tls_context(tls) if tls.enable else None
        reader, writer = await asyncio.open_connection(host, port, ssl=context, limit=LINE_LIMIT)
        conn = cls(reader, writer)
        try:
            greeting = _Status((await conn._read_line()).removeprefix("* "))
            if greeting.kind == "PREAUTH":
                raise ImapError("the server greets with PREAUTH: no login can be checked on this connection")
            if greeting.kind != "OK":
                raise ImapError(f"the server refuses the connection: {greeting.kind} {greeting.text[:200]}")
            if greeting.code == "CAPABILITY":  # Dovecot's greeting says it: one round trip fewer
                conn._learn(greeting.text[1:].partition("]")[0])
            else:
                await conn.capability()
            if not tls.enable and "STARTTLS" in conn.capabilities:
                status = await conn.command("STARTTLS")
                if status.kind != "OK":
                    raise ImapError(f"STARTTLS refused: {status.kind} {status.text[:200]}")
                await writer.start_tls(tls_context(tls), server_hostname=host)
                await conn.capability()  # RFC 9051 §6.2.1: forget what was announced before TLS
        except BaseException:
            conn.abort()
            raise
        return conn

    def _next_tag(self) -> str:
        self._tag += 1
        return f"M{self._tag}"

    async def _read_line(self) -> str:
        """One response line, with any literal it announces folded in (``{n}`` then n bytes, RFC 9051 §4.3)."""
        parts: list[bytes] = []
        while True:
            try:
                line = await self.reader.readuntil(b"\r\n")
            except asyncio.IncompleteReadError:
                raise ImapError("the server closed the connection") from None
            except asyncio.LimitOverrunError:
                raise ImapError("a response line is too long") from None
            line = line[:-2]
            parts.append(line)
            literal = _LITERAL.search(line)
            if literal is None:
                break
            size = int(literal.group(1))
            if size > LINE_LIMIT:
                raise ImapError("a response literal is too long")
            try:
                parts.append(await self.reader.readexactly(size))
            except asyncio.IncompleteReadError:
                raise ImapError("the server closed the connection") from None
        return b"".join(parts).decode("utf-8", "replace")

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _response(self, tag: str, *, continuation: bool = False) -> _Status | None:
        """Read until the tagged status of ``tag`` (or, with ``continuation``, a ``+`` line: then None).

        Untagged CAPABILITY responses update :attr:`capabilities`; an untagged BYE means the connection is over."""
        while True:
            line = await self._read_line()
            if line.startswith("+") and continuation:
                return None
            if line.startswith(f"{tag} "):
                status = _Status(line[len(tag) + 1 :])
                if status.code == "CAPABILITY":
                    self._learn(status.text[1:].partition("]")[0])
                return status
            if line.startswith("* "):
                rest = line[2:]
                word = rest.partition(" ")[0].upper()
                if word == "CAPABILITY":
                    self._learn(rest)
                elif word == "BYE":
                    raise ImapError(f"the server closes the connection: {rest[4:200]}")
            elif not line.startswith("+"):
                raise ImapError(f"unexpected response {line[:100]!r}")

    def _learn(self, text: str) -> None:
        self.capabilities = frozenset(word.upper() for word in text.split()[1:])

    async def command(self, text: str) -> _Status:
        """Send ``tag text`` (no secret in ``text``: it may be logged by the caller) and return its status."""
        tag = self._next_tag()
        await self._send(f"{tag} {text}\r\n".encode())
        status = await self._response(tag)
        assert status is not None
        if status.kind not in ("OK", "NO", "BAD"):
            raise ImapError(f"unexpected response to {text.partition(' ')[0]}: {status.kind}")
        return status

    async def capability(self) -> None:
        status = await self.command("CAPABILITY")
        if status.kind != "OK":
            raise ImapError(f"CAPABILITY refused: {status.kind} {status.text[:200]}")
        if not {"IMAP4REV1", "IMAP4REV2"} & self.capabilities:
            raise ImapError("not an IMAP4rev1 or IMAP4rev2 server")

    async def noop(self) -> bool:
        return (await self.command("NOOP")).kind == "OK"

    async def authenticate(self, login: str, password: str) -> _Status:
        """Log in with AUTHENTICATE PLAIN when offered, else LOGIN; the caller tells OK, NO and BAD apart."""
        if "AUTH=PLAIN" in self.capabilities:
            status = await self._authenticate_plain(login, password)
        elif "LOGINDISABLED" in self.capabilities:
            raise ImapError("the server offers neither AUTH=PLAIN nor LOGIN (LOGINDISABLED): use tls.enable")
        else:
            status = await self._login(login, password)
        return status

    async def _authenticate_plain(self, login: str, password: str) -> _Status:
        # RFC 4616: authzid (empty), authcid, password; RFC 4959 SASL-IR sends it with the command.
        response = base64.b64encode(b"\0" + login.encode() + b"\0" + password.encode())
        tag = self._next_tag()
        if "SASL-IR" in self.capabilities:
            await self._send(tag.encode() + b" AUTHENTICATE PLAIN " + response + b"\r\n")
        else:
            await self._send(tag.encode() + b" AUTHENTICATE PLAIN\r\n")
            if await self._response(tag, continuation=True) is not None:
                raise ImapError("AUTHENTICATE PLAIN refused before the credentials were sent")
            await self._send(response + b"\r\n")
        while True:
            status = await self._response(tag, continuation=True)
            if status is not None:
                return status
            await self._send(b"*\r\n")  # a second challenge PLAIN does not have: cancel (RFC 9051 §6.2.2)

    async def _login(self, login: str, password: str) -> _Status:
        tag = self._next_tag()
        head = tag.encode() + b" LOGIN"
        for value in (login, password):
            if _QUOTABLE.fullmatch(value) and value:
                head += b' "' + value.encode() + b'"'
                continue
            # Anything else (quotes, backslashes, 8-bit, an empty string...) goes as a synchronising literal.
            data = value.encode()
            await self._send(head + b" {" + str(len(data)).encode() + b"}\r\n")
            status = await self._response(tag, continuation=True)
            if status is not None:
                return status
            head = data
        await self._send(head + b"\r\n")
        status = await self._response(tag)
        assert status is not None
        return status

    def logout(self) -> None:
        """Say LOGOUT without waiting for the answer: the connection is closed next anyway."""
        with contextlib.suppress(Exception):
            if not self.writer.is_closing():
                self.writer.write(f"{self._next_tag()} LOGOUT\r\n".encode())

    def abort(self) -> None:
        self.writer.close()

    async def close(self) -> None:
        self.logout()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class _LoggedIn(Exception):
    """Raised through the pool so it discards (closes) a connection that is now authenticated."""


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "***") if password else text


class ImapDirectory(RemoteDirectory[ImapConnection]):
    """A :class:`RemoteDirectory` whose passwords an IMAP server checks."""

    kind = "imap"

    def __init__(self, config: ImapDirectoryConfig) -> None:
        self.config = config
        self._host = config.host
        self._port = config.effective_port
        self._timeout = float(config.timeout)
        name = f"imap {self._host}:{self._port}"
        super().__init__(
            name, config.lookup.domains, config.pool, connect=self._open, disconnect=self._close, check=self._check
        )

    @classmethod
    def from_config(cls, config: ImapDirectoryConfig) -> ImapDirectory:
        return cls(config)

    async def _open(self) -> ImapConnection:
        try:
            return await ImapConnection.open(self._host, self._port, self.config.tls)
        except ImapError as exc:
            raise TemporaryFailure(f"{self._name}: {exc}") from None

    async def _close(self, conn: ImapConnection) -> None:
        await conn.close()

    async def _check(self, conn: ImapConnection) -> bool:
        # At most half the check's time, as in ldap.py: a hung server then fails its check early enough to leave
        # a new connection the rest of the time.
        async with asyncio.timeout(min(float(self.config.pool.timeout.recycle), self._timeout) / 2):
            return await conn.noop()

    async def verify_password(self, login: str, password: str, *, by_email: bool = True) -> Principal | None:
        """Whether the server accepts ``login``/``password``. ``by_email`` is moot: the server resolves the login."""
        if self.never_valid(login, password):
            return None
        await ensure_task()  # asyncio.timeout needs a task of this request's own (see .tasks)
        try:
            async with asyncio.timeout(self._timeout), self._pool.connection() as conn:
                status = await conn.authenticate(login, password)
                if status.kind == "OK":
                    raise _LoggedIn  # out through the pool, which closes the connection: it cannot log in again
                if status.kind == "BAD" or status.code in TEMPORARY_CODES:
                    # Raised inside: the pool discards a connection the server may be confused about.
                    text = _scrub(status.text[:200], password)
                    raise TemporaryFailure(
                        f"{self._name}: the server cannot check a password now: {status.kind} {text}"
                    )
        except _LoggedIn:
            return self.logged_in(login)
        except TimeoutError:
            raise TemporaryFailure(f"{self._name}: no answer within {self._timeout:g}s") from None
        except ImapError as exc:
            raise TemporaryFailure(f"{self._name}: {_scrub(str(exc), password)}") from None
        except (OSError, ConnectionError) as exc:
            raise TemporaryFailure(f"{self._name}: {exc.strerror or type(exc).__name__}") from None
        return None  # NO: a wrong password or an unknown user; the connection went back to the pool
