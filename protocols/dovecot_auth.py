"""Dovecot auth-client protocol v1.2, server side, as Postfix (``smtpd_sasl_type = dovecot``), Exim and
``doveadm auth test`` speak it (Dovecot 2.3 ``src/auth/auth-client-connection.c``, ``auth-request-handler.c``;
PROTOCOLS.md §1; doc.dovecot.org/2.3 "Dovecot Authentication Protocol", where it and the code disagree, the code).

The server speaks first: ``VERSION``, one ``MECH`` per mechanism (before ``SPID``: Postfix and Exim take
"SPID before any MECH" for the auth-master socket and give up), ``SPID``, ``CUID``, ``COOKIE``, ``DONE``. The
client answers ``VERSION 1 <minor>`` and ``CPID <pid>``, then sends ``AUTH``/``CONT``/``CANCEL`` lines keyed by
request ids. Requests are independent: each runs in its own task and replies come in any order.

Postfix 3.7 turns every ``FAIL`` into a 535, ``code=temp_fail`` included; only a closed connection or a timeout
gives its 454. ``tempfail_close=True`` therefore answers a backend fault by closing the connection.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import itertools
import logging
import os
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import assert_never

from mailroster.backends.outcome import AuthOutcome, AuthStatus
from mailroster.backends.tasks import ensure_task

from . import sasl
from .dovecot import UINT32_MAX, LineSession, join_line, parse_uint, split_line, tab_escape
from .eager import run_eagerly
from .errors import BadRequest
from .service import AuthService, ConnectionObserver

log = logging.getLogger(__name__)

#: Longest line either way, LF included (``AUTH_CLIENT_MAX_LINE_LENGTH``).
MAX_LINE = 16384
#: Dovecot's time for a client to continue an exchange (``MASTER_AUTH_SERVER_TIMEOUT_SECS``).
DEFAULT_REQUEST_TIMEOUT = 150.0
#: Dovecot's ``auth_failure_delay``; Postfix waits 10 s for a reply, so keep it well below that.
DEFAULT_FAILURE_DELAY = 2.0
#: Requests one connection may have in flight; Postfix and Exim have one at a time.
MAX_REQUESTS = 64

#: MECH flags (``mech.c``, ``mech_register_add``), each its own field, in Dovecot's order.
MECH_FLAGS: dict[str, tuple[str, ...]] = {
    "PLAIN": ("plaintext",),
    "LOGIN": ("plaintext",),
    "XOAUTH2": ("plaintext",),
    "OAUTHBEARER": ("plaintext",),
    "CRAM-MD5": ("dictionary", "active"),
    "SCRAM-SHA-1": ("mutual-auth",),
    "SCRAM-SHA-256": ("mutual-auth",),
    "ANONYMOUS": ("anonymous",),
}

REASON_TIMED_OUT = "Authentication request timed out"
REASON_UNEXPECTED_CONT = "Unexpected continuation"
REASON_BAD_BASE64_INITIAL = "Invalid base64 data in initial response"
REASON_BAD_BASE64_CONT = "Invalid base64 data in continued response"
REASON_UNSUPPORTED = "Unsupported authentication mechanism"
REASON_TOO_MANY = "Too many concurrent authentication requests"
REASON_TEMPFAIL = "Temporary authentication failure"

# One whole AUTH line of a PLAIN login with an initial response and nothing the general way would have to
# unescape or refuse outright (NUL, tab-escapes, CR, a second line); the parameters keep their leading TAB. Linear:
# the response holds no TAB, so each earlier "\tresp=" the parameters backtrack to fails at the next TAB.
_FAST_PLAIN = re.compile(rb"AUTH\t([0-9]{1,10})\tPLAIN(\t[^\x00\x01\r\n]*)\tresp=([^\x00\x01\t\r\n]*)\n\Z")


@functools.lru_cache(maxsize=4096)
def _user_field(name: str) -> bytes:
    """The value of ``user=`` for ``name``, escaped and encoded: the same for every login of a user."""
    return tab_escape(name).encode("utf-8", "surrogateescape")


# CUID: Dovecot's per-process connection counter.
_connection_ids = itertools.count(1)


# Requests (sans-IO).


@dataclass(frozen=True, slots=True)
class Auth:
    """``AUTH <id> <mech> service=<svc> [params] [resp=<b64>]``; ``resp`` is the raw base64, if sent."""

    id: int
    mechanism: str
    service: str
    params: dict[str, str] = field(default_factory=dict)
    resp: str | None = field(default=None, repr=False)

    @property
    def final_resp_ok(self) -> bool:
        """Whether the client takes final SASL data with OK (``resp=``); Postfix and Exim do not."""
        return "final-resp-ok" in self.params


@dataclass(frozen=True, slots=True)
class Cont:
    """``CONT <id> <b64>``: the client's response to a challenge."""

    id: int
    data: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Cancel:
    """``CANCEL <id>``: forget the request, reply nothing."""

    id: int


