"""Postfix tcp_table protocol, server side (tcp_table(5); Postfix 3.7 ``dict_tcp.c``, ``hex_quote.c``).

Request: ``get SP <%XX-encoded key> LF``. Reply: ``200 <%XX-encoded value>``, ``500 <text>`` (not found) or
``400 <text>`` (temporary error, Postfix then closes the connection), each at most 4096 bytes with its LF. The
map name is not on the wire: each listener serves one map.

``500`` means "not found" to Postfix, so it answers only a key that does not exist or a request that is not a
valid ``get``; a directory that cannot answer as configured (``PermFail``) gets ``400`` like any other fault, so
that mail is deferred rather than bounced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Coroutine
from typing import Any, assert_never

from mailroster.backends.outcome import Found, NotFound, Outcome, PermFail, TempFail

from .errors import BadRequest, FrameTooLong
from .service import ConnectionObserver, MapService
from .session import RequestReplySession

log = logging.getLogger(__name__)

#: Longest reply line Postfix reads, LF included.
MAX_REPLY = 4096
#: Longest request line accepted, LF included; a longer one closes the connection.
MAX_REQUEST = 8192

_HEX_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


def quote(text: str) -> str:
    """Postfix ``hex_quote``: ``%``, white space and every non-printable or non-ASCII byte become ``%XX``."""
    out = []
    for byte in text.encode():
        if byte == 0x25 or byte <= 0x20 or byte >= 0x7F:
            out.append(f"%{byte:02X}")
        else:
            out.append(chr(byte))
    return "".join(out)


def unquote(data: bytes) -> str:
    """Postfix ``hex_unquote`` followed by UTF-8 decoding. Raises :class:`BadRequest` on a bad escape."""
    if b"%" in data:
        if data.count(b"%") != len(_HEX_ESCAPE.findall(data)):
            raise BadRequest("bad %XX escape")
        data = _HEX_ESCAPE.sub(lambda m: bytes((int(m.group(1), 16),)), data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("key is not UTF-8") from None


class LineDecoder:
    """Splits a byte stream into LF-terminated lines (CR before LF tolerated), refusing over-long lines."""

    __slots__ = ("_buffer", "_max_line")

    def __init__(self, max_line: int) -> None:
        self._buffer = b""
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buffer + data if self._buffer else data
        lines = buf.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) >= self._max_line or any(len(line) >= self._max_line for line in lines):
            raise FrameTooLong(f"line longer than {self._max_line} bytes")
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def parse_request(line: bytes) -> str:
    """The key of a ``get`` request. Raises :class:`BadRequest` for anything else."""
    command, _, key = line.partition(b" ")
    if command != b"get":
        raise BadRequest("only 'get' is supported")
    if not key:
        raise BadRequest("empty key")
    return unquote(key)


def encode_reply(outcome: Outcome) -> bytes:
    """The reply line for ``outcome``: the only place where outcomes become tcp_table text."""
    match outcome:
        case Found(value):
            line = f"200 {quote(value)}\n"
            if len(line) > MAX_REPLY:
                # Truncating would silently drop recipients; a temporary error defers mail until someone looks.
                log.error("tcp_table reply of %d bytes exceeds Postfix's limit of %d", len(line), MAX_REPLY)
                line = "400 reply%20too%20long%20for%20tcp_table\n"
        case NotFound():
            line = "500 not%20found\n"
        case TempFail(reason) | PermFail(reason):
            line = f"400 {quote(reason)}\n"
        case _:
            assert_never(outcome)
    return line.encode("ascii")


class TcpTableSession(RequestReplySession):
    """One Postfix connection to a tcp_table listener serving ``map_name``."""

    protocol_name = "tcp-table"

    def __init__(self, service: MapService, map_name: str, observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._service = service
        self._map = map_name
        self._decoder = LineDecoder(MAX_REQUEST)

    def decode(self, data: bytes) -> list[bytes]:
        return self._decoder.feed(data)

    def answer(self, request: bytes) -> Coroutine[Any, Any, Outcome] | bytes:
        try:
            key = parse_request(request)
        except BadRequest as exc:
            return f"500 {quote(str(exc))}\n".encode("ascii")
        hit = self._service.cached(self._map, key)
        if hit is not None:
            return encode_reply(hit)
        return self._service.lookup(self._map, key)

    def encode(self, outcome: Outcome) -> bytes:
        return encode_reply(outcome)
