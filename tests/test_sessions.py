"""Protocol sessions over real sockets in-process: ordering, pipelining, bad input, isolation of connections."""

from __future__ import annotations

import asyncio

import pytest

from mailroster.protocols.netstring import NetstringDecoder, encode_netstring
from mailroster.protocols.socketmap import SocketmapSession
from mailroster.protocols.tcptable import TcpTableSession

from sessionkit import (
    Kept,
    ScriptedService,
    loop_kind,  # noqa: F401 (a fixture: pytest finds it by name)
    run,
    serve,
)


async def read_netstrings(reader: asyncio.StreamReader, count: int) -> list[bytes]:
    decoder = NetstringDecoder()
    frames: list[bytes] = []
    while len(frames) < count:
        data = await asyncio.wait_for(reader.read(4096), 5)
        if not data:
            break
        frames.extend(decoder.feed(data))
    return frames


pytestmark = pytest.mark.usefixtures("loop_kind")  # every session test, under the stdlib loop and uvloop


def test_socketmap_replies_in_order_when_pipelined() -> None:
    async def main() -> None:
        service = ScriptedService()
        async with serve(lambda: SocketmapSession(service)) as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"".join(encode_netstring(r) for r in (b"mailbox slow1", b"alias fast", b"domain down1")))
            await asyncio.sleep(0.05)
            service.release.set()
            frames = await read_netstrings(reader, 3)
            assert frames == [b"OK mailbox:slow1", b"OK alias:fast", b"TEMP backend unavailable"]
            writer.close()

    run(main())


def test_socketmap_holds_fast_reply_until_slow_one_is_written() -> None:
    async def main() -> None:
        service = ScriptedService()
        async with serve(lambda: SocketmapSession(service)) as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(encode_netstring(b"mailbox slow") + encode_netstring(b"mailbox fast"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(4096), 0.2)
            service.release.set()
            assert await read_netstrings(reader, 2) == [b"OK mailbox:slow", b"OK mailbox:fast"]
            writer.close()

    run(main())


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"mailbox", b"PERM expected '<map> <key>'"),
        (b"mailbox ", b"PERM expected '<map> <key>'"),
        (b"mailbox \xff\xfe", b"PERM request is not UTF-8"),
        (b"mailbox none@x", b"NOTFOUND "),
    ],
)
def test_socketmap_bad_requests_get_perm_and_connection_stays(request_bytes: bytes, reply: bytes) -> None:
    async def main() -> None:
        service = ScriptedService()
        async with serve(lambda: SocketmapSession(service)) as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(encode_netstring(request_bytes) + encode_netstring(b"domain ok"))
            assert await read_netstrings(reader, 2) == [reply, b"OK domain:ok"]
            writer.close()

    run(main())


@pytest.mark.parametrize(
    "garbage",
    [b"10485760:", b"\x00\x01\x02\x03garbage", b"3:abc;", b"GET / HTTP/1.1\r\n\r\n"],
    ids=["10MB-announced", "binary", "bad-terminator", "http"],
)
def test_socketmap_bad_framing_closes_only_that_connection(garbage: bytes) -> None:
    async def main() -> None:
        service = ScriptedService()
        async with serve(lambda: SocketmapSession(service)) as path:
            good_reader, good_writer = await asyncio.open_unix_connection(path)
            bad_reader, bad_writer = await asyncio.open_unix_connection(path)
            bad_writer.write(garbage)
            assert await asyncio.wait_for(bad_reader.read(), 2) == b""  # closed, not waiting for more bytes
            good_writer.write(encode_netstring(b"domain example.org"))
            assert await read_netstrings(good_reader, 1) == [b"OK domain:example.org"]
            good_writer.close()

    run(main())


def test_tcp_table_session() -> None:
    async def main() -> None:
        service = ScriptedService()
        async with serve(lambda: TcpTableSession(service, "alias")) as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"get a%20b\nget none\nput x y\nget down\n")
            lines = [await asyncio.wait_for(reader.readline(), 2) for _ in range(4)]
            assert lines == [
                b"200 alias:a%20b\n",
                b"500 not%20found\n",
                b"500 only%20'get'%20is%20supported\n",
                b"400 backend%20unavailable\n",
            ]
            assert service.calls == [("alias", "a b"), ("alias", "none"), ("alias", "down")]
            writer.write(b"get " + b"x" * 100_000)
            assert await asyncio.wait_for(reader.read(), 2) == b""
            writer.close()

    run(main())


def test_half_closed_connection_gets_its_answers_then_closes() -> None:
    async def main() -> None:
        service = ScriptedService()
        factory = Kept(lambda: SocketmapSession(service))
        sessions = factory.sessions
        async with serve(factory) as path:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(encode_netstring(b"mailbox slow"))
            writer.write_eof()
            await asyncio.sleep(0.05)
            assert sessions[0].busy
            service.release.set()
            assert await asyncio.wait_for(reader.read(), 2) == encode_netstring(b"OK mailbox:slow")
            assert not sessions[0].busy
            writer.close()

    run(main())


def test_connection_lost_cancels_pending_lookups() -> None:
    async def main() -> None:
        service = ScriptedService()
        factory = Kept(lambda: SocketmapSession(service))
        sessions = factory.sessions
        async with serve(factory) as path:
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(encode_netstring(b"mailbox slow"))
            await asyncio.sleep(0.05)
            pending = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "_resume"]  # type: ignore[union-attr]
            assert len(pending) == 1
            sessions[0].close()  # as the idle sweeper or a forced shutdown does
            await asyncio.sleep(0.05)
            assert pending[0].cancelled()
            assert not sessions[0].busy

    run(main())
