"""The Dovecot auth-master (auth-userdb) protocol: sans-IO parsing and encoding, then sessions over real Unix
sockets in-process, under the stdlib loop and uvloop, with a fake UserService."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Self

import pytest

from mailroster.backends.errors import DirectoryError, PermanentFailure, TemporaryFailure
from mailroster.backends.outcome import NOT_FOUND, TempFail, UserFields, UserOutcome
from mailroster.protocols import dovecot_master
from mailroster.protocols.dovecot_master import (
    DovecotMasterSession,
    ListRequest,
    PassRequest,
    UserRequest,
    encode_list_done,
    encode_lookup,
    parse_request,
    wildcard_match,
)
from mailroster.protocols.errors import BadRequest

from conftest import require_tool
from sessionkit import (
    Kept,
    LineClient,
    Observer,
    command,
    loop_kind,  # noqa: F401 (a fixture: pytest finds it by name)
    run,
    serve,
    transcript,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "dovecot" / "master.json").read_text())
WRITE_SIZES = (4096, 128, 16, 1)

ALICE = UserFields(
    "alice@example.com",
    (
        ("uid", "5000"),
        ("gid", "5000"),
        ("home", "/var/vmail/example.com/alice"),
        ("mail", "maildir:~/Maildir"),
        ("quota_rule", "*:storage=2G"),
    ),
)
USERS = {
    "alice@example.com": ALICE,
    "bob@example.com": UserFields("bob@example.com", (("uid", "5001"),)),
    "nofields@example.com": UserFields("nofields@example.com"),
    "odd\tname@example.com": UserFields("odd\tname@example.com", (("uid", "5002"),)),
}
LISTED = ["alice@example.com", "bob@example.com", "carol@example.org", "Dave@Example.com", "odd\tname@example.com"]


class FakeUsers:
    """``slow*`` logins wait for ``release``; ``down@...`` is a backend fault; ``list_fail`` breaks LIST midway."""

    def cached_userdb(self, login: str) -> UserOutcome | None:
        return None  # no cache: every lookup takes the full path

    def __init__(self, listed: list[str] | None = None) -> None:
        self.listed = LISTED if listed is None else listed
        self.release = asyncio.Event()
        self.list_fail: type[DirectoryError] | None = None
        self.calls: list[tuple[str, str, str]] = []

    async def _find(self, login: str) -> UserOutcome:
        if login.startswith("slow"):
            await self.release.wait()
            login = login.removeprefix("slow")
        if login == "down@example.com":
            return TempFail("directory unavailable")
        if login == "big@example.com":
            return UserFields(login, (("note", "x" * 9000),))
        return USERS.get(login.lower(), NOT_FOUND)

    async def userdb(self, login: str, *, service: str = "") -> UserOutcome:
        self.calls.append(("userdb", login, service))
        return await self._find(login)

    async def passdb(self, login: str, *, with_password: bool, service: str = "") -> UserOutcome:
        self.calls.append(("passdb", login, service))
        outcome = await self._find(login)
        if isinstance(outcome, UserFields) and outcome.user == "alice@example.com":
            extra = (("password", "{PLAIN}secret"),) if with_password else ()
            return UserFields(outcome.user, (*extra, ("allow_nets", "192.0.2.0/24")))
        return outcome

    async def users(self) -> AsyncIterator[str]:
        for index, login in enumerate(self.listed):
            if self.list_fail and index == 2:
                raise self.list_fail("LDAP server down")
            if index % 100 == 0:
                await asyncio.sleep(0)
            yield login


# Running sessions.


class Client(LineClient):
    """Reads and checks the server's greeting on connecting, unless told not to."""

    @classmethod
    async def connect(cls, path: str, *, greeting: bool = True) -> Self:
        client = await super().connect(path)
        if greeting:
            assert await client.lines(2) == ["VERSION\t1\t1", f"SPID\t{os.getpid()}"]
        return client


# Sans-IO.


