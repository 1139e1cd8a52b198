"""tcp_table codec: %XX quoting as Postfix's hex_quote does it, requests, replies, line limits."""

from __future__ import annotations

import pytest

from mailroster.backends.outcome import NOT_FOUND, Found, PermFail, TempFail
from mailroster.protocols import errors
from mailroster.protocols.tcptable import (
    MAX_REPLY,
    LineDecoder,
    encode_reply,
    parse_request,
    quote,
    unquote,
)

READ_SIZES = (4096, 128, 16, 1)

QUOTING = [
    ("alice@example.com", "alice@example.com"),
    ("a b", "a%20b"),
    ("100%", "100%25"),
    ("tab\there", "tab%09here"),
    ("line\nfeed", "line%0Afeed"),
    ("jürgen", "j%C3%BCrgen"),
    ("del\x7f", "del%7F"),
]


@pytest.mark.parametrize(("text", "quoted"), QUOTING)
def test_quote(text: str, quoted: str) -> None:
    assert quote(text) == quoted
    assert unquote(quoted.encode()) == text


def test_unquote_accepts_lower_case_hex() -> None:
    assert unquote(b"a%2fb%c3%bc") == "a/bü"


@pytest.mark.parametrize("bad", [b"50%", b"%G0", b"%2", b"%%41", b"%C3"])
def test_unquote_rejects_bad_escapes(bad: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        unquote(bad)


@pytest.mark.parametrize(
    ("line", "key"),
    [(b"get alice@example.com", "alice@example.com"), (b"get a%20b", "a b"), (b"get j%C3%BCrgen@x", "jürgen@x")],
)
def test_parse_request(line: bytes, key: str) -> None:
    assert parse_request(line) == key


@pytest.mark.parametrize("line", [b"put a b", b"GET a", b"get", b"get ", b"", b"\x00\x01"])
def test_parse_request_rejects(line: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        parse_request(line)


@pytest.mark.parametrize(
    ("outcome", "reply"),
    [
        (Found("example.org/alice/"), b"200 example.org/alice/\n"),
        (Found("a b,c"), b"200 a%20b,c\n"),
        (NOT_FOUND, b"500 not%20found\n"),
        (TempFail("backend down"), b"400 backend%20down\n"),
        # 500 would mean "not found" to Postfix and bounce mail: a misconfigured directory defers instead.
        (PermFail("misconfigured"), b"400 misconfigured\n"),
    ],
)
def test_encode_reply(outcome, reply) -> None:  # type: ignore[no-untyped-def]
    assert encode_reply(outcome) == reply


def test_reply_limit_is_a_temporary_failure_not_a_truncation() -> None:
    reply = encode_reply(Found("x" * MAX_REPLY))
    assert reply.startswith(b"400 ")
    assert len(encode_reply(Found("x" * (MAX_REPLY - 5)))) == MAX_REPLY


@pytest.mark.parametrize("size", READ_SIZES)
def test_line_decoder_in_chunks(size: int) -> None:
    stream = b"get a\nget b\r\nget c\n"
    decoder = LineDecoder(100)
    lines: list[bytes] = []
    for i in range(0, len(stream), size):
        lines.extend(decoder.feed(stream[i : i + size]))
    assert lines == [b"get a", b"get b", b"get c"]


@pytest.mark.parametrize("size", READ_SIZES)
def test_line_decoder_refuses_long_lines_without_waiting_for_lf(size: int) -> None:
    decoder = LineDecoder(100)
    data = b"get " + b"x" * 200
    with pytest.raises(errors.FrameTooLong):
        for i in range(0, len(data), size):
            decoder.feed(data[i : i + size])
