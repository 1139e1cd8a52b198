"""The in-process harness of the session tests: protocol sessions served on real Unix sockets, under the stdlib
loop and under uvloop, and driven by a line client over asyncio streams.

A test module imports the fixture :func:`loop_kind` (pytest finds fixtures by name in the test module) and marks its
session tests, or itself, ``pytest.mark.usefixtures("loop_kind")``; :func:`run` then runs a coroutine on that loop.

:func:`transcript` is a differential test of the Dovecot sessions' fast paths (``LineSession.answer_at_once``): a
session whose service has a cache must reply byte for byte as one without, whatever the client sends, and the reads
the fast path answers never reach the line reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Generic, Self, TypeVar

import pytest
import uvloop

from mailroster.backends.outcome import NOT_FOUND, Found, Outcome, TempFail
from mailroster.protocols.dovecot import LineDecoder, LineSession
from mailroster.protocols.service import Connection

T = TypeVar("T")
P = TypeVar("P", bound=asyncio.Protocol)

_LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
_loop_factory: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]


@pytest.fixture(params=sorted(_LOOPS))
def loop_kind(request: pytest.FixtureRequest) -> None:
    """Session tests run under the stdlib loop and under uvloop (whose transports differ)."""
    _loop_factory[0] = _LOOPS[request.param]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh loop of the kind :func:`loop_kind` chose, failing it after 30 seconds."""
    with asyncio.Runner(loop_factory=_loop_factory[0]) as runner:
        return runner.run(asyncio.wait_for(coro, 30))


@asynccontextmanager
async def serve(factory: Callable[[], asyncio.Protocol], path: str | None = None) -> AsyncIterator[str]:
    """Serve ``factory``'s sessions on a Unix socket, at ``path`` or in a fresh directory under /tmp (sun_path is
    short); yields the socket's path."""
    directory = tempfile.mkdtemp(prefix="mrss", dir="/tmp")
    path = path or os.path.join(directory, "s")
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    os.chmod(path, 0o666)  # at a path of the test's choosing, Postfix's smtpd or Dovecot connects unprivileged
    try:
        yield path
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)


class Kept(Generic[P]):
    """A session factory for :func:`serve` that keeps every session it makes, in ``sessions``."""

    def __init__(self, make: Callable[[], P]) -> None:
        self.make = make
        self.sessions: list[P] = []

    def __call__(self) -> P:
        self.sessions.append(self.make())
        return self.sessions[-1]


class ScriptedService:
    """Answers lookups of ``<map>/<key>``: ``hit*`` keys from its cache, ``slow*`` keys once ``release`` is set,
    ``down*`` keys with a temporary failure, ``none*`` keys not found, others as :meth:`answer` says; records
    every lookup that is not cached in ``calls``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str]] = []

    def cached(self, map_name: str, key: str) -> Outcome | None:
        return Found(f"cached:{key}") if key.startswith("hit") else None

    async def lookup(self, map_name: str, key: str) -> Outcome:
        self.calls.append((map_name, key))
        if key.startswith("slow"):
            await self.release.wait()
        if key.startswith("down"):
            return TempFail("backend unavailable")
        if key.startswith("none"):
            return NOT_FOUND
        return self.answer(map_name, key)

    def answer(self, map_name: str, key: str) -> Outcome:
        """The answer to any other key: it echoes the map and the key."""
        return Found(f"{map_name}:{key}")


class Observer:
    """A connection observer that records what it is told; refuses new connections unless ``accept``."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.events: list[str] = []

    def opened(self, conn: Connection) -> bool:
        self.events.append("opened")
        return self.accept

    def closed(self, conn: Connection) -> None:
        self.events.append("closed")

    def idle(self, conn: Connection) -> None:
        self.events.append("idle")


class LineClient:
    """A client of a line protocol (Dovecot's are tab-separated lines); reads replies of up to a MiB."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, path: str) -> Self:
        return cls(*await asyncio.open_unix_connection(path, limit=1 << 20))

    async def send(self, *lines: str | bytes, size: int = 4096) -> None:
        """Write ``lines``, each with its LF, in writes of ``size`` bytes (a small size yields between writes)."""
        data = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
        for i in range(0, len(data), size):
            self.writer.write(data[i : i + size])
            await self.writer.drain()
            if size < 4096:
                await asyncio.sleep(0)

    async def line(self, timeout: float = 5) -> str:
        data = await asyncio.wait_for(self.reader.readline(), timeout)
        assert data.endswith(b"\n"), f"connection closed, got {data!r}"
        return data[:-1].decode()

    async def lines(self, count: int) -> list[str]:
        return [await self.line() for _ in range(count)]

    async def rest(self, timeout: float = 5) -> bytes:
        """Everything until the server closes."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


async def command(*args: str) -> tuple[int, str]:
    """Run a real client (doveadm) without blocking the loop serving it: its exit status and output."""
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


class CountingDecoder(LineDecoder):
    """A line reader that counts the reads it is fed."""

    __slots__ = ("reads",)

    def __init__(self, max_line: int) -> None:
        super().__init__(max_line)
        self.reads = 0

    def feed(self, data: bytes) -> list[bytes]:
        self.reads += 1
        return super().feed(data)


async def transcript(
    session: Callable[[], LineSession],
    greeting_end: bytes,
    handshake: bytes,
    chunks: list[bytes],
    *,
    end: bytes,
    end_reply: bytes,
) -> tuple[list[bytes], int]:
    """The replies to ``chunks`` (each written as one read) up to the one starting with ``end_reply``, the reply to
    ``end``, or ``b"<closed>"``; and how many reads of ``chunks`` reached the line reader."""

    def counted() -> LineSession:
        made = session()
        made._decoder = CountingDecoder(made.max_line)
        return made

    factory = Kept(counted)
    async with serve(factory) as path:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        while not (await asyncio.wait_for(reader.readline(), 5)).startswith(greeting_end):
            pass
        writer.write(handshake)
        await writer.drain()
        await asyncio.sleep(0.01)
        decoder = factory.sessions[0]._decoder
        assert isinstance(decoder, CountingDecoder)
        before = decoder.reads
        with contextlib.suppress(ConnectionError):  # a chunk may have closed the connection
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.01)  # each chunk is one read on the server
        reads = decoder.reads - before
        with contextlib.suppress(ConnectionError):
            writer.write(end)
        replies: list[bytes] = []
        while not replies or not replies[-1].startswith(end_reply):
            try:
                data = await asyncio.wait_for(reader.readline(), 5)
            except ConnectionError:
                data = b""
            if not data:
                replies.append(b"<closed>")
                break
            replies.append(data)
        writer.close()
        return replies, reads
