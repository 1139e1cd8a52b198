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
from collections.abc import Callable
from dataclasses import dataclass
from typing import assert_never

from mailroster.backends.errors import DirectoryError
from mailroster.backends.outcome import NotFound, TempFail, UserFields, UserOutcome

from .dovecot import UINT32_MAX, OrderedLineSession, ReplySlot, is_text, join_line, parse_uint, split_line
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


#: id(UserFields) -> (that UserFields, its USER reply after the id). The entry holds the object, so its id cannot be
#: reused while the entry exists. A service that hands out the same outcome for a user again (AccountService
#: memoizes rendered userdb fields) is then answered without escaping and joining the fields every time.
_USER_TAILS: dict[int, tuple[UserFields, bytes]] = {}
_USER_TAILS_SIZE = 10000


def _user_tail(outcome: UserFields) -> bytes:
    entry = _USER_TAILS.get(id(outcome))
    if entry is not None and entry[0] is outcome:
        return entry[1]
    # The user is positional here, and Dovecot writes a TAB after it even with no fields.
    tail = join_line([outcome.user, *(_fields(outcome.fields) or [""])])
    if len(_USER_TAILS) >= _USER_TAILS_SIZE:
        _USER_TAILS.clear()
    _USER_TAILS[id(outcome)] = (outcome, tail)
    return tail


def encode_lookup(request: UserRequest | PassRequest, outcome: UserOutcome) -> bytes:
    """The reply to USER or PASS: the only place where lookup outcomes become auth-master text.

    A reply longer than lib-auth reads becomes a FAIL: cut short, it would be a wrong answer.
    """
    match outcome:
        case UserFields(user, fields):
            if isinstance(request, UserRequest):
                line = b"USER\t%d\t%s" % (request.id, _user_tail(outcome))
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


# One whole USER line with a user name and parameters and nothing the general way would have to unescape or refuse
# outright (NUL, tab-escapes, CR, a second line); the parameters keep their leading TAB.
_FAST_USER = re.compile(rb"USER\t([0-9]{1,10})\t([^\x00\x01\t\r\n]+)(\t[^\x00\x01\r\n]*)\n\Z")


class DovecotMasterSession(OrderedLineSession):
    """One client connection to a dovecot-master (auth-userdb) listener."""

    protocol_name = "dovecot-master"
    max_line = MAX_REQUEST

    def __init__(self, service: UserService, observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._service = service
        self._version_received = False
        # The service's synchronous userdb cache check: see line_received.
        self._cached_userdb: Callable[[str], UserOutcome | None] | None = service.cached_userdb

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
                elif not self._reply_cached(request):
                    self.submit(lambda slot: self._lookup(slot, request))
            case ListRequest():
                self.submit(lambda slot: self._list(slot, request))
            case _:
                assert_never(request)

    def answer_at_once(self, data: bytes) -> bytes | None:
        # A cached USER lookup (lmtp and imap look every user up) arrives as one whole line in one read: answered
        # straight from the bytes, without the line reader, a request object or a reply slot.
        if data[:5] != b"USER\t" or not self._version_received or self._cached_userdb is None:
            return None
        match = _FAST_USER.match(data) if len(data) <= MAX_REQUEST else None
        if match is None:
            return None
        id_text, user_bytes, params = match.groups()
        request_id = int(id_text)
        if request_id > UINT32_MAX or b"\tservice=" not in params:
            return None
        try:
            user = user_bytes.decode()
        except UnicodeDecodeError:
            return None  # answered NOTFOUND the general way
        outcome = self._cached_userdb(user)
        if outcome is None:
            return None
        return encode_lookup(UserRequest(request_id, user, ""), outcome)

    def _reply_cached(self, request: UserRequest | PassRequest) -> bool:
        """Answer a USER lookup the directory cache knows at once; ``False`` leaves it to :meth:`_lookup`.

        The fast path for the commonest request (lmtp and imap look every user up): no slot, coroutine or task, as
        socketmap's ``cached()``. The reply still goes out in its turn behind any earlier one.
        """
        if self._cached_userdb is None or not isinstance(request, UserRequest):
            return False
        outcome = self._cached_userdb(request.user)
        if outcome is None:
            return False
        self.reply(encode_lookup(request, outcome))
        if not self.busy:
            self.became_idle()  # as when a request's slot is done: a draining daemon may close the connection
        return True

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
        except DirectoryError as exc:  # a fault, or a directory that cannot list (misconfigured)
            log.warning("LIST %d failed: %s", request.id, exc)
            failed = True
        finally:
            aclose = getattr(users, "aclose", None)
            if aclose is not None:
                await aclose()
        rows.append(encode_list_done(request.id, failed=failed))
        slot.write(b"".join(rows))
