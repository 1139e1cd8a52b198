"""Socketmap load generator: closed-loop clients that behave like Postfix.

Postfix never pipelines socketmap requests: each process holds one connection per endpoint and sends the next
request only once the reply to the previous one has arrived (PROTOCOLS.md section 4). So the load here is ``N``
persistent connections with exactly one request in flight each; with ``N = 1`` the round measures pure round-trip
latency, with larger ``N`` it measures how a server copes with many concurrent Postfix processes.

Every reply is compared byte for byte with the netstring it must be (``OK example.com/userK/`` for ``userK``); a
wrong, malformed or missing reply is counted, and :meth:`RoundResult.raise_for_errors` turns any error into a
:class:`ReplyError`, because a fast wrong answer is worth nothing.

A round (:func:`run_round`) connects, runs a warm-up, then records for a fixed duration: requests completed, req/s,
and per-request latency from just before the write to the arrival of the reply (``time.perf_counter_ns``). The
latency is what a client sees, so with many connections it includes the time a reply waits for this (single-threaded)
client to get round to it. Optional probes read a server's CPU time at the edges of the recording window.

Run as ``python -m bench.loadgen --socket PATH [--users N] [--conns 1,8,32] [--duration S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import functools
import math
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

from .common import EventLoopKind, NetstringError, Workload, netstring_end, run_event_loop, uvloop_available

__all__ = [
    "ReplyCheck",
    "ReplyError",
    "RoundClient",
    "RoundResult",
    "RoundState",
    "SocketmapClient",
    "check_reply",
    "measure",
    "parse_conns",
    "run_round",
    "verify_all",
]

#: How many error descriptions a round keeps for its report.
MAX_ERROR_SAMPLES = 5


class ReplyError(RuntimeError):
    """A server gave wrong, malformed or no replies: its numbers are not to be trusted."""


class ReplyCheck(enum.Enum):
    """What a client's receive buffer holds, compared with the reply it expects."""

    MATCH = "match"
    MISMATCH = "mismatch"
    INCOMPLETE = "incomplete"


def check_reply(buf: bytes, expected: bytes) -> ReplyCheck:
    """Compare ``buf`` with the one netstring ``expected``.

    ``INCOMPLETE`` means more bytes are needed. A well-formed netstring other than ``expected`` is a ``MISMATCH``.
    Raises :class:`NetstringError` when ``buf`` is not a netstring, or holds more than one reply (a request is only
    ever answered once, so extra bytes mean the stream is out of step).
    """
    if buf == expected:
        return ReplyCheck.MATCH
    end = netstring_end(buf)
    if end is None:
        return ReplyCheck.INCOMPLETE
    if end != len(buf):
        raise NetstringError(f"{len(buf) - end} unsolicited bytes after the reply: {buf[end : end + 40]!r}")
    return ReplyCheck.MISMATCH


