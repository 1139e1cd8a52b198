"""Dovecot auth load generators: closed-loop clients of the auth-client (SASL) and auth-master (userdb) protocols.

Both protocols are lines of tab-separated fields (PROTOCOLS.md sections 0 to 2), and both servers speak first:

- **auth-client** (what Postfix ``smtpd_sasl_type = dovecot``, Exim and ``doveadm auth test`` speak): the server
  sends ``VERSION``, ``MECH`` lines, ``SPID``, ``CUID``, ``COOKIE``, ``DONE``; the client answers
  ``VERSION\\t1\\t2`` and ``CPID\\t<pid>`` (as lib-auth does), then sends
  ``AUTH\\t<id>\\tPLAIN\\tservice=smtp\\tresp=<base64(\\0user\\0password)>`` and expects ``OK\\t<id>\\tuser=<user>``.
- **auth-master** (Dovecot's ``auth-userdb`` socket, as LMTP, LDA and ``doveadm user`` use it): the server sends
  ``VERSION`` and ``SPID``; the client sends ``VERSION\\t1\\t0``, then ``USER\\t<id>\\t<user>\\tservice=lmtp`` and
  expects ``USER\\t<id>\\t<user>\\t<userdb fields>``.

As in :mod:`bench.loadgen`, each connection has exactly one request in flight, as Postfix's smtpd and Dovecot's
lib-auth clients do; request ids count up from 1 per connection. Every reply is compared byte for byte with the
line it must be (the id included), so a ``FAIL``, a ``CONT``, a wrong user or a reply to another request is an error
and :meth:`~bench.loadgen.RoundResult.raise_for_errors` rejects the round.

:class:`BackgroundLoad` runs the same clients without a measuring window, as load beside another measurement (the
burst of uncached slow-hash logins during socketmap lookups).

The data set (shared by the mailroster and Dovecot configurations :mod:`bench.run` writes): users ``user{i}``
with password ``pw{i}-Bench``, primary address ``user{i}@example.com`` and userdb fields ``uid=5000 gid=5000
home=/srv/vmail/example.com/user{i} mail=maildir:~/Maildir``; users ``crypt{i}`` (password ``cpw{i}-Bench``) for
the slow-hash logins.

Run as ``python -m bench.auth --socket PATH [--protocol auth-client|auth-master] [--users N] [--conns 1,8,32]``
against a server holding that data set.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

from .common import EventLoopKind, run_event_loop, uvloop_available
from .loadgen import ReplyError, RoundResult, RoundState, measure, parse_conns

__all__ = [
    "MAX_LINE",
    "USERDB_GID",
    "USERDB_MAIL",
    "USERDB_UID",
    "BackgroundLoad",
    "DovecotClient",
    "HandshakeKind",
    "LineWorkload",
    "crypt_login",
    "crypt_password",
    "home",
    "login",
    "parse_handshake",
    "password",
    "run_round",
    "tab_escape",
    "userdb_fields",
    "verify_all",
]

HandshakeKind = Literal["auth-client", "auth-master"]

#: Longest line either way, LF included (``AUTH_CLIENT_MAX_LINE_LENGTH``); auth-master replies stay under 8 KiB.
MAX_LINE = 16384
#: Lines a handshake may have before the client gives up on it (Dovecot sends one MECH line per mechanism).
MAX_HANDSHAKE_LINES = 64

USERDB_UID = "5000"
USERDB_GID = "5000"
USERDB_MAIL = "maildir:~/Maildir"
DOMAIN = "example.com"


def login(i: int) -> str:
    """Login name of user ``i`` (the principal whose primary address is ``user{i}@example.com``)."""
    return f"user{i}"


def password(i: int) -> str:
    """Password of user ``i``."""
    return f"pw{i}-Bench"


def crypt_login(i: int) -> str:
    """Login name of the ``i``-th user whose secret is a slow hash."""
    return f"crypt{i}"


def crypt_password(i: int) -> str:
    return f"cpw{i}-Bench"


def home(name: str) -> str:
    """The home directory of a user, as mailroster's template ``/srv/vmail/{domain}/{local}`` renders it."""
    return f"/srv/vmail/{DOMAIN}/{name}"


def userdb_fields(name: str) -> tuple[tuple[str, str], ...]:
    """The userdb fields both servers return for ``name``, in the order both send them."""
    return (("uid", USERDB_UID), ("gid", USERDB_GID), ("home", home(name)), ("mail", USERDB_MAIL))


