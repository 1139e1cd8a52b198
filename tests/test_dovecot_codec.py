"""Dovecot tab-escaping and the sans-IO line decoder, fed whole and at read sizes down to one byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mailroster.protocols import errors
from mailroster.protocols.dovecot import (
    LineDecoder,
    is_text,
    join_line,
    parse_uint,
    split_line,
    tab_escape,
    tab_unescape,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "dovecot" / "codec.json").read_text())
READ_SIZES = (4096, 128, 16, 1)
LIMIT = GOLDEN["lines_limit"]


def enc(text: str) -> bytes:
    return text.encode("utf-8")


def feed_in_chunks(data: bytes, size: int, limit: int = LIMIT) -> tuple[list[bytes], LineDecoder]:
    decoder = LineDecoder(limit)
    lines: list[bytes] = []
    for i in range(0, len(data), size):
        lines.extend(decoder.feed(data[i : i + size]))
    return lines, decoder


# Escaping.


@pytest.mark.parametrize(("raw", "escaped"), GOLDEN["escape"])
def test_escape_and_back(raw: str, escaped: str) -> None:
    assert tab_escape(raw) == escaped
    assert tab_unescape(escaped) == raw


@pytest.mark.parametrize(("escaped", "raw"), GOLDEN["unescape"])
def test_unescape_lenient_cases(escaped: str, raw: str) -> None:
    """Any other character after \\x01 is itself; a trailing \\x01 is dropped (the doc's \\x01l is not LF)."""
    assert tab_unescape(escaped) == raw


@pytest.mark.parametrize(("line", "fields"), GOLDEN["split"])
def test_split_on_tab_first_then_unescape(line: str, fields: list[str]) -> None:
    assert split_line(enc(line)) == fields


@pytest.mark.parametrize("fields", [["OK", "1", "user=a\tb"], ["O", "x\ny\r\x00\x01"], ["DONE", "7", ""], [""]])
def test_join_round_trips_through_split(fields: list[str]) -> None:
    line = join_line(fields)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert split_line(line[:-1]) == fields


def test_join_keeps_a_trailing_empty_field() -> None:
    assert join_line(["DONE", "3", ""]) == b"DONE\t3\t\n"


def test_undecodable_bytes_survive_and_are_flagged() -> None:
    fields = split_line(b"USER\t1\tj\xfcrgen")
    assert not is_text(fields[2])
    assert is_text(fields[0])
    assert join_line(fields) == b"USER\t1\tj\xfcrgen\n"


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("42", 42), ("4294967295", 2**32 - 1)])
def test_parse_uint(text: str, value: int) -> None:
    assert parse_uint(text) == value


@pytest.mark.parametrize("text", ["", "-1", "+1", " 1", "1 ", "4294967296", "12345678901", "0x10", "\u0661"])
def test_parse_uint_refuses(text: str) -> None:
    with pytest.raises(errors.BadRequest):
        parse_uint(text)


def test_parse_uint_positive() -> None:
    with pytest.raises(errors.BadRequest):
        parse_uint("0", positive=True)
    assert parse_uint("1", positive=True) == 1


# Line decoding.


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(("stream", "lines"), GOLDEN["lines"])
def test_lines(stream: str, lines: list[str], size: int) -> None:
    got, decoder = feed_in_chunks(enc(stream), size)
    assert got == [enc(line) for line in lines]
    assert decoder.buffered == 0


@pytest.mark.parametrize("size", READ_SIZES)
def test_whole_table_as_one_stream(size: int) -> None:
    stream = b"".join(enc(s) for s, _ in GOLDEN["lines"])
    expected = [enc(line) for _, lines in GOLDEN["lines"] for line in lines]
    assert feed_in_chunks(stream, size)[0] == expected


@pytest.mark.parametrize(("stream", "lines"), GOLDEN["partial"])
def test_partial_lines_are_held(stream: str, lines: list[str]) -> None:
    decoder = LineDecoder(LIMIT)
    assert decoder.feed(enc(stream)) == [enc(line) for line in lines]
    assert decoder.buffered == len(enc(stream).rpartition(b"\n")[2])


@pytest.mark.parametrize("size", READ_SIZES)
@pytest.mark.parametrize(("stream", "error"), GOLDEN["errors"])
def test_errors(stream: str, error: str, size: int) -> None:
    with pytest.raises(getattr(errors, error)):
        feed_in_chunks(enc(stream), size)


def test_limit_counts_the_lf() -> None:
    """A limit of N takes lines of N-1 bytes plus LF, as Dovecot's N-byte input buffer does."""
    decoder = LineDecoder(8)
    assert decoder.feed(b"1234567\n") == [b"1234567"]
    with pytest.raises(errors.FrameTooLong):
        decoder.feed(b"12345678\n")


def test_overlong_line_fails_before_its_lf_arrives() -> None:
    decoder = LineDecoder(16384)
    decoder.feed(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=")
    with pytest.raises(errors.FrameTooLong):
        decoder.feed(b"A" * 16384)


def test_a_megabyte_without_lf_fails_on_the_first_chunk_over_the_limit() -> None:
    decoder = LineDecoder(1024)
    fed = 0
    with pytest.raises(errors.FrameTooLong):
        while fed < 1 << 20:
            decoder.feed(b"x" * 512)
            fed += 512
    assert fed == 1024 - 512  # the second chunk reached the limit