@pytest.mark.parametrize(
    ("line", "request_"),
    [
        (b"USER\t1\talice@example.com\tservice=lmtp\tlip=127.0.0.1", UserRequest(1, "alice@example.com", "lmtp")),
        (b"USER\t2\ta\x01tb\tservice=", UserRequest(2, "a\tb", "")),
        (b"PASS\t3\tbob\tdebug\tservice=doveadm", PassRequest(3, "bob", "doveadm")),
        (b"LIST\t4", ListRequest(4)),
        (b"LIST\t5\tuser=*@example.com\tservice=doveadm", ListRequest(5, "*@example.com")),
    ],
)
def test_parse_request(line: bytes, request_: object) -> None:
    assert parse_request(line) == request_


@pytest.mark.parametrize("case", GOLDEN["closes"], ids=lambda c: c["name"])
def test_parse_refuses_what_dovecot_disconnects_on(case: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        for line in case["send"]:
            parse_request(line.encode())


@pytest.mark.parametrize(
    ("mask", "name", "matches"),
    [
        ("*", "", True),
        ("*", "alice@example.com", True),
        ("?", "", False),
        ("*@example.com", "alice@example.com", True),
        ("*@example.com", "alice@example.org", False),
        ("*@EXAMPLE.com", "Alice@example.COM", True),
        ("a?ice@*", "alice@x", True),
        ("a?ice@*", "aice@x", False),
        ("a*e*e", "alice@example", True),
        ("*b", "abab", True),
        ("[ab]*", "a", False),
        ("a.c", "abc", False),
        ("a+", "aa", False),
        ("j\u00fcrgen@*", "J\u00dcRGEN@x", True),
    ],
)
def test_wildcard_match(mask: str, name: str, matches: bool) -> None:
    assert wildcard_match(mask, name) is matches


def test_encode_lookup() -> None:
    user, pass_ = UserRequest(1, "x", "lmtp"), PassRequest(2, "x", "doveadm")
    record = UserFields("a\tb", (("home", "/h\tx"), ("nologin", ""), ("password", "{PLAIN}x")))
    assert encode_lookup(user, record) == b"USER\t1\ta\x01tb\thome=/h\x01tx\tnologin=\tpassword={PLAIN}x\n"
    # PASS never carries credentials, whatever the directory put in.
    assert encode_lookup(pass_, record) == b"PASS\t2\tuser=a\x01tb\thome=/h\x01tx\tnologin=\n"
    assert encode_lookup(user, UserFields("u")) == b"USER\t1\tu\t\n"
    assert encode_lookup(pass_, UserFields("u")) == b"PASS\t2\tuser=u\n"
    assert encode_lookup(user, NOT_FOUND) == b"NOTFOUND\t1\n"
    assert encode_lookup(pass_, TempFail("down\tnow")) == b"FAIL\t2\treason=down\x01tnow\n"
    assert encode_list_done(3, failed=False) == b"DONE\t3\t\n"
    assert encode_list_done(3, failed=True) == b"DONE\t3\tfail\n"


def test_oversized_reply_becomes_fail(caplog: pytest.LogCaptureFixture) -> None:
    request = UserRequest(9, "big", "lmtp")
    fits = UserFields("big", (("k", "v" * (dovecot_master.MAX_REPLY - len("USER\t9\tbig\tk=\n"))),))
    assert len(encode_lookup(request, fits)) == dovecot_master.MAX_REPLY
    too_big = UserFields("big", (("k", "v" * (dovecot_master.MAX_REPLY - len("USER\t9\tbig\tk=\n") + 1)),))
    with caplog.at_level(logging.ERROR):
        assert encode_lookup(request, too_big) == b"FAIL\t9\treason=reply too long\n"
    assert "exceeds lib-auth's limit" in caplog.text


# Sessions.


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("size", WRITE_SIZES)
@pytest.mark.parametrize("case", GOLDEN["transcripts"], ids=lambda c: c["name"])
def test_transcript(case: dict[str, Any], size: int) -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            client = await Client.connect(path)
            for index, step in enumerate(case["steps"]):
                # lib-auth pipelines its VERSION with the first command.
                await client.send(*(["VERSION\t1\t0"] if index == 0 else []), *step["send"], size=size)
                assert await client.lines(len(step["expect"])) == step["expect"]
            client.writer.write_eof()
            assert await client.rest() == b""
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("case", GOLDEN["closes"], ids=lambda c: c["name"])
def test_protocol_errors_close(case: dict[str, Any]) -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", *case["send"])
            assert await client.rest() == "".join(line + "\n" for line in case["expect"]).encode()
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("lines", GOLDEN["handshake_errors"], ids=repr)
def test_handshake_errors_close(lines: list[str]) -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            client = await Client.connect(path)
            await client.send(*lines)
            assert await client.rest() == b""
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_greeting_comes_before_the_client_speaks() -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            client = await Client.connect(path, greeting=False)
            data = await asyncio.wait_for(client.reader.readuntil(b"SPID\t%d\n" % os.getpid()), 2)
            assert data == b"VERSION\t1\t1\nSPID\t%d\n" % os.getpid()
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_lookups_get_the_service_name_and_never_ask_for_a_password() -> None:
    async def main() -> None:
        service = FakeUsers()
        async with serve(lambda: DovecotMasterSession(service)) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "USER\t1\tbob@example.com\tservice=lmtp", "PASS\t2\tbob\tservice=pop3")
            await client.lines(2)
            assert service.calls == [("userdb", "bob@example.com", "lmtp"), ("passdb", "bob", "pop3")]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_undecodable_user_is_not_found_without_asking() -> None:
    async def main() -> None:
        service = FakeUsers()
        async with serve(lambda: DovecotMasterSession(service)) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", b"USER\t1\tj\xfcrgen@example.com\tservice=lmtp")
            assert await client.line() == "NOTFOUND\t1"
            assert service.calls == []
            client.close()

    run(main())


