"""What Dovecot's line protocols share: tab-escaping, a line codec with limits, and the asyncio adapters.

Dovecot's auth-client (``dovecot_auth``), auth-master (``dovecot_master``) and dict proxy (``dovecot_dict``)
protocols are ``field TAB field ... LF`` lines. The receiver splits on TAB first, then unescapes each field
(Dovecot 2.3 ``src/lib/strescape.c``: ``t_strsplit_tabescaped``). The escape character is ``\\x01``:

======  ==========
raw     escaped
======  ==========
NUL     ``\\x01 0``
\\x01   ``\\x01 1``
TAB     ``\\x01 t``
CR      ``\\x01 r``
LF      ``\\x01 n``
======  ==========

``\\x01`` followed by any other character gives that character, and a trailing ``\\x01`` is dropped. (Dovecot's
auth protocol document says LF is ``\\x01l``; the code, which wins, uses ``n``.)

:class:`LineDecoder` is sans-IO. :class:`LineSession` is the thin asyncio adapter underneath the three sessions
(connection observer, flow control, half-close); :class:`OrderedLineSession` adds replies written strictly in
request order, which the master and dict protocols need and the auth protocol, keyed by request ids, does not.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, cast

from .eager import run_eagerly
from .errors import BadRequest, FrameTooLong, MalformedFrame, ProtocolError
from .service import ConnectionObserver

log = logging.getLogger(__name__)

#: Replies a pipelining client may have outstanding before a session stops reading from it.
MAX_PENDING = 64
UINT32_MAX = 2**32 - 1

_ESCAPE = str.maketrans({"\x00": "\x010", "\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"})
_UNESCAPE = {"0": "\x00", "1": "\x01", "t": "\t", "r": "\r", "n": "\n"}
# ".?" also matches at the very end, which is how a trailing \x01 gets dropped.
_ESCAPED = re.compile("\x01(.?)", re.DOTALL)


def tab_escape(text: str) -> str:
    """Dovecot ``str_tabescape``."""
    return text.translate(_ESCAPE)


def tab_unescape(field: str) -> str:
    """Dovecot ``str_tabunescape``: ``\\x01`` + any other character is that character; a trailing one is dropped."""
    if "\x01" not in field:
        return field
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(1)), field)


def split_line(line: bytes) -> list[str]:
    """A line's fields: split on TAB first, then unescape each field.

    Dovecot is byte-transparent, so bytes that are not UTF-8 are kept as surrogates (``surrogateescape``) rather
    than refused; :func:`is_text` tells whether a field is clean text that may be handed to the directory.
    """
    fields = line.decode("utf-8", "surrogateescape").split("\t")
    if b"\x01" not in line:  # the usual line escapes nothing: skip the per-field pass
        return fields
    return [tab_unescape(field) for field in fields]


def join_line(fields: Iterable[str]) -> bytes:
    """One line from ``fields``: each tab-escaped, joined with TAB, terminated by LF."""
    return "\t".join(map(tab_escape, fields)).encode("utf-8", "surrogateescape") + b"\n"


def is_text(text: str) -> bool:
    """Whether ``text`` came from valid UTF-8 (holds no surrogate standing for an undecodable byte)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_uint(text: str, what: str = "number", *, positive: bool = False) -> int:
    """Dovecot ``str_to_uint`` for a 32-bit id: digits only. Raises :class:`BadRequest`."""
    if not text.isascii() or not text.isdigit() or len(text) > 10:
        raise BadRequest(f"{what} is not a number")
    value = int(text)
    if value > UINT32_MAX or (positive and value == 0):
        raise BadRequest(f"{what} out of range")
    return value


