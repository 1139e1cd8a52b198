"""Postfix SMTP access policy delegation: the codec, the decisions and the session over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.memory import MemoryDirectory
from mailroster.backends.model import Principal, PrincipalType
from mailroster.backends.outcome import Found, Outcome, TempFail
from mailroster.backends.settings import CacheConfig
from mailroster.daemon.config import LookupConfig, PolicyConfig
from mailroster.daemon.lookups import LookupService
from mailroster.daemon.policy import PolicyService
from mailroster.protocols.errors import BadRequest, FrameTooLong
from mailroster.protocols.policy import (
    MAX_ATTRIBUTES,
    MAX_LINE,
    TEMPFAIL_ACTION,
    PolicyDecoder,
    PolicySession,
    encode_action,
)

from inprocess import FailingDirectory, SlowDirectory
from sessionkit import (
    LineClient,
    loop_kind,  # noqa: F401 (a fixture: pytest finds it by name)
    run,
    serve,
)

# What Postfix 3.7 sends (PROTOCOLS.md §6), in its order: an authenticated submission client at RCPT.
POSTFIX_37: list[tuple[str, str]] = [
    ("request", "smtpd_access_policy"),
    ("protocol_state", "RCPT"),
    ("protocol_name", "ESMTP"),
    ("client_address", "192.0.2.10"),
    ("client_name", "laptop.client.example"),
    ("client_port", "53124"),
    ("reverse_client_name", "laptop.client.example"),
    ("server_address", "198.51.100.25"),
    ("server_port", "587"),
    ("helo_name", "[192.0.2.10]"),
    ("sender", "alice@example.org"),
    ("recipient", "bob@example.org"),
    ("recipient_count", "0"),
    ("queue_id", "4Ms2Kq0Rvqz9sVp"),
    ("instance", "1a2b.65f0c1d2.8e3f4.0"),
    ("size", "12345"),
    ("etrn_domain", ""),
    ("stress", ""),
    ("sasl_method", "PLAIN"),
    ("sasl_username", "alice"),
    ("sasl_sender", ""),
    ("ccert_subject", "laptop.client.example"),
    ("ccert_issuer", "C=US,+20O=Let's+20Encrypt,+20CN=R3"),  # xtext, with '=' inside the value
    ("ccert_fingerprint", "6B:E2:59:3C:20:0A:35:7D:B2:44:6F:4E:6D:11:C3:B9"),
    ("ccert_pubkey_fingerprint", "9F:12:0B:7C:55:3E:A1:04:DD:6A:2F:88:C0:E7:14:3A"),
    ("encryption_protocol", "TLSv1.3"),
    ("encryption_cipher", "TLS_AES_256_GCM_SHA384"),
    ("encryption_keysize", "256"),
    ("policy_context", "submission"),
]


def wire(attributes: list[tuple[str, str]] | dict[str, str], eol: bytes = b"\n") -> bytes:
    """A request as Postfix writes it: ``name=value`` lines and an empty line."""
    items = attributes.items() if isinstance(attributes, dict) else attributes
    return b"".join(f"{name}={value}".encode("utf-8", "surrogateescape") + eol for name, value in items) + eol


def request(state: str = "RCPT", *, login: str = "", sender: str = "", recipient: str = "") -> dict[str, str]:
    """A full Postfix 3.7 request; ``login`` empty means the client did not authenticate."""
    return dict(
        POSTFIX_37,
        protocol_state=state,
        sasl_method="PLAIN" if login else "",
        sasl_username=login,
        sender=sender,
        recipient=recipient,
    )


def feed_in_chunks(data: bytes, size: int) -> tuple[list[dict[str, str]], list[int]]:
    """Feed ``data`` to a fresh decoder in chunks of ``size`` bytes: the requests, and the chunk indexes that
    completed one."""
    decoder = PolicyDecoder()
    requests: list[dict[str, str]] = []
    completing: list[int] = []
    for index, start in enumerate(range(0, len(data), size)):
        got = decoder.feed(data[start : start + size])
        if got:
            completing.append(index)
        requests.extend(got)
    return requests, completing


# The codec.


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 4096, 1 << 20])
def test_decoder_full_postfix_request_at_every_split(size: int) -> None:
    data = wire(POSTFIX_37)
    requests, completing = feed_in_chunks(data, size)
    assert requests == [dict(POSTFIX_37)]
    assert list(requests[0]) == [name for name, _ in POSTFIX_37]
    last_chunk = (len(data) - 1) // size
    assert completing == [last_chunk]  # the request is complete with its empty line, not before


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 4096])
def test_decoder_pipelined_requests_in_order_at_every_split(size: int) -> None:
    first = request("MAIL", login="alice", sender="alice@example.org")
    second = request("RCPT", login="alice", sender="alice@example.org", recipient="bob@example.org")
    third = request("DATA", login="alice", sender="alice@example.org", recipient="bob@example.org")
    data = wire(first) + wire(second) + wire(third)
    assert feed_in_chunks(data, size)[0] == [first, second, third]


def test_decoder_pipelined_requests_in_one_chunk() -> None:
    requests = [request(state, sender=f"s{i}@example.net") for i, state in enumerate(["CONNECT", "MAIL", "RCPT"])]
    decoder = PolicyDecoder()
    assert decoder.feed(b"".join(wire(r) for r in requests)) == requests
    assert decoder.feed(b"request=smtpd_access_policy\n") == []  # a partial request waits for its empty line
    assert decoder.feed(b"\n") == [{"request": "smtpd_access_policy"}]


def test_decoder_tolerates_crlf() -> None:
    assert PolicyDecoder().feed(wire(POSTFIX_37, eol=b"\r\n")) == [dict(POSTFIX_37)]
    assert feed_in_chunks(wire(POSTFIX_37, eol=b"\r\n"), 1)[0] == [dict(POSTFIX_37)]


def test_decoder_value_with_equals_and_empty_value() -> None:
    data = b"request=smtpd_access_policy\nccert_subject=CN=mx,+20O=Example\nsender=\nstress=\nsize=0\n\n"
    assert PolicyDecoder().feed(data) == [
        {
            "request": "smtpd_access_policy",
            "ccert_subject": "CN=mx,+20O=Example",
            "sender": "",
            "stress": "",
            "size": "0",
        }
    ]


def test_decoder_keeps_a_non_utf8_byte_as_a_surrogate() -> None:
    data = b"request=smtpd_access_policy\nsender=caf\xe9@example.org\nrecipient=jos\xc3\xa9@ex\xc3\xa4mple.org\n\n"
    [decoded] = PolicyDecoder().feed(data)
    assert decoded["sender"] == "caf\udce9@example.org"
    assert decoded["sender"].encode("utf-8", "surrogateescape") == b"caf\xe9@example.org"
    assert decoded["recipient"] == "josé@exämple.org"  # valid UTF-8 is decoded as such


@pytest.mark.parametrize(
    "data",
    [
        b"request=smtpd_access_policy\nsender alice@example.org\n\n",
        b"request=smtpd_access_policy\n=alice@example.org\n\n",
        b"protocol_state=RCPT\nsender=alice@example.org\n\n",
        b"request=junk\nprotocol_state=RCPT\n\n",
        b"request=SMTPD_ACCESS_POLICY\n\n",
        b"\n",
    ],
    ids=["no-equals", "leading-equals", "no-request", "other-request", "request-case", "empty-request"],
)
def test_decoder_refuses_bad_requests(data: bytes) -> None:
    with pytest.raises(BadRequest):
        PolicyDecoder().feed(data)


def test_decoder_refuses_a_bad_line_before_the_request_ends() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"request=smtpd_access_policy\n") == []
    with pytest.raises(BadRequest):
        decoder.feed(b"garbage\n")  # refused at once, not at the empty line


def test_decoder_attribute_limit() -> None:
    exactly = [("request", "smtpd_access_policy")] + [(f"x{i}", str(i)) for i in range(MAX_ATTRIBUTES - 1)]
    assert PolicyDecoder().feed(wire(exactly)) == [dict(exactly)]
    decoder = PolicyDecoder()
    assert decoder.feed(b"".join(f"{n}={v}\n".encode() for n, v in exactly)) == []
    with pytest.raises(BadRequest):
        decoder.feed(b"one_too_many=1\n")  # refused as it arrives, before the empty line


def test_decoder_accepts_the_longest_value_postfix_sends() -> None:
    value = "x" * 8192
    [decoded] = PolicyDecoder().feed(wire({"request": "smtpd_access_policy", "ccert_pubkey_fingerprint": value}))
    assert decoded["ccert_pubkey_fingerprint"] == value


def test_decoder_refuses_an_over_long_line_with_its_newline() -> None:
    with pytest.raises(FrameTooLong):
        PolicyDecoder().feed(b"request=smtpd_access_policy\nsender=" + b"a" * MAX_LINE + b"\n\n")


def test_decoder_refuses_an_over_long_line_as_soon_as_max_line_bytes_arrive() -> None:
    decoder = PolicyDecoder()
    assert decoder.feed(b"request=smtpd_access_policy\n") == []
    assert decoder.feed(b"sender=" + b"a" * (MAX_LINE - 8)) == []  # MAX_LINE - 1 bytes: may still end in time
    with pytest.raises(FrameTooLong):
        decoder.feed(b"a")  # the MAX_LINE-th byte without a newline: no need to wait for more
    with pytest.raises(FrameTooLong):
        PolicyDecoder().feed(b"x" * MAX_LINE)  # in one chunk too


def test_decoder_line_of_exactly_max_line_bytes_with_its_newline_is_accepted() -> None:
    line = b"sender=" + b"a" * (MAX_LINE - 8) + b"\n"
    assert len(line) == MAX_LINE
    [decoded] = PolicyDecoder().feed(b"request=smtpd_access_policy\n" + line + b"\n")
    assert decoded["sender"] == "a" * (MAX_LINE - 8)


def test_encode_action_exact_bytes() -> None:
    assert encode_action("DUNNO") == b"action=DUNNO\n\n"
    assert encode_action("550 5.1.1 Recipient address <a@b> does not exist") == (
        b"action=550 5.1.1 Recipient address <a@b> does not exist\n\n"
    )
    assert encode_action(TEMPFAIL_ACTION) == b"action=DEFER Directory temporarily unavailable\n\n"


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("REJECT foo\r\naction=OK\n", b"action=REJECT foo action=OK\n\n"),
        ("WARN a\nb", b"action=WARN a b\n\n"),
        ("WARN a\rb", b"action=WARN a b\n\n"),
        ("DUNNO\n\n", b"action=DUNNO\n\n"),
        ("\r\nREJECT x", b"action=REJECT x\n\n"),
        ("WARN a\x0bb\x0cc\x1cd\u2028e\x85f", b"action=WARN a b c d e f\n\n"),
    ],
)
def test_encode_action_never_puts_a_line_break_on_the_wire(action: str, expected: bytes) -> None:
    encoded = encode_action(action)
    assert encoded == expected
    assert encoded.count(b"\n") == 2
    assert b"\r" not in encoded


def test_encode_action_gives_back_non_utf8_bytes_of_the_request() -> None:
    assert encode_action("WARN unknown recipient <caf\udce9@example.org>") == (
        b"action=WARN unknown recipient <caf\xe9@example.org>\n\n"
    )


# The decisions.


def directory() -> MemoryDirectory:
    return MemoryDirectory(
        [
            Principal("alice", emails=("alice@example.org", "al@example.org"), member_of=("sales",)),
            Principal("bob", emails=("bob@example.org",)),
            Principal("sales", type=PrincipalType.GROUP, emails=("sales@example.org",)),
            Principal("carol", emails=("carol@example.org", "@catchall.example")),
        ],
        ["example.org", "catchall.example"],
    )


def service(
    config: PolicyConfig | None = None, backend: Directory | None = None, *, cached: bool = False
) -> tuple[PolicyService, LookupService]:
    backend = backend if backend is not None else directory()
    if cached:
        backend = CachedDirectory(backend, CacheConfig())
    lookups = LookupService(backend, LookupConfig())
    return PolicyService(lookups, config or PolicyConfig()), lookups


def decide(attributes: dict[str, str], config: PolicyConfig | None = None, *, cached: bool = False) -> Outcome:
    policy, _ = service(config, cached=cached)
    return asyncio.run(policy.decide(attributes))


DUNNO = Found("DUNNO")
ONLY = {"sender_login_mismatch": "off", "unknown_recipient": "off", "unauthenticated_local_sender": "off"}


def only(**modes: str) -> PolicyConfig:
    """Every check off but those given."""
    return PolicyConfig(**{**ONLY, **modes})  # type: ignore[arg-type]


@pytest.fixture(params=[False, True], ids=["plain", "cached"])
def cached(request: pytest.FixtureRequest) -> bool:
    """Decisions are the same with the directory behind a cache."""
    return bool(request.param)


@pytest.mark.parametrize(
    ("login", "sender"),
    [
        ("alice", "alice@example.org"),
        ("alice", "alice+tag@example.org"),
        ("alice", "al@example.org"),
        ("alice", "Alice@Example.ORG"),
        ("ALICE", "alice@example.org"),
        ("Alice", "al+lists@example.org"),
        ("bob", "bob@example.org"),
    ],
)
@pytest.mark.parametrize("state", ["MAIL", "RCPT"])
def test_sender_owned_by_the_login_is_dunno(login: str, sender: str, state: str, cached: bool) -> None:
    recipient = "bob@example.org" if state == "RCPT" else ""
    assert decide(request(state, login=login, sender=sender, recipient=recipient), cached=cached) == DUNNO


def test_group_address_may_be_sent_as_by_its_members_only(cached: bool) -> None:
    policy, lookups = service(cached=cached)
    # The sender map gives a group's address to the group's members (member-of).
    assert asyncio.run(lookups.lookup("sender", "sales@example.org")) == Found("alice")
    assert asyncio.run(policy.decide(request("MAIL", login="alice", sender="sales@example.org"))) == DUNNO
    assert asyncio.run(policy.decide(request("MAIL", login="bob", sender="sales@example.org"))) == Found(
        "553 5.7.1 Sender address <sales@example.org> is not owned by user bob"
    )


@pytest.mark.parametrize(
    ("login", "sender"),
    [
        ("alice", "bob@example.org"),
        ("alice", "alice@external.example"),
        ("alice", "bob+alice@example.org"),
        ("alice", "anything@catchall.example"),
        ("bob", "al@example.org"),
        ("ALICE", "bob@example.org"),
        ("alice", "caf\udce9@example.org"),
    ],
)
@pytest.mark.parametrize("state", ["MAIL", "RCPT"])
def test_sender_not_owned_by_the_login_is_rejected(login: str, sender: str, state: str, cached: bool) -> None:
    recipient = "bob@example.org" if state == "RCPT" else ""
    outcome = decide(request(state, login=login, sender=sender, recipient=recipient), cached=cached)
    assert outcome == Found(f"553 5.7.1 Sender address <{sender}> is not owned by user {login}")


@pytest.mark.parametrize("login", ["alice", ""])
@pytest.mark.parametrize("state", ["MAIL", "RCPT", "DATA"])
def test_empty_sender_is_dunno(login: str, state: str, cached: bool) -> None:
    recipient = "bob@example.org" if state != "MAIL" else ""
    assert decide(request(state, login=login, sender="", recipient=recipient), cached=cached) == DUNNO


@pytest.mark.parametrize(
    "sender", ["bob@example.org", "nobody@example.org", "Alice@EXAMPLE.org", "x@catchall.example", "y@example.org."]
)
def test_unauthenticated_local_sender_warns_by_default(sender: str, cached: bool) -> None:
    assert decide(request("MAIL", sender=sender), cached=cached) == Found(
        f"WARN unauthenticated sender <{sender}> of a local domain"
    )


@pytest.mark.parametrize(
    "sender", ["someone@external.example", "bob@example.org.external.example", "x@sub.example.org"]
)
@pytest.mark.parametrize("state", ["MAIL", "RCPT"])
def test_unauthenticated_external_sender_is_dunno(sender: str, state: str, cached: bool) -> None:
    recipient = "bob@example.org" if state == "RCPT" else ""
    assert decide(request(state, sender=sender, recipient=recipient), cached=cached) == DUNNO


def test_unauthenticated_sender_without_a_domain_is_not_local() -> None:
    assert decide(request("MAIL", sender="example.org")) == DUNNO


@pytest.mark.parametrize("recipient", ["nobody@example.org", "alice.smith@example.org", "NOBODY@Example.Org"])
@pytest.mark.parametrize("sender", ["", "someone@external.example"])
def test_unknown_local_recipient_is_rejected_at_rcpt(recipient: str, sender: str, cached: bool) -> None:
    outcome = decide(request("RCPT", sender=sender, recipient=recipient), cached=cached)
    assert outcome == Found(f"550 5.1.1 Recipient address <{recipient}> does not exist")


@pytest.mark.parametrize(
    "recipient",
    [
        "bob@example.org",
        "Bob@EXAMPLE.org",
        "alice+tag@example.org",
        "bob+x@example.org.",
        "al@example.org",
        "sales@example.org",
        "carol@example.org",
        "anything@catchall.example",
        "x+y@catchall.example",
        "someone@external.example",
    ],
)
def test_known_catch_all_and_external_recipients_are_dunno(recipient: str, cached: bool) -> None:
    attributes = request("RCPT", sender="someone@external.example", recipient=recipient)
    assert decide(attributes, cached=cached) == DUNNO


@pytest.mark.parametrize("state", ["CONNECT", "EHLO", "HELO", "MAIL", "DATA", "END-OF-MESSAGE", "VRFY", "ETRN"])
def test_recipient_check_only_at_rcpt(state: str) -> None:
    assert decide(request(state, sender="someone@external.example", recipient="nobody@example.org")) == DUNNO
    assert decide(request("RCPT", sender="someone@external.example", recipient="nobody@example.org")) == Found(
        "550 5.1.1 Recipient address <nobody@example.org> does not exist"
    )


MISMATCH = request("MAIL", login="alice", sender="bob@example.org")
UNKNOWN = request("RCPT", sender="someone@external.example", recipient="nobody@example.org")
UNAUTHENTICATED = request("MAIL", sender="bob@example.org")


@pytest.mark.parametrize(
    ("check", "attributes", "reject", "defer", "warn"),
    [
        (
            "sender_login_mismatch",
            MISMATCH,
            "553 5.7.1 Sender address <bob@example.org> is not owned by user alice",
            "450 4.7.1 Sender address <bob@example.org> is not owned by user alice",
            "WARN sender <bob@example.org> not owned by user alice",
        ),
        (
            "unknown_recipient",
            UNKNOWN,
            "550 5.1.1 Recipient address <nobody@example.org> does not exist",
            "450 4.1.1 Recipient address <nobody@example.org> does not exist",
            "WARN unknown recipient <nobody@example.org>",
        ),
        (
            "unauthenticated_local_sender",
            UNAUTHENTICATED,
            "553 5.7.1 Sender address <bob@example.org> of a local domain requires authentication",
            "450 4.7.1 Sender address <bob@example.org> of a local domain requires authentication",
            "WARN unauthenticated sender <bob@example.org> of a local domain",
        ),
    ],
)
def test_each_check_in_each_mode(check: str, attributes: dict[str, str], reject: str, defer: str, warn: str) -> None:
    expected = {"reject": Found(reject), "defer": Found(defer), "warn": Found(warn), "off": DUNNO}
    for mode, action in expected.items():
        assert decide(attributes, only(**{check: mode})) == action, mode
        assert decide(attributes, PolicyConfig(**{check: mode})) == action, mode  # type: ignore[arg-type]


def test_default_modes() -> None:
    config = PolicyConfig()
    assert (config.sender_login_mismatch, config.unknown_recipient, config.unauthenticated_local_sender) == (
        "reject",
        "reject",
        "warn",
    )
    assert config.tempfail == "defer"


UNAUTHENTICATED_TO_UNKNOWN = request("RCPT", sender="bob@example.org", recipient="nobody@example.org")
MISMATCH_TO_UNKNOWN = request("RCPT", login="alice", sender="bob@example.org", recipient="nobody@example.org")
SENDER_REJECT = "553 5.7.1 Sender address <bob@example.org> of a local domain requires authentication"
SENDER_DEFER = "450 4.7.1 Sender address <bob@example.org> of a local domain requires authentication"
MISMATCH_REJECT = "553 5.7.1 Sender address <bob@example.org> is not owned by user alice"
MISMATCH_DEFER = "450 4.7.1 Sender address <bob@example.org> is not owned by user alice"
RECIPIENT_REJECT = "550 5.1.1 Recipient address <nobody@example.org> does not exist"
RECIPIENT_DEFER = "450 4.1.1 Recipient address <nobody@example.org> does not exist"


TWO_CHECKS = {"unauthenticated_local_sender": UNAUTHENTICATED_TO_UNKNOWN, "sender_login_mismatch": MISMATCH_TO_UNKNOWN}


@pytest.mark.parametrize(
    ("sender_check", "sender_mode", "recipient_mode", "action"),
    [
        ("unauthenticated_local_sender", "warn", "reject", RECIPIENT_REJECT),  # the defaults
        ("unauthenticated_local_sender", "reject", "defer", SENDER_REJECT),
        ("unauthenticated_local_sender", "defer", "reject", RECIPIENT_REJECT),
        ("unauthenticated_local_sender", "defer", "warn", SENDER_DEFER),
        ("unauthenticated_local_sender", "warn", "defer", RECIPIENT_DEFER),
        ("sender_login_mismatch", "defer", "reject", RECIPIENT_REJECT),
        ("sender_login_mismatch", "reject", "defer", MISMATCH_REJECT),
        ("sender_login_mismatch", "defer", "warn", MISMATCH_DEFER),
        ("sender_login_mismatch", "warn", "defer", RECIPIENT_DEFER),
        ("sender_login_mismatch", "off", "warn", "WARN unknown recipient <nobody@example.org>"),
    ],
)
def test_the_strongest_verdict_wins(sender_check: str, sender_mode: str, recipient_mode: str, action: str) -> None:
    config = PolicyConfig(**{sender_check: sender_mode, "unknown_recipient": recipient_mode})  # type: ignore[arg-type]
    assert decide(TWO_CHECKS[sender_check], config) == Found(action)


FAULTS = {
    "sender_login_mismatch": request("MAIL", login="alice", sender="alice@example.org"),
    "unauthenticated_local_sender": request("MAIL", sender="someone@external.example"),
    "unknown_recipient": request("RCPT", recipient="bob@example.org"),
}


@pytest.mark.parametrize("check", sorted(FAULTS))
@pytest.mark.parametrize("mode", ["reject", "defer", "warn"])
def test_a_directory_fault_is_a_tempfail_never_a_verdict(check: str, mode: str, cached: bool) -> None:
    down = FailingDirectory(directory())
    policy, _ = service(only(**{check: mode}), down, cached=cached)
    outcome = asyncio.run(policy.decide(FAULTS[check]))
    assert outcome == TempFail("backend unavailable")
    down.down = False
    assert asyncio.run(policy.decide(FAULTS[check])) == DUNNO  # the same request, once the directory answers
    down.down = True
    off, _ = service(only(), down, cached=cached)
    assert asyncio.run(off.decide(FAULTS[check])) == DUNNO  # with the check off, nothing is looked up


def test_a_fault_outranks_a_known_rejection() -> None:
    """The sender map's answer is cached (a rejection); the recipient lookup then fails: a temporary failure."""
    backend = FailingDirectory(directory())
    backend.down = False
    policy, _ = service(PolicyConfig(), backend, cached=True)
    assert asyncio.run(policy.decide(MISMATCH)) == Found(MISMATCH_REJECT)
    backend.down = True
    assert asyncio.run(policy.decide(MISMATCH)) == Found(MISMATCH_REJECT)  # from the cache alone
    assert asyncio.run(policy.decide(MISMATCH_TO_UNKNOWN)) == TempFail("backend unavailable")