class CachingUsers(FakeUsers):
    """FakeUsers with a userdb cache that knows alice, "big" (a reply too long) and nobody@ (not found)."""

    def cached_userdb(self, login: str) -> UserOutcome | None:
        self.calls.append(("cached", login, ""))
        if login == "big@example.com":
            return UserFields(login, (("note", "x" * 9000),))
        if login == "nobody@example.com":
            return NOT_FOUND
        return ALICE if login.lower() == "alice@example.com" else None


def user_line(user: str = "alice@example.com", params: str = "service=lmtp", request_id: str = "1") -> bytes:
    return f"USER\t{request_id}\t{user}\t{params}\n".encode()


# Cached lookups in every shape the fast path must either answer exactly as the general way, or leave to it.
FAST_PATH_CASES: dict[str, tuple[list[bytes], bool]] = {
    # name: (chunks as the server reads them after the handshake, whether the fast path answers them)
    "lmtp": ([user_line(params="service=lmtp\tlip=127.0.0.1\trip=127.0.0.1")], True),
    "id 0": ([user_line(request_id="0")], True),
    "largest id": ([user_line(request_id="4294967295")], True),
    "name case": ([user_line("Alice@Example.COM")], True),
    "not found": ([user_line("nobody@example.com")], True),
    "reply too long": ([user_line("big@example.com")], True),
    "not cached": ([user_line("bob@example.com")], False),
    "escaped user": ([user_line("ali\x01tce@example.com")], False),
    "undecodable user": ([b"USER\t1\t\xff@example.com\tservice=lmtp\n"], False),
    "crlf": ([user_line()[:-1] + b"\r\n"], False),
    "two lines": ([user_line() + user_line(request_id="2")], False),
    "split line": ([user_line()[:9], user_line()[9:]], False),
    "bare service": ([user_line(params="service")], False),
    "no service": ([user_line(params="lip=127.0.0.1")], False),
    "no params": ([b"USER\t1\talice@example.com\n"], False),
    "empty user": ([user_line("")], False),
    "id over 32 bits": ([user_line(request_id="4294967296")], False),
    "NUL": ([user_line(params="service=lmtp\x00")], False),
    "too long": ([user_line(params="service=lmtp\tx=" + "y" * 1024)], False),
    "PASS": ([b"PASS\t1\talice@example.com\tservice=lmtp\n"], False),
}


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("case", sorted(FAST_PATH_CASES))
def test_cached_lookup_fast_path_answers_as_the_general_way(case: str) -> None:
    """A session whose service caches alice replies byte for byte as one without a cache; the shapes the fast path
    takes are answered without the line reader, the others go the general way."""
    chunks, fast = FAST_PATH_CASES[case]
    end = b"USER\t99\tbob@example.com\tservice=lmtp\n"  # never cached: marks the end of the replies

    async def main() -> None:
        cached_replies, cached_reads = await transcript(
            lambda: DovecotMasterSession(CachingUsers()),
            b"SPID",
            b"VERSION\t1\t0\n",
            chunks,
            end=end,
            end_reply=b"USER\t99\t",
        )
        general_replies, general_reads = await transcript(
            lambda: DovecotMasterSession(FakeUsers()),
            b"SPID",
            b"VERSION\t1\t0\n",
            chunks,
            end=end,
            end_reply=b"USER\t99\t",
        )
        if case == "not found":  # FakeUsers does not know nobody@ either: the same NOTFOUND
            assert cached_replies[0] == b"NOTFOUND\t1\n"
        if case == "reply too long":
            assert cached_replies[0] == b"FAIL\t1\treason=reply too long\n"
        assert cached_replies == general_replies
        assert general_reads == len(chunks)
        assert cached_reads == (0 if fast else len(chunks))

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_pipelined_replies_stay_in_order() -> None:
    async def main() -> None:
        service = FakeUsers()
        async with serve(lambda: DovecotMasterSession(service)) as path:
            client = await Client.connect(path)
            await client.send(
                "VERSION\t1\t0",
                "USER\t1\tslowalice@example.com\tservice=lmtp",
                "USER\t2\tbob@example.com\tservice=lmtp",
                "LIST\t3\tuser=b*",
                "PASS\t4\tnobody\tservice=doveadm",
            )
            with pytest.raises(TimeoutError):
                await client.line(0.2)  # held behind the slow first request
            service.release.set()
            assert await client.lines(5) == [
                "USER\t1\talice@example.com\tuid=5000\tgid=5000\thome=/var/vmail/example.com/alice"
                "\tmail=maildir:~/Maildir\tquota_rule=*:storage=2G",
                "USER\t2\tbob@example.com\tuid=5001",
                "LIST\t3\tbob@example.com",
                "DONE\t3\t",
                "NOTFOUND\t4",
            ]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("error", [TemporaryFailure, PermanentFailure])
