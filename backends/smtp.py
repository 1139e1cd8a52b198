"""The ``smtp`` and ``lmtp`` directories: a remote SMTP or LMTP server checks logins (AUTH) and says whether a
recipient exists (RCPT TO), as Stalwart's directories of these types did (STALWART.md §1.5).

```toml
[directory.mx]
type = "smtp"                        # or "lmtp" (LHLO instead of EHLO)
host = "mx.example.org"
port = 25                            # default: 25 (465 with tls.enable) for smtp, 24 for lmtp
tls = { enable = false, allow-invalid-certs = false }   # without enable: plain, upgraded by STARTTLS if offered
timeout = "30s"                      # bounds every question as a whole
limits = { rcpt = 10, auth-errors = 3 }
lookup.domains = ["example.org"]     # the local domains: a remote server cannot say
```

Connections are pooled (``pool.*``): each is opened with the greeting, EHLO (LHLO), STARTTLS when offered and
``tls.enable`` is false, and EHLO again; an idle one is checked with NOOP before reuse.

- :meth:`SmtpDirectory.verify_password`: AUTH PLAIN (or LOGIN). 235 is a success, after which the connection is
  closed (RFC 4954 allows one successful AUTH per session); 535 is a wrong password or an unknown login (the server
  cannot tell them apart, nor can we), counted toward ``limits.auth-errors``, at which the connection is closed
  rather than reused. Any 4xx, a timeout or a lost connection is a :class:`TemporaryFailure`; a server that offers
  no usable AUTH mechanism, or refuses AUTH itself with another 5xx, is a :class:`PermanentFailure`.
- :meth:`SmtpDirectory.recipient`: ``MAIL FROM:<>`` once per transaction, then ``RCPT TO:<address>``: 2xx is a
  mailbox named by the address, 5xx is unknown, 4xx a temporary failure. The transaction is reset (RSET, MAIL FROM
  again) after ``limits.rcpt`` accepted recipients. Nothing is ever delivered: no DATA is sent.
- :meth:`SmtpDirectory.vrfy` and :meth:`SmtpDirectory.expn` forward VRFY and EXPN: 250/251 list the addresses of
  the reply lines, 252 (cannot verify) and 5xx are "nothing", 4xx a temporary failure.

Addresses and logins are written into command lines: one with a character that could end or bend a command (CR,
LF, NUL, other controls, spaces, ``<``, ``>``) is refused locally and never sent. The password travels base64
encoded in AUTH and appears in no log line and no exception message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final, Literal

from aiosmtplib import SMTP, SMTPException, SMTPResponse

from .errors import PermanentFailure, TemporaryFailure
from .model import Mailbox, Principal, Recipient
from .pool import PoolConfig
from .remote import RemoteDirectory, RemoteLookupConfig, RemoteTlsConfig, tls_context
from .settings import CacheConfig, Duration
from .tasks import ensure_task

log = logging.getLogger(__name__)

SMTP_PORT: Final = 25
SMTPS_PORT: Final = 465
LMTP_PORT: Final = 24

#: Rejected recipients a connection may collect before it is replaced: Postfix's smtpd slows down (1 s per error)
#: past ``smtpd_soft_error_limit`` (10) errors in one session, and disconnects at ``smtpd_hard_error_limit`` (20).
MAX_REJECTIONS: Final = 9

# Characters that could end a command line or change its meaning; controls and spaces are never part of an address.
_UNSAFE = re.compile(r"[\x00-\x20\x7f<>]")
_BRACKETED = re.compile(r"<([^<>\s]+)>")
_ENHANCED_CODE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}\s+")
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+"
)


@dataclass(frozen=True, slots=True)
class SmtpLimitsConfig:
    """``limits``: ``rcpt`` accepted recipients per transaction before RSET; ``auth-errors`` failed AUTHs after
    which a connection is closed instead of reused."""

    rcpt: int = 10
    auth_errors: int = 3

    def __post_init__(self) -> None:
        if self.rcpt < 1:
            raise ValueError("rcpt: must be at least 1")
        if self.auth_errors < 1:
            raise ValueError("auth-errors: must be at least 1")


@dataclass(frozen=True, slots=True)
class SmtpDirectoryConfig:
    """``[directory.<id>]`` with ``type = "smtp"`` or ``"lmtp"``.

    ``port`` defaults to 25 for smtp (465 with ``tls.enable``) and 24 for lmtp.
    """

    type: Literal["smtp", "lmtp"]
    host: str
    port: int | None = None
    tls: RemoteTlsConfig = field(default_factory=RemoteTlsConfig)
    timeout: Duration = Duration(30)
    lookup: RemoteLookupConfig = field(default_factory=RemoteLookupConfig)
    limits: SmtpLimitsConfig = field(default_factory=SmtpLimitsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not self.host or _UNSAFE.search(self.host):
            raise ValueError('host: required, a host name or address such as "mx.example.org"')
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.timeout <= 0:
            raise ValueError("timeout: must be more than 0s")

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        if self.type == "lmtp":
            return LMTP_PORT
        return SMTPS_PORT if self.tls.enable else SMTP_PORT


def hello_name() -> str:
    """The name sent in EHLO/LHLO: this host's name when it is a dotted domain name, else ``[127.0.0.1]`` (as
    Stalwart did without ``server.hostname``). ``gethostname`` asks no resolver."""
    name = socket.gethostname()
    return name if _HOSTNAME.fullmatch(name) else "[127.0.0.1]"


def is_safe_address(address: str) -> bool:
    """Whether ``address`` can be written between ``<`` and ``>`` in a command line as it is."""
    return 0 < len(address) <= 320 and not _UNSAFE.search(address)


def reply_addresses(response: SMTPResponse) -> tuple[str, ...]:
    """The addresses of a 250/251 VRFY or EXPN reply, one a line: ``Name <a@b>``, ``<a@b>`` or ``a@b``."""
    found: list[str] = []
    for raw in response.message.splitlines():
        line = _ENHANCED_CODE.sub("", raw.strip())
        match = _BRACKETED.search(line)
        if match:
            found.append(match.group(1).lower())
        elif line and " " not in line and "@" in line:
            found.append(line.lower())
    return tuple(dict.fromkeys(found))


class _Session:
    """One connection and what this directory did on it."""

    __slots__ = ("accepted", "auth_errors", "dirty", "in_transaction", "rejected", "smtp")

    def __init__(self, smtp: SMTP) -> None:
        self.smtp = smtp
        self.in_transaction = False  # MAIL FROM accepted, not reset since
        self.accepted = 0  # recipients accepted in the current transaction
        self.rejected = 0  # recipients refused on this connection (the server counts them as errors)
        self.auth_errors = 0
        self.dirty = False  # a command since the last RSET may have left state behind (MAIL, a failed AUTH)

    @property
    def extensions(self) -> dict[str, str]:
        return self.smtp.esmtp_extensions


class _Retire(Exception):
    """Raised inside the pool's context to have the connection closed instead of reused."""

    def __init__(self, principal: Principal | None) -> None:
        super().__init__("connection retired")
        self.principal = principal


