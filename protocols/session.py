"""The asyncio adapter shared by request-then-reply protocols (socketmap, tcp_table, policy).

A session decodes frames with its protocol's sans-IO codec, answers each request through the lookup service and
writes replies strictly in request order, also when a client pipelines. An answer that completes without
suspending (a cache hit) is written at once from ``data_received``; only a real wait creates a task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any, cast

from mailroster.backends.outcome import Outcome, TempFail

from .eager import run_eagerly
from .errors import ProtocolError
from .service import ConnectionObserver

log = logging.getLogger(__name__)

#: Replies a pipelining client may have outstanding before the session stops reading from it.
MAX_PENDING = 64


class RequestReplySession(asyncio.Protocol):
    """One client connection. Subclasses implement :meth:`decode`, :meth:`answer` and :meth:`encode`."""

    protocol_name = "?"

    def __init__(self, observer: ConnectionObserver | None = None) -> None:
        self._observer = observer
        self._transport: asyncio.Transport | None = None
        # Replies not yet written: encoded bytes, or a task still answering. Head first.
        self._pending: deque[bytes | asyncio.Task[Outcome]] = deque()
        self._reading_paused = False
        self._closing = False
        self.last_active = time.monotonic()
        self.peer = "?"

    # What a protocol supplies.

    def decode(self, data: bytes) -> list[Any]:
        """Feed bytes to the codec; return the complete requests. Raises :class:`ProtocolError`."""
        raise NotImplementedError

    def answer(self, request: Any) -> Coroutine[Any, Any, Outcome] | bytes:
        """The coroutine that answers one request, or the reply itself for a request refused outright."""
        raise NotImplementedError

    def encode(self, outcome: Outcome) -> bytes:
        """The reply for one outcome."""
        raise NotImplementedError

    def error_reply(self, error: ProtocolError) -> bytes | None:
        """A last reply before closing on a protocol error, if the protocol has one."""
        return None

    # Connection.

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = self._transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        if self._observer is not None and not self._observer.opened(self):
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        for item in self._pending:
            if isinstance(item, asyncio.Task):
                item.cancel()
        self._pending.clear()
        if self._observer is not None:
            self._observer.closed(self)
            self._observer = None

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = time.monotonic()
        try:
            requests = self.decode(data)
        except ProtocolError as exc:
            log.warning("protocol=%s peer=%s closing connection: %s", self.protocol_name, self.peer, exc)
            last = self.error_reply(exc)
            if last is not None and not self._pending:
                self._write(last)
            self.close()
            return
        for request in requests:
            self._submit(request)
        if len(self._pending) > MAX_PENDING and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        # Half-close: answer what is pending, then close (returning True keeps the transport open until then).
        if self._pending:
            self._closing = True
            return True
        return None

    def pause_writing(self) -> None:
        if self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._maybe_resume_reading()

    # Internals.

    def _submit(self, request: Any) -> None:
        try:
            answer = self.answer(request)
            if isinstance(answer, bytes):
                self._reply(answer)
                return
            result = run_eagerly(answer)
        except Exception:  # the service never raises; this is a bug, not a backend fault
            log.exception("protocol=%s internal error", self.protocol_name)
            result = TempFail("internal error")
        if isinstance(result, asyncio.Task):
            self._pending.append(result)
            result.add_done_callback(self._on_done)
        else:
            self._reply(self.encode(result))

    def _reply(self, reply: bytes) -> None:
        if self._pending:
            self._pending.append(reply)
        else:
            self._write(reply)

    def _on_done(self, task: asyncio.Task[Outcome]) -> None:
        if task.cancelled():
            return
        # Write every reply at the head of the queue that is ready, in order.
        while self._pending:
            head = self._pending[0]
            if isinstance(head, asyncio.Task):
                if not head.done():
                    return
                try:
                    reply = self.encode(head.result())
                except Exception:
                    log.exception("protocol=%s internal error", self.protocol_name)
                    reply = self.encode(TempFail("internal error"))
            else:
                reply = head
            self._pending.popleft()
            self._write(reply)
        if self._closing and self._transport is not None:
            self._transport.close()
            return
        self._maybe_resume_reading()
        if self._observer is not None:
            self._observer.idle(self)

    def _maybe_resume_reading(self) -> None:
        if (
            self._reading_paused
            and self._transport is not None
            and len(self._pending) <= MAX_PENDING
            and self._transport.get_write_buffer_size() == 0
        ):
            self._reading_paused = False
            self._transport.resume_reading()

    def _write(self, reply: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(reply)
