"""The floor: the cheapest correct Python socketmap server, answering from a dict.

Whatever a Python daemon does per lookup, it pays at least for the event loop's read and write system calls, for
framing netstrings and for one dict lookup. This server does exactly that and nothing else: an
:class:`asyncio.Protocol` whose ``data_received`` parses every complete netstring in the chunk (several pipelined
requests in one read, or one request split across reads), splits ``<map> SP <key>`` at the first space, looks the key
up and writes ``OK <value>`` or ``NOTFOUND `` (socketmap_table(5)). It does no logging, no case folding, no
``+detail`` or catch-all fallback and no cache bookkeeping, so what mailroster costs above it is the price of
mailroster's own work and structure. Measuring against it, rather than against a fixed number, keeps the comparison
meaningful across machines and Python versions.

Run as ``python -m bench.floor --socket PATH --users N``; prints ``ready`` once listening and stops on SIGTERM or
SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import stat
import sys
from collections.abc import Mapping
from typing import cast

from .common import (
    MAX_DIGITS,
    MAX_PAYLOAD,
    EventLoopKind,
    mailbox_value,
    netstring,
    run_event_loop,
    user_address,
    uvloop_available,
)

__all__ = ["FloorProtocol", "Maps", "mailbox_maps", "main", "serve"]

#: map name -> key -> value, all raw bytes as they travel on the wire.
Maps = Mapping[bytes, Mapping[bytes, bytes]]

NOTFOUND = netstring(b"NOTFOUND ")
PERM_NO_KEY = netstring(b"PERM request has no key")
PERM_UNKNOWN_MAP = netstring(b"PERM unknown map")


def mailbox_maps(users: int) -> dict[bytes, dict[bytes, bytes]]:
    """The same ``mailbox`` map mailroster serves in the benchmark."""
    return {b"mailbox": {user_address(i).encode(): mailbox_value(i).encode() for i in range(users)}}


class FloorProtocol(asyncio.Protocol):
    """One client connection. All of the work happens in :meth:`data_received`, written for speed: no per-request
    method calls or allocations beyond slicing the request and formatting the reply.
    """

    __slots__ = ("_maps", "_pending", "_transport")

    def __init__(self, maps: Maps) -> None:
        self._maps = maps
        self._pending = b""  # an incomplete netstring carried over to the next read
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if self._pending:
            data = self._pending + data
            self._pending = b""
        maps = self._maps
        size = len(data)
        pos = 0
        replies: list[bytes] = []
        while pos < size:
            colon = data.find(b":", pos, pos + MAX_DIGITS + 1)
            if colon < 0:
                if size - pos > MAX_DIGITS or not data[pos:].isdigit():
                    transport.close()  # not a netstring: the stream cannot be resynchronised
                    return
                break  # only part of the length prefix so far
            digits = data[pos:colon]
            if not digits.isdigit():
                transport.close()
                return
            comma = colon + 1 + int(digits)
            if comma - colon - 1 > MAX_PAYLOAD:
                transport.close()  # refuse at once rather than wait for the announced bytes
                return
            if comma >= size:
                break  # payload or comma still to come
            if data[comma] != 0x2C:
                transport.close()
                return
            space = data.find(b" ", colon + 1, comma)
            if space < 0:
                replies.append(PERM_NO_KEY)
            else:
                table = maps.get(data[colon + 1 : space])
                if table is None:
                    replies.append(PERM_UNKNOWN_MAP)
                else:
                    value = table.get(data[space + 1 : comma])
                    if value is None:
                        replies.append(NOTFOUND)
                    else:
                        replies.append(b"%d:OK %b," % (len(value) + 3, value))
            pos = comma + 1
        if pos < size:
            self._pending = data[pos:]
        if replies:
            transport.write(replies[0] if len(replies) == 1 else b"".join(replies))


async def serve(socket_path: str, maps: Maps, ready: asyncio.Event | None = None) -> None:
    """Serve ``maps`` on a unix socket until cancelled, or until SIGTERM/SIGINT when run as a program."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(socket_path).st_mode):
            os.unlink(socket_path)
    server = await loop.create_unix_server(lambda: FloorProtocol(maps), socket_path, backlog=1024)
    try:
        if ready is not None:
            ready.set()
        await server.serve_forever()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


async def _serve_until_signalled(socket_path: str, maps: Maps) -> None:
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(socket_path, maps, ready))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    ready_wait = asyncio.create_task(ready.wait())
    await asyncio.wait({task, ready_wait}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        print("ready", flush=True)
    ready_wait.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--users", type=int, default=1000, help="number of users in the mailbox map (default 1000)")
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop" if uvloop_available() else "asyncio",
        help="event loop implementation (default: uvloop when installed)",
    )
    args = parser.parse_args(argv)
    kind: EventLoopKind = args.event_loop
    run_event_loop(_serve_until_signalled(args.socket, mailbox_maps(args.users)), kind)
    return 0


if __name__ == "__main__":
    sys.exit(main())