class SmtpDirectory(RemoteDirectory[_Session]):
    """Authenticates against, and asks about recipients, a remote SMTP or LMTP server."""

    kind = "smtp"

    def __init__(self, config: SmtpDirectoryConfig, *, helo: str | None = None) -> None:
        self.kind = config.type
        self.config = config
        self._port = config.effective_port
        self._timeout = float(config.timeout)
        self._helo = helo or hello_name()
        self._tls = tls_context(config.tls)
        name = f"{config.type} {config.host}:{self._port}"
        super().__init__(
            name, config.lookup.domains, config.pool, connect=self._open, disconnect=self._close, check=self._healthy
        )

    @classmethod
    def from_config(cls, config: SmtpDirectoryConfig) -> SmtpDirectory:
        return cls(config)

    # Connections.

    async def _open(self) -> _Session:
        smtp = SMTP(
            hostname=self.config.host,
            port=self._port,
            local_hostname=self._helo,
            timeout=self._timeout,
            use_tls=self.config.tls.enable,
            start_tls=False,
            tls_context=self._tls,
        )
        try:
            await smtp.connect()
            await self._hello(smtp)
            if not self.config.tls.enable and smtp.supports_extension("starttls"):
                response = await smtp.starttls()
                if response.code != 220:
                    raise self._refused("STARTTLS", response)
                await self._hello(smtp)
        except BaseException:
            smtp.close()
            raise
        return _Session(smtp)

    async def _hello(self, smtp: SMTP) -> None:
        verb = b"LHLO" if self.config.type == "lmtp" else b"EHLO"
        response = await smtp.execute_command(verb, self._helo.encode("ascii"))
        if response.code != 250:
            raise self._refused(verb.decode(), response)
        smtp.last_ehlo_response = response  # parses the extensions

    async def _close(self, session: _Session) -> None:
        try:
            if session.smtp.is_connected:
                await session.smtp.execute_command(b"QUIT")
        finally:
            session.smtp.close()

    async def _healthy(self, session: _Session) -> bool:
        if session.auth_errors >= self.config.limits.auth_errors or not session.smtp.is_connected:
            return False
        response = await session.smtp.execute_command(b"NOOP")
        return response.code == 250

    async def _command(self, session: _Session, *args: bytes) -> SMTPResponse:
        return await session.smtp.execute_command(*args)

    async def _reset(self, session: _Session) -> None:
        response = await self._command(session, b"RSET")
        if response.code != 250:
            raise self._refused("RSET", response)
        session.in_transaction = False
        session.accepted = 0
        session.dirty = False

    def _refused(self, command: str, response: SMTPResponse) -> TemporaryFailure | PermanentFailure:
        """The failure of a command the server should have accepted: temporary for 4xx (and anything odd),
        permanent for 5xx (the server will not do it, whatever the moment)."""
        first_line = next(iter(response.message.splitlines()), "")
        text = f"{self._name}: {command} answered {response.code} {first_line}".rstrip()
        return PermanentFailure(text) if 500 <= response.code < 600 else TemporaryFailure(text)

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        """Turn timeouts and transport errors into TemporaryFailure (never "not found", never "wrong password")."""
        try:
            yield
        except (TemporaryFailure, PermanentFailure, _Retire):
            raise
        except TimeoutError:
            raise TemporaryFailure(f"{self._name}: no answer within {self._timeout:g}s") from None
        except SMTPException as exc:
            # aiosmtplib's messages carry the server's reply or the socket error, never the command sent.
            raise TemporaryFailure(f"{self._name}: {type(exc).__name__}: {exc}") from None
        except (OSError, EOFError) as exc:
            raise TemporaryFailure(f"{self._name}: {type(exc).__name__}: {exc}") from None

    # Passwords.

    async def verify_password(self, login: str, password: str, *, by_email: bool = True) -> Principal | None:
        """The individual ``login`` if the server accepts ``password`` for it (235), else None (535).

        ``by_email`` is the server's business: it decides which logins it knows. An empty password, or a login or
        password with a NUL (the separator of AUTH PLAIN), is None without asking.
        """
        if self.never_valid(login, password):
            return None
        await ensure_task()
        try:
            with self._faults():
                async with asyncio.timeout(self._timeout), self._pool.connection() as session:
                    accepted = await self._authenticate(session, login, password)
                    if accepted:
                        raise _Retire(self.logged_in(login))
                    session.auth_errors += 1
                    if session.auth_errors >= self.config.limits.auth_errors:
                        raise _Retire(None)
                    await self._after_refusal(session)
                    return None
        except _Retire as retired:
            return retired.principal

    async def _after_refusal(self, session: _Session) -> None:
        """RSET after a 535: the answer stands whatever happens; a connection that fails here is retired."""
        try:
            await self._reset(session)
        except (SMTPException, OSError, TemporaryFailure, PermanentFailure):
            raise _Retire(None) from None

    async def _authenticate(self, session: _Session, login: str, password: str) -> bool:
        """AUTH on ``session``: True for 235, False for 535; any other reply raises."""
        methods = [m.upper() for m in session.smtp.server_auth_methods]
        if session.in_transaction:  # RFC 4954: no AUTH during a mail transaction
            await self._reset(session)
        user, secret = login.encode(), password.encode()
        session.dirty = True
        if "PLAIN" in methods:
            response = await self._command(session, b"AUTH", b"PLAIN", base64.b64encode(b"\0" + user + b"\0" + secret))
            if response.code == 334:  # no initial response wanted: cancel rather than guess
                await self._command(session, b"*")
                raise TemporaryFailure(f"{self._name}: AUTH PLAIN with an initial response was not accepted")
        elif "LOGIN" in methods:
            response = await self._command(session, b"AUTH", b"LOGIN", base64.b64encode(user))
            if response.code == 334:
                response = await self._command(session, base64.b64encode(secret))
        elif "auth" in session.extensions:
            raise PermanentFailure(f"{self._name}: the server offers neither AUTH PLAIN nor AUTH LOGIN")
        else:
            raise PermanentFailure(f"{self._name}: the server offers no AUTH: it cannot check passwords")
        if response.code == 235:
            return True
        if response.code == 535:
            return False
        raise self._refused("AUTH", response)

    # Recipients.

    async def recipient(self, address: str) -> Recipient | None:
        """A mailbox named by ``address`` if the server accepts it in RCPT TO (2xx); None if it refuses it (5xx)."""
        if not is_safe_address(address):
            return None
        address = address.lower()
        await ensure_task()
        try:
            with self._faults():
                async with asyncio.timeout(self._timeout), self._pool.connection() as session:
                    return await self._rcpt(session, address)
        except _Retire:  # refused, and the connection has seen enough refusals
            return None

    async def _rcpt(self, session: _Session, address: str) -> Recipient | None:
        encoded = self._encode(session, address)
        if encoded is None:
            return None
        if session.in_transaction and session.accepted >= self.config.limits.rcpt:
            await self._reset(session)
        if not session.in_transaction:
            await self._mail_from(session)
        response = await self._command(session, b"RCPT", b"TO:<" + encoded + b">")
        if 200 <= response.code < 300:
            session.accepted += 1
            return Mailbox((address,), (address,))
        if 500 <= response.code < 600:
            session.rejected += 1
            if session.rejected >= MAX_REJECTIONS:
                raise _Retire(None)
            return None
        raise self._refused("RCPT", response)

    async def _mail_from(self, session: _Session) -> None:
        if session.dirty:  # a used connection: start clean
            await self._reset(session)
        args = [b"MAIL", b"FROM:<>"]
        if "smtputf8" in session.extensions:
            args.append(b"SMTPUTF8")
        response = await self._command(session, *args)
        if response.code != 250:
            raise self._refused("MAIL FROM", response)
        session.in_transaction = session.dirty = True
        session.accepted = 0

    @staticmethod
    def _encode(session: _Session, address: str) -> bytes | None:
        """The address as sent: ASCII, or UTF-8 when the server offers SMTPUTF8; None when it cannot be sent."""
        if address.isascii():
            return address.encode("ascii")
        if "smtputf8" in session.extensions:
            return address.encode("utf-8")
        return None

    # VRFY and EXPN.

    async def vrfy(self, address: str) -> tuple[str, ...]:
        return await self._ask(b"VRFY", address)

    async def expn(self, address: str) -> tuple[str, ...]:
        return await self._ask(b"EXPN", address)

    async def _ask(self, verb: bytes, address: str) -> tuple[str, ...]:
        if not is_safe_address(address):
            return ()
        await ensure_task()
        with self._faults():
            async with asyncio.timeout(self._timeout), self._pool.connection() as session:
                encoded = self._encode(session, address.lower())
                if encoded is None:
                    return ()
                response = await self._command(session, verb, encoded)
                if response.code in (250, 251):
                    return reply_addresses(response)
                if response.code == 252 or 500 <= response.code < 600:
                    return ()
                raise self._refused(verb.decode(), response)
