"""The Dovecot dict proxy protocol: sans-IO parsing and encoding, then sessions over real Unix sockets in-process,
under the stdlib loop and uvloop, with fake DictServices."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mailroster.backends.errors import TemporaryFailure
from mailroster.backends.outcome import (
    NOT_FOUND,
    Found,
    Outcome,
    PermFail,
    TempFail,
    UserFields,
    UserOutcome,
)
from mailroster.protocols import dovecot_dict
from mailroster.protocols.dovecot_dict import (
    Begin,
    Change,
    Commit,
    DovecotDictSession,
    Hello,
    Iterate,
    Lookup,
    MapKey,
    RecordKey,
    Rollback,
    encode_record,
    encode_value,
    parse_command,
    parse_hello,
    parse_key,
    record_json,
)
from mailroster.protocols.errors import BadRequest

from conftest import require_tool
from servers import dict_auth_dovecot
from sessionkit import (
    Kept,
    LineClient,
    Observer,
    ScriptedService,
    command,
    loop_kind,  # noqa: F401 (a fixture: pytest finds it by name)
    run,
    serve,
)

GOLDEN = json.loads((Path(__file__).parent / "data" / "dovecot" / "dict.json").read_text())
WRITE_SIZES = (4096, 128, 16, 1)
HELLO = "H3\t2\t0\t\tauth"

USERS = {
    "alice@example.com": UserFields(
        "alice@example.com",
        (
            ("uid", "5000"),
            ("gid", "5000"),
            ("home", "/var/vmail/example.com/alice"),
            ("mail", "maildir:~/Maildir"),
            ("quota_rule", "*:storage=2G"),
        ),
    ),
    "bob@example.com": UserFields("bob@example.com", (("uid", "5001"),)),
    "nofields@example.com": UserFields("nofields@example.com"),
    "sub/child@example.com": UserFields("sub/child@example.com", (("uid", "5003"),)),
    "odd@example.com": UserFields("odd@example.com", (("note", 'say "hi" \\ \t \u00fc\n'),)),
}
LISTED = ["bob@example.com", "alice@example.com", "ghost@example.com", "sub/child@example.com", "nofields@example.com"]


class FakeDirectory(ScriptedService):
    """A DictService: map lookups as :class:`ScriptedService`'s, and ``perm*`` and ``tab*`` keys; ``slow*`` logins
    also wait for ``release``."""

    def cached_userdb(self, login: str) -> UserOutcome | None:
        return None  # no cache: every lookup takes the full path

    def __init__(self, listed: list[str] | None = None, name: str = "") -> None:
        super().__init__()
        self.listed = LISTED if listed is None else listed
        self.name = name
        self.list_fail_at: int | None = None
        self.userdb_delay = 0.0

    def answer(self, map_name: str, key: str) -> Outcome:
        if key.startswith("perm"):
            return PermFail("no such map")
        if key.startswith("tab"):
            return Found("a\tb\nc")
        return Found(f"{self.name}{map_name}:{key}")

    async def _find(self, login: str) -> UserOutcome:
        if login.startswith("slow"):
            await self.release.wait()
            login = login.removeprefix("slow")
        if self.userdb_delay:
            await asyncio.sleep(self.userdb_delay)
        if login == "down@example.com":
            return TempFail("directory unavailable")
        return USERS.get(login.lower(), NOT_FOUND)

    async def userdb(self, login: str, *, service: str = "") -> UserOutcome:
        self.calls.append(("userdb", login))
        return await self._find(login)

    async def passdb(self, login: str, *, with_password: bool, service: str = "") -> UserOutcome:
        self.calls.append(("passdb", login))
        outcome = await self._find(login)
        if isinstance(outcome, UserFields) and outcome.user == "alice@example.com":
            password = (("password", "{PLAIN}secret"),) if with_password else ()
            return UserFields(outcome.user, (*password, ("allow_nets", "192.0.2.0/24")))
        return outcome

    async def users(self) -> AsyncIterator[str]:
        for index, login in enumerate(self.listed):
            if index == self.list_fail_at:
                raise TemporaryFailure("LDAP server down")
            if index % 50 == 0:
                await asyncio.sleep(0)
            yield login


# Running sessions.


class Client(LineClient):
    async def silent(self, seconds: float = 0.2) -> bool:
        """Whether the server says nothing for ``seconds`` (or closes)."""
        try:
            data = await asyncio.wait_for(self.reader.readline(), seconds)
        except TimeoutError:
            return True
        return data == b""


def session(directory: FakeDirectory | None = None, observer: Observer | None = None) -> Callable[[], Any]:
    services = {"auth": directory or FakeDirectory()}
    return lambda: DovecotDictSession(services, observer)


# Sans-IO.


def test_parse_hello() -> None:
    assert parse_hello(b"H3\t2\t0\t\tauth") == Hello(3, 2, 0, "", "auth")
    assert parse_hello(b"H3\t1\t1\tuser\tdict\x01tname\textra") == Hello(3, 1, 1, "user", "dict\tname")


@pytest.mark.parametrize("lines", GOLDEN["handshake_errors"], ids=repr)
def test_parse_hello_refuses(lines: list[str]) -> None:
    if lines[0].endswith(("nosuchdict", "\t\t")):
        assert parse_hello(lines[0].encode()).name in ("nosuchdict", "")  # well formed; the session refuses it
        return
    with pytest.raises(BadRequest):
        parse_hello(lines[0].encode())


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (
            b"Lshared/passdb/alice@example.com\talice@example.com",
            Lookup("shared/passdb/alice@example.com", "alice@example.com"),
        ),
        (b"Lshared/x", Lookup("shared/x")),
        (b"Lshared/a\x01tb\t", Lookup("shared/a\tb")),
        (b"I0\t0\tshared/userdb/\t", Iterate(0, 0, "shared/userdb/")),
        (b"I9\t18446744073709551615\tshared/userdb/\tbob", Iterate(9, 2**64 - 1, "shared/userdb/", "bob")),
        (b"B1\talice", Begin(1)),
        (b"S1\tpriv/k\tv", Change("S", 1)),
        (b"U1\tpriv/k", Change("U", 1)),
        (b"A1\tpriv/k\t-1", Change("A", 1)),
        (b"T1\t1\t0", Change("T", 1)),
        (b"R1", Rollback(1)),
        (b"C1", Commit(1)),
    ],
)
def test_parse_command(line: bytes, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    "line",
    [
        b"X",
        b"",
        b"D1",
        b"Bx\t",
        b"B\t",
        b"S1\tk",
        b"U1",
        b"A1\tk",
        b"T1\t1",
        b"I0",
        b"Ix\t0\tp\t",
        b"I0\t-1\tp\t",
        b"H3\t2",
    ],
)
def test_parse_refuses(line: bytes) -> None:
    """What Dovecot's server disconnects on, as far as one line tells (transaction state is the session's)."""
    with pytest.raises(BadRequest):
        parse_command(line)


@pytest.mark.parametrize(
    ("key", "target"),
    [
        ("shared/passdb/alice@example.com", RecordKey("passdb", "alice@example.com")),
        ("shared/userdb/sub/child", RecordKey("userdb", "sub/child")),
        ("shared/mailbox/a@b", MapKey("mailbox", "a@b")),
        ("shared/quota/a/b", MapKey("quota", "a/b")),
        ("shared/alias/", None),
        ("shared/other/x", None),
        ("priv/passdb/alice", None),
        ("shared", None),
        ("", None),
        ("shared/userdb/j\udcfcrgen", None),
    ],
)
def test_parse_key(key: str, target: object) -> None:
    assert parse_key(key) == target


def test_record_json() -> None:
    record = UserFields("alice@example.com", (("uid", "5000"), ("home", "/h"), ("uid", "5001")))
    assert json.loads(record_json(record, "alice@example.com")) == {"uid": "5001", "home": "/h"}
    assert json.loads(record_json(record, "Alice")) == {"uid": "5001", "home": "/h", "user": "alice@example.com"}
    renamed = UserFields("alice", (("user", "explicit"),))
    assert json.loads(record_json(renamed, "x")) == {"user": "explicit"}


def test_encoders() -> None:
    assert encode_value(Found("a\tb")) == b"Oa\x01tb\n"
    assert encode_value(NOT_FOUND) == b"N\n"
    assert encode_value(TempFail("x\ny")) == b"Fx\x01ny\n"
    assert encode_value(PermFail("bad")) == b"Fbad\n"
    assert encode_record(UserFields("u", (("k", "v"),)), "u") == b'O{"k":"v"}\n'
    assert encode_record(NOT_FOUND, "u") == b"N\n"
    assert encode_record(TempFail("down"), "u") == b"Fdown\n"


# Sessions.


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("size", WRITE_SIZES)
@pytest.mark.parametrize("case", GOLDEN["transcripts"], ids=lambda c: c["name"])
def test_transcript(case: dict[str, Any], size: int) -> None:
    async def main() -> None:
        async with serve(session()) as path:
            client = await Client.connect(path)
            for index, step in enumerate(case["steps"]):
                await client.send(*([HELLO] if index == 0 else []), *step["send"], size=size)
                assert await client.lines(len(step["expect"])) == step["expect"]
            client.writer.write_eof()
            assert await client.rest() == b""
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("case", GOLDEN["closes"], ids=lambda c: c["name"])
def test_protocol_errors_close(case: dict[str, Any]) -> None:
    async def main() -> None:
        async with serve(session()) as path:
            client = await Client.connect(path)
            await client.send(HELLO, *case["send"])
            assert await client.rest() == "".join(line + "\n" for line in case["expect"]).encode()
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
@pytest.mark.parametrize("lines", GOLDEN["handshake_errors"], ids=repr)
def test_handshake_errors_close(lines: list[str]) -> None:
    async def main() -> None:
        async with serve(session()) as path:
            client = await Client.connect(path)
            await client.send(*lines)
            assert await client.rest() == b""
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_hello_gets_no_reply() -> None:
    async def main() -> None:
        async with serve(session()) as path:
            client = await Client.connect(path)
            assert await client.silent(0.2)  # the server does not speak first either
            await client.send(HELLO)
            assert await client.silent(0.3)
            await client.send("Lshared/alias/x@example.com\t")
            assert await client.line() == "Oalias:x@example.com"
            assert await client.silent(0.2)
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_dict_name_selects_the_directory() -> None:
    async def main() -> None:
        services = {"auth": FakeDirectory(name="a-"), "other": FakeDirectory(name="b-")}
        async with serve(lambda: DovecotDictSession(services)) as path:
            first, second = await Client.connect(path), await Client.connect(path)
            await first.send("H3\t2\t0\t\tauth", "Lshared/domain/example.com\t")
            await second.send("H3\t2\t0\t\tother", "Lshared/domain/example.com\t")
            assert await first.line() == "Oa-domain:example.com"
            assert await second.line() == "Ob-domain:example.com"
            first.close()
            second.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_replies_wait_for_the_slow_one_ahead() -> None:
    async def main() -> None:
        directory = FakeDirectory()
        async with serve(session(directory)) as path:
            client = await Client.connect(path)
            await client.send(
                HELLO,
                "Lshared/mailbox/slow@example.com\t",
                "Lshared/mailbox/hit@example.com\t",
                "I8\t1\tshared/userdb/\t",
                "B1\t",
                "C1",
                "Lshared/userdb/bob@example.com\t",
            )
            assert await client.silent(0.2)
            directory.release.set()
            assert await client.lines(6) == [
                "Omailbox:slow@example.com",
                "Ocached:hit@example.com",
                "Oshared/userdb/bob@example.com\t",
                "",
                "F1\tmailroster's dict is read-only",
                'O{"uid":"5001"}',
            ]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_iteration_finishes_before_anything_after_it() -> None:
    async def main() -> None:
        directory = FakeDirectory()
        directory.userdb_delay = 0.02
        async with serve(session(directory)) as path:
            client = await Client.connect(path)
            await client.send(HELLO, "I0\t0\tshared/userdb/\t", "Lshared/mailbox/hit@example.com\t")
            lines = await client.lines(5)
            assert [line.split("\t")[0] for line in lines] == [
                "Oshared/userdb/bob@example.com",
                "Oshared/userdb/alice@example.com",
                "Oshared/userdb/nofields@example.com",
                "",
                "Ocached:hit@example.com",
            ]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_iteration_failure_is_an_f_line() -> None:
    async def main() -> None:
        directory = FakeDirectory()
        directory.list_fail_at = 2
        async with serve(session(directory)) as path:
            client = await Client.connect(path)
            await client.send(HELLO, "I8\t0\tshared/userdb/\t", "Lshared/alias/a\t")
            assert await client.lines(4) == [
                "Oshared/userdb/bob@example.com\t",
                "Oshared/userdb/alice@example.com\t",
                "FLDAP server down",
                "Oalias:a",
            ]
            # A userdb fault for one listed user ends the iteration the same way.
            directory.list_fail_at = None
            directory.listed = ["bob@example.com", "down@example.com", "alice@example.com"]
            await client.send("I0\t0\tshared/userdb/\t")
            assert await client.lines(2) == ['Oshared/userdb/bob@example.com\t{"uid":"5001"}', "Fdirectory unavailable"]
            assert await client.silent()
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_long_iteration_streams() -> None:
    async def main() -> None:
        listed = [f"user{i:05d}@example.com" for i in range(20000)]
        async with serve(session(FakeDirectory(listed))) as path:
            client = await Client.connect(path)
            await client.send(HELLO, "I8\t0\tshared/userdb/\t", "Lshared/alias/a\t")
            await asyncio.sleep(0.2)  # nobody reads for a while: the server must wait, not pile up
            lines = await client.lines(len(listed) + 2)
            assert lines[:-2] == [f"Oshared/userdb/{user}\t" for user in listed]
            assert lines[-2:] == ["", "Oalias:a"]
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_iteration_lookups_run_a_window_at_a_time() -> None:
    async def main() -> None:
        listed = [f"user{i}@example.com" for i in range(64)]
        directory = FakeDirectory(listed)
        directory.userdb_delay = 0.05
        async with serve(session(directory)) as path:
            client = await Client.connect(path)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await client.send(HELLO, "I0\t0\tshared/userdb/\t")
            assert await client.line() == ""  # none of them has a record: no rows
            # 64 lookups of 50 ms, 16 at a time: about 0.2 s, not 3.2 s.
            assert loop.time() - start < 1.5
            assert len(directory.calls) == 64
            client.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_line_limit() -> None:
    async def main() -> None:
        async with serve(session()) as path:
            good, bad = await Client.connect(path), await Client.connect(path)
            key = "Lshared/alias/"
            longest = key + "k" * (dovecot_dict.MAX_LINE - 1 - len(key) - 1) + "\t"
            await good.send(HELLO, longest)
            assert (await good.line()).startswith("Oalias:kkk")
            await bad.send(HELLO, longest + "x")
            assert await bad.rest(2) == b""
            await good.send("Lshared/alias/a\t")
            assert await good.line() == "Oalias:a"
            good.close()
            bad.close()

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_observer_and_busy() -> None:
    async def main() -> None:
        directory = FakeDirectory()
        observer = Observer()
        factory = Kept(lambda: DovecotDictSession({"auth": directory}, observer))
        sessions = factory.sessions
        async with serve(factory) as path:
            client = await Client.connect(path)
            await client.send(HELLO, "Lshared/mailbox/hit@example.com\t")
            assert await client.line() == "Ocached:hit@example.com"
            assert observer.events == ["opened"]  # answered at once: the connection was never busy
            await client.send("Lshared/mailbox/slow@example.com\t")
            await asyncio.sleep(0.05)
            assert sessions[0].busy
            directory.release.set()
            assert await client.line() == "Omailbox:slow@example.com"
            assert not sessions[0].busy
            assert observer.events == ["opened", "idle"]
            client.writer.write_eof()
            assert await client.rest() == b""
            await asyncio.sleep(0.05)
            assert observer.events == ["opened", "idle", "closed"]
            client.close()

    run(main())


# Real clients: doveadm, and a private Dovecot whose passdb and userdb are this dict (installed by .ci/run).


@pytest.mark.usefixtures("loop_kind")
def test_doveadm_dict() -> None:
    doveadm = require_tool("doveadm")

    async def main() -> None:
        async with serve(session()) as path:
            uri = f"proxy:{path}:auth"
            get = (doveadm, "-c", "/dev/null", "dict", "get", uri)
            rc, out = await command(*get, "shared/passdb/alice@example.com")
            assert rc == 0
            assert json.loads(out) == {"password": "{PLAIN}secret", "allow_nets": "192.0.2.0/24"}
            rc, out = await command(*get, "shared/recipient/tab@example.com")
            assert (rc, out.rstrip(" \n")) == (0, "a\tb\nc")
            assert (await command(*get, "shared/passdb/nobody@example.com"))[0] == 68
            rc, out = await command(*get, "shared/userdb/down@example.com")
            assert rc == 75
            assert "dict-server returned failure: directory unavailable" in out
            rc, out = await command(doveadm, "-c", "/dev/null", "dict", "iter", uri, "shared/userdb/")
            assert rc == 0
            assert out.splitlines()[1:] == [
                'shared/userdb/bob@example.com\t{"uid":"5001"}',
                "shared/userdb/alice@example.com\t" + record_json(USERS["alice@example.com"], "alice@example.com"),
                "shared/userdb/nofields@example.com\t{}",
            ]
            rc, out = await command(doveadm, "-c", "/dev/null", "dict", "set", uri, "shared/x", "y")
            assert rc == 75
            assert "read-only" in out

    run(main())


@pytest.mark.usefixtures("loop_kind")
def test_dovecot_passdb_and_userdb_dict() -> None:
    """PROTOCOLS.md's working 2.3 config: Dovecot authenticates, looks users up and lists them through the dict."""
    doveadm = require_tool("doveadm")
    base = Path(tempfile.mkdtemp(prefix="mrdv", dir="/tmp"))
    base.chmod(0o755)
    socket_path = str(base / "dict")
    dovecot = dict_auth_dovecot(base, f"proxy:{socket_path}:auth", "default_pass_scheme = PLAIN")

    async def main() -> None:
        async with serve(session(), socket_path):
            client = str(dovecot.base_dir / "auth-client")
            userdb = str(dovecot.base_dir / "auth-userdb")
            base_args = (doveadm, "-c", str(dovecot.config))
            rc, out = await command(
                *base_args, "auth", "test", "-x", "rip=192.0.2.7", "-a", client, "alice@example.com", "secret"
            )
            assert rc == 0, out
            rc, out = await command(*base_args, "auth", "test", "-a", client, "alice@example.com", "secret")
            assert rc == 77, out  # allow_nets from the passdb record took effect
            rc, out = await command(
                *base_args, "auth", "test", "-x", "rip=192.0.2.7", "-a", client, "alice@example.com", "wrong"
            )
            assert rc == 77, out
            rc, out = await command(*base_args, "user", "-a", userdb, "-f", "home", "alice@example.com")
            assert (rc, out) == (0, "/var/vmail/example.com/alice\n")
            rc, out = await command(*base_args, "user", "-a", userdb, "nobody@example.com")
            assert rc == 67, out
            rc, out = await command(*base_args, "user", "-a", userdb, "*")
            assert (rc, out.split()) == (0, ["bob@example.com", "alice@example.com", "nofields@example.com"])

    dovecot.start()
    try:
        run(main())
    finally:
        dovecot.stop()
        shutil.rmtree(base, ignore_errors=True)
