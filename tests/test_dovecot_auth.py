"""The Dovecot auth-client protocol: sans-IO parsing and encoding, then sessions over real Unix sockets in-process,
under the stdlib loop and uvloop, with a fake AuthService."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from mailroster.backends.outcome import AuthOutcome, AuthStatus, ScramCredentials
from mailroster.protocols import dovecot_auth
from mailroster.protocols.dovecot_auth import (
    Auth,
    Cancel,
    Cont,
    DovecotAuthSession,
    decode_initial_response,
    encode_handshake,
    encode_outcome,
    parse_command,
)
from mailroster.protocols.errors import BadRequest

from conftest import require_tool
from servers import PrivatePostfix
from sessionkit import (
    Kept,
    LineClient,
    Observer,
    loop_kind,  # noqa: F401 (a fixture: pytest finds it by name)
    run,
    serve,
    transcript,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "dovecot" / "auth.json").read_text())
WRITE_SIZES = (4096, 128, 16, 1)

# The fake directory.

PASSWORDS = {
    "alice@example.com": "secret",
    "bob@example.com": "hunter2",
    "disabled@example.com": "secret",
    "admin": "adminpw",
}
FIELDS = {"bob@example.com": (("quota_rule", "*:storage=1G"), ("note", "tab\there"))}


def scram_keys(password: str, salt: bytes, iterations: int, hash_name: str) -> ScramCredentials:
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return ScramCredentials(salt, iterations, hashlib.new(hash_name, client_key).digest(), server_key)


class FakeAuth:
    """Logins are case-insensitive; ``slow*`` logins wait for ``release``; ``down@...`` is a backend fault."""

    def cached_login(self, login: bytes, password: bytes) -> str | None:
        return None  # no cache: every login takes the full path

    def __init__(self, mechanisms: Sequence[str] = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")):
        self._mechanisms = mechanisms
        self.release = asyncio.Event()
        self.calls: list[tuple[str, str, str]] = []

    def mechanisms(self) -> Sequence[str]:
        return self._mechanisms

    def _outcome(self, login: str, good: bool) -> AuthOutcome:
        user = login.lower()
        if user == "down@example.com":
            return AuthOutcome(AuthStatus.TEMPFAIL, reason="directory unavailable")
        if user not in PASSWORDS or not good:
            return AuthOutcome(AuthStatus.FAILED, user=user if user in PASSWORDS else "")
        if user.startswith("disabled"):
            return AuthOutcome(AuthStatus.DISABLED, user=user)
        return AuthOutcome(AuthStatus.OK, user=user, fields=FIELDS.get(user, ()))

    async def authenticate(self, login: str, password: str, *, service: str, authzid: str = "") -> AuthOutcome:
        self.calls.append(("plain", login, service))
        if login.startswith("slow"):
            await self.release.wait()
            login = login.removeprefix("slow")
        good = PASSWORDS.get(login.lower()) == password
        if authzid and authzid != login:
            return self._outcome(authzid, good and login == "admin")
        return self._outcome(login, good)

    async def cram_md5(self, login: str, challenge: bytes, digest: bytes, *, service: str) -> AuthOutcome:
        self.calls.append(("cram", login, service))
        password = PASSWORDS.get(login.lower(), "")
        return self._outcome(login, hmac.compare_digest(hmac.new(password.encode(), challenge, "md5").digest(), digest))

    async def scram_credentials(
        self, login: str, algorithm: str, *, service: str
    ) -> tuple[AuthOutcome, ScramCredentials | None]:
        self.calls.append(("scram", login, service))
        outcome = self._outcome(login, True)
        if outcome.status not in (AuthStatus.OK, AuthStatus.DISABLED):
            return outcome, None
        hash_name = {"SHA-1": "sha1", "SHA-256": "sha256"}[algorithm]
        return outcome, scram_keys(PASSWORDS[login.lower()], b"salt:" + login.encode(), 4096, hash_name)


# Running sessions.


class Client(LineClient):
    async def handshake(self, minor: int = 0) -> list[str]:
        """Read the server's handshake up to DONE, answer it with VERSION and CPID; returns the lines read."""
        lines = [await self.line()]
        while lines[-1] != "DONE":
            lines.append(await self.line())
        await self.send(f"VERSION\t1\t{minor}", "CPID\t4242")
        return lines

    async def silent(self, seconds: float = 0.1) -> bool:
        """Whether the server says nothing for ``seconds`` (closing is saying something)."""
        try:
            await asyncio.wait_for(self.reader.readline(), seconds)
        except TimeoutError:
            return True
        return False


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain(user: str, password: str, authzid: str = "") -> str:
    """A PLAIN response, base64."""
    return b64(f"{authzid}\0{user}\0{password}")


