"""Smoke tests of the benchmark harness in ``bench/``.

They check that the harness can be trusted, not how fast anything is (speed is measured by ``make bench``, never
asserted in a test): the floor frames and answers socketmap correctly, the load generators (socketmap; Dovecot
auth-client and auth-master) complete requests with zero errors against the floor and a real mailroster, and a
wrong, malformed or missing reply is caught rather than counted as a fast answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level package of the checkout, not part of the installed mailroster
    sys.path.insert(0, str(ROOT))

from bench import auth, floor, loadgen  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench.common import (  # noqa: E402
    EventLoopKind,
    NetstringError,
    Workload,
    netstring,
    run_event_loop,
    uvloop_available,
)
from bench.procs import ServerProcess  # noqa: E402

from conftest import require_tool, unavailable  # noqa: E402

T = TypeVar("T")
LOOP: EventLoopKind = "uvloop" if uvloop_available() else "asyncio"


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds ~100 bytes; pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="mrb-t-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def with_floor(socket_path: Path, maps: floor.Maps, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` while an in-process floor serves ``maps`` on ``socket_path``."""

    async def main() -> T:
        ready = asyncio.Event()
        server = asyncio.create_task(floor.serve(str(socket_path), maps, ready))
        ready_wait = asyncio.create_task(ready.wait())
        await asyncio.wait({server, ready_wait}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        ready_wait.cancel()
        if server.done():
            server.result()  # raises why it could not listen
        assert ready.is_set(), "floor did not start listening"
        try:
            return await body()
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server

    return run_event_loop(main(), LOOP)


def test_loadgen_completes_requests_against_the_floor(sock_dir: Path) -> None:
    path = sock_dir / "floor.sock"
    workload = Workload.mailbox(50)

    async def body() -> loadgen.RoundResult:
        await loadgen.verify_all(str(path), workload)
        return await loadgen.run_round(str(path), workload, 4, warmup=0.05, duration=0.25)

    result = with_floor(path, floor.mailbox_maps(50), body)
    assert result.errors == 0, result.error_samples
    result.raise_for_errors()
    assert result.completed > 0
    assert result.req_per_s > 0
    assert 0 < result.p50_ms <= result.p99_ms
    assert not path.exists(), "the floor removes its socket when it stops"


def test_a_wrong_reply_is_detected(sock_dir: Path) -> None:
    path = sock_dir / "floor.sock"
    workload = Workload.mailbox(10)
    maps = floor.mailbox_maps(10)
    maps[b"mailbox"][b"user7@example.com"] = b"example.com/someone-else/"

    async def body() -> tuple[loadgen.RoundResult, str]:
        with pytest.raises(loadgen.ReplyError) as verify_error:
            await loadgen.verify_all(str(path), workload)
        result = await loadgen.run_round(str(path), workload, 2, warmup=0.0, duration=0.1)
        return result, str(verify_error.value)

    result, verify_message = with_floor(path, maps, body)
    assert "user7@example.com" in verify_message
    assert result.errors > 0
    with pytest.raises(loadgen.ReplyError, match="someone-else"):
        result.raise_for_errors("broken floor")


def test_a_server_that_closes_is_an_error(sock_dir: Path) -> None:
    """A dropped connection must fail the round, not leave it waiting or count as zero-latency replies."""
    path = sock_dir / "floor.sock"
    workload = Workload(requests=(netstring(b"mailbox " + b"x" * 70_000),), replies=(netstring(b"OK x"),))

    result = with_floor(
        path, floor.mailbox_maps(1), lambda: loadgen.run_round(str(path), workload, 1, warmup=0.0, duration=0.1)
    )
    assert result.errors == 1
    assert "closed by the server" in result.error_samples[0]


@pytest.mark.parametrize(
    ("received", "expected"),
    [
        (b"21:OK example.com/user1/,", loadgen.ReplyCheck.MATCH),
        (b"21:OK example.com/user2/,", loadgen.ReplyCheck.MISMATCH),
        (b"9:NOTFOUND ,", loadgen.ReplyCheck.MISMATCH),
        (b"21:OK example.com/user1/", loadgen.ReplyCheck.INCOMPLETE),
        (b"21:OK exa", loadgen.ReplyCheck.INCOMPLETE),
        (b"2", loadgen.ReplyCheck.INCOMPLETE),
        (b"", loadgen.ReplyCheck.INCOMPLETE),
    ],
)
def test_check_reply(received: bytes, expected: loadgen.ReplyCheck) -> None:
    assert loadgen.check_reply(received, b"21:OK example.com/user1/,") is expected


@pytest.mark.parametrize(
    "received",
    [
        b"OK example.com/user1/",  # no netstring at all
        b"21:OK example.com/user1/;",  # wrong terminator
        b"2x:OK",  # bad length
        b"9999999:",  # longer than any reply may be
        b"21:OK example.com/user1/,9:NOTFOUND ,",  # a second, unsolicited reply
    ],
)
def test_check_reply_rejects_broken_streams(received: bytes) -> None:
    with pytest.raises(NetstringError):
        loadgen.check_reply(received, b"21:OK example.com/user1/,")


def test_floor_framing(sock_dir: Path) -> None:
    """Pipelined requests in one write, a request split byte by byte, and refusal of garbage."""
    path = sock_dir / "floor.sock"
    requests = [b"mailbox user1@example.com", b"mailbox nobody@example.com", b"alias user1@example.com", b"mailbox"]
    replies = b"21:OK example.com/user1/,9:NOTFOUND ,16:PERM unknown map,23:PERM request has no key,"

    async def exchange(data: bytes, chunk: int) -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(path))
        with contextlib.suppress(ConnectionError):  # the floor may close before we are done writing garbage
            for i in range(0, len(data), chunk):
                writer.write(data[i : i + chunk])
                await writer.drain()
                await asyncio.sleep(0)
            writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return reply

    async def body() -> list[bytes]:
        pipelined = b"".join(netstring(r) for r in requests)
        return [
            await exchange(pipelined, len(pipelined)),
            await exchange(pipelined, 1),
            await exchange(b"999999:mailbox", 100),  # announces more than 64 KiB: closed at once, no waiting
            await exchange(b"99999999:", 100),  # a length no request can have
            await exchange(b"5:hello;5:mailbox", 100),  # bad terminator
            await exchange(b"hello", 100),
        ]

    answers = with_floor(path, floor.mailbox_maps(2), body)
    assert answers == [replies, replies, b"", b"", b"", b""]


