"""Sans-IO netstring codec (http://cr.yp.to/proto/netstrings.txt), as Postfix's ``netstring.c`` frames it.

``NetstringDecoder.feed(data)`` takes whatever bytes arrived and returns the complete payloads, keeping a partial
frame for the next call. A length above the limit is refused as soon as its digits are read: the decoder never
waits for the bytes a hostile frame announces.
"""

from __future__ import annotations

from .errors import FrameTooLong, MalformedFrame

#: The most digits a length may have (leading zeros included) before the ``:``.
MAX_LENGTH_DIGITS = 10


class NetstringDecoder:
    """Accumulates bytes and yields netstring payloads; raises on the first broken frame."""

    __slots__ = ("_buffer", "_max_length")

    def __init__(self, max_length: int = 65536) -> None:
        self._buffer = b""
        self._max_length = max_length

    def feed(self, data: bytes) -> list[bytes]:
        """Return every payload completed by ``data``. Raises :class:`FrameTooLong` or :class:`MalformedFrame`."""
        buf = self._buffer + data if self._buffer else data
        size = len(buf)
        frames: list[bytes] = []
        pos = 0
        while pos < size:
            colon = buf.find(b":", pos, pos + MAX_LENGTH_DIGITS + 1)
            if colon < 0:
                digits = buf[pos : pos + MAX_LENGTH_DIGITS + 1]
                if not digits.isdigit():
                    raise MalformedFrame("netstring length is not a number")
                if len(digits) > MAX_LENGTH_DIGITS or int(digits) > self._max_length:
                    raise FrameTooLong(f"netstring longer than {self._max_length} bytes")
                break
            digits = buf[pos:colon]
            if not digits.isdigit():
                raise MalformedFrame("netstring length is not a number")
            length = int(digits)
            if length > self._max_length:
                raise FrameTooLong(f"netstring longer than {self._max_length} bytes")
            end = colon + 1 + length
            if end >= size:
                break
            if buf[end] != 0x2C:  # ","
                raise MalformedFrame("netstring without its ',' terminator")
            frames.append(buf[colon + 1 : end])
            pos = end + 1
        self._buffer = buf[pos:] if pos < size else b""
        return frames

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buffer)


def encode_netstring(payload: bytes) -> bytes:
    return b"%d:%b," % (len(payload), payload)
