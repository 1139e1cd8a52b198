"""Smoke tests of the benchmark harness in ``bench/``.

They check that the harness can be trusted, not how fast anything is (speed is measured by ``make bench``, never
asserted in a test): the floor frames and answers socketmap correctly, the load generator completes requests with
zero errors against it, and a wrong, malformed or missing reply is caught rather than counted as a fast answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the checkout, not part of the installed mailroster
    sys.path.insert(0, str(ROOT))

from bench import floor, loadgen  # noqa: E402
from bench.common import (  # noqa: E402
    EventLoopKind,
    NetstringError,
    Workload,
    netstring,
    run_event_loop,
    uvloop_available,
)

T = TypeVar("T")
LOOP: EventLoopKind = "uvloop" if uvloop_available() else "asyncio"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds ~100 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="mrb-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def with_floor(socket_path: Path, maps: floor.Maps, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` while an in-process floor serves ``maps`` on ``socket_path``."""

    async def main() -> T:
        ready = asyncio.Event()
        server = asyncio.create_task(floor.serve(str(socket_path), maps, ready))
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({server, ready_wait}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        ready_wait.cancel()
        if server.done():
            server.result()  # raises why it could not listen
        assert ready.is_set(), "floor did not start listening"
        try:
            return await body()
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    return run_event_loop(main(), LOOP)


def test_loadgen_completes_requests_against_the_floor(sock_dir: Path) -> None:
    path = sock_dir / "floor.sock"
    workload = Workload.mailbox(50)

    async def body() -> loadgen.RoundResult:
        await loadgen.verify_all(str(path), workload)
        return await loadgen.run_round(str(path), workload, 4, warmup=0.05, duration=0.25)

    result = with_floor(path, floor.mailbox_maps(50), body)
    assert result.errors == 0, result.error_samples
    result.raise_for_errors()
    assert result.completed > 0
    assert result.req_per_s > 0
    assert 0 < result.p50_ms <= result.p99_ms
    assert not path.exists(), "the floor removes its socket when it stops"


def test_a_wrong_reply_is_detected(sock_dir: Path) -> None:
    path = sock_dir / "floor.sock"
    workload = Workload.mailbox(10)
    maps = floor.mailbox_maps(10)
    maps[b"mailbox"][b"user7@example.com"] = b"example.com/someone-else/"

    async def body() -> tuple[loadgen.RoundResult, str]:
        with pytest.raises(loadgen.ReplyError) as verify_error:
            await loadgen.verify_all(str(path), workload)
        result = await loadgen.run_round(str(path), workload, 2, warmup=0.0, duration=0.1)
        return result, str(verify_error.value)

    result, verify_message = with_floor(path, maps, body)
    assert "user7@example.com" in verify_message
    assert result.errors > 0
    with pytest.raises(loadgen.ReplyError, match="someone-else"):
        result.raise_for_errors("broken floor")


def test_a_server_that_closes_is_an_error(sock_dir: Path) -> None:
    """A dropped connection must fail the round, not leave it waiting or count as zero-latency replies."""
    path = sock_dir / "floor.sock"
    workload = Workload(requests=(netstring(b"mailbox " + b"x" * 70_000),), replies=(netstring(b"OK x"),))

    result = with_floor(
        path, floor.mailbox_maps(1), lambda: loadgen.run_round(str(path), workload, 1, warmup=0.0, duration=0.1)
    )
    assert result.errors == 1
    assert "closed by the server" in result.error_samples[0]


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (b"21:OK example.com/user1/,", loadgen.ReplyCheck.MATCH),
        (b"21:OK example.com/user2/,", loadgen.ReplyCheck.MISMATCH),
        (b"9:NOTFOUND ,", loadgen.ReplyCheck.MISMATCH),
        (b"21:OK example.com/user1/", loadgen.ReplyCheck.INCOMPLETE),
        (b"21:OK exa", loadgen.ReplyCheck.INCOMPLETE),
        (b"2", loadgen.ReplyCheck.INCOMPLETE),
        (b"", loadgen.ReplyCheck.INCOMPLETE),
    ],
)
def test_check_reply(received: bytes, expected: loadgen.ReplyCheck) -> None:
    assert loadgen.check_reply(received, b"21:OK example.com/user1/,") is expected


@pytest.mark.parametrize(
    "received",
    [
        b"OK example.com/user1/",  # no netstring at all
        b"21:OK example.com/user1/;",  # wrong terminator
        b"2x:OK",  # bad length
        b"9999999:",  # longer than any reply may be
        b"21:OK example.com/user1/,9:NOTFOUND ,",  # a second, unsolicited reply
    ],
)
def test_check_reply_rejects_broken_streams(received: bytes) -> None:
    with pytest.raises(NetstringError):
        loadgen.check_reply(received, b"21:OK example.com/user1/,")


def test_floor_framing(sock_dir: Path) -> None:
    """Pipelined requests in one write, a request split byte by byte, and refusal of garbage."""
    path = sock_dir / "floor.sock"
    requests = [b"mailbox user1@example.com", b"mailbox nobody@example.com", b"alias user1@example.com", b"mailbox"]
    replies = b"21:OK example.com/user1/,9:NOTFOUND ,16:PERM unknown map,23:PERM request has no key,"

    async def exchange(data: bytes, chunk: int) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        with contextlib.suppress(ConnectionError):  # the floor may close before we are done writing garbage
            for i in range(0, len(data), chunk):
                writer.write(data[i : i + chunk])
                await writer.drain()
                await asyncio.sleep(0)
            writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return reply

    async def body() -> list[bytes]:
        pipelined = b"".join(netstring(r) for r in requests)
        return [
            await exchange(pipelined, len(pipelined)),
            await exchange(pipelined, 1),
            await exchange(b"999999:mailbox", 100),  # announces more than 64 KiB: closed at once, no waiting
            await exchange(b"99999999:", 100),  # a length no request can have
            await exchange(b"5:hello;5:mailbox", 100),  # bad terminator
            await exchange(b"hello", 100),
        ]

    answers = with_floor(path, floor.mailbox_maps(2), body)
    assert answers == [replies, replies, b"", b"", b"", b""]


def test_run_orchestrates_an_a_a_round() -> None:
    """``bench.run`` end to end with a second floor in mailroster's place: servers start, the table is printed."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--floor-vs-floor",
            "--users",
            "20",
            "--conns",
            "1,4",
            "--warmup",
            "0.05",
            "--duration",
            "0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [row[:2] for row in rows] == [["1", "floor-b"], ["1", "floor"], ["4", "floor-b"], ["4", "floor"]]