def test_run_orchestrates_an_a_a_round() -> None:
    """``bench.run`` end to end with a second floor in mailroster's place: servers start, the table is printed."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--floor-vs-floor",
            "--users",
            "20",
            "--conns",
            "1,4",
            "--warmup",
            "0.05",
            "--duration",
            "0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["1"], ["4"])]
    assert [row[:2] for row in rows] == [["1", "floor-b"], ["1", "floor"], ["4", "floor-b"], ["4", "floor"]]


# The Dovecot auth load generators (bench/auth.py).

AUTH_CLIENT_HANDSHAKE = (
    b"VERSION\t1\t2\nMECH\tPLAIN\tplaintext\nMECH\tLOGIN\tplaintext\nSPID\t42\nCUID\t1\n"
    b"COOKIE\t0123456789abcdef0123456789abcdef\nDONE\n"
)
AUTH_MASTER_HANDSHAKE = b"VERSION\t1\t1\nSPID\t42\n"
MAILROSTER = Path(sys.executable).parent / "mailroster"


def require_mailroster() -> None:
    """The installed mailroster script; skip without it, fail under CI=true (as conftest.require_tool)."""
    if not MAILROSTER.exists():
        unavailable(f"{MAILROSTER} is not installed")


def test_parse_handshake_answers_as_lib_auth() -> None:
    answer, end = auth.parse_handshake("auth-client", AUTH_CLIENT_HANDSHAKE) or (b"", 0)
    assert end == len(AUTH_CLIENT_HANDSHAKE)
    assert answer == b"VERSION\t1\t2\nCPID\t%d\n" % os.getpid()
    assert auth.parse_handshake("auth-master", AUTH_MASTER_HANDSHAKE) == (
        b"VERSION\t1\t0\n",
        len(AUTH_MASTER_HANDSHAKE),
    )
    assert auth.parse_handshake("auth-client", AUTH_CLIENT_HANDSHAKE[:-3]) is None  # DONE not complete yet
    assert auth.parse_handshake("auth-master", b"VERSION\t1\t1\nSP") is None


@pytest.mark.parametrize(
    ("kind", "handshake", "message"),
    [
        ("auth-client", b"VERSION\t2\t0\nMECH\tPLAIN\nSPID\t1\nCUID\t1\nCOOKIE\tx\nDONE\n", "VERSION 1"),
        ("auth-client", b"VERSION\t1\t2\nSPID\t1\nMECH\tPLAIN\nCUID\t1\nCOOKIE\tx\nDONE\n", "SPID before MECH"),
        ("auth-client", b"VERSION\t1\t2\nMECH\tLOGIN\nSPID\t1\nCUID\t1\nCOOKIE\tx\nDONE\n", "PLAIN"),
        ("auth-client", b"VERSION\t1\t2\nMECH\tPLAIN\nSPID\t1\nCUID\t1\nDONE\n", "COOKIE"),
        ("auth-master", AUTH_CLIENT_HANDSHAKE, "VERSION, SPID"),  # the auth-client socket is not auth-master
    ],
)
def test_parse_handshake_rejects_the_wrong_server(kind: auth.HandshakeKind, handshake: bytes, message: str) -> None:
    with pytest.raises(loadgen.ReplyError, match=message):
        auth.parse_handshake(kind, handshake)


def test_line_workloads_are_the_wire_lines() -> None:
    plain = auth.LineWorkload.plain_auth([("alice", "secret"), ("bob", "pw")])
    assert len(plain) == 2
    assert plain.request(0, 7) == b"AUTH\t7\tPLAIN\tservice=smtp\tresp=AGFsaWNlAHNlY3JldA==\n"
    assert plain.reply(1, 8) == b"OK\t8\tuser=bob\n"
    userdb = auth.LineWorkload.userdb([("alice", auth.userdb_fields("alice"))])
    assert userdb.request(0, 3) == b"USER\t3\talice\tservice=lmtp\n"
    assert userdb.reply(0, 3) == (
        b"USER\t3\talice\tuid=5000\tgid=5000\thome=/srv/vmail/example.com/alice\tmail=maildir:~/Maildir\n"
    )
    assert auth.tab_escape("a\tb\x01c\n") == b"a\x01tb\x011c\x01n"


def with_line_server(
    socket_path: Path, handshake: bytes, answer: Callable[[bytes], bytes], body: Callable[[], Awaitable[T]]
) -> T:
    """Run ``body`` while a fake Dovecot-like server on ``socket_path`` sends ``handshake`` and answers every line
    it reads after the client's own handshake lines with ``answer(line)``.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(handshake)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                if not line.startswith((b"VERSION\t", b"CPID\t")):
                    writer.write(answer(line))
        writer.close()

    async def main() -> T:
        server = await asyncio.start_unix_server(handle, str(socket_path))
        try:
            return await body()
        finally:
            server.close()

    return run_event_loop(main(), LOOP)