def test_list_failure_ends_with_done_fail(error: type[DirectoryError]) -> None:
    """A fault, or a directory that cannot list at all (misconfigured): DONE fail, and the connection goes on."""

    async def main() -> None:
        service = FakeUsers()
        service.list_fail = error
        async with serve(lambda: DovecotMasterSession(service)) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "LIST\t1", "USER\t2\tbob@example.com\tservice=lmtp")
            assert await client.lines(4) == [
                "LIST\t1\talice@example.com",
                "LIST\t1\tbob@example.com",
                "DONE\t1\tfail",
                "USER\t2\tbob@example.com\tuid=5001",
            ]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_long_list_streams_and_keeps_order() -> None:
    async def main() -> None:
        listed = [f"user{i:05d}@example.com" for i in range(20000)]
        async with serve(lambda: DovecotMasterSession(FakeUsers(listed))) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "LIST\t1", "USER\t2\tbob@example.com\tservice=lmtp")
            await asyncio.sleep(0.2)  # let the server fill the socket while nobody reads
            rows = await client.lines(len(listed) + 2)
            assert rows[:-2] == [f"LIST\t1\t{user}" for user in listed]
            assert rows[-2:] == ["DONE\t1\t", "USER\t2\tbob@example.com\tuid=5001"]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_request_line_limit() -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            good, bad = await Client.connect(path), await Client.connect(path)
            line = "USER\t1\tbob@example.com\tservice=lmtp\tsession="
            line += "x" * (dovecot_master.MAX_REQUEST - 1 - len(line))
            await good.send("VERSION\t1\t0", line)
            assert await good.line() == "USER\t1\tbob@example.com\tuid=5001"
            await bad.send("VERSION\t1\t0", line + "x")
            assert await bad.rest(2) == b""
            await good.send("USER\t2\tbob@example.com\tservice=lmtp")
            assert await good.line() == "USER\t2\tbob@example.com\tuid=5001"
            good.close()
            bad.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_oversized_reply_is_a_fail_over_the_wire(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "USER\t1\tbig@example.com\tservice=lmtp")
            assert await client.line() == "FAIL\t1\treason=reply too long"
            client.close()

    with caplog.at_level(logging.ERROR):
        run(main())
    assert "big@example.com" in caplog.text