def test_a_line_break_in_a_request_never_reaches_the_reply() -> None:
    data = b"request=smtpd_access_policy\nprotocol_state=MAIL\nsasl_username=alice\nsender=x\r421 y@example.org\n\n"
    [decoded] = PolicyDecoder().feed(data)
    assert decoded["sender"] == "x\r421 y@example.org"
    reply = encode_action(decide(decoded).value)  # type: ignore[union-attr]
    assert reply == b"action=553 5.7.1 Sender address <x 421 y@example.org> is not owned by user alice\n\n"


# The session, over real Unix sockets, under the stdlib loop and uvloop.


async def reply(client: LineClient, timeout: float = 5) -> bytes:
    """One reply: ``action=...`` and its empty line."""
    return await asyncio.wait_for(client.reader.readuntil(b"\n\n"), timeout)


async def eof(client: LineClient, timeout: float = 2) -> bytes:
    """What the server sent before closing cleanly (without a reset)."""
    return await asyncio.wait_for(client.reader.read(), timeout)


def session_factory(
    backend: Directory, config: PolicyConfig | None = None, *, tempfail_close: bool = False
) -> Callable[[], PolicySession]:
    policy, _ = service(config, backend)
    return lambda: PolicySession(policy, tempfail_close=tempfail_close)