_ESCAPES = {0x01: b"\x011", 0x00: b"\x010", 0x09: b"\x01t", 0x0D: b"\x01r", 0x0A: b"\x01n"}


def tab_escape(value: str) -> bytes:
    """``value`` as one field of a Dovecot line (PROTOCOLS.md section 0)."""
    raw = value.encode()
    if not any(b in _ESCAPES for b in raw):
        return raw
    return b"".join(_ESCAPES.get(b, bytes((b,))) for b in raw)


@dataclass(frozen=True, slots=True)
class LineWorkload:
    """Every request with the exact reply it must get. A request line is ``request_head + <id> +
    request_tails[i]`` and its reply ``reply_head + <id> + reply_tails[i]``, so that the client loop only formats
    an integer and compares bytes.
    """

    handshake: HandshakeKind
    request_head: bytes
    request_tails: tuple[bytes, ...]
    reply_head: bytes
    reply_tails: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.request_tails or len(self.request_tails) != len(self.reply_tails):
            raise ValueError("a workload needs as many replies as requests, and at least one")

    def __len__(self) -> int:
        return len(self.request_tails)

    def request(self, i: int, request_id: int) -> bytes:
        return b"%b%d%b" % (self.request_head, request_id, self.request_tails[i])

    def reply(self, i: int, request_id: int) -> bytes:
        return b"%b%d%b" % (self.reply_head, request_id, self.reply_tails[i])

    @classmethod
    def plain_auth(cls, credentials: Sequence[tuple[str, str]], service: str = "smtp") -> LineWorkload:
        """``AUTH <id> PLAIN service=<service> resp=<b64(\\0login\\0password)>`` -> ``OK <id> user=<login>``.

        The reply must carry the login exactly as sent (both servers' users are lower-case canonical names).
        """
        requests = []
        replies = []
        for name, secret in credentials:
            resp = base64.b64encode(b"\0" + name.encode() + b"\0" + secret.encode())
            requests.append(b"\tPLAIN\tservice=%b\tresp=%b\n" % (tab_escape(service), resp))
            replies.append(b"\tuser=%b\n" % tab_escape(name))
        return cls("auth-client", b"AUTH\t", tuple(requests), b"OK\t", tuple(replies))

    @classmethod
    def userdb(cls, users: Sequence[tuple[str, Sequence[tuple[str, str]]]], service: str = "lmtp") -> LineWorkload:
        """``USER <id> <user> service=<service>`` -> ``USER <id> <user> <key=value>...``, fields in the given order."""
        requests = []
        replies = []
        for name, fields in users:
            requests.append(b"\t%b\tservice=%b\n" % (tab_escape(name), tab_escape(service)))
            values = b"".join(b"\t" + tab_escape(f"{key}={value}") for key, value in fields)
            replies.append(b"\t%b%b\n" % (tab_escape(name), values))
        return cls("auth-master", b"USER\t", tuple(requests), b"USER\t", tuple(replies))