def test_a_reply_to_another_request_id_is_detected(sock_dir: Path) -> None:
    path = sock_dir / "fake.sock"
    workload = auth.LineWorkload.plain_auth([("alice", "secret")])

    def answer(line: bytes) -> bytes:
        request_id = int(line.split(b"\t")[1])
        return b"OK\t%d\tuser=alice\n" % (request_id + (request_id == 3))  # the third reply carries id 4

    async def body() -> loadgen.RoundResult:
        return await auth.run_round(str(path), workload, 1, warmup=0.0, duration=0.1)

    result = with_line_server(path, AUTH_CLIENT_HANDSHAKE, answer, body)
    assert result.errors == 1, result.error_samples
    assert "expected b'OK\\t3\\tuser=alice\\n' got b'OK\\t4\\tuser=alice\\n'" in result.error_samples[0]
    with pytest.raises(loadgen.ReplyError):
        result.raise_for_errors()


def test_a_wrong_handshake_fails_the_connection(sock_dir: Path) -> None:
    """Connecting the auth-client load generator to an auth-master socket fails at once, not with a timeout."""
    path = sock_dir / "fake.sock"
    workload = auth.LineWorkload.plain_auth([("alice", "secret")])

    async def body() -> None:
        await auth.run_round(str(path), workload, 2, warmup=0.0, duration=0.1)

    with pytest.raises(loadgen.ReplyError, match="SPID before MECH"):
        with_line_server(path, AUTH_MASTER_HANDSHAKE, lambda line: b"", body)