@pytest.mark.usefixtures("loop_kind")
def test_session_answers_a_request() -> None:
    async def main() -> None:
        async with serve(session_factory(directory())) as path:
            client = await LineClient.connect(path)
            client.writer.write(wire(POSTFIX_37))
            assert await reply(client) == b"action=DUNNO\n\n"
            client.writer.write(wire(request("RCPT", login="alice", sender="bob@example.org", recipient="x@y.example")))
            assert await reply(client) == (
                b"action=553 5.7.1 Sender address <bob@example.org> is not owned by user alice\n\n"
            )
            client.writer.write(wire(POSTFIX_37, eol=b"\r\n"))  # CRLF, and split in small writes
            await client.send(*(f"{n}={v}" for n, v in UNKNOWN.items()), "", size=5)
            assert await reply(client) == b"action=DUNNO\n\n"
            assert await reply(client) == (
                b"action=550 5.1.1 Recipient address <nobody@example.org> does not exist\n\n"
            )
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("slow", [False, True], ids=["eager", "slow-recipient"])
def test_session_pipelined_requests_get_replies_in_order(slow: bool) -> None:
    async def main() -> None:
        backend: Directory = SlowDirectory(directory(), 0.05) if slow else directory()
        async with serve(session_factory(backend)) as path:
            client = await LineClient.connect(path)
            # The first and the last wait for the recipient lookup (when slow); the middle one needs none.
            client.writer.write(
                wire(request("RCPT", login="alice", sender="al@example.org", recipient="bob@example.org"))
                + wire(request("MAIL", login="alice", sender="bob@example.org"))
                + wire(request("RCPT", sender="someone@external.example", recipient="nobody@example.org"))
            )
            replies = [await reply(client) for _ in range(3)]
            assert replies == [
                b"action=DUNNO\n\n",
                b"action=553 5.7.1 Sender address <bob@example.org> is not owned by user alice\n\n",
                b"action=550 5.1.1 Recipient address <nobody@example.org> does not exist\n\n",
            ]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_session_backend_fault_gets_defer_and_the_connection_stays() -> None:
    async def main() -> None:
        backend = FailingDirectory(directory())
        async with serve(session_factory(backend)) as path:
            client = await LineClient.connect(path)
            client.writer.write(wire(FAULTS["unknown_recipient"]))
            assert await reply(client) == b"action=DEFER Directory temporarily unavailable\n\n"
            backend.down = False
            client.writer.write(wire(FAULTS["unknown_recipient"]))
            assert await reply(client) == b"action=DUNNO\n\n"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_session_backend_fault_with_tempfail_close_closes_without_reply() -> None:
    async def main() -> None:
        backend = FailingDirectory(directory())
        async with serve(session_factory(backend, tempfail_close=True)) as path:
            client = await LineClient.connect(path)
            client.writer.write(wire(FAULTS["sender_login_mismatch"]))
            assert await eof(client) == b""
            client.close()

            # A request that needs no lookup is still answered before the fault that follows it closes.
            client = await LineClient.connect(path)
            client.writer.write(wire(request("CONNECT")) + wire(FAULTS["sender_login_mismatch"]))
            assert await eof(client) == b"action=DUNNO\n\n"
            client.close()

            backend.down = False
            client = await LineClient.connect(path)  # the next connection works
            client.writer.write(wire(FAULTS["sender_login_mismatch"]))
            assert await reply(client) == b"action=DUNNO\n\n"
            client.close()

    run(main())


