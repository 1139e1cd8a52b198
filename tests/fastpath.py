"""Differential tests of the Dovecot sessions' fast paths (``LineSession.answer_at_once``).

A session whose service has a cache must reply byte for byte as one without, whatever the client sends; the reads
the fast path answers never reach the line reader. :func:`transcript` runs one exchange over a real Unix socket and
reports the replies and how many reads reached the line reader (:class:`CountingDecoder`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable

from mailroster.protocols.dovecot import LineDecoder, LineSession


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
    sessions: list[LineSession] = []

    def factory() -> LineSession:
        sessions.append(session())
        sessions[-1]._decoder = CountingDecoder(sessions[-1].max_line)
        return sessions[-1]

    directory = tempfile.mkdtemp(prefix="mrfp", dir="/tmp")
    path = os.path.join(directory, "s")
    server = await asyncio.get_running_loop().create_unix_server(factory, path)
    try:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        while not (await asyncio.wait_for(reader.readline(), 5)).startswith(greeting_end):
            pass
        writer.write(handshake)
        await writer.drain()
        await asyncio.sleep(0.01)
        decoder = sessions[0]._decoder
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
    finally:
        server.close()
        shutil.rmtree(directory, ignore_errors=True)