@pytest.fixture(scope="module")
def bench_mailroster() -> Iterator[tuple[ServerProcess, Path]]:
    """A real ``mailroster serve`` with the benchmark's own configuration (bench.run.mailroster_config): 20 users
    with {PLAIN} secrets behind dovecot-auth and dovecot-master listeners, and 2 uncached SHA512-CRYPT users.
    """
    require_mailroster()
    tmpdir = Path(tempfile.mkdtemp(prefix="mrb-t-", dir="/tmp"))
    (tmpdir / "conf").mkdir()
    slow_secret = bench_run.mailroster_hash(MAILROSTER, "SHA512-CRYPT", bench_run.SLOW_PASSWORD)
    (tmpdir / "conf" / "bench.toml").write_text(
        bench_run.mailroster_config(tmpdir, 20, accounts=True, slow_secret=slow_secret, slow_users=2)
    )
    server = ServerProcess(
        "mailroster",
        [str(MAILROSTER), "serve", "-c", str(tmpdir / "conf")],
        str(tmpdir / bench_run.MR_AUTH),
        tmpdir / "mailroster.log",
        tmpdir,
        wait_sockets=[str(tmpdir / bench_run.MR_USERDB), str(tmpdir / bench_run.MR_SLOW)],
    )
    try:
        server.start()
        server.wait_listening(30)
        yield server, tmpdir
        server.check_alive()
    finally:
        server.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


def test_auth_loadgen_against_mailroster(bench_mailroster: tuple[ServerProcess, Path]) -> None:
    server, tmpdir = bench_mailroster
    plain, userdb = auth.plain_workload(20), auth.userdb_workload(20)

    async def body() -> tuple[loadgen.RoundResult, loadgen.RoundResult]:
        await auth.verify_all(str(tmpdir / bench_run.MR_AUTH), plain)
        await auth.verify_all(str(tmpdir / bench_run.MR_USERDB), userdb)
        server.refresh_pids()
        logins = await auth.run_round(
            str(tmpdir / bench_run.MR_AUTH), plain, 4, warmup=0.05, duration=0.25, server_cpu=server.cpu_seconds
        )
        lookups = await auth.run_round(str(tmpdir / bench_run.MR_USERDB), userdb, 4, warmup=0.05, duration=0.25)
        return logins, lookups

    for result in run_event_loop(body(), LOOP):
        assert result.errors == 0, result.error_samples
        result.raise_for_errors()
        assert result.completed > 0
        assert 0 < result.p50_ms <= result.p99_ms
    server.check_alive()


def test_wrong_auth_and_userdb_replies_are_detected(bench_mailroster: tuple[ServerProcess, Path]) -> None:
    _, tmpdir = bench_mailroster
    wrong_password = auth.LineWorkload.plain_auth([(auth.login(i), auth.password(i)) for i in range(3)] + [
        (auth.login(3), "not-the-password")
    ])  # fmt: skip
    wrong_home = auth.LineWorkload.userdb([("user1", (("uid", "5000"), ("gid", "5000"), ("home", "/elsewhere")))])

    async def body() -> tuple[str, str, loadgen.RoundResult, loadgen.RoundResult]:
        with pytest.raises(loadgen.ReplyError) as auth_error:
            await auth.verify_all(str(tmpdir / bench_run.MR_AUTH), wrong_password)
        with pytest.raises(loadgen.ReplyError) as userdb_error:
            await auth.verify_all(str(tmpdir / bench_run.MR_USERDB), wrong_home)
        logins = await auth.run_round(str(tmpdir / bench_run.MR_AUTH), wrong_password, 2, warmup=0.0, duration=0.1)
        lookups = await auth.run_round(str(tmpdir / bench_run.MR_USERDB), wrong_home, 1, warmup=0.0, duration=0.1)
        return str(auth_error.value), str(userdb_error.value), logins, lookups

    auth_message, userdb_message, logins, lookups = run_event_loop(body(), LOOP)
    assert "1 of 4 replies wrong" in auth_message
    assert "got b'FAIL\\t" in auth_message
    assert "home=/srv/vmail/example.com/user1" in userdb_message
    for result in (logins, lookups):
        assert result.errors > 0
        with pytest.raises(loadgen.ReplyError):
            result.raise_for_errors()