def session_factory(service: FakeAuth, **options: Any) -> Callable[[], DovecotAuthSession]:
    options.setdefault("failure_delay", 0)
    return lambda: DovecotAuthSession(service, **options)


# Sans-IO: parsing.


def test_parse_auth() -> None:
    line = b"AUTH\t7\tplain\tservice=smtp\tnologin\tlip=192.0.2.1\tsecured\tfinal-resp-ok\tresp=AA=="
    command = parse_command(line)
    assert command == Auth(
        7,
        "PLAIN",
        "smtp",
        {"service": "smtp", "nologin": "", "lip": "192.0.2.1", "secured": "", "final-resp-ok": ""},
        "AA==",
    )
    assert isinstance(command, Auth)
    assert command.final_resp_ok
    assert "AA==" not in repr(command)


def test_parse_auth_unescapes_fields() -> None:
    command = parse_command(b"AUTH\t1\tPLAIN\tservice=smtp\tsession=a\x01tb")
    assert isinstance(command, Auth)
    assert command.params["session"] == "a\tb"


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"CONT\t3\tYWJj", Cont(3, "YWJj")),
        (b"CONT\t3\t", Cont(3, "")),
        (b"CONT\t3\ta\tb", Cont(3, "a\tb")),
        (b"CANCEL\t9", Cancel(9)),
    ],
)
def test_parse_cont_and_cancel(line: bytes, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "case",
    [case for case in GOLDEN["closes"] if not case["send"][0].startswith("CPID")],  # CPID: the session's state
    ids=lambda c: c["name"],
)
def test_parse_refuses_what_dovecot_disconnects_on(case: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        for line in case["send"]:
            parse_command(line.encode())


@pytest.mark.parametrize(
    ("resp", "minor", "initial"),
    [
        (None, 0, None),
        (None, 2, None),
        ("", 0, None),
        ("", 1, None),
        ("", 2, b""),
        ("=", 2, b""),
        ("=", 0, b""),
        ("AGE=", 0, b"\0a"),
    ],
)
def test_initial_response_rules(resp: str | None, minor: int, initial: bytes | None) -> None:
    assert decode_initial_response(resp, minor) == initial


@pytest.mark.parametrize("resp", ["AGE", "AG E=", "*", "AGE=\n", "AG\u00e9="])
def test_initial_response_bad_base64(resp: str) -> None:
    with pytest.raises(ValueError):
        decode_initial_response(resp, 2)


# Sans-IO: encoding.


def test_handshake_lines() -> None:
    data = encode_handshake(["PLAIN", "CRAM-MD5", "SCRAM-SHA-256"], pid=4242, cuid=1, cookie="0" * 32)
    assert data == (
        b"VERSION\t1\t2\n"
        b"MECH\tPLAIN\tplaintext\n"
        b"MECH\tCRAM-MD5\tdictionary\tactive\n"
        b"MECH\tSCRAM-SHA-256\tmutual-auth\n"
        b"SPID\t4242\nCUID\t1\nCOOKIE\t00000000000000000000000000000000\nDONE\n"
    )


@pytest.mark.parametrize(
    ("outcome", "final", "line"),
    [
        (AuthOutcome(AuthStatus.OK, user="alice"), b"", b"OK\t1\tuser=alice\n"),
        (AuthOutcome(AuthStatus.OK), b"", b"OK\t1\tuser=Login\n"),
        (
            AuthOutcome(AuthStatus.OK, user="a\tb", fields=(("user", "x"), ("k", "v"))),
            b"",
            b"OK\t1\tuser=a\x01tb\tk=v\n",
        ),
        (AuthOutcome(AuthStatus.OK, user="alice"), b"v=abc", b"OK\t1\tuser=alice\tresp=dj1hYmM=\n"),
        (AuthOutcome(AuthStatus.FAILED, user="alice"), b"", b"FAIL\t1\tuser=Login\n"),
        (AuthOutcome(AuthStatus.FAILED), b"", b"FAIL\t1\tuser=Login\n"),
        (AuthOutcome(AuthStatus.DISABLED, user="alice"), b"", b"FAIL\t1\tuser=Login\tcode=user_disabled\n"),
        (
            AuthOutcome(AuthStatus.TEMPFAIL, reason="LDAP down"),
            b"",
            b"FAIL\t1\tuser=Login\tcode=temp_fail\treason=LDAP down\n",
        ),
        (
            AuthOutcome(AuthStatus.TEMPFAIL),
            b"",
            b"FAIL\t1\tuser=Login\tcode=temp_fail\treason=Temporary authentication failure\n",
        ),
    ],
)
def test_encode_outcome(outcome: AuthOutcome, final: bytes, line: bytes) -> None:
    """A failure names the login as typed, never the canonical user (which would tell that the user exists)."""
    assert encode_outcome(1, outcome, login="Login", final=final) == line


def test_encode_outcome_too_long_for_lib_auth(caplog: pytest.LogCaptureFixture) -> None:
    prefix = len(b"OK\t1\tuser=alice\tk=\n")
    fits = AuthOutcome(AuthStatus.OK, user="alice", fields=(("k", "v" * (dovecot_auth.MAX_LINE - prefix)),))
    assert len(encode_outcome(1, fits, login="alice")) == dovecot_auth.MAX_LINE
    too_long = AuthOutcome(AuthStatus.OK, user="alice", fields=(("k", "v" * (dovecot_auth.MAX_LINE - prefix + 1)),))
    with caplog.at_level(logging.ERROR):
        assert encode_outcome(1, too_long, login="alice") == (
            b"FAIL\t1\tuser=alice\tcode=temp_fail\treason=Temporary authentication failure\n"
        )
    assert "exceeds the limit" in caplog.text


# Golden transcripts over a socket.


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("size", WRITE_SIZES)
@pytest.mark.parametrize("case", GOLDEN["transcripts"], ids=lambda c: c["name"])
def test_transcript(case: dict[str, Any], size: int) -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(case["minor"])
            for step in case["steps"]:
                await client.send(*step["send"], size=size)
                assert await client.lines(len(step["expect"])) == step["expect"]
            client.writer.write_eof()
            assert await client.rest() == b""  # nothing more was said
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("size", (4096, 1))
@pytest.mark.parametrize("case", GOLDEN["closes"], ids=lambda c: c["name"])
def test_protocol_errors_close(case: dict[str, Any], size: int) -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(case["minor"])
            await client.send(*case["send"], size=size)
            expected = "".join(line + "\n" for line in case["expect"]).encode()
            assert await client.rest() == expected
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("lines", GOLDEN["handshake_errors"], ids=repr)
def test_handshake_errors_close(lines: list[str]) -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            while await client.line() != "DONE":
                pass
            await client.send(*lines)
            assert await client.rest() == b""
            client.close()

    run(main())


# Sessions.


@pytest.mark.usefixtures("loop_kind")
def test_handshake_order_and_content() -> None:
    async def main() -> None:
        service = FakeAuth(["plain", "LOGIN", "XOAUTH2", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256", "GSSAPI"])
        async with serve(session_factory(service)) as path:
            first, second = await Client.connect(path), await Client.connect(path)
            lines = await first.handshake()
            assert lines[0] == "VERSION\t1\t2"
            assert lines[1:6] == [
                "MECH\tPLAIN\tplaintext",
                "MECH\tLOGIN\tplaintext",
                "MECH\tCRAM-MD5\tdictionary\tactive",
                "MECH\tSCRAM-SHA-1\tmutual-auth",
                "MECH\tSCRAM-SHA-256\tmutual-auth",
            ]  # MECH before SPID; nothing this server cannot run (XOAUTH2, GSSAPI)
            assert lines[6] == f"SPID\t{os.getpid()}"
            assert re.fullmatch(r"CUID\t[1-9]\d*", lines[7])
            assert re.fullmatch(r"COOKIE\t[0-9a-f]{32}", lines[8])
            assert lines[9:] == ["DONE"]
            other = await second.handshake()
            assert int(other[7].split("\t")[1]) == int(lines[7].split("\t")[1]) + 1
            assert other[8] != lines[8]
            # Duplicate CPIDs are fine: every smtpd process has its own connection.
            for client in (first, second):
                await client.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'secret')}")
                assert await client.line() == "OK\t1\tuser=alice@example.com"
                client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_cram_md5_exchange() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake()
            for request_id, password, reply in (
                (1, "secret", "OK\t1\tuser=alice@example.com"),
                (2, "wrong", "FAIL\t2\tuser=alice@example.com"),
            ):
                await client.send(f"AUTH\t{request_id}\tCRAM-MD5\tservice=smtp")
                cont = await client.line()
                assert cont.startswith(f"CONT\t{request_id}\t")
                challenge = base64.b64decode(cont.split("\t")[2])
                assert re.fullmatch(rb"<\d{16}\.\d+@[^>]+>", challenge)
                digest = hmac.new(password.encode(), challenge, "md5").hexdigest()
                await client.send(f"CONT\t{request_id}\t{b64('alice@example.com ' + digest)}")
                assert await client.line() == reply
            client.close()

    run(main())


async def scram_start(client: Client, request_id: int, mech: str, user: str, params: str = "") -> tuple[str, str]:
    """Send client-first in resp=; return (client-first-bare, server-first)."""
    bare = f"n={user},r=clientnonce{request_id}"
    await client.send(f"AUTH\t{request_id}\t{mech}\tservice=imap{params}\tresp={b64('n,,' + bare)}")
    cont = await client.line()
    assert cont.startswith(f"CONT\t{request_id}\t")
    return bare, base64.b64decode(cont.split("\t")[2]).decode()


def scram_final(password: str, bare: str, server_first: str, hash_name: str) -> tuple[str, str]:
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.new(hash_name, client_key).digest(), auth_message, hash_name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_signature = hmac.new(hmac.new(salted, b"Server Key", hash_name).digest(), auth_message, hash_name).digest()
    return f"{without_proof},p={b64(proof)}", f"v={b64(server_signature)}"


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize(("mech", "hash_name"), [("SCRAM-SHA-1", "sha1"), ("SCRAM-SHA-256", "sha256")])
def test_scram_with_final_resp_ok(mech: str, hash_name: str) -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(2)
            bare, server_first = await scram_start(client, 1, mech, "alice@example.com", "\tfinal-resp-ok")
            assert re.fullmatch(r"r=clientnonce1[!-+\--~]{64},s=[A-Za-z0-9+/=]+,i=4096", server_first)
            final, server_final = scram_final("secret", bare, server_first, hash_name)
            await client.send(f"CONT\t1\t{b64(final)}")
            assert await client.line() == f"OK\t1\tuser=alice@example.com\tresp={b64(server_final)}"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize(("mech", "hash_name"), [("SCRAM-SHA-1", "sha1"), ("SCRAM-SHA-256", "sha256")])
def test_scram_without_final_resp_ok_sends_server_final_as_cont(mech: str, hash_name: str) -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(0)
            bare, server_first = await scram_start(client, 1, mech, "alice@example.com")
            final, server_final = scram_final("secret", bare, server_first, hash_name)
            await client.send(f"CONT\t1\t{b64(final)}")
            assert await client.line() == f"CONT\t1\t{b64(server_final)}"
            await client.send("CONT\t1\t")
            assert await client.line() == "OK\t1\tuser=alice@example.com"
            # A client that answers the server-final message with data fails.
            bare, server_first = await scram_start(client, 2, mech, "alice@example.com")
            final, server_final = scram_final("secret", bare, server_first, hash_name)
            await client.send(f"CONT\t2\t{b64(final)}")
            assert await client.line() == f"CONT\t2\t{b64(server_final)}"
            await client.send(f"CONT\t2\t{b64('junk')}")
            assert await client.line() == "FAIL\t2\tuser=alice@example.com"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_scram_failures_look_alike() -> None:
    """Wrong password and unknown user: the same exchange, the same FAIL; disabled only after a good proof."""

    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(2)
            replies = {}
            for request_id, user, password in (
                (1, "alice@example.com", "wrong"),
                (2, "ghost@example.com", "secret"),
                (3, "disabled@example.com", "wrong"),
                (4, "disabled@example.com", "secret"),
            ):
                bare, server_first = await scram_start(client, request_id, "SCRAM-SHA-256", user, "\tfinal-resp-ok")
                assert re.fullmatch(rf"r=clientnonce{request_id}\S{{64}},s=\S+,i=4096", server_first)
                final, _ = scram_final(password, bare, server_first, "sha256")
                await client.send(f"CONT\t{request_id}\t{b64(final)}")
                replies[request_id] = await client.line()
            assert replies == {
                1: "FAIL\t1\tuser=alice@example.com",
                2: "FAIL\t2\tuser=ghost@example.com",
                3: "FAIL\t3\tuser=disabled@example.com",
                4: "FAIL\t4\tuser=disabled@example.com\tcode=user_disabled",
            }
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_scram_refusals() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake(2)
            await client.send(f"AUTH\t1\tSCRAM-SHA-1\tservice=imap\tresp={b64('p=tls-unique,,n=alice,r=abc')}")
            assert await client.line() == "FAIL\t1\treason=Channel binding not supported"
            await client.send(f"AUTH\t2\tSCRAM-SHA-1\tservice=imap\tresp={b64('n,a=bob,n=admin,r=abc')}")
            assert await client.line() == (
                "FAIL\t2\tcode=authz_fail\treason=Authorization identity not supported with SCRAM"
            )
            # Client-first in a continuation, and a backend fault on the key lookup.
            await client.send("AUTH\t3\tSCRAM-SHA-256\tservice=imap")
            assert await client.line() == "CONT\t3\t"
            await client.send(f"CONT\t3\t{b64('n,,n=down@example.com,r=abc')}")
            assert await client.line() == (
                "FAIL\t3\tuser=down@example.com\tcode=temp_fail\treason=directory unavailable"
            )
            client.close()

    run(main())


class CachingAuth(FakeAuth):
    """FakeAuth with an auth cache that holds one successful login: alice's, with her password."""

    def cached_login(self, login: bytes, password: bytes) -> str | None:
        self.calls.append(("cached", login.decode(errors="replace"), ""))
        return "alice@example.com" if (login.lower(), password) == (b"alice@example.com", b"secret") else None


GOOD = plain("alice@example.com", "secret")


def auth_line(resp: str = GOOD, params: str = "service=smtp", request_id: str = "1", mech: str = "PLAIN") -> bytes:
    return f"AUTH\t{request_id}\t{mech}\t{params}\tresp={resp}\n".encode()


# A cached login in every shape the fast path must either answer exactly as the general way, or leave to it.
FAST_PATH_CASES: dict[str, tuple[int, list[bytes], bool]] = {
    # name: (minor version, chunks as the server reads them, whether the fast path answers them)
    "postfix": (1, [auth_line(params="service=smtp\tnologin\tlip=127.0.0.1")], True),
    "login case": (1, [auth_line(plain("ALICE@example.com", "secret"))], True),
    "authzid = login": (1, [auth_line(plain("alice@example.com", "secret", "alice@example.com"))], True),
    "id with zeros": (1, [auth_line(request_id="007")], True),
    "largest id": (1, [auth_line(request_id="4294967295")], True),
    "lower-case mech": (1, [auth_line(mech="plain")], False),
    "crlf": (1, [auth_line()[:-1] + b"\r\n"], False),
    "escaped param": (1, [auth_line(params="service=smtp\tsession=a\x01tb")], False),
    "two lines": (1, [auth_line() + auth_line(request_id="2")], False),
    "split line": (1, [auth_line()[:20], auth_line()[20:]], False),
    "wrong password": (1, [auth_line(plain("alice@example.com", "wrong"))], False),
    "other authzid": (1, [auth_line(plain("admin", "adminpw", "alice@example.com"))], False),
    "no padding": (1, [auth_line(GOOD.rstrip("="))], False),
    "bad base64": (1, [auth_line("*" + GOOD)], False),
    "empty resp, minor 1": (1, [auth_line("")], False),
    "empty resp, minor 2": (2, [auth_line("")], False),
    "resp not last": (1, [f"AUTH\t1\tPLAIN\tresp={GOOD}\tservice=smtp\n".encode()], False),
    "two resp": (1, [auth_line(params=f"service=smtp\tresp={GOOD}")], False),
    "no service": (1, [auth_line(params="nologin")], False),
    "id 0": (1, [auth_line(request_id="0")], False),
    "id over 32 bits": (1, [auth_line(request_id="4294967296")], False),
    "NUL": (1, [auth_line(params="service=smtp\x00")], False),
    "too long": (1, [auth_line(params="service=smtp\tx=" + "y" * 16384)], False),
}


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("case", sorted(FAST_PATH_CASES))
def test_cached_login_fast_path_answers_as_the_general_way(case: str) -> None:
    """A session whose service caches alice's login replies byte for byte as one without a cache; the shapes the
    fast path takes are answered from the cache without the line reader, the others go the general way."""
    minor, chunks, fast = FAST_PATH_CASES[case]
    end = f"AUTH\t99\tPLAIN\tservice=smtp\tresp={plain('bob@example.com', 'hunter2')}\n".encode()  # never cached
    handshake = f"VERSION\t1\t{minor}\nCPID\t4242\n".encode()

    async def main() -> None:
        cached = CachingAuth()
        cached_replies, cached_reads = await transcript(
            lambda: DovecotAuthSession(cached, failure_delay=0),
            b"DONE",
            handshake,
            chunks,
            end=end,
            end_reply=b"OK\t99\t",
        )
        general_replies, general_reads = await transcript(
            lambda: DovecotAuthSession(FakeAuth(), failure_delay=0),
            b"DONE",
            handshake,
            chunks,
            end=end,
            end_reply=b"OK\t99\t",
        )
        assert cached_replies == general_replies
        assert general_reads == len(chunks)  # without a cache, every read goes the general way
        if fast:
            assert re.fullmatch(rb"OK\t\d+\tuser=alice@example\.com\n", cached_replies[0])
            assert cached_reads == 0
            assert cached.calls[0][0] == "cached"  # alice's hit
            assert [call for call in cached.calls if call[0] == "plain"] == [("plain", "bob@example.com", "smtp")]
        else:
            assert cached_reads == len(chunks)

    run(main())


def test_cached_login_reply_escapes_the_user_name() -> None:
    assert dovecot_auth._user_field("a\tb\x01c") == b"a\x01tb\x011c"


@pytest.mark.usefixtures("loop_kind")
def test_tempfail_close_closes_without_a_reply() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth(), tempfail_close=True)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'wrong')}")
            assert await client.line() == "FAIL\t1\tuser=alice@example.com"  # ordinary failures still FAIL
            await client.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain('down@example.com', 'x')}")
            assert await client.rest() == b""  # Postfix answers 454 4.7.0 on this
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_concurrent_requests_are_answered_out_of_order() -> None:
    async def main() -> None:
        service = FakeAuth()
        async with serve(session_factory(service)) as path:
            client = await Client.connect(path)
            await client.handshake(2)
            await client.send(
                f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('slowalice@example.com', 'secret')}",
                f"AUTH\t2\tPLAIN\tservice=imap\tresp={plain('bob@example.com', 'hunter2')}",
                "AUTH\t3\tLOGIN\tservice=imap",
            )
            assert sorted(await client.lines(2)) == [
                "CONT\t3\tVXNlcm5hbWU6",
                "OK\t2\tuser=bob@example.com\tquota_rule=*:storage=1G\tnote=tab\x01there",
            ]
            service.release.set()
            assert await client.line() == "OK\t1\tuser=alice@example.com"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_failure_delay_holds_only_its_own_request() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth(), failure_delay=0.5)) as path:
            client = await Client.connect(path)
            await client.handshake()
            start = time.monotonic()
            await client.send(
                f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'wrong')}",
                f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'secret')}",
            )
            assert await client.line() == "OK\t2\tuser=alice@example.com"
            assert time.monotonic() - start < 0.4
            assert await client.line() == "FAIL\t1\tuser=alice@example.com"
            # The delay applied (libuv's millisecond timers may fire a fraction of a millisecond early).
            assert time.monotonic() - start >= 0.49
            # A backend fault is not delayed: no password was judged.
            start = time.monotonic()
            await client.send(f"AUTH\t3\tPLAIN\tservice=smtp\tresp={plain('down@example.com', 'x')}")
            assert (await client.line()).startswith("FAIL\t3\tuser=down@example.com\tcode=temp_fail")
            assert time.monotonic() - start < 0.4
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_no_cutting_the_failure_delay_short() -> None:
    """A CONT or CANCEL during the delay neither answers early nor frees the id for an immediate retry."""

    async def main() -> None:
        async with serve(session_factory(FakeAuth(), failure_delay=0.4)) as path:
            client = await Client.connect(path)
            await client.handshake(2)
            start = time.monotonic()
            await client.send(f"AUTH\t1\tPLAIN\tservice=imap\tresp={plain('alice@example.com', 'wrong')}")
            await asyncio.sleep(0.1)
            await client.send(f"CONT\t1\t{b64('x')}")
            assert await client.line() == "FAIL\t1\tuser=alice@example.com"
            assert time.monotonic() - start >= 0.4
            await client.send(f"AUTH\t2\tPLAIN\tservice=imap\tresp={plain('alice@example.com', 'wrong')}")
            await asyncio.sleep(0.1)
            await client.send("CANCEL\t2")
            assert await client.silent(0.5)  # cancelled: never answered
            await client.send(f"AUTH\t2\tPLAIN\tservice=imap\tresp={plain('alice@example.com', 'secret')}")
            assert await client.line() == "OK\t2\tuser=alice@example.com"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_continuation_while_the_directory_is_asked() -> None:
    async def main() -> None:
        service = FakeAuth()
        async with serve(session_factory(service)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('slowalice@example.com', 'secret')}")
            await asyncio.sleep(0.05)
            await client.send(f"CONT\t1\t{b64('x')}")
            assert await client.line() == "FAIL\t1\treason=Unexpected continuation"
            service.release.set()
            assert await client.silent()  # the abandoned request says nothing more
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_two_continuations_for_one_challenge() -> None:
    async def main() -> None:
        service = FakeAuth()
        async with serve(session_factory(service)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send("AUTH\t1\tPLAIN\tservice=smtp")
            assert await client.line() == "CONT\t1\t"
            cont = f"CONT\t1\t{plain('slowalice@example.com', 'secret')}"
            await client.send(cont, cont)
            assert await client.line() == "FAIL\t1\treason=Unexpected continuation"
            service.release.set()
            assert await client.silent()
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_duplicate_id_closes() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send("AUTH\t1\tLOGIN\tservice=smtp")
            assert await client.line() == "CONT\t1\tVXNlcm5hbWU6"
            await client.send("AUTH\t1\tPLAIN\tservice=smtp")
            assert await client.rest() == b""
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_waiting_requests_expire_and_the_connection_stays() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth(), request_timeout=0.2)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send("AUTH\t1\tLOGIN\tservice=smtp")
            assert await client.line() == "CONT\t1\tVXNlcm5hbWU6"
            start = time.monotonic()
            assert await client.line() == "FAIL\t1\treason=Authentication request timed out"
            assert 0.15 <= time.monotonic() - start < 2
            await client.send(f"CONT\t1\t{b64('alice@example.com')}")
            assert await client.line() == "FAIL\t1\treason=Authentication request timed out"
            await client.send(f"AUTH\t2\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'secret')}")
            assert await client.line() == "OK\t2\tuser=alice@example.com"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_requests_in_flight_are_bounded() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth(), max_requests=3)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send(*(f"AUTH\t{i}\tLOGIN\tservice=smtp" for i in range(1, 5)))
            assert sorted(await client.lines(4)) == [
                "CONT\t1\tVXNlcm5hbWU6",
                "CONT\t2\tVXNlcm5hbWU6",
                "CONT\t3\tVXNlcm5hbWU6",
                "FAIL\t4\tcode=temp_fail\treason=Too many concurrent authentication requests",
            ]
            await client.send("CANCEL\t1", f"AUTH\t5\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'secret')}")
            assert await client.line() == "OK\t5\tuser=alice@example.com"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_oversized_line_closes_only_that_connection() -> None:
    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            good, bad = await Client.connect(path), await Client.connect(path)
            await good.handshake()
            await bad.handshake()
            bad.writer.write(b"AUTH\t1\tPLAIN\tservice=smtp\tresp=" + b"A" * 20000)  # no LF: not waited for
            assert await bad.rest(2) == b""
            await good.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('alice@example.com', 'secret')}")
            assert await good.line() == "OK\t1\tuser=alice@example.com"
            # The limit counts the LF: 16383 bytes of line are fine.
            line = f"AUTH\t2\tPLAIN\tservice=smtp\tx=\tresp={plain('alice@example.com', 'secret')}"
            line = line.replace("x=", "x=" + "y" * (dovecot_auth.MAX_LINE - 1 - len(line)))
            assert len(line.encode()) == dovecot_auth.MAX_LINE - 1
            await good.send(line)
            assert await good.line() == "OK\t2\tuser=alice@example.com"
            good.close()
            bad.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_observer_hooks() -> None:
    async def main() -> None:
        service = FakeAuth()
        observer = Observer()
        factory = Kept(lambda: DovecotAuthSession(service, observer, failure_delay=0))
        async with serve(factory) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send(f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('slowalice@example.com', 'secret')}")
            await asyncio.sleep(0.05)
            session = factory.sessions[0]
            assert session.busy
            before = session.last_active
            assert observer.events == ["opened"]
            service.release.set()
            assert await client.line() == "OK\t1\tuser=alice@example.com"
            assert not session.busy
            assert observer.events == ["opened", "idle"]
            await client.send("AUTH\t2\tLOGIN\tservice=smtp")
            assert await client.line() == "CONT\t2\tVXNlcm5hbWU6"
            assert session.last_active > before
            assert session.busy  # a request waiting for the client counts: draining lets it finish
            session.close()  # as the idle sweeper or a forced shutdown does
            assert await client.rest() == b""
            await asyncio.sleep(0.05)
            assert observer.events == ["opened", "idle", "closed"]
            assert not session.busy
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_refused_connection_gets_no_handshake() -> None:
    async def main() -> None:
        observer = Observer(accept=False)
        async with serve(lambda: DovecotAuthSession(FakeAuth(), observer)) as path:
            client = await Client.connect(path)
            assert await client.rest() == b""
            await asyncio.sleep(0.05)
            assert observer.events == ["opened", "closed"]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_half_close_answers_then_closes() -> None:
    async def main() -> None:
        service = FakeAuth()
        async with serve(session_factory(service)) as path:
            client = await Client.connect(path)
            await client.handshake()
            await client.send(
                f"AUTH\t1\tPLAIN\tservice=smtp\tresp={plain('slowalice@example.com', 'secret')}",
                "AUTH\t2\tLOGIN\tservice=smtp",
            )
            assert await client.line() == "CONT\t2\tVXNlcm5hbWU6"
            client.writer.write_eof()
            await asyncio.sleep(0.05)
            service.release.set()
            assert await client.rest() == b"OK\t1\tuser=alice@example.com\n"
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_no_password_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    secrets_used = ["s3cr3t-Pa55", "wr0ng-Pa55", "l0gin-Pa55", "0ver-L1mit-Pa55"]

    async def main() -> None:
        async with serve(session_factory(FakeAuth(), max_requests=1)) as path:
            client = await Client.connect(path)
            await client.handshake()
            PASSWORDS["carol@example.com"] = secrets_used[0]
            try:
                for request_id, password in ((1, secrets_used[0]), (2, secrets_used[1])):
                    await client.send(
                        f"AUTH\t{request_id}\tPLAIN\tservice=smtp\tresp={plain('carol@example.com', password)}"
                    )
                    await client.line()
                await client.send("AUTH\t3\tLOGIN\tservice=smtp")
                await client.line()
                await client.send(f"CONT\t3\t{b64('carol@example.com')}")
                await client.line()
                await client.send(f"CONT\t3\t{b64(secrets_used[2])}")
                assert await client.line() == "FAIL\t3\tuser=carol@example.com"
                await client.send("AUTH\t4\tLOGIN\tservice=smtp")
                await client.line()
                await client.send(f"AUTH\t5\tPLAIN\tservice=smtp\tresp={plain('carol@example.com', secrets_used[3])}")
                await client.line()
                await client.send(f"AUTH\t6\tPLAIN\tresp={plain('carol@example.com', secrets_used[0])}")
                assert await client.rest() == b""  # no service=: protocol error, logged
            finally:
                del PASSWORDS["carol@example.com"]
            client.close()

    with caplog.at_level(logging.DEBUG):
        run(main())
    assert any("carol@example.com" in record.getMessage() for record in caplog.records)
    assert any("closing connection" in record.getMessage() for record in caplog.records)
    text = "\n".join(f"{record.getMessage()} {record.args!r} {record.exc_text or ''}" for record in caplog.records)
    for password in secrets_used:
        assert password not in text
        assert b64(password) not in text
        assert plain("carol@example.com", password) not in text