@pytest.mark.usefixtures("loop_kind")
def test_observer_and_busy() -> None:
    async def main() -> None:
        service = FakeUsers()
        observer = Observer()
        factory = Kept(lambda: DovecotMasterSession(service, observer))
        sessions = factory.sessions
        async with serve(factory) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "USER\t1\tslowbob@example.com\tservice=lmtp")
            await asyncio.sleep(0.05)
            assert sessions[0].busy
            assert observer.events == ["opened"]
            service.release.set()
            assert await client.line() == "USER\t1\tbob@example.com\tuid=5001"
            assert not sessions[0].busy
            assert observer.events == ["opened", "idle"]
            client.writer.write_eof()
            assert await client.rest() == b""
            await asyncio.sleep(0.05)
            assert observer.events == ["opened", "idle", "closed"]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_close_cancels_what_is_in_flight() -> None:
    async def main() -> None:
        service = FakeUsers()
        factory = Kept(lambda: DovecotMasterSession(service))
        sessions = factory.sessions
        async with serve(factory) as path:
            client = await Client.connect(path)
            await client.send("VERSION\t1\t0", "USER\t1\tslowbob@example.com\tservice=lmtp")
            await asyncio.sleep(0.05)
            sessions[0].close()
            assert await client.rest() == b""
            await asyncio.sleep(0.05)
            assert not sessions[0].busy
            client.close()

    run(main())


# A real client: doveadm (installed by .ci/run).


@pytest.mark.usefixtures("loop_kind")
def test_doveadm_user_list_and_auth_lookup() -> None:
    doveadm = require_tool("doveadm")

    async def main() -> None:
        async with serve(lambda: DovecotMasterSession(FakeUsers())) as path:
            user = (doveadm, "-c", "/dev/null", "user", "-a", path)
            assert await command(*user, "-f", "home", "Alice@Example.com") == (0, "/var/vmail/example.com/alice\n")
            rc, out = await command(*user, "-u", "bob@example.com")
            assert rc == 0
            assert out.splitlines()[1:] == ["  user      : bob@example.com", "  uid       : 5001"]
            assert (await command(*user, "nobody@example.com"))[0] == 67
            assert (await command(*user, "down@example.com"))[0] == 75
            assert await command(*user, "*@example.com") == (
                0,
                "alice@example.com\nbob@example.com\nDave@Example.com\nodd\tname@example.com\n",
            )
            lookup = (doveadm, "-c", "/dev/null", "auth", "lookup", "-a", path)
            rc, out = await command(*lookup, "alice@example.com")
            assert rc == 0
            assert "allow_nets: 192.0.2.0/24" in out
            assert (await command(*lookup, "nobody@example.com"))[0] == 67

    run(main())
