"""Dovecot auth-master protocol v1.1 on the auth-userdb socket, server side: USER, PASS and LIST, as lib-auth
(``doveadm user``, ``doveadm auth lookup``, dovecot-lda, lmtp) speaks it (Dovecot 2.3
``src/auth/auth-master-connection.c``, client ``src/lib-auth/auth-master.c``; PROTOCOLS.md §2).

On accept the server sends ``VERSION 1 1`` and ``SPID``; the client sends ``VERSION 1 <minor>`` pipelined with
its first command. Replies go out in request order. ``FAIL`` carries ``reason=<text>`` (the protocol document
shows a bare message; lib-auth parses the ``reason=`` the code sends). REQUEST and CACHE-FLUSH belong to the
auth-master socket proper and are not served; CPID means a client meant for auth-client and is disconnected.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import assert_never

from mailroster.backends.errors import TemporaryFailure
from mailroster.backends.outcome import NotFound, TempFail, UserFields, UserOutcome

from .dovecot import OrderedLineSession, ReplySlot, is_text, join_line, parse_uint, split_line
from .errors import BadRequest
from .service import ConnectionObserver, UserService

log = logging.getLogger(__name__)

#: Longest request line, LF included (the server's ``MAX_INBUF_SIZE``).
MAX_REQUEST = 1024
#: Longest reply line lib-auth reads, LF included.
MAX_REPLY = 8192
#: LIST rows written at once before waiting for the client to read.
LIST_BATCH = 256


@dataclass(frozen=True, slots=True)
class UserRequest:
    """``USER <id> <user> service=<svc> [...]``: a userdb lookup."""

    id: int
    user: str
    service: str


@dataclass(frozen=True, slots=True)
class PassRequest:
    """``PASS <id> <user> service=<svc> [...]``: a passdb lookup without a password check."""

    id: int
    user: str
    service: str


@dataclass(frozen=True, slots=True)
class ListRequest:
    """``LIST <id> [user=<mask>] [service=<svc>]``: every user, filtered by a wildcard mask."""

    id: int
    mask: str = ""


Request = UserRequest | PassRequest | ListRequest


def parse_version(line: bytes) -> None:
    """The client's ``VERSION 1 <minor>``: Dovecot checks only the major version. Raises :class:`BadRequest`."""
    fields = split_line(line)
    if len(fields) < 2 or fields[0] != "VERSION" or fields[1] != "1":
        raise BadRequest("expected VERSION 1")


def parse_request(line: bytes) -> Request:
    """One request line. Raises :class:`BadRequest` for anything Dovecot disconnects on."""
    fields = split_line(line)
    command = fields[0]
    if command in ("USER", "PASS"):
        if len(fields) < 3:
            raise BadRequest(f"broken {command}")
        request_id = parse_uint(fields[1], f"{command} id")
        params = dict(field.partition("=")[::2] for field in fields[3:])
        if "service" not in params:
            raise BadRequest(f"{command} without service")
        kind = UserRequest if command == "USER" else PassRequest
        return kind(request_id, fields[2], params["service"])
    if command == "LIST":
        if len(fields) < 2:
            raise BadRequest("broken LIST")
        params = dict(field.partition("=")[::2] for field in fields[2:])
        return ListRequest(parse_uint(fields[1], "LIST id"), params.get("user", ""))
    if command == "CPID":
        raise BadRequest("auth-client handshake on the userdb socket")
    raise BadRequest("unknown command")


def wildcard_match(mask: str, name: str) -> bool:
    """Dovecot ``wildcard_match_icase``: ``*`` is any run of characters, ``?`` one character, case ignored."""
    return _mask_pattern(mask).fullmatch(name) is not None


@functools.lru_cache(maxsize=64)
def _mask_pattern(mask: str) -> re.Pattern[str]:
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in mask)
    return re.compile(pattern, re.IGNORECASE | re.DOTALL)