Command = Auth | Cont | Cancel


def parse_version(line: bytes) -> int:
    """The client's minor version from ``VERSION 1 <minor>``. Raises :class:`BadRequest`."""
    fields = split_line(line)
    if len(fields) != 3 or fields[0] != "VERSION":
        raise BadRequest("expected VERSION")
    if parse_uint(fields[1], "major version") != 1:
        raise BadRequest("unsupported major version")
    return parse_uint(fields[2], "minor version")


def parse_cpid(line: bytes) -> int:
    """The pid from ``CPID <pid>`` (n > 0). Raises :class:`BadRequest`."""
    fields = split_line(line)
    if len(fields) != 2 or fields[0] != "CPID":
        raise BadRequest("expected CPID")
    return parse_uint(fields[1], "CPID", positive=True)


def parse_command(line: bytes) -> Command:
    """One request line after the handshake. Raises :class:`BadRequest` for anything Dovecot disconnects on."""
    name, tab, rest = line.partition(b"\t")
    if tab and name == b"AUTH":
        return _parse_auth(split_line(rest))
    if tab and name == b"CONT":
        # Dovecot takes everything after the id as the data, unsplit; a stray TAB makes it bad base64.
        id_text, sep, data = rest.partition(b"\t")
        if not sep:
            raise BadRequest("broken CONT")
        return Cont(parse_uint(id_text.decode("latin-1"), "CONT id"), data.decode("latin-1"))
    if tab and name == b"CANCEL":
        return Cancel(parse_uint(rest.decode("latin-1"), "CANCEL id"))
    raise BadRequest("unknown command")  # never echoed: a confused client might have sent a password


def _parse_auth(fields: list[str]) -> Auth:
    if len(fields) < 2:
        raise BadRequest("broken AUTH")
    request_id = parse_uint(fields[0], "AUTH id", positive=True)
    params: dict[str, str] = {}
    resp: str | None = None
    last = len(fields) - 1
    for index in range(2, len(fields)):
        name, _, value = fields[index].partition("=")
        if name == "resp":
            if index != last:
                raise BadRequest("AUTH parameters after resp")
            resp = value
        else:
            params[name] = value
    if "service" not in params:
        raise BadRequest("AUTH without service")
    return Auth(request_id, fields[1].upper(), params["service"], params, resp)


def decode_initial_response(resp: str | None, minor: int) -> bytes | None:
    """The initial response of an AUTH, ``None`` for none. Raises :class:`ValueError` on bad base64.

    Before minor version 2 (Postfix, Exim) an empty ``resp=`` means "no initial response"; from 2 on, ``resp=``
    and ``resp==`` mean an empty one.
    """
    if resp is None or (resp == "" and minor < 2):
        return None
    if resp in ("", "="):
        return b""
    return base64.b64decode(resp, validate=True)


# Replies (sans-IO).


def encode_handshake(mechanisms: Sequence[str], *, pid: int, cuid: int, cookie: str) -> bytes:
    """What the server sends on accept, MECH lines before SPID."""
    lines = [join_line(("VERSION", "1", "2"))]
    lines += [join_line(("MECH", name, *MECH_FLAGS.get(name, ()))) for name in mechanisms]
    lines += [join_line(("SPID", str(pid))), join_line(("CUID", str(cuid))), join_line(("COOKIE", cookie))]
    return b"".join(lines) + b"DONE\n"