def test_background_load_runs_beside_a_round(bench_mailroster: tuple[ServerProcess, Path]) -> None:
    """The burst part's shape: uncached slow-hash logins in the background while a socketmap round runs."""
    _, tmpdir = bench_mailroster
    slow = auth.LineWorkload.plain_auth([(bench_run.slow_login(i), bench_run.SLOW_PASSWORD) for i in range(2)])

    async def body() -> tuple[loadgen.RoundResult, loadgen.RoundResult]:
        burst = auth.BackgroundLoad(str(tmpdir / bench_run.MR_SLOW), slow, 2)
        await burst.start()
        try:
            lookups = await loadgen.run_round(
                str(tmpdir / bench_run.MR_SOCKETMAP), Workload.mailbox(20), 2, warmup=0.05, duration=0.25
            )
        finally:
            logins = await burst.stop()
        return lookups, logins

    lookups, logins = run_event_loop(body(), LOOP)
    for result in (lookups, logins):
        assert result.errors == 0, result.error_samples
        assert result.completed > 0


def test_run_orchestrates_the_dovecot_parts() -> None:
    """``bench.run`` end to end against a real Dovecot: every auth part runs and prints its table."""
    require_mailroster()
    require_tool("dovecot")
    require_tool("doveadm")
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick", "--only", "auth,userdb,crypt,burst", "--users", "20",
            "--auth-conns", "2", "--userdb-conns", "2", "--crypt-conns", "2", "--crypt-users", "3",
            "--burst-conns", "2", "--burst-lookup-conns", "1", "--burst-scheme", "SHA512-CRYPT",
            "--warmup", "0.05", "--duration", "0.1",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    titles = [line.split(":", 1)[0] for line in proc.stdout.splitlines() if line.split(":", 1)[0] in bench_run.PARTS]
    assert titles == ["auth", "userdb", "crypt", "burst"]
    rows = [line.split()[:2] for line in proc.stdout.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert rows == [["2", "mailroster"], ["2", "dovecot"]] * 3 + [["1", "burst"], ["1", "no-burst"]]
    assert "crypt, 2 conns: mailroster / dovecot logins/s" in proc.stdout
    assert "socketmap p99 at 1 conns:" in proc.stdout


def test_run_orchestrates_the_internal_part() -> None:
    """``bench.run --only internal`` end to end with tiny databases: built, served cache-off, every reply right."""
    require_mailroster()
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick", "--only", "internal", "--internal-sizes", "100,1000",
            "--internal-keys", "50", "--warmup", "0.05", "--duration", "0.2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERRORS" not in proc.stderr
    assert "internal 100: 8 keys answered correctly" in proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["8"]]
    assert [row[:2] for row in rows] == [["8", "100"], ["8", "1k"]]
    assert all(float(row[2]) > 0 for row in rows)  # req/s: lookups completed, none wrong (a wrong one fails the run)
    assert "CPU per lookup at 1k / at 100" in proc.stdout


def test_run_orchestrates_the_external_part() -> None:
    """``bench.run --only external`` end to end with 50 users: PostgreSQL, MariaDB and slapd started and loaded,
    each served cache-off through the shipped example, every reply right.
    """
    require_mailroster()
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.run", "--quick", "--only", "external", "--users", "50",
            "--warmup", "0.05", "--duration", "0.2",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERRORS" not in proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["8"]]
    if len(rows) < 3:
        unavailable("not every database server is installed here:\n" + proc.stdout)
    assert [row[:2] for row in rows] == [["8", "postgresql"], ["8", "mariadb"], ["8", "ldap"]]
    assert all(float(row[2]) > 0 for row in rows)  # req/s: lookups completed, none wrong (a wrong one fails the run)
    assert " skipped: " not in proc.stdout + proc.stderr
