"""What the floor, the load generator and the orchestrator share: the data set, netstrings and the event loop.

The data set is the one mailroster serves in the benchmark: ``N`` users, ``user{i}@example.com``, whose socketmap
``mailbox`` value is ``example.com/user{i}/`` (mailroster's default ``mailbox-path`` of ``"{domain}/{local}/"``).
Netstrings are Postfix's socketmap framing, ``<len>:<bytes>,`` (socketmap_table(5)).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

__all__ = [
    "MAX_DIGITS",
    "MAX_PAYLOAD",
    "EventLoopKind",
    "NetstringError",
    "Workload",
    "mailbox_value",
    "netstring",
    "netstring_end",
    "run_event_loop",
    "user_address",
    "uvloop_available",
]

#: Requests above this size are refused (PROTOCOLS.md: "cap requests at around 64 KiB").
MAX_PAYLOAD = 65536
#: Length prefixes longer than this many digits cannot be below MAX_PAYLOAD; replies may be up to 100000 bytes.
MAX_DIGITS = 6

EventLoopKind = Literal["uvloop", "asyncio"]
T = TypeVar("T")


def user_address(i: int) -> str:
    """The address of user ``i``: the key of its ``mailbox`` lookup."""
    return f"user{i}@example.com"


def mailbox_value(i: int) -> str:
    """The ``mailbox`` value of user ``i``, as mailroster's default mailbox-path renders it."""
    return f"example.com/user{i}/"


def netstring(payload: bytes) -> bytes:
    """Frame ``payload`` as a netstring."""
    return b"%d:%b," % (len(payload), payload)


class NetstringError(ValueError):
    """Bytes that cannot be the start of a netstring: the stream is out of step and the connection is lost."""


def netstring_end(buf: bytes, limit: int = 100_000) -> int | None:
    """Where the first netstring in ``buf`` ends (the index after its comma), or None if more bytes are needed.

    Raises :class:`NetstringError` on a malformed length, a length above ``limit`` or a missing comma.
    """
    colon = buf.find(b":", 0, MAX_DIGITS + 1)
    if colon < 0:
        if len(buf) > MAX_DIGITS or (buf and not buf.isdigit()):
            raise NetstringError(f"no length prefix in {buf[:20]!r}")
        return None
    digits = buf[:colon]
    if not digits.isdigit():
        raise NetstringError(f"bad length prefix {digits!r}")
    length = int(digits)
    if length > limit:
        raise NetstringError(f"netstring of {length} bytes exceeds {limit}")
    comma = colon + 1 + length
    if comma >= len(buf):
        return None
    if buf[comma] != 0x2C:
        raise NetstringError(f"netstring not terminated by a comma: {buf[comma : comma + 1]!r}")
    return comma + 1


@dataclass(frozen=True, slots=True)
class Workload:
    """Every request of the benchmark with the exact reply it must get, precomputed so that the client loop only
    writes and compares bytes.
    """

    requests: tuple[bytes, ...]
    replies: tuple[bytes, ...]

    @classmethod
    def mailbox(cls, users: int) -> Workload:
        """``mailbox user{i}@example.com`` -> ``OK example.com/user{i}/`` for i in range(users)."""
        if users < 1:
            raise ValueError("users must be at least 1")
        requests = tuple(netstring(b"mailbox " + user_address(i).encode()) for i in range(users))
        replies = tuple(netstring(b"OK " + mailbox_value(i).encode()) for i in range(users))
        return cls(requests, replies)

    def __len__(self) -> int:
        return len(self.requests)


def uvloop_available() -> bool:
    """Whether uvloop can be imported here."""
    return importlib.util.find_spec("uvloop") is not None


def run_event_loop(coro: Coroutine[Any, Any, T], kind: EventLoopKind = "uvloop") -> T:
    """Run ``coro`` to completion on a fresh uvloop or stock asyncio loop."""
    if kind == "uvloop":
        import uvloop  # noqa: PLC0415 - optional dependency, imported only when asked for

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    with asyncio.Runner() as runner:
        return runner.run(coro)
