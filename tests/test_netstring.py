"""The sans-IO netstring codec, fed whole and at read sizes down to one byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailroster.protocols import errors
from mailroster.protocols.netstring import NetstringDecoder, encode_netstring

GOLDEN = json.loads((Path(__file__).parent / "data" / "netstring.json").read_text())
READ_SIZES = (4096, 128, 16, 1)


def feed_in_chunks(data: bytes, size: int) -> list[bytes]:
    decoder = NetstringDecoder(max_length=65536)
    frames: list[bytes] = []
    for i in range(0, len(data), size):
        frames.extend(decoder.feed(data[i : i + size]))
    assert decoder.buffered == 0
    return frames


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(("stream", "frames"), GOLDEN["ok"])
def test_frames(stream: str, frames: list[str], size: int) -> None:
    assert feed_in_chunks(stream.encode("latin-1"), size) == [f.encode("latin-1") for f in frames]


@pytest.mark.parametrize("size", READ_SIZES)
def test_whole_table_as_one_stream(size: int) -> None:
    stream = b"".join(s.encode("latin-1") for s, _ in GOLDEN["ok"])
    expected = [f.encode("latin-1") for _, frames in GOLDEN["ok"] for f in frames]
    assert feed_in_chunks(stream, size) == expected


@pytest.mark.parametrize(("stream", "frames"), GOLDEN["partial"])
def test_partial_frames_are_held(stream: str, frames: list[str]) -> None:
    decoder = NetstringDecoder()
    assert decoder.feed(stream.encode("latin-1")) == frames
    assert decoder.buffered == len(stream)


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(("stream", "error"), GOLDEN["errors"])
def test_errors(stream: str, error: str, size: int) -> None:
    decoder = NetstringDecoder(max_length=65536)
    data = stream.encode("latin-1")
    with pytest.raises(getattr(errors, error)):
        for i in range(0, len(data), size):
            decoder.feed(data[i : i + size])


def test_oversized_announcement_fails_before_its_bytes() -> None:
    """A frame announcing 10 MB is refused as soon as its length is read, not after 10 MB arrive."""
    decoder = NetstringDecoder(max_length=65536)
    with pytest.raises(errors.FrameTooLong):
        decoder.feed(b"10485760:")


def test_limit_is_inclusive() -> None:
    decoder = NetstringDecoder(max_length=5)
    assert decoder.feed(b"5:abcde,") == [b"abcde"]
    with pytest.raises(errors.FrameTooLong):
        decoder.feed(b"6:")


@pytest.mark.parametrize("payload", [b"", b"OK 1", b"NOTFOUND ", "OK jürgen".encode(), b"x" * 1000])
def test_encode_round_trip(payload: bytes) -> None:
    encoded = encode_netstring(payload)
    assert encoded == str(len(payload)).encode() + b":" + payload + b","
    assert NetstringDecoder().feed(encoded) == [payload]