class LineDecoder:
    """Splits a byte stream into LF-terminated lines, refusing over-long lines and NUL bytes.

    ``max_line`` counts the LF, as Dovecot's input buffers do: a line may hold ``max_line - 1`` bytes. A longer
    one is refused as soon as that many bytes are buffered without an LF, never after waiting for the rest. A CR
    before the LF is dropped, as Dovecot's ``i_stream_next_line`` does.
    """

    __slots__ = ("_buffer", "_max_line")

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> list[bytes]:
        """Every line completed by ``data``. Raises :class:`FrameTooLong` or :class:`MalformedFrame`."""
        if b"\x00" in data:
            # Dovecot reads lines as C strings; a NUL in one is binary garbage, not text.
            raise MalformedFrame("NUL byte in a line")
        if b"\n" not in data:
            # Appending to a bytearray keeps a line dribbled in byte by byte linear, not quadratic.
            self._buffer += data
            if len(self._buffer) >= self._max_line:
                raise FrameTooLong(f"line longer than {self._max_line} bytes")
            return []
        if self._buffer:
            self._buffer += data
            data = bytes(self._buffer)
        lines = data.split(b"\n")
        self._buffer = bytearray(lines.pop())
        if len(self._buffer) >= self._max_line or any(len(line) >= self._max_line for line in lines):
            raise FrameTooLong(f"line longer than {self._max_line} bytes")
        return [line[:-1] if line.endswith(b"\r") else line for line in lines]

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buffer)