def parse_handshake(kind: HandshakeKind, buf: bytes) -> tuple[bytes, int] | None:
    """Read the server's handshake at the start of ``buf``.

    Returns what the client must send in answer and how many bytes of ``buf`` the handshake took, or None when more
    bytes are needed. Raises :class:`ReplyError` when the lines are not the handshake of ``kind``: auth-client wants
    ``VERSION 1 <minor>``, a ``MECH PLAIN`` line before ``SPID``, ``CUID``, ``COOKIE`` and ``DONE``; auth-master
    wants ``VERSION 1 <minor>`` and then ``SPID``.
    """
    lines: list[bytes] = []
    pos = 0
    while True:
        end = buf.find(b"\n", pos)
        if end < 0:
            if len(buf) - pos >= MAX_LINE:
                raise ReplyError(f"handshake line over {MAX_LINE} bytes: {buf[pos : pos + 60]!r}")
            return None
        line = buf[pos:end]
        pos = end + 1
        lines.append(line)
        if len(lines) > MAX_HANDSHAKE_LINES:
            raise ReplyError(f"no end of the {kind} handshake in {MAX_HANDSHAKE_LINES} lines")
        if kind == "auth-client" and line == b"DONE":
            break
        if kind == "auth-client" and line.startswith(b"SPID\t") and not any(x.startswith(b"MECH\t") for x in lines):
            # Postfix's and Exim's rule: SPID before any MECH is the auth-master socket (which sends no DONE).
            raise ReplyError(
                f"auth-client handshake sends SPID before MECH (an auth-master socket?): {b'|'.join(lines)[:200]!r}"
            )
        if kind == "auth-master" and line.startswith(b"SPID\t"):
            break
    version = lines[0].split(b"\t")
    if len(version) < 3 or version[0] != b"VERSION" or version[1] != b"1":
        raise ReplyError(f"{kind} handshake does not start with VERSION 1: {lines[0][:60]!r}")
    names = [line.split(b"\t", 1)[0] for line in lines]
    if kind == "auth-master":
        if names != [b"VERSION", b"SPID"]:
            raise ReplyError(f"auth-master handshake is not VERSION, SPID: {b'|'.join(lines)[:200]!r}")
        return b"VERSION\t1\t0\n", pos
    for required in (b"SPID", b"CUID", b"COOKIE"):
        if required not in names:
            raise ReplyError(f"auth-client handshake without {required.decode()}: {b'|'.join(lines)[:300]!r}")
    mechanisms = [line.split(b"\t")[1].upper() for line in lines if line.startswith(b"MECH\t")]
    if b"PLAIN" not in mechanisms:
        raise ReplyError(f"the server does not offer PLAIN: {b'|'.join(lines)[:300]!r}")
    return b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid(), pos