def encode_cont(request_id: int, data: bytes) -> bytes:
    """A challenge; the data field is there even when empty (Postfix needs it)."""
    return b"CONT\t%d\t%s\n" % (request_id, base64.b64encode(data))


def encode_fail(request_id: int, *, user: str = "", code: str = "", reason: str = "") -> bytes:
    fields = ["FAIL", str(request_id)]
    if user:
        fields.append(f"user={user}")
    if code:
        fields.append(f"code={code}")
    if reason:
        fields.append(f"reason={reason}")
    return join_line(fields)


def encode_outcome(request_id: int, outcome: AuthOutcome, *, login: str, final: bytes = b"") -> bytes:
    """The reply for an authentication's outcome: the only place where outcomes become auth-client text.

    ``login`` is the name the client gave: a failure names it rather than the canonical user, so that unknown
    users and wrong passwords look the same. ``final`` is SASL data to send with OK (``resp=``).
    """
    match outcome.status:
        case AuthStatus.OK if not outcome.fields and not final:
            # The common reply (a cached PLAIN login) built in one go; the same bytes as the general case below.
            user = tab_escape(outcome.user or login).encode("utf-8", "surrogateescape")
            line = b"OK\t%d\tuser=%s\n" % (request_id, user)
            if len(line) > MAX_LINE:
                log.error("auth OK reply of %d bytes for %r exceeds the limit of %d", len(line), login, MAX_LINE)
                return encode_fail(request_id, user=login, code="temp_fail", reason=REASON_TEMPFAIL)
            return line
        case AuthStatus.OK:
            # user= is mandatory: Postfix and Exim fail the login without it; it becomes sasl_username.
            fields = ["OK", str(request_id), f"user={outcome.user or login}"]
            fields += [f"{key}={value}" for key, value in outcome.fields if key not in ("user", "resp")]
            if final:
                fields.append("resp=" + base64.b64encode(final).decode("ascii"))
            line = join_line(fields)
            if len(line) > MAX_LINE:
                # lib-auth drops a longer line, and with it the connection; leaving fields out could change
                # what the login may do. Better a failure that someone will look into.
                log.error("auth OK reply of %d bytes for %r exceeds the limit of %d", len(line), login, MAX_LINE)
                return encode_fail(request_id, user=login, code="temp_fail", reason=REASON_TEMPFAIL)
            return line
        case AuthStatus.FAILED:
            return encode_fail(request_id, user=login)
        case AuthStatus.DISABLED:
            return encode_fail(request_id, user=login, code="user_disabled")
        case AuthStatus.TEMPFAIL:
            return encode_fail(request_id, user=login, code="temp_fail", reason=outcome.reason or REASON_TEMPFAIL)
        case _:
            assert_never(outcome.status)


# The session.


class _Request:
    """One AUTH in flight."""

    __slots__ = ("auth", "failing", "login", "mechanism", "outcome", "silent", "task", "waiter")

    def __init__(self, auth: Auth, mechanism: sasl.Mechanism) -> None:
        self.auth = auth
        self.mechanism = mechanism
        self.login = ""
        self.outcome: AuthOutcome | None = None  # SCRAM: the outcome that comes with the keys
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[bytes] | None = None  # set while waiting for a CONT
        self.failing = False  # in the failure delay
        self.silent = False  # cancelled during the failure delay: reply nothing

    @property
    def id(self) -> int:
        return self.auth.id