def _fields(fields: tuple[tuple[str, str], ...]) -> list[str]:
    return [f"{key}={value}" for key, value in fields]


def encode_lookup(request: UserRequest | PassRequest, outcome: UserOutcome) -> bytes:
    """The reply to USER or PASS: the only place where lookup outcomes become auth-master text.

    A reply longer than lib-auth reads becomes a FAIL: cut short, it would be a wrong answer.
    """
    match outcome:
        case UserFields(user, fields):
            if isinstance(request, UserRequest):
                # The user is positional here, and Dovecot writes a TAB after it even with no fields.
                line = join_line(["USER", str(request.id), user, *(_fields(fields) or [""])])
            else:
                # Credentials never go out here: PASS answers passdb extra fields, as Dovecot's does.
                extra = tuple((key, value) for key, value in fields if key != "password")
                line = join_line(["PASS", str(request.id), f"user={user}", *_fields(extra)])
            if len(line) > MAX_REPLY:
                log.error(
                    "auth-master reply of %d bytes for %r exceeds lib-auth's limit of %d", len(line), user, MAX_REPLY
                )
                return join_line(["FAIL", str(request.id), "reason=reply too long"])
            return line
        case NotFound():
            return join_line(["NOTFOUND", str(request.id)])
        case TempFail(reason):
            return join_line(["FAIL", str(request.id), f"reason={reason}"])
        case _:
            assert_never(outcome)


def encode_list_row(request_id: int, user: str) -> bytes:
    return join_line(["LIST", str(request_id), user])


def encode_list_done(request_id: int, *, failed: bool) -> bytes:
    """The end of a LIST: ``DONE <id> fail``, or ``DONE <id>`` with its trailing TAB on success."""
    return join_line(["DONE", str(request_id), "fail" if failed else ""])


class DovecotMasterSession(OrderedLineSession):
    """One client connection to a dovecot-master (auth-userdb) listener."""

    protocol_name = "dovecot-master"
    max_line = MAX_REQUEST

    def __init__(self, service: UserService, observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._service = service
        self._version_received = False

    def greeting(self) -> bytes:
        return join_line(["VERSION", "1", "1"]) + join_line(["SPID", str(os.getpid())])

    def line_received(self, line: bytes) -> None:
        if not self._version_received:
            parse_version(line)
            self._version_received = True
            return
        request = parse_request(line)
        match request:
            case UserRequest() | PassRequest():
                if not request.user or not is_text(request.user):
                    self.reply(encode_lookup(request, NotFound()))  # as Dovecot: a name it cannot take is unknown
                else:
                    self.submit(lambda slot: self._lookup(slot, request))
            case ListRequest():
                self.submit(lambda slot: self._list(slot, request))
            case _:
                assert_never(request)

    async def _lookup(self, slot: ReplySlot, request: UserRequest | PassRequest) -> None:
        if isinstance(request, UserRequest):
            outcome = await self._service.userdb(request.user, service=request.service)
        else:
            # The password stays out: Dovecot's PASS reply carries passdb extra fields, not credentials.
            outcome = await self._service.passdb(request.user, with_password=False, service=request.service)
        slot.write(encode_lookup(request, outcome))

    async def _list(self, slot: ReplySlot, request: ListRequest) -> None:
        await slot.ready()  # stream rows only once every earlier reply is out
        rows: list[bytes] = []
        failed = False
        users = self._service.users()
        try:
            async for user in users:
                if request.mask and not wildcard_match(request.mask, user):
                    continue
                rows.append(encode_list_row(request.id, user))
                if len(rows) >= LIST_BATCH:
                    slot.write(b"".join(rows))
                    rows.clear()
                    await slot.ready()
        except TemporaryFailure as exc:
            log.warning("LIST %d failed: %s", request.id, exc)
            failed = True
        finally:
            aclose = getattr(users, "aclose", None)
            if aclose is not None:
                await aclose()
        rows.append(encode_list_done(request.id, failed=failed))
        slot.write(b"".join(rows))