BAD_REQUESTS = {
    "no-equals": b"request=smtpd_access_policy\nsender alice@example.org\n\n",
    "leading-equals": b"request=smtpd_access_policy\n=x\n\n",
    "no-request": b"protocol_state=RCPT\nsender=alice@example.org\n\n",
    "other-request": b"request=junk\nprotocol_state=RCPT\n\n",
    "too-many-attributes": wire([("request", "smtpd_access_policy")] + [(f"x{i}", "1") for i in range(MAX_ATTRIBUTES)]),
    "over-long-line": b"request=smtpd_access_policy\nsender=" + b"a" * MAX_LINE + b"\n\n",
}


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("bad", sorted(BAD_REQUESTS))
def test_session_bad_request_closes_only_that_connection_without_reply(bad: str) -> None:
    async def main() -> None:
        async with serve(session_factory(directory())) as path:
            good = await LineClient.connect(path)
            good.writer.write(wire(POSTFIX_37))
            assert await reply(good) == b"action=DUNNO\n\n"
            malformed = await LineClient.connect(path)
            malformed.writer.write(BAD_REQUESTS[bad])
            assert await eof(malformed) == b""
            malformed.close()
            good.writer.write(wire(UNKNOWN))
            assert await reply(good) == b"action=550 5.1.1 Recipient address <nobody@example.org> does not exist\n\n"
            good.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("size", [MAX_LINE, 1 << 20], ids=["max-line", "1MB"])
def test_session_over_long_line_without_newline_closes_promptly(size: int) -> None:
    async def main() -> None:
        async with serve(session_factory(directory())) as path:
            client = await LineClient.connect(path)
            client.writer.write(b"request=smtpd_access_policy\nsender=" + b"a" * size)  # no newline, and no EOF
            received = b""
            with contextlib.suppress(ConnectionError):  # unread bytes make the close a reset
                received = await eof(client, timeout=2)  # TimeoutError if the server waits for more bytes
            assert received == b""
            assert client.reader.at_eof() or client.reader.exception() is not None
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("slow", [False, True], ids=["eager", "slow-recipient"])
def test_session_half_close_still_gets_the_answer(slow: bool) -> None:
    async def main() -> None:
        backend: Directory = SlowDirectory(directory(), 0.05) if slow else directory()
        async with serve(session_factory(backend)) as path:
            client = await LineClient.connect(path)
            client.writer.write(wire(UNKNOWN) + wire(POSTFIX_37))
            client.writer.write_eof()
            assert await eof(client) == (
                b"action=550 5.1.1 Recipient address <nobody@example.org> does not exist\n\n" + b"action=DUNNO\n\n"
            )
            client.close()

    run(main())