class DovecotAuthSession(LineSession):
    """One client connection to a dovecot-auth listener."""

    protocol_name = "dovecot-auth"
    max_line = MAX_LINE

    def __init__(
        self,
        service: AuthService,
        observer: ConnectionObserver | None = None,
        *,
        failure_delay: float = DEFAULT_FAILURE_DELAY,
        tempfail_close: bool = False,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        max_requests: int = MAX_REQUESTS,
        hostname: str | None = None,
    ) -> None:
        super().__init__(observer)
        self._service = service
        self._failure_delay = failure_delay
        self._tempfail_close = tempfail_close
        self._request_timeout = request_timeout
        self._max_requests = max_requests
        self._hostname = hostname
        # Offer what the directory allows and this module implements (no OAuth: AuthService cannot check tokens).
        offered = [name.upper() for name in service.mechanisms()]
        self._mechanisms = tuple(name for name in offered if name in sasl.MECHANISMS)
        self._stage = "version"
        self._minor = 0
        self._requests: dict[int, _Request] = {}
        # The service's synchronous auth-cache check, and whether cached PLAIN logins may take the fast path.
        self._cached_login: Callable[[bytes, bytes], str | None] | None = service.cached_login
        self._fast_plain = False  # True once the handshake is over, if PLAIN is offered
        self._debug = log.isEnabledFor(logging.DEBUG)  # the level is set at start-up, before any connection

    @property
    def mechanisms(self) -> tuple[str, ...]:
        return self._mechanisms

    @property
    def busy(self) -> bool:
        return bool(self._requests)

    def greeting(self) -> bytes:
        return encode_handshake(
            self._mechanisms, pid=os.getpid(), cuid=next(_connection_ids), cookie=secrets.token_hex(16)
        )

    def answer_at_once(self, data: bytes) -> bytes | None:
        """The OK for ``data`` when it is exactly one well-formed AUTH line of a PLAIN login the auth cache knows.

        The commonest request: Postfix, Exim and Dovecot's lib-auth write a line at once and wait for the reply, so a
        cached login arrives as one whole line in one read. Anything else goes the general way from the start.
        """
        match = _FAST_PLAIN.match(data) if self._fast_plain and len(data) <= MAX_LINE else None
        if match is None:
            return None
        id_text, params, resp = match.groups()
        request_id = int(id_text)
        if not 0 < request_id <= UINT32_MAX or b"\tservice=" not in params or b"\tresp=" in params:
            return None  # an id out of range, no service, resp= before other parameters: refused the general way
        try:
            initial = binascii.a2b_base64(resp, strict_mode=True)
        except binascii.Error:
            return None
        return self._cached_reply(request_id, initial)

    def _cached_reply(self, request_id: int, initial: bytes) -> bytes | None:
        """The OK for a PLAIN initial response whose successful check the auth cache holds, else ``None``.

        A cache hit is always an OK: failures are not cached, and anything unusual (an authorization identity,
        a master login, a malformed message) goes the general way, which logs it and applies the failure delay.
        """
        if self._cached_login is None:
            return None
        parts = initial.split(b"\x00")
        if len(parts) != 3:
            return None
        authzid, login, password = parts
        if not login or (authzid and authzid != login):
            return None
        name = self._cached_login(login, password)
        if name is None:
            return None
        reply = b"OK\t%d\tuser=%s\n" % (request_id, _user_field(name))
        if len(reply) > MAX_LINE:
            return None  # the general way reports it
        if self._debug:
            log.debug("auth id=%d mech='PLAIN' login=%r result=ok (cached)", request_id, login.decode(errors="replace"))
        return reply

    def line_received(self, line: bytes) -> None:
        if self._stage == "version":
            self._minor = parse_version(line)
            self._stage = "cpid"
            return
        if self._stage == "cpid":
            parse_cpid(line)  # Dovecot ignores the pid on sockets that only authenticate; so do we
            self._stage = "ready"
            self._fast_plain = "PLAIN" in self._mechanisms
            return
        command = parse_command(line)
        match command:
            case Auth():
                self._begin(command)
            case Cont():
                self._continue(command)
            case Cancel():
                self._cancel(command.id)
            case _:
                assert_never(command)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)  # cancels every request's task
        self._requests.clear()

    def on_eof(self) -> None:
        # Requests waiting for the client can never go on; those with the directory still get their answer.
        for request in list(self._requests.values()):
            if request.waiter is not None and not request.waiter.done():
                self._drop(request)

    # Commands.

    def _begin(self, auth: Auth) -> None:
        if auth.id in self._requests:
            raise BadRequest(f"duplicate request id {auth.id}")
        offered = auth.mechanism in self._mechanisms
        mechanism = sasl.create(auth.mechanism, hostname=self._hostname) if offered else None
        if mechanism is None:
            # Dovecot disconnects; a FAIL leaves the other requests on this connection alone.
            log.info("auth id=%d service=%r unsupported mechanism", auth.id, auth.service)
            self.write(encode_fail(auth.id, reason=REASON_UNSUPPORTED))
            return
        if len(self._requests) >= self._max_requests:
            log.warning(
                "protocol=%s peer=%s over %d requests in flight", self.protocol_name, self.peer, len(self._requests)
            )
            self.write(encode_fail(auth.id, code="temp_fail", reason=REASON_TOO_MANY))
            return
        try:
            initial = decode_initial_response(auth.resp, self._minor)
        except ValueError:  # binascii.Error, or a character that is not even ASCII
            self.write(encode_fail(auth.id, code="invalid_base64", reason=REASON_BAD_BASE64_INITIAL))
            return
        if initial is not None and mechanism.name == "PLAIN" and self._answer_cached(auth, initial):
            return
        request = _Request(auth, mechanism)
        self._requests[auth.id] = request
        # Eagerly: an exchange that needs no wait is answered here, without a task or a trip through the loop.
        try:
            result = run_eagerly(self._run(request, initial))
        except Exception:  # _run answers every outcome itself: this is a bug
            log.exception("protocol=%s internal error, closing connection", self.protocol_name)
            self.close()
            return
        if isinstance(result, asyncio.Task):
            request.task = result
            self._tasks.add(result)
            result.add_done_callback(self._task_done)

    def _answer_cached(self, auth: Auth, initial: bytes) -> bool:
        """Answer a PLAIN login the auth cache knows at once; ``False`` leaves the request to the full exchange.

        For a cached login that did not come alone in one read (see :meth:`data_received`): no mechanism,
        request, coroutine or task either.
        """
        reply = self._cached_reply(auth.id, initial)
        if reply is None:
            return False
        self.write(reply)
        if not self._requests:
            self.became_idle()  # as when a request is forgotten: a draining daemon may close the connection
        return True

    def _continue(self, cont: Cont) -> None:
        request = self._requests.get(cont.id)
        if request is None:
            self.write(encode_fail(cont.id, reason=REASON_TIMED_OUT))
            return
        waiter = request.waiter
        if waiter is None or waiter.done():
            if request.failing:
                return  # its FAIL comes when the delay ends: answering now would cut the delay short
            self.write(encode_fail(cont.id, reason=REASON_UNEXPECTED_CONT))
            self._drop(request)
            return
        try:
            data = base64.b64decode(cont.data, validate=True)
        except ValueError:
            self.write(encode_fail(cont.id, code="invalid_base64", reason=REASON_BAD_BASE64_CONT))
            self._drop(request)
            return
        waiter.set_result(data)

    def _cancel(self, request_id: int) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        if request.failing:
            # Keep the request (and its place under max_requests) until the delay ends, but say nothing.
            request.silent = True
            return
        self._drop(request)

    # One request.

    async def _run(self, request: _Request, initial: bytes | None) -> None:
        try:
            await self._exchange(request, initial)
        finally:
            self._forget(request)

    async def _exchange(self, request: _Request, initial: bytes | None) -> None:
        service, svc = self._service, request.auth.service
        step = request.mechanism.start(initial)
        while True:
            match step:
                case sasl.Challenge(data):
                    self.write(encode_cont(request.id, data))
                    response = await self._response(request)
                    if response is None:
                        return
                    step = request.mechanism.step(response)
                case sasl.CheckPassword(login, password, authzid):
                    request.login = login
                    outcome = await service.authenticate(login, password, service=svc, authzid=authzid)
                    await self._finish(request, outcome)
                    return
                case sasl.CheckCramMD5(login, challenge, digest):
                    request.login = login
                    outcome = await service.cram_md5(login, challenge, digest, service=svc)
                    await self._finish(request, outcome)
                    return
                case sasl.LookupScram(login, algorithm):
                    request.login = login
                    outcome, credentials = await service.scram_credentials(login, algorithm, service=svc)
                    if outcome.status is AuthStatus.TEMPFAIL:
                        await self._finish(request, outcome)
                        return
                    if outcome.status not in (AuthStatus.OK, AuthStatus.DISABLED):
                        credentials = None  # the mechanism goes on with made-up keys and fails at the proof
                    request.outcome = outcome
                    step = request.mechanism.credentials(credentials)
                case sasl.Verified(final):
                    outcome = request.outcome or AuthOutcome(AuthStatus.FAILED)
                    if outcome.status is AuthStatus.OK and not request.auth.final_resp_ok:
                        # Postfix and Exim ignore resp= on OK: the server-final message goes as a challenge,
                        # which the client answers with an empty response.
                        self.write(encode_cont(request.id, final))
                        response = await self._response(request)
                        if response is None:
                            return
                        if response:
                            step = sasl.Failed("non-empty response to the server-final-message")
                            continue
                        final = b""
                    await self._finish(request, outcome, final)
                    return
                case sasl.Failed(reason, code, public):
                    log.info(
                        "auth id=%d mech=%r service=%r login=%r failed: %s",
                        request.id,
                        request.auth.mechanism,
                        svc,
                        request.login,
                        reason,
                    )
                    await self._fail(request, encode_fail(request.id, user=request.login, code=code, reason=public))
                    return
                case _:
                    assert_never(step)

    async def _response(self, request: _Request) -> bytes | None:
        """The client's next CONT data, or ``None`` once the request expired (FAIL written)."""
        request.waiter = asyncio.get_running_loop().create_future()
        try:
            # asyncio.timeout needs the request's own task, not an eager first step. The waiter is there before
            # this yields, so that a CONT arriving meanwhile is kept.
            await ensure_task()
            async with asyncio.timeout(self._request_timeout):
                return await request.waiter
        except TimeoutError:
            log.info("auth id=%d expired waiting for the client", request.id)
            self.write(encode_fail(request.id, reason=REASON_TIMED_OUT))
            return None
        finally:
            request.waiter = None

    async def _finish(self, request: _Request, outcome: AuthOutcome, final: bytes = b"") -> None:
        status = outcome.status
        # Successes at debug: a log line per login is a third of a cached login's cost (and Dovecot, too, logs
        # them only when asked). Failures stay at info, for whoever watches for password guessing.
        log.log(
            logging.DEBUG if status is AuthStatus.OK else logging.INFO,
            "auth id=%d mech=%r service=%r login=%r result=%s",
            request.id,
            request.auth.mechanism,
            request.auth.service,
            request.login,
            status.value,
        )
        if status is AuthStatus.TEMPFAIL and self._tempfail_close:
            log.warning(
                "protocol=%s peer=%s closing connection on a temporary failure: %s",
                self.protocol_name,
                self.peer,
                outcome.reason,
            )
            self.close()
            return
        reply = encode_outcome(request.id, outcome, login=request.login, final=final)
        if status in (AuthStatus.OK, AuthStatus.TEMPFAIL):
            self.write(reply)  # no delay for a backend fault: no password was judged
        else:
            await self._fail(request, reply)

    async def _fail(self, request: _Request, reply: bytes) -> None:
        """Write a failure after the failure delay, in this request's task only."""
        request.failing = True
        if self._failure_delay > 0:
            await asyncio.sleep(self._failure_delay)
        if not request.silent:
            self.write(reply)

    def _drop(self, request: _Request) -> None:
        """Forget a request now and stop its task."""
        self._forget(request)
        if request.task is not None:
            request.task.cancel()

    def _forget(self, request: _Request) -> None:
        if self._requests.get(request.id) is request:
            del self._requests[request.id]
            if not self._requests:
                self.became_idle()
