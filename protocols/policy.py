"""Postfix SMTP access policy delegation, server side (Postfix 3.7 ``SMTPD_POLICY_README``, ``smtpd_check.c``
``check_policy_service``, ``attr_scan_plain.c``; PROTOCOLS.md §6).

A request is ``name=value`` lines ended by an empty line; the reply is ``action=<action>`` and an empty line. Each
smtpd keeps one connection and sends one request at a time; requests pipelined anyway are answered in order.

The policy server "must not send a reply" when something is wrong with a request: it logs a warning and
disconnects, and Postfix retries, then applies its ``smtpd_policy_service_default_action`` (451 4.3.5). A line
without ``=``, a request that is not ``request=smtpd_access_policy``, too many attributes or an over-long line
closes the connection so. A backend fault is answered ``DEFER`` (the client retries later) or, with
``tempfail_close``, closes the connection in the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any, assert_never

from mailroster.backends.outcome import Found, NotFound, Outcome, PermFail, TempFail

from .errors import BadRequest
from .service import ConnectionObserver, PolicyService
from .session import RequestReplySession
from .tcptable import LineDecoder

log = logging.getLogger(__name__)

#: Longest attribute line, LF included: Postfix sends values of at most 8192 characters, plus the name.
MAX_LINE = 8192 + 256
#: Attributes one request may have (Postfix 3.7 sends about 35).
MAX_ATTRIBUTES = 128
#: The action for a backend fault; Postfix replies ``450 4.7.1 <address>: ... rejected: <text>``.
TEMPFAIL_ACTION = "DEFER Directory temporarily unavailable"

Request = dict[str, str]


class PolicyDecoder:
    """Splits a byte stream into requests (dicts of attributes). Raises :class:`BadRequest` for what the policy
    server must disconnect on, and :class:`FrameTooLong` for an over-long line."""

    __slots__ = ("_attributes", "_lines")

    def __init__(self) -> None:
        self._lines = LineDecoder(MAX_LINE)
        self._attributes: Request = {}

    def feed(self, data: bytes) -> list[Request]:
        requests = []
        for line in self._lines.feed(data):
            if not line:
                request, self._attributes = self._attributes, {}
                if request.get("request") != "smtpd_access_policy":
                    raise BadRequest("not an smtpd_access_policy request")
                requests.append(request)
                continue
            name, sep, value = line.partition(b"=")
            if not sep or not name:
                raise BadRequest("attribute line without name=value")
            if len(self._attributes) >= MAX_ATTRIBUTES:
                raise BadRequest(f"more than {MAX_ATTRIBUTES} attributes")
            # Bytes that are not UTF-8 are kept as surrogates: such an address matches nothing in the directory.
            self._attributes[name.decode("ascii", "replace")] = value.decode("utf-8", "surrogateescape")
        return requests


def encode_action(action: str) -> bytes:
    """``action=<action>`` and the empty line that ends the reply (without it Postfix waits for its timeout)."""
    text = " ".join(action.split())  # no line break may reach the wire
    return f"action={text}\n\n".encode("utf-8", "surrogateescape")


class PolicySession(RequestReplySession):
    """One smtpd connection to a ``policy`` listener."""

    protocol_name = "policy"

    def __init__(
        self, service: PolicyService, observer: ConnectionObserver | None = None, *, tempfail_close: bool = False
    ) -> None:
        super().__init__(observer)
        self._service = service
        self._tempfail_close = tempfail_close
        self._decoder = PolicyDecoder()

    def decode(self, data: bytes) -> list[Request]:
        return self._decoder.feed(data)

    def answer(self, request: Request) -> Coroutine[Any, Any, Outcome] | bytes:
        return self._service.decide(request)

    def encode(self, outcome: Outcome) -> bytes:
        match outcome:
            case Found(action):
                return encode_action(action)
            case NotFound():
                return encode_action("DUNNO")
            case TempFail(reason) | PermFail(reason):
                if self._tempfail_close:
                    log.warning("protocol=policy peer=%s closing on a directory fault: %s", self.peer, reason)
                    self.close()
                    return b""
                return encode_action(TEMPFAIL_ACTION)
            case _:
                assert_never(outcome)