@dataclass(slots=True)
class RoundResult:
    """What one round measured. Latencies are sorted, in nanoseconds."""

    conns: int
    completed: int
    elapsed_s: float
    latencies_ns: Sequence[int]
    errors: int
    error_samples: list[str]
    client_cpu_s: float
    server_cpu_s: float | None = None
    machine_cpu_s: float | None = None

    @property
    def req_per_s(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, fraction: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds (NaN when nothing completed)."""
        n = len(self.latencies_ns)
        if n == 0:
            return math.nan
        rank = min(n - 1, max(0, math.ceil(fraction * n) - 1))
        return self.latencies_ns[rank] / 1e6

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(0.99)

    @property
    def server_cpu_us_per_req(self) -> float:
        """Server CPU time (user + system) per completed request, in microseconds (NaN without a probe)."""
        if self.server_cpu_s is None or self.completed == 0:
            return math.nan
        return self.server_cpu_s * 1e6 / self.completed

    @property
    def client_cpu_share(self) -> float:
        """CPU time of this process over the window: near 1.0 means the load generator, not the server, was the
        bottleneck for req/s (CPU per request stays meaningful either way).
        """
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else math.nan

    @property
    def other_cpu_share(self) -> float:
        """CPU busy time of everything but the server and this process over the window, in cores (steal included):
        a round with a high value was disturbed by something else on the machine (NaN without both probes).
        """
        if self.machine_cpu_s is None or self.server_cpu_s is None or self.elapsed_s <= 0:
            return math.nan
        return max(0.0, self.machine_cpu_s - self.server_cpu_s - self.client_cpu_s) / self.elapsed_s

    def raise_for_errors(self, server: str = "server") -> None:
        if self.errors:
            details = "\n  ".join(self.error_samples)
            raise ReplyError(f"{server}: {self.errors} bad replies with {self.conns} connections, e.g.\n  {details}")

    def summary(self) -> str:
        line = (
            f"conns={self.conns} completed={self.completed} req/s={self.req_per_s:.0f} "
            f"p50={self.p50_ms:.3f}ms p99={self.p99_ms:.3f}ms client-cpu={self.client_cpu_share:.0%}"
        )
        if self.server_cpu_s is not None:
            line += f" server-cpu={self.server_cpu_us_per_req:.1f}us/req"
        if self.machine_cpu_s is not None and self.server_cpu_s is not None:
            line += f" other-cpu={self.other_cpu_share:.0%}"
        return line + (f" ERRORS={self.errors}" if self.errors else "")


@dataclass(slots=True, eq=False)
class RoundState:
    """State shared by the clients of one round; flags are flipped by :func:`measure` at the window's edges.

    Clients append the latency of every reply that arrives while ``recording`` is set, count errors through
    :meth:`error`, and once ``stopping`` is set, send nothing more and call :meth:`client_done` after their last
    reply (or on an error that ends the connection).
    """

    active: int
    drained: asyncio.Future[None]
    recording: bool = False
    stopping: bool = False
    latencies: array[int] = field(default_factory=lambda: array("q"))
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(message)

    def client_done(self) -> None:
        self.active -= 1
        if self.active <= 0 and not self.drained.done():
            self.drained.set_result(None)


class RoundClient(Protocol):
    """What :func:`measure` needs of a connected client."""

    def start(self) -> None:
        """Send the first request."""

    def give_up(self, reason: str) -> None:
        """Count a request still unanswered after the round as an error."""

    def close(self) -> None:
        """Close the connection."""


class SocketmapClient(asyncio.Protocol):
    """One Postfix-like connection: send a request, wait for its reply, check it, send the next.

    The common case (the whole expected reply in one read) costs one bytes comparison; anything else goes through
    :func:`check_reply`.
    """

    __slots__ = (
        "_buf",
        "_done",
        "_expected",
        "_id",
        "_in_flight",
        "_index",
        "_request",
        "_sent_ns",
        "_state",
        "_workload",
        "transport",
    )

    def __init__(self, state: RoundState, workload: Workload, client_id: int, first_index: int) -> None:
        self._state = state
        self._workload = workload
        self._id = client_id
        self._index = first_index % len(workload)
        self._buf = b""
        self._request = b""
        self._expected = b""
        self._sent_ns = 0
        self._in_flight = False
        self._done = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def start(self) -> None:
        self._send()

    def _send(self) -> None:
        workload = self._workload
        i = self._index
        self._index = i + 1 if i + 1 < len(workload.requests) else 0
        self._request = workload.requests[i]
        self._expected = workload.replies[i]
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

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        state = self._state
        if self._buf:
            data = self._buf + data
            self._buf = b""
        if data != self._expected:
            if not self._in_flight:
                self._fail(f"unsolicited bytes {data[:80]!r}")
                return
            try:
                check = check_reply(data, self._expected)
            except NetstringError as exc:
                self._fail(f"request {self._request!r}: unparseable reply {data[:80]!r} ({exc})")
                return
            if check is ReplyCheck.INCOMPLETE:
                self._buf = data
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
        if not self._done:
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


async def measure(
    state: RoundState,
    clients: Sequence[RoundClient],
    *,
    warmup: float,
    duration: float,
    server_cpu: Callable[[], float] | None = None,
    machine_cpu: Callable[[], float] | None = None,
    drain_timeout: float = 5.0,
) -> RoundResult:
    """Start the connected ``clients`` (which share ``state``), let them run ``warmup`` seconds, record for
    ``duration`` seconds, then stop them and wait for their last replies (up to ``drain_timeout`` seconds; a reply
    still missing then is an error). The caller closes the clients.

    ``server_cpu``, if given, returns the server's CPU seconds so far; ``machine_cpu`` the busy CPU seconds of the
    whole machine. Both are read at the start and at the end of the recording window.
    """
    for client in clients:
        client.start()
    await asyncio.sleep(warmup)

    cpu_before = server_cpu() if server_cpu is not None else None
    machine_before = machine_cpu() if machine_cpu is not None else None
    own_before = time.process_time()
    started = time.perf_counter()
    state.recording = True
    await asyncio.sleep(duration)
    state.recording = False
    state.stopping = True
    elapsed = time.perf_counter() - started
    own_cpu = time.process_time() - own_before
    server_cpu_s = server_cpu() - cpu_before if server_cpu is not None and cpu_before is not None else None
    machine_cpu_s = machine_cpu() - machine_before if machine_cpu is not None and machine_before is not None else None

    try:
        await asyncio.wait_for(asyncio.shield(state.drained), drain_timeout)
    except TimeoutError:
        for client in clients:
            client.give_up(f"no reply within {drain_timeout:g}s")
    return RoundResult(
        conns=len(clients),
        completed=len(state.latencies),
        elapsed_s=elapsed,
        latencies_ns=sorted(state.latencies),
        errors=state.errors,
        error_samples=state.error_samples,
        client_cpu_s=own_cpu,
        server_cpu_s=server_cpu_s,
        machine_cpu_s=machine_cpu_s,
    )


async def run_round(
    socket_path: str,
    workload: Workload,
    conns: int,
    *,
    warmup: float = 0.5,
    duration: float = 3.0,
    server_cpu: Callable[[], float] | None = None,
    machine_cpu: Callable[[], float] | None = None,
    drain_timeout: float = 5.0,
) -> RoundResult:
    """Drive ``conns`` closed-loop connections for ``warmup`` + ``duration`` seconds and measure the last
    ``duration`` seconds (:func:`measure`). Connecting happens before the warm-up and is not measured.
    """
    if conns < 1:
        raise ValueError("conns must be at least 1")
    loop = asyncio.get_running_loop()
    state = RoundState(active=conns, drained=loop.create_future())
    size = len(workload)
    clients: list[SocketmapClient] = []
    try:
        for c in range(conns):
            # Connections start at evenly spread keys, so that together they cycle over the whole user set.
            factory = functools.partial(SocketmapClient, state, workload, c, c * size // conns)
            _, client = await loop.create_unix_connection(factory, socket_path)
            clients.append(client)
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


async def verify_all(socket_path: str, workload: Workload, conns: int = 4, reply_timeout: float = 10.0) -> None:
    """Send every request of ``workload`` once and check every reply; raise :class:`ReplyError` on any error.

    Used before measuring: it checks that a server answers what the load generator expects, and fills
    mailroster's cache so that the rounds measure the steady state Postfix sees, not the first lookups.
    """
    errors: list[str] = []

    async def one_connection(indexes: range) -> None:
        reader, writer = await asyncio.open_unix_connection(socket_path)
        try:
            for i in indexes:
                request, expected = workload.requests[i], workload.replies[i]
                writer.write(request)
                async with asyncio.timeout(reply_timeout):
                    head = await reader.readuntil(b":")
                    if not head[:-1].isdigit() or int(head[:-1]) > 100_000:
                        raise ReplyError(f"request {request!r}: bad reply length prefix {head[:20]!r}")
                    reply = head + await reader.readexactly(int(head[:-1]) + 1)
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


async def _main(args: argparse.Namespace) -> int:
    workload = Workload.mailbox(args.users)
    await verify_all(args.socket, workload)
    status = 0
    for conns in args.conns:
        result = await run_round(args.socket, workload, conns, warmup=args.warmup, duration=args.duration)
        print(result.summary(), flush=True)
        if result.errors:
            print("\n  ".join(["errors:", *result.error_samples]), file=sys.stderr)
            status = 1
    return status


def parse_conns(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("connection counts must be positive")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket of the socketmap server")
    parser.add_argument("--users", type=int, default=1000, help="size of the user set the keys cycle over")
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
    kind: EventLoopKind = args.event_loop
    try:
        return run_event_loop(_main(args), kind)
    except ReplyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