class DovecotClient(asyncio.Protocol):
    """One connection: handshake, then send a request, wait for its reply line, check it, send the next.

    ``ready`` completes once the handshake is done (or fails with :class:`ReplyError`); :meth:`start` then sends
    the first request. The common case (the whole expected reply in one read) costs one bytes comparison.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_expected",
        "_id",
        "_in_flight",
        "_index",
        "_next_id",
        "_ready",
        "_request",
        "_sent_ns",
        "_state",
        "_workload",
        "ready",
        "transport",
    )

    def __init__(
        self,
        state: RoundState,
        workload: LineWorkload,
        client_id: int,
        first_index: int,
        ready: asyncio.Future[None],
    ) -> None:
        self._state = state
        self._workload = workload
        self._id = client_id
        self._index = first_index % len(workload)
        self._next_id = 1
        self._buf = b""
        self._request = b""
        self._expected = b""
        self._sent_ns = 0
        self._in_flight = False
        self._done = False
        self._ready = False
        self.ready = ready
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        if not self._ready:
            raise RuntimeError("start() before the handshake completed")
        self._send()

    def _send(self) -> None:
        workload = self._workload
        i = self._index
        self._index = i + 1 if i + 1 < len(workload.request_tails) else 0
        request_id = self._next_id
        self._next_id = request_id + 1 if request_id < 0xFFFFFFFF else 1
        self._request = b"%b%d%b" % (workload.request_head, request_id, workload.request_tails[i])
        self._expected = b"%b%d%b" % (workload.reply_head, request_id, workload.reply_tails[i])
        self._in_flight = True
        transport = self.transport
        assert transport is not None
        self._sent_ns = time.perf_counter_ns()
        transport.write(self._request)

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._state.client_done()

    def _fail(self, message: str) -> None:
        """An error after which this connection cannot go on: record it, stop and close."""
        self._state.error(f"connection {self._id}: {message}")
        self._in_flight = False
        self._finish()
        if self.transport is not None:
            self.transport.close()

    def _handshake(self, data: bytes) -> None:
        buf = self._buf + data
        try:
            parsed = parse_handshake(self._workload.handshake, buf)
            if parsed is not None and parsed[1] != len(buf):
                raise ReplyError(f"unsolicited bytes after the handshake: {buf[parsed[1] : parsed[1] + 80]!r}")
        except ReplyError as exc:
            if not self.ready.done():
                self.ready.set_exception(exc)
            if self.transport is not None:
                self.transport.close()
            return
        if parsed is None:
            self._buf = buf
            return
        self._buf = b""
        assert self.transport is not None
        self.transport.write(parsed[0])
        self._ready = True
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        if not self._ready:
            self._handshake(data)
            return
        state = self._state
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if data != self._expected:
            if not self._in_flight:
                self._fail(f"unsolicited bytes {data[:80]!r}")
                return
            end = data.find(b"\n")
            if end < 0:
                if len(data) >= MAX_LINE:
                    self._fail(f"request {self._request!r}: reply line over {MAX_LINE} bytes")
                    return
                self._buf = data
                return
            if end + 1 != len(data):
                self._fail(f"request {self._request!r}: more than one reply line: {data[:160]!r}")
                return
            state.error(f"connection {self._id}: request {self._request!r} expected {self._expected!r} got {data!r}")
        elif not self._in_flight:
            self._fail(f"unsolicited bytes {data[:80]!r}")
            return
        self._in_flight = False
        if state.recording:
            state.latencies.append(now - self._sent_ns)
        if state.stopping:
            self._finish()
        else:
            self._send()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            reason = f" ({exc})" if exc else ""
            self.ready.set_exception(ReplyError(f"connection closed by the server during the handshake{reason}"))
        if not self._done and self._ready:
            reason = f" ({exc})" if exc else ""
            what = f"with request {self._request!r} unanswered" if self._in_flight else "between requests"
            self._state.error(f"connection {self._id}: closed by the server {what}{reason}")
            self._finish()
        self.transport = None

    def give_up(self, reason: str) -> None:
        """Count a request still unanswered after the round as an error."""
        if self._in_flight and not self._done:
            self._fail(f"request {self._request!r}: {reason}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(
    socket_path: str, workload: LineWorkload, conns: int, state: RoundState, *, handshake_timeout: float = 10.0
) -> list[DovecotClient]:
    """Open ``conns`` connections and complete their handshakes (each within ``handshake_timeout`` seconds).

    Raises :class:`ReplyError` on a bad or missing handshake and OSError when the socket refuses; closes whatever it
    opened before raising.
    """
    if conns < 1:
        raise ValueError("conns must be at least 1")
    loop = asyncio.get_running_loop()
    size = len(workload)
    clients: list[DovecotClient] = []
    try:
        for c in range(conns):
            ready: asyncio.Future[None] = loop.create_future()
            # Connections start at evenly spread users, so that together they cycle over the whole user set.
            factory = functools.partial(DovecotClient, state, workload, c, c * size // conns, ready)
            try:
                async with asyncio.timeout(handshake_timeout):
                    _, client = await loop.create_unix_connection(factory, socket_path)
                    clients.append(client)
                    await ready
            except TimeoutError:
                raise ReplyError(
                    f"{socket_path}: no {workload.handshake} handshake within {handshake_timeout:g}s"
                ) from None
    except BaseException:
        for client in clients:
            client.close()
        raise
    return clients


async def run_round(
    socket_path: str,
    workload: LineWorkload,
    conns: int,
    *,
    warmup: float = 0.5,
    duration: float = 3.0,
    server_cpu: Callable[[], float] | None = None,
    machine_cpu: Callable[[], float] | None = None,
    drain_timeout: float = 5.0,
    connect_timeout: float = 10.0,
) -> RoundResult:
    """Like :func:`bench.loadgen.run_round`: ``conns`` closed-loop connections, handshakes done before the warm-up,
    the last ``duration`` seconds measured.
    """
    state = RoundState(active=conns, drained=asyncio.get_running_loop().create_future())
    clients = await connect(socket_path, workload, conns, state, handshake_timeout=connect_timeout)
    try:
        return await measure(
            state,
            clients,
            warmup=warmup,
            duration=duration,
            server_cpu=server_cpu,
            machine_cpu=machine_cpu,
            drain_timeout=drain_timeout,
        )
    finally:
        for client in clients:
            client.close()


class BackgroundLoad:
    """Closed-loop load that runs beside another measurement: :meth:`start` connects and starts recording,
    :meth:`stop` stops, waits for the last replies and returns what was done in between (``client_cpu_s`` is NaN:
    this load shares the process with the measurement it accompanies).
    """

    def __init__(self, socket_path: str, workload: LineWorkload, conns: int) -> None:
        self.socket_path = socket_path
        self.workload = workload
        self.conns = conns
        self._state: RoundState | None = None
        self._clients: list[DovecotClient] = []
        self._started = 0.0

    async def start(self, connect_timeout: float = 10.0) -> None:
        state = RoundState(active=self.conns, drained=asyncio.get_running_loop().create_future())
        self._clients = await connect(
            self.socket_path, self.workload, self.conns, state, handshake_timeout=connect_timeout
        )
        self._state = state
        state.recording = True
        self._started = time.perf_counter()
        for client in self._clients:
            client.start()

    async def stop(self, drain_timeout: float = 30.0) -> RoundResult:
        state = self._state
        if state is None:
            raise RuntimeError("stop() without start()")
        state.recording = False
        state.stopping = True
        elapsed = time.perf_counter() - self._started
        try:
            await asyncio.wait_for(asyncio.shield(state.drained), drain_timeout)
        except TimeoutError:
            for client in self._clients:
                client.give_up(f"no reply within {drain_timeout:g}s")
        finally:
            self.close()
        return RoundResult(
            conns=self.conns,
            completed=len(state.latencies),
            elapsed_s=elapsed,
            latencies_ns=sorted(state.latencies),
            errors=state.errors,
            error_samples=state.error_samples,
            client_cpu_s=math.nan,
        )

    def close(self) -> None:
        for client in self._clients:
            client.close()


async def verify_all(socket_path: str, workload: LineWorkload, conns: int = 4, reply_timeout: float = 10.0) -> None:
    """Send every request of ``workload`` once and check every reply; raise :class:`ReplyError` on any error.

    Used before measuring: it checks that a server answers what the load generator expects, and warms the servers'
    caches (mailroster's auth cache, Dovecot's auth cache) so that the rounds measure the steady state.
    """
    errors: list[str] = []

    async def one_connection(indexes: range) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path, limit=4 * MAX_LINE)
        try:
            buf = b""
            async with asyncio.timeout(reply_timeout):
                while (parsed := parse_handshake(workload.handshake, buf)) is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ReplyError(f"{socket_path}: connection closed during the handshake")
                    buf += chunk
            if parsed[1] != len(buf):
                raise ReplyError(f"{socket_path}: unsolicited bytes after the handshake: {buf[parsed[1] :][:80]!r}")
            writer.write(parsed[0])
            for request_id, i in enumerate(indexes, 1):
                request, expected = workload.request(i, request_id), workload.reply(i, request_id)
                writer.write(request)
                async with asyncio.timeout(reply_timeout):
                    reply = await reader.readuntil(b"\n")
                if reply != expected:
                    errors.append(f"request {request!r} expected {expected!r} got {reply!r}")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    size = len(workload)
    conns = max(1, min(conns, size))
    bounds = [c * size // conns for c in range(conns + 1)]
    try:
        await asyncio.gather(*(one_connection(range(bounds[c], bounds[c + 1])) for c in range(conns)))
    except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        raise ReplyError(f"{socket_path}: {type(exc).__name__}: {exc}") from exc
    if errors:
        raise ReplyError(f"{socket_path}: {len(errors)} of {size} replies wrong, e.g.\n  " + "\n  ".join(errors[:5]))


def plain_workload(users: int) -> LineWorkload:
    """PLAIN logins of ``user{i}`` for i in range(users)."""
    return LineWorkload.plain_auth([(login(i), password(i)) for i in range(users)])


def userdb_workload(users: int) -> LineWorkload:
    """USER lookups of ``user{i}`` for i in range(users)."""
    return LineWorkload.userdb([(login(i), userdb_fields(login(i))) for i in range(users)])


async def _main(args: argparse.Namespace) -> int:
    workload = plain_workload(args.users) if args.protocol == "auth-client" else userdb_workload(args.users)
    await verify_all(args.socket, workload)
    status = 0
    for conns in args.conns:
        result = await run_round(args.socket, workload, conns, warmup=args.warmup, duration=args.duration)
        print(result.summary(), flush=True)
        if result.errors:
            print("\n  ".join(["errors:", *result.error_samples]), file=sys.stderr)
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.auth", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket of the auth-client or auth-master server")
    parser.add_argument(
        "--protocol",
        choices=("auth-client", "auth-master"),
        default="auth-client",
        help="auth-client: PLAIN logins of user{i}/pw{i}-Bench; auth-master: USER lookups of user{i}",
    )
    parser.add_argument("--users", type=int, default=1000, help="size of the user set the requests cycle over")
    parser.add_argument("--conns", type=parse_conns, default=[1, 8, 32], help="connection counts (default 1,8,32)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each round")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per round")
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if uvloop_available() else "asyncio",
        help="event loop of the load generator (default: uvloop when installed)",
    )
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    kind: EventLoopKind = args.event_loop
    try:
        return run_event_loop(_main(args), kind)
    except ReplyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