class LineSession(asyncio.Protocol):
    """One client connection of a Dovecot line protocol.

    Subclasses supply :meth:`greeting`, :meth:`line_received` (raising :class:`ProtocolError` closes the
    connection) and :attr:`busy`, and call :meth:`became_idle` whenever the last request is answered.
    """

    protocol_name = "dovecot"
    #: The longest request line, LF included.
    max_line = 16384

    def __init__(self, observer: ConnectionObserver | None = None) -> None:
        self._observer = observer
        self._transport: asyncio.Transport | None = None
        self._decoder = LineDecoder(self.max_line)
        self._closing = False
        self._close_when_idle = False
        self._reading_paused = False
        self._writing_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.last_active = time.monotonic()
        self.peer = "?"

    # What a protocol supplies.

    def greeting(self) -> bytes:
        """What the server sends first, on accept."""
        return b""

    def line_received(self, line: bytes) -> None:
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Whether a request is being answered (draining waits for it)."""
        raise NotImplementedError

    def too_busy(self) -> bool:
        """Whether to stop reading until some requests are answered."""
        return False

    def answer_at_once(self, data: bytes) -> bytes | None:
        """The reply to ``data``, when it is one whole request a cache answers, else ``None``.

        Called for each read while nothing is in flight, before the line reader sees it: the fast path of the
        commonest request. It must change no state, and answer only what the general way (:meth:`line_received`)
        would answer with the same bytes; ``None`` hands the read to the general way.
        """
        return None

    def on_eof(self) -> None:
        """The client will send nothing more."""

    # Connection.

    @property
    def closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Close after the replies already written have been sent; requests in flight are abandoned."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def writable(self) -> None:
        """Wait while the client is not reading what was written (flow control for long replies)."""
        while self._writing_paused and not self._closing:
            if self._writable is None:
                self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task owned by this connection: cancelled when it closes; an exception escaping it is a bug."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def became_idle(self) -> None:
        """Every request is answered: close a half-closed connection, or let a draining daemon close it."""
        if self._close_when_idle:
            self.close()
        elif self._observer is not None and not self._closing:
            self._observer.idle(self)
        self.update_reading()

    def update_reading(self) -> None:
        """Pause reading while the client does not read replies or has too many requests in flight."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pause = self._writing_paused or self.too_busy()
        if pause and not self._reading_paused:
            self._reading_paused = True
            transport.pause_reading()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self._observer is not None and not self._observer.opened(self):
            self._closing = True
            self._transport.abort()
            return
        greeting = self.greeting()
        if greeting:
            self.write(greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        if self._observer is not None:
            self._observer.closed(self)
            self._observer = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = time.monotonic()
        if not (self._writing_paused or self._decoder.buffered or self.busy):
            reply = self.answer_at_once(data)
            if reply is not None:
                assert self._transport is not None  # data arrived on it, and it is not closing (_closing above)
                self._transport.write(reply)
                return
        try:
            for line in self._decoder.feed(data):
                self.line_received(line)
                if self.closing:  # a reply that closes the connection ends the reading too
                    return
        except ProtocolError as exc:
            # Never log the line itself: AUTH and CONT lines carry passwords.
            log.warning("protocol=%s peer=%s closing connection: %s", self.protocol_name, self.peer, exc)
            self.close()
            return
        self.update_reading()

    def eof_received(self) -> bool | None:
        self.on_eof()
        if self.busy:
            # Half-close: answer what is in flight, then close (True keeps the transport open until then).
            self._close_when_idle = True
            return True
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True
        self.update_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None
        self.update_reading()

    # Internals.

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("protocol=%s internal error, closing connection", self.protocol_name, exc_info=exc)
            self.close()


class ReplySlot:
    """The place of one request's reply in the connection's reply order.

    A request's handler writes through its slot; what it writes before the requests ahead of it are answered is
    held back. A long reply (an iteration) awaits :meth:`ready` so that it streams instead of piling up.
    """

    __slots__ = ("_chunks", "_head", "_session", "done")

    def __init__(self, session: OrderedLineSession) -> None:
        self._session = session
        self._chunks: list[bytes] = []
        self._head: asyncio.Future[None] | None = None
        self.done = False

    def write(self, data: bytes) -> None:
        if self._session.is_head(self):
            self._session.write(data)
        else:
            self._chunks.append(data)

    async def ready(self) -> None:
        """Wait until every earlier reply is written and the client reads what this one writes."""
        if not self._session.is_head(self):
            self._head = asyncio.get_running_loop().create_future()
            await self._head
        await self._session.writable()

    def _flush(self) -> None:
        if self._chunks:
            self._session.write(b"".join(self._chunks))
            self._chunks.clear()
        if self._head is not None and not self._head.done():
            self._head.set_result(None)


class OrderedLineSession(LineSession):
    """A line session whose replies go out strictly in request order, also when requests are pipelined.

    Each request is answered by a handler coroutine given a :class:`ReplySlot`. A handler that completes without
    suspending (a cache hit) is answered inside ``data_received``; only a real wait creates a task.
    """

    def __init__(self, observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._slots: deque[ReplySlot] = deque()

    @property
    def busy(self) -> bool:
        return bool(self._slots)

    def too_busy(self) -> bool:
        return len(self._slots) > MAX_PENDING

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._slots.clear()

    def is_head(self, slot: ReplySlot) -> bool:
        return bool(self._slots) and self._slots[0] is slot

    def reply(self, data: bytes) -> None:
        """Answer a request at once (in its turn)."""
        if not self._slots:
            self.write(data)
            return
        slot = ReplySlot(self)
        slot.write(data)
        slot.done = True
        self._slots.append(slot)

    def submit(self, handler: Callable[[ReplySlot], Coroutine[Any, Any, None]]) -> None:
        """Answer a request with ``handler``, whose reply goes out after those of every earlier request."""
        slot = ReplySlot(self)
        self._slots.append(slot)
        try:
            result = run_eagerly(handler(slot))
        except Exception:  # handlers answer every outcome themselves: this is a bug
            log.exception("protocol=%s internal error, closing connection", self.protocol_name)
            self.close()
            return
        if isinstance(result, asyncio.Task):
            self._tasks.add(result)
            result.add_done_callback(functools.partial(self._handler_done, slot))
        else:
            self._finish(slot)

    def _handler_done(self, slot: ReplySlot, task: asyncio.Task[None]) -> None:
        self._task_done(task)
        if not task.cancelled() and task.exception() is None:
            self._finish(slot)

    def _finish(self, slot: ReplySlot) -> None:
        slot.done = True
        if not self.is_head(slot):
            return
        while self._slots:
            head = self._slots[0]
            head._flush()
            if not head.done:
                break
            self._slots.popleft()
        if not self._slots:
            self.became_idle()
        else:
            self.update_reading()