# Real clients: doveadm, and Postfix's smtpd driven by swaks (installed by .ci/run).


async def command(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.usefixtures("loop_kind")
def test_doveadm_auth_test() -> None:
    doveadm = require_tool("doveadm")

    async def main() -> None:
        async with serve(session_factory(FakeAuth())) as path:
            auth_test = (doveadm, "-c", "/dev/null", "auth", "test", "-a", path)
            rc, out = await command(*auth_test, "alice@example.com", "secret")
            assert (rc, out.splitlines()[0]) == (0, "passdb: alice@example.com auth succeeded"), out
            rc, out = await command(*auth_test, "-x", "service=smtp", "bob@example.com", "hunter2")
            assert rc == 0, out
            assert "quota_rule=*:storage=1G" in out
            rc, out = await command(*auth_test, "alice@example.com", "wrong")
            assert (rc, out.splitlines()[0]) == (77, "passdb: alice@example.com auth failed"), out
            rc, out = await command(*auth_test, "down@example.com", "secret")
            assert rc == 77
            assert "code=temp_fail" in out

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_postfix_smtpd_sasl() -> None:
    """Postfix 3.7's own Dovecot SASL client: 235, 535, and 454 when a backend fault closes the connection."""
    require_tool("postfix")
    swaks = require_tool("swaks")
    base = Path(tempfile.mkdtemp(prefix="mrdp", dir="/tmp"))
    base.chmod(0o755)
    socket_path = str(base / "auth")
    postfix = PrivatePostfix(
        base / "pf", f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {socket_path}\nsmtpd_sasl_auth_enable = yes\n"
    )

    async def main() -> None:
        async with serve(session_factory(FakeAuth(), tempfail_close=True), socket_path):

            async def smtp_auth(mech: str, user: str, password: str) -> str:
                _, out = await command(
                    swaks, "--server", "127.0.0.1", "--port", str(postfix.port), "--quit-after", "AUTH",
                    "--timeout", "30", "--auth", mech, "--auth-user", user, "--auth-password", password,
                )  # fmt: skip
                replies = [line[4:] for line in out.splitlines() if line.startswith(("<-  ", "<** "))]
                return next((reply for reply in replies if reply[:3] in ("235", "535", "454")), out)

            assert (await smtp_auth("PLAIN", "alice@example.com", "secret")).startswith("235 ")
            assert (await smtp_auth("PLAIN", "alice@example.com", "wrong")).startswith("535 5.7.8")
            assert (await smtp_auth("LOGIN", "Alice@Example.COM", "secret")).startswith("235 ")
            assert (await smtp_auth("CRAM-MD5", "alice@example.com", "secret")).startswith("235 ")
            assert (await smtp_auth("PLAIN", "down@example.com", "secret")).startswith("454 4.7.0")
            # smtpd reconnects after the close.
            assert (await smtp_auth("LOGIN", "alice@example.com", "secret")).startswith("235 ")

    postfix.start()
    try:
        run(main())
    finally:
        postfix.stop()
        shutil.rmtree(base, ignore_errors=True)
