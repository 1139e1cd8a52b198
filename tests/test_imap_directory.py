"""The IMAP directory (backends/imap.py) against a real private Dovecot IMAP server: good, wrong and unknown
credentials, AUTHENTICATE PLAIN (with and without SASL-IR) and LOGIN, the pool, a stopped and a silent server, the
questions it cannot answer, the configuration, and one end-to-end check through the daemon with ``doveadm auth test``.

Every directory is built from conf.d/examples/imap.toml through the real configuration loader, with the fixture's
host and port (and, per test, a few more keys) merged over it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pytest

from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.imap import ImapConnection, ImapDirectory, ImapDirectoryConfig
from mailroster.backends.model import PrincipalType
from mailroster.daemon import config as config_module
from mailroster.daemon.config import ConfigError

from conftest import RunningDaemon, free_port, require_tool, server_toml, wait_for_socket
from servers import PrivateDovecot

EXAMPLE = Path(__file__).resolve().parent.parent / "conf.d" / "examples" / "imap.toml"
PASSWORD = "Jane-Secret-42"
ODD_PASSWORD = 'qu"o\\te sp ä-ß'  # a quote, a backslash, spaces and 8-bit: LOGIN sends it as a literal
USERS = {"jane@example.org": PASSWORD, "odd@example.org": ODD_PASSWORD, "bob": "Bob-Secret-7"}

Overrides = dict[str, object]


class Dovecot(PrivateDovecot):
    """A private Dovecot serving IMAP on 127.0.0.1:``port``, users from a passwd-file, logins case-insensitive."""

    def __init__(self, base: Path, *, tls_port: int = 0, tls: str = "") -> None:
        """``tls_port`` (0: none) is the implicit-TLS listener; ``tls`` the ssl settings."""
        self.port = free_port()
        users = base / "users"
        base.mkdir(parents=True, exist_ok=True)
        users.write_text("".join(f"{name}:{{PLAIN}}{password}::::::\n" for name, password in USERS.items()))
        home = base / "home"
        home.mkdir(exist_ok=True)
        shutil.chown(home, 65534, 65534)
        super().__init__(
            base,
            "protocols = imap\n"
            "auth_username_format = %Lu\n"
            "mail_location = maildir:~/Maildir\n"
            "protocol imap {\n  mail_max_userip_connections = 1000\n}\n"
            "service imap-login {\n"
            f"  inet_listener imap {{\n    address = 127.0.0.1\n    port = {self.port}\n  }}\n"
            f"  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {tls_port}\n  }}\n}}\n"
            f"passdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
            f"userdb {{\n  driver = static\n  args = uid=65534 gid=65534 home={home}/%Lu\n}}\n" + tls,
        )

    def start(self, wait_for: str = "auth-userdb") -> Self:
        super().start(wait_for)
        wait_for_socket(("127.0.0.1", self.port), time.monotonic() + 10, self.proc)
        return self


class TlsDovecot(Dovecot):
    """The same, with TLS: STARTTLS on ``port``, implicit TLS on ``tls_port``, a self-signed certificate."""

    def __init__(self, base: Path) -> None:
        require_tool("openssl")
        base.mkdir(parents=True, exist_ok=True)
        cert, key = base / "cert.pem", base / "key.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
             "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        self.tls_port = free_port()
        super().__init__(base, tls_port=self.tls_port, tls=f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    require_tool("dovecot")
    base = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    base.chmod(0o755)
    server = Dovecot(base / "dc")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def load_config(overrides: Overrides) -> Any:
    """The example file with ``overrides`` (dotted keys under ``[directory.imap]``) merged over it."""
    text = "[directory.imap]\n" + "".join(f"{key} = {_toml(value)}\n" for key, value in overrides.items())
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "zz-test.toml"
        path.write_text(text)
        return config_module.load_config([EXAMPLE, path]).directory["imap"]


def server_keys(port: int, **more: object) -> Overrides:
    return {"host": "127.0.0.1", "port": port, "tls.enable": False, "timeout": "5s", **more}


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    """One event loop for the module: pooled connections belong to the loop that opened them."""
    with asyncio.Runner() as loop_runner:
        yield loop_runner


class Directories:
    """Builds IMAP directories on one event loop and closes them at the end of the test."""

    def __init__(self, runner: asyncio.Runner) -> None:
        self.runner = runner
        self.opened: list[ImapDirectory] = []

    def __call__(self, overrides: Overrides) -> ImapDirectory:
        config = load_config(overrides)
        assert isinstance(config, ImapDirectoryConfig)
        directory = ImapDirectory.from_config(config)
        self.opened.append(directory)
        return directory

    def run(self, coro: Awaitable[Any]) -> Any:
        async def wrapped() -> Any:
            return await coro

        return self.runner.run(wrapped())

    def close(self) -> None:
        for directory in self.opened:
            self.runner.run(directory.close())


@pytest.fixture
def directories(runner: asyncio.Runner) -> Iterator[Directories]:
    opened = Directories(runner)
    yield opened
    opened.close()


class Counted:
    """Wraps a directory's pool: connections opened in all, open now, and the most open at once."""

    def __init__(self, directory: ImapDirectory) -> None:
        pool = directory._pool
        self.created = self.open = self.peak = 0
        create: Callable[[], Awaitable[ImapConnection]] = pool._create
        close: Callable[[ImapConnection], Awaitable[None]] = pool._close

        async def counting_create() -> ImapConnection:
            conn = await create()
            self.created += 1
            self.open += 1
            self.peak = max(self.peak, self.open)
            return conn

        async def counting_close(conn: ImapConnection) -> None:
            self.open -= 1
            await close(conn)

        pool._create = counting_create
        pool._close = counting_close


