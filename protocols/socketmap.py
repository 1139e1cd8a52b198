"""Postfix socketmap protocol, server side (socketmap_table(5); Postfix 3.7 ``dict_sockmap.c``).

Request: one netstring ``<map name> SP <key>``, the key verbatim as Postfix has it (no case folding, no partial
keys). Reply: one netstring ``OK <value>``, ``NOTFOUND ``, ``TEMP <reason>`` or ``PERM <reason>``, at most
100000 bytes. Postfix sends one request at a time per connection; pipelined requests are answered in order.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any, assert_never

from mailroster.backends.outcome import Found, NotFound, Outcome, PermFail, TempFail

from .netstring import NetstringDecoder, encode_netstring
from .service import ConnectionObserver, MapService
from .session import RequestReplySession

log = logging.getLogger(__name__)

#: Largest reply payload Postfix accepts (``dict_sockmap.c``).
MAX_REPLY = 100000
#: Largest request accepted; a longer one closes the connection.
MAX_REQUEST = 65536

NOTFOUND_REPLY = encode_netstring(b"NOTFOUND ")
BAD_REQUEST_REPLY = encode_netstring(b"PERM expected '<map> <key>'")


def encode_reply(outcome: Outcome) -> bytes:
    """The netstring that answers ``outcome``: the only place where outcomes become socketmap text."""
    match outcome:
        case Found(value):
            payload = b"OK " + value.encode()
            if len(payload) > MAX_REPLY:
                log.error("socketmap reply of %d bytes exceeds Postfix's limit of %d", len(payload), MAX_REPLY)
                payload = b"PERM reply too long for socketmap"
            return encode_netstring(payload)
        case NotFound():
            return NOTFOUND_REPLY
        case TempFail(reason):
            return encode_netstring(b"TEMP " + reason.encode())
        case PermFail(reason):
            return encode_netstring(b"PERM " + reason.encode())
        case _:
            assert_never(outcome)


class SocketmapSession(RequestReplySession):
    """One Postfix connection to a socketmap listener."""

    protocol_name = "socketmap"

    def __init__(self, service: MapService, observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._service = service
        self._decoder = NetstringDecoder(MAX_REQUEST)

    def decode(self, data: bytes) -> list[bytes]:
        return self._decoder.feed(data)

    def answer(self, request: bytes) -> Coroutine[Any, Any, Outcome] | bytes:
        name, sep, key = request.partition(b" ")
        if not sep or not name or not key:
            return BAD_REQUEST_REPLY
        try:
            map_name, text = name.decode("ascii"), key.decode("utf-8")
        except UnicodeDecodeError:
            return encode_netstring(b"PERM request is not UTF-8")
        hit = self._service.cached(map_name, text)
        if hit is not None:
            return encode_reply(hit)
        return self._service.lookup(map_name, text)

    def encode(self, outcome: Outcome) -> bytes:
        return encode_reply(outcome)