# Credentials.


def test_right_password_is_the_login_principal(
    dovecot: Dovecot, directories: Directories, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    directory = directories(server_keys(dovecot.port))
    principal = directories.run(directory.verify_password("jane@example.org", PASSWORD))
    assert principal is not None
    assert principal.name == "jane@example.org"
    assert principal.type is PrincipalType.INDIVIDUAL
    assert principal.emails == ("jane@example.org",)
    bob = directories.run(directory.verify_password("bob", "Bob-Secret-7"))
    assert bob is not None and bob.name == "bob" and bob.emails == ()
    assert PASSWORD not in caplog.text and "Bob-Secret-7" not in caplog.text


def test_mixed_case_login(dovecot: Dovecot, directories: Directories) -> None:
    directory = directories(server_keys(dovecot.port))
    principal = directories.run(directory.verify_password("Jane@Example.ORG", PASSWORD))
    assert principal is not None
    assert principal.name == "jane@example.org"
    assert principal.emails == ("jane@example.org",)


def test_wrong_password_and_unknown_user_are_the_same_none(
    dovecot: Dovecot,
    directories: Directories,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    directory = directories(server_keys(dovecot.port))
    assert directories.run(directory.verify_password("jane@example.org", "Wrong-Secret-1")) is None
    assert directories.run(directory.verify_password("nobody@example.org", PASSWORD)) is None
    assert directories.run(directory.verify_password("jane@example.org", PASSWORD.lower())) is None
    assert "Wrong-Secret-1" not in caplog.text and PASSWORD not in caplog.text


def test_empty_password_never_asks_the_server(directories: Directories) -> None:
    directory = directories(server_keys(1))  # nothing listens on port 1: asking would be a TemporaryFailure
    counted = Counted(directory)
    assert directories.run(directory.verify_password("jane@example.org", "")) is None
    assert directories.run(directory.verify_password("", PASSWORD)) is None
    assert directories.run(directory.verify_password("jane@example.org", "a\0b")) is None
    assert counted.created == 0


@pytest.mark.parametrize("mechanism", ["plain-sasl-ir", "plain-continuation", "login"])
def test_every_login_command(dovecot: Dovecot, directories: Directories, mechanism: str) -> None:
    """Dovecot offers AUTH=PLAIN and SASL-IR; hiding them from the client drives the other two paths."""
    directory = directories(server_keys(dovecot.port))
    hidden = {"plain-sasl-ir": set(), "plain-continuation": {"SASL-IR"}, "login": {"AUTH=PLAIN"}}[mechanism]
    pool = directory._pool
    create = pool._create

    async def hiding_create() -> ImapConnection:
        conn = await create()
        assert {"AUTH=PLAIN", "SASL-IR"} <= conn.capabilities
        conn.capabilities -= hidden
        return conn

    pool._create = hiding_create
    counted = Counted(directory)
    run = directories.run
    assert run(directory.verify_password("odd@example.org", ODD_PASSWORD)) is not None
    assert run(directory.verify_password("odd@example.org", ODD_PASSWORD[:-1])) is None
    assert run(directory.verify_password("Bob", "Bob-Secret-7")) is not None
    assert run(directory.verify_password("bob", "bob-secret-7")) is None
    assert run(directory.verify_password("jane@example.org", "\"'\\ {3}\r\n")) is None
    assert run(directory.verify_password("jane@example.org", PASSWORD)) is not None
    assert counted.created == 3  # one per success; the failures reused the connection


# The pool.


def test_pool_reuses_connections_after_failures(dovecot: Dovecot, directories: Directories) -> None:
    directory = directories(server_keys(dovecot.port))
    counted = Counted(directory)
    for i in range(3):  # Dovecot answers each failure after 0.5s, whatever auth_failure_delay says
        assert directories.run(directory.verify_password("jane@example.org", f"wrong-{i}")) is None
    assert counted.created == 1 and directory.pool_size == 1
    assert directories.run(directory.verify_password("jane@example.org", PASSWORD)) is not None
    assert directory.pool_size == 0  # logged in: logged out and closed, never reused
    assert directories.run(directory.verify_password("jane@example.org", "wrong")) is None
    assert counted.created == 2


def test_pool_bounds_concurrent_logins(dovecot: Dovecot, directories: Directories) -> None:
    directory = directories(server_keys(dovecot.port, **{"pool.max-connections": 3}))
    counted = Counted(directory)
    attempts = [("jane@example.org", PASSWORD if i % 3 == 0 else f"wrong-{i}") for i in range(15)]

    async def all_at_once() -> list[object]:
        return await asyncio.gather(*(directory.verify_password(login, pw) for login, pw in attempts))

    results = directories.run(all_at_once())
    assert [r is not None for r in results] == [i % 3 == 0 for i in range(15)]
    assert counted.peak == 3
    assert counted.created <= 5 + 3  # a new connection after each of the 5 successes, at most


# Server faults.


def test_silent_server_is_a_temporary_failure_within_the_timeout(directories: Directories) -> None:
    async def scenario() -> float:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # reads until the client gives up, says nothing
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        directory = directories(server_keys(port, timeout="1s"))
        started = time.monotonic()
        try:
            with pytest.raises(TemporaryFailure) as failure:
                await directory.verify_password("jane@example.org", PASSWORD)
        finally:
            server.close()
        assert PASSWORD not in str(failure.value)
        return time.monotonic() - started

    elapsed = directories.run(scenario())
    assert 0.9 < elapsed < 2.5


def test_server_that_greets_with_bye(directories: Directories) -> None:
    async def scenario() -> str:
        async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"* BYE Too many connections\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(bye, "127.0.0.1", 0)
        directory = directories(server_keys(server.sockets[0].getsockname()[1]))
        try:
            with pytest.raises(TemporaryFailure) as failure:
                await directory.verify_password("jane@example.org", PASSWORD)
        finally:
            server.close()
        return str(failure.value)

    assert "Too many connections" in directories.run(scenario())


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [
        (b"NO [UNAVAILABLE] Temporary authentication failure.", True),
        (b"NO [SERVERBUG] Internal error", True),
        (b"BAD Error in IMAP command", True),
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", False),
        (b"NO Login failed", False),
        (b"OK [CAPABILITY IMAP4rev1] Logged in", None),
    ],
)
def test_scripted_server_replies(directories: Directories, reply: bytes, temporary: bool | None) -> None:
    """A scripted server, for the replies Dovecot will not give on demand; it echoes nothing of the password."""

    async def scenario() -> object:
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"* OK ready\r\n")
            while line := await reader.readline():
                tag, _, command = line.decode().partition(" ")
                if command.startswith("CAPABILITY"):
                    writer.write(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n" + tag.encode() + b" OK done\r\n")
                elif command.startswith("AUTHENTICATE"):
                    writer.write(tag.encode() + b" " + reply + b"\r\n")
                elif command.startswith("LOGOUT"):
                    break
            writer.close()

        server = await asyncio.start_server(script, "127.0.0.1", 0)
        directory = directories(server_keys(server.sockets[0].getsockname()[1]))
        try:
            return await directory.verify_password("jane@example.org", PASSWORD)
        except TemporaryFailure as exc:
            assert PASSWORD not in str(exc)
            return exc
        finally:
            server.close()

    result = directories.run(scenario())
    if temporary is None:
        assert result is not None and not isinstance(result, TemporaryFailure)
    else:
        assert isinstance(result, TemporaryFailure) is temporary
        assert temporary or result is None


def test_dovecot_stopped_then_started_again(dovecot: Dovecot, directories: Directories) -> None:
    directory = directories(server_keys(dovecot.port, timeout="2s"))
    assert directories.run(directory.verify_password("jane@example.org", "wrong")) is None  # one idle connection
    dovecot.stop()
    try:
        for _ in range(2):  # the idle connection fails its NOOP, then no new one can be opened
            started = time.monotonic()
            with pytest.raises(TemporaryFailure) as failure:
                directories.run(directory.verify_password("jane@example.org", PASSWORD))
            assert time.monotonic() - started < 2.5
            assert PASSWORD not in str(failure.value)
    finally:
        dovecot.start()
    assert directories.run(directory.verify_password("jane@example.org", PASSWORD)) is not None


# TLS.


@pytest.fixture(scope="module")
def tls_dovecot() -> Iterator[TlsDovecot]:
    require_tool("dovecot")
    base = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    base.chmod(0o755)
    server = TlsDovecot(base / "dc")
    try:
        yield server.start()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize(("implicit", "allow_invalid"), [(False, True), (True, True), (False, False), (True, False)])
def test_starttls_and_implicit_tls(
    tls_dovecot: TlsDovecot, directories: Directories, implicit: bool, allow_invalid: bool
) -> None:
    port = tls_dovecot.tls_port if implicit else tls_dovecot.port
    keys = server_keys(port, **{"tls.enable": implicit, "tls.allow-invalid-certs": allow_invalid})
    directory = directories(keys)
    opened: list[ImapConnection] = []
    create = directory._pool._create

    async def keeping_create() -> ImapConnection:
        opened.append(await create())
        return opened[-1]

    directory._pool._create = keeping_create
    if not allow_invalid:  # self-signed: refused, never a fallback to plain text
        with pytest.raises(TemporaryFailure, match="CERTIFICATE_VERIFY_FAILED"):
            directories.run(directory.verify_password("jane@example.org", PASSWORD))
        return
    assert directories.run(directory.verify_password("jane@example.org", "wrong")) is None
    assert directories.run(directory.verify_password("jane@example.org", PASSWORD)) is not None
    assert len(opened) == 1
    assert opened[0].writer.get_extra_info("ssl_object") is not None
    assert "STARTTLS" not in opened[0].capabilities  # asked again after STARTTLS (or never offered on imaps)


# What it cannot answer, and the configuration.


def test_unsupported_questions_are_permanent_failures(directories: Directories) -> None:
    directory = directories(server_keys(1, **{"lookup.domains": ["Example.ORG", "example.net."]}))

    async def listing() -> list[str]:
        return [name async for name in directory.individuals()]

    for question in (
        directory.principal("jane"),
        directory.recipient("jane@example.org"),
        directory.sender_logins("jane@example.org"),
        directory.email_to_names("jane@example.org"),
        listing(),
    ):
        with pytest.raises(PermanentFailure):
            directories.run(question)
    assert directories.run(directory.is_local_domain("example.org"))
    assert directories.run(directory.is_local_domain("EXAMPLE.NET"))
    assert not directories.run(directory.is_local_domain("example.com"))
    assert directory.verifies_passwords


def test_configuration_defaults_and_errors() -> None:
    example = load_config({})
    assert isinstance(example, ImapDirectoryConfig)
    assert (example.host, example.effective_port, example.tls.enable, float(example.timeout)) == (
        "imap.example.org",
        993,
        True,
        10.0,
    )
    assert ImapDirectoryConfig(type="imap", host="h").effective_port == 143
    plain = load_config({"tls.enable": False})
    assert plain.port == 993  # the example sets it: only an absent port follows tls.enable
    cases: list[tuple[Overrides, str]] = [
        ({"host": ""}, "directory.imap: host: required"),
        ({"port": 70000}, "directory.imap: port: 70000 is not a TCP port"),
        ({"timeout": "0s"}, "directory.imap: timeout: must be more than 0s"),
        ({"tls.implicit": True}, "directory.imap.tls.implicit: unknown key"),  # Stalwart v0.6's name
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as error:
            load_config(overrides)
        assert message in str(error.value), str(error.value)


# End to end: the real daemon, its directory the private Dovecot, driven by doveadm.


def test_doveadm_auth_test_through_the_daemon(dovecot: Dovecot, daemon_factory: Callable[..., RunningDaemon]) -> None:
    doveadm = require_tool("doveadm")
    toml = (
        server_toml({"auth": "dovecot-auth"})
        + '[auth]\nmechanisms = ["PLAIN", "LOGIN"]\nfailure-delay = "0s"\n'
        + '[storage]\ndirectory = "imap"\n'
        + f'[directory.imap]\ntype = "imap"\nhost = "127.0.0.1"\nport = {dovecot.port}\ntimeout = "2s"\n'
        + 'lookup.domains = ["example.org"]\n'
    )
    daemon = daemon_factory(toml, wait_for=("auth",))

    def auth_test(user: str, password: str) -> subprocess.CompletedProcess[str]:
        args = [doveadm, "-c", "/dev/null", "auth", "test", "-a", daemon.socket("auth"), user, password]
        return subprocess.run(args, capture_output=True, text=True, timeout=30)

    ok = auth_test("Jane@example.org", PASSWORD)
    assert ok.returncode == 0, ok.stdout + ok.stderr + daemon.log()
    assert "user=jane@example.org" in ok.stdout
    bad = auth_test("jane@example.org", "Wrong-Secret-1")
    assert bad.returncode == 77 and "temp_fail" not in bad.stdout, bad.stdout
    unknown = auth_test("nobody@example.org", PASSWORD)
    assert unknown.returncode == 77 and "temp_fail" not in unknown.stdout, unknown.stdout
    dovecot.stop()
    try:
        down = auth_test("bob", "Bob-Secret-7")  # never checked before: not in the daemon's auth cache
        assert down.returncode == 77
        assert "temp_fail" in down.stdout + down.stderr, down.stdout + down.stderr
    finally:
        dovecot.start()
    assert auth_test("bob", "Bob-Secret-7").returncode == 0
    assert daemon.stop() == 0
    log = daemon.log()
    assert PASSWORD not in log and "Wrong-Secret-1" not in log and "Bob-Secret-7" not in log
