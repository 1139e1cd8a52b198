"""The smtp and lmtp directories against real servers: a private Dovecot LMTP (RCPT) and a private Postfix smtpd
(AUTH through Dovecot SASL, RCPT from its virtual mailbox table), and one end-to-end run of the daemon."""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtplib import SMTPResponse

from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.model import Mailbox, PrincipalType
from mailroster.backends.pool import PoolConfig
from mailroster.backends.remote import RemoteLookupConfig, RemoteTlsConfig
from mailroster.backends.settings import Duration
from mailroster.backends.smtp import (
    SmtpDirectory,
    SmtpDirectoryConfig,
    SmtpLimitsConfig,
    is_safe_address,
    reply_addresses,
)
from mailroster.daemon import config as config_module

from conftest import free_port, server_toml, wait_for_socket
from servers import PrivateDovecot, PrivatePostfix

T = TypeVar("T")

EXAMPLE = Path(__file__).resolve().parent.parent / "conf.d" / "examples" / "lmtp.toml"

PASSWORD = "Zebra-Quartz-9137"  # distinctive: searched for in the logs
USERS = {"alice@example.org": PASSWORD, "bob@example.org": "hunter2", "carol@example.org": "carol-pw"}
INJECTIONS = ("a@b>\r\nRSET", "x\r\nDATA", "a@b>\nRSET", "a b@example.org", "<alice@example.org>", "a\0@b", "")


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(bounded())


def directory(kind: str, port: int, **kwargs: Any) -> SmtpDirectory:
    settings: dict[str, Any] = {
        "timeout": Duration(5),
        "lookup": RemoteLookupConfig(["example.org"]),
        "pool": PoolConfig(max_connections=1),
        **kwargs,
    }
    return SmtpDirectory(SmtpDirectoryConfig(type=kind, host="127.0.0.1", port=port, **settings))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mrsm", dir="/tmp"))
    path.chmod(0o755)  # smtpd (user postfix) must reach Dovecot's auth socket and the texthash file
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dovecot(base: Path) -> Iterator[PrivateDovecot]:
    """LMTP on a loopback port for the lmtp directory, and SASL (auth-client, mode 0666) for Postfix."""
    users = base / "users"
    users.write_text("".join(f"{name}:{{PLAIN}}{pw}:65534:65534::{base}/home/{name}::\n" for name, pw in USERS.items()))
    users.chmod(0o644)
    server = PrivateDovecot(
        base / "dc",
        f"protocols = lmtp\nmail_location = maildir:{base}/mail/%u\n"
        f"passdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
        f"userdb {{\n  driver = passwd-file\n  args = {users}\n}}\n"
        f"service lmtp {{\n  inet_listener lmtp {{\n    address = 127.0.0.1\n    port = {free_port()}\n  }}\n}}\n"
        "service auth {\n  unix_listener auth-client {\n    mode = 0666\n  }\n}\n",
    )
    server.lmtp_port = int(re.findall(r"port = (\d+)", server.config.read_text())[-1])  # type: ignore[attr-defined]
    start_dovecot(server)
    yield server
    server.stop()


def start_dovecot(server: PrivateDovecot) -> None:
    server.start()
    wait_for_socket(("127.0.0.1", server.lmtp_port), time.monotonic() + 20, server.proc)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def postfix(base: Path, dovecot: PrivateDovecot) -> Iterator[PrivatePostfix]:
    mailboxes = base / "vmailbox"
    mailboxes.write_text("".join(f"{name} example.org/{name.split('@')[0]}/\n" for name in USERS))
    mailboxes.chmod(0o644)
    server = PrivatePostfix(
        base / "pf",
        f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {dovecot.base_dir / 'auth-client'}\n"
        "smtpd_sasl_auth_enable = yes\nsmtpd_relay_restrictions = permit_mynetworks, reject\n"
        f"virtual_mailbox_domains = example.org\nvirtual_mailbox_maps = texthash:{mailboxes}\n"
        "virtual_transport = discard:\n",
    )
    server.start()
    yield server
    server.stop()


def lmtp(dovecot: PrivateDovecot, **kwargs: Any) -> SmtpDirectory:
    return directory("lmtp", dovecot.lmtp_port, **kwargs)  # type: ignore[attr-defined]


def connections(postfix: PrivatePostfix) -> int:
    return len(re.findall(r"smtpd\[\d+\]: connect from", postfix.log()))


def wait_connections(postfix: PrivatePostfix, expected: int) -> int:
    """Postfix's log is written by postlogd, a moment later: wait for ``expected`` connections (or give up)."""
    deadline = time.monotonic() + 5
    while (seen := connections(postfix)) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return seen


# LMTP (Dovecot).


def test_lmtp_recipients(dovecot: PrivateDovecot) -> None:
    async def main() -> None:
        mx = lmtp(dovecot)
        try:
            found = await mx.recipient("alice@example.org")
            assert found == Mailbox(("alice@example.org",))
            assert isinstance(found, Mailbox)
            assert found.primaries == ("alice@example.org",)
            assert await mx.recipient("Bob@Example.ORG") == Mailbox(("bob@example.org",))
            assert await mx.recipient("nobody@example.org") is None
            assert await mx.is_local_domain("EXAMPLE.org")
            assert not await mx.is_local_domain("example.net")
        finally:
            await mx.close()

    run(main())


def test_lmtp_more_recipients_than_the_limit(dovecot: PrivateDovecot) -> None:
    """limits.rcpt = 2 on one connection: RSET and a new MAIL FROM every two accepted recipients."""

    async def main() -> None:
        mx = lmtp(dovecot, limits=SmtpLimitsConfig(rcpt=2))
        sent: list[bytes] = []
        command = mx._command

        async def recording(session: Any, *args: bytes) -> SMTPResponse:
            sent.append(args[0])
            return await command(session, *args)

        mx._command = recording  # type: ignore[method-assign]
        try:
            for _ in range(4):
                for name in USERS:
                    assert await mx.recipient(name) == Mailbox((name,))
                assert await mx.recipient("nobody@example.org") is None
            assert mx.pool_size == 1
            # A new transaction before any RCPT once 2 were accepted: 7 MAIL FROM, the first without a RSET.
            assert (sent.count(b"RCPT"), sent.count(b"MAIL"), sent.count(b"RSET")) == (16, 7, 6)
        finally:
            await mx.close()

    run(main())


def test_lmtp_connection_replaced_after_faults(dovecot: PrivateDovecot) -> None:
    """A pooled connection the server dropped fails its NOOP check and is replaced; a fault is never "unknown"."""

    async def main() -> None:
        mx = lmtp(dovecot)
        try:
            assert await mx.recipient("alice@example.org") is not None
            async with mx._pool.connection() as session:
                session.smtp.transport.close()  # type: ignore[union-attr] # dropped under the pool
            assert await mx.recipient("bob@example.org") == Mailbox(("bob@example.org",))
            async with mx._pool.connection() as session:
                session.smtp.close()
            assert await mx.recipient("carol@example.org") == Mailbox(("carol@example.org",))
            assert await mx.recipient("nobody@example.org") is None
            assert mx.pool_size == 1
        finally:
            await mx.close()

    run(main())


def test_lmtp_cannot_check_passwords(dovecot: PrivateDovecot) -> None:
    """Dovecot's LMTP offers no AUTH: a misconfiguration, not a wrong password. VRFY: 252, nothing."""

    async def main() -> None:
        mx = lmtp(dovecot)
        try:
            with pytest.raises(PermanentFailure, match="no AUTH"):
                await mx.verify_password("alice@example.org", PASSWORD)
            assert await mx.vrfy("alice@example.org") == ()
            assert await mx.recipient("alice@example.org") is not None
        finally:
            await mx.close()

    run(main())


# SMTP (Postfix, with Dovecot SASL).


def test_smtp_auth(postfix: PrivatePostfix) -> None:
    async def main() -> None:
        mx = directory("smtp", postfix.port)
        try:
            principal = await mx.verify_password("Alice@Example.org", PASSWORD)
            assert principal is not None
            assert (principal.name, principal.type, principal.emails) == (
                "alice@example.org",
                PrincipalType.INDIVIDUAL,
                ("alice@example.org",),
            )
            assert mx.pool_size == 0  # closed after a successful AUTH
            assert await mx.verify_password("bob@example.org", "hunter2") is not None
            assert await mx.verify_password("alice@example.org", "wrong") is None
            assert await mx.verify_password("nobody@example.org", PASSWORD) is None
            assert await mx.verify_password("alice@example.org", PASSWORD) is not None
        finally:
            await mx.close()

    run(main())


def test_empty_password_and_injections_are_not_sent() -> None:
    """Nothing listens on the port: any attempt to ask would be a TemporaryFailure."""

    async def main() -> None:
        mx = directory("smtp", free_port())
        try:
            assert await mx.verify_password("alice@example.org", "") is None
            assert await mx.verify_password("", PASSWORD) is None
            assert await mx.verify_password("alice@example.org", "a\0b") is None
            for address in INJECTIONS:
                assert await mx.recipient(address) is None, address
                assert await mx.vrfy(address) == (), address
                assert await mx.expn(address) == (), address
            with pytest.raises(TemporaryFailure):
                await mx.recipient("alice@example.org")
        finally:
            await mx.close()

    run(main())


def test_smtp_recipients(postfix: PrivatePostfix) -> None:
    async def main() -> None:
        mx = directory("smtp", postfix.port, limits=SmtpLimitsConfig(rcpt=2))
        try:
            for _ in range(3):
                assert await mx.recipient("alice@example.org") == Mailbox(("alice@example.org",))
                assert await mx.recipient("BOB@example.org") == Mailbox(("bob@example.org",))
                assert await mx.recipient("nobody@example.org") is None
            # Rejections are errors to smtpd (it slows down past 10, disconnects at 20): the connection is replaced.
            for _ in range(25):
                assert await mx.recipient("nobody@example.org") is None
            assert await mx.recipient("carol@example.org") is not None
            # AUTH after recipients on the same connection: the transaction is reset first.
            assert await mx.verify_password("carol@example.org", "wrong") is None
            assert await mx.recipient("carol@example.org") is not None
            assert await mx.verify_password("carol@example.org", "carol-pw") is not None
            assert await mx.vrfy("alice@example.org") == ()  # Postfix answers 252
        finally:
            await mx.close()

    run(main())


def test_smtp_connection_replaced_after_auth_errors(postfix: PrivatePostfix) -> None:
    async def main() -> None:
        mx = directory("smtp", postfix.port, limits=SmtpLimitsConfig(auth_errors=2))
        try:
            before = wait_connections(postfix, 0)
            for _ in range(4):  # two connections, each closed at its second failure
                assert await mx.verify_password("alice@example.org", "wrong") is None
            assert mx.pool_size == 0
            assert wait_connections(postfix, before + 2) == before + 2
            assert await mx.verify_password("alice@example.org", "wrong") is None
            assert await mx.recipient("alice@example.org") is not None  # same connection, one error on it
            assert mx.pool_size == 1
            time.sleep(0.3)
            assert wait_connections(postfix, before + 3) == before + 3
        finally:
            await mx.close()

    run(main())


def test_smtp_server_stopped_then_back(postfix: PrivatePostfix) -> None:
    async def main() -> None:
        mx = directory("smtp", postfix.port, timeout=Duration(3))
        try:
            assert await mx.recipient("alice@example.org") is not None
            postfix.stop()
            try:
                for question in (
                    mx.recipient("alice@example.org"),
                    mx.verify_password("alice@example.org", PASSWORD),
                ):
                    started = time.monotonic()
                    with pytest.raises(TemporaryFailure):
                        await question
                    assert time.monotonic() - started < 3.5
            finally:
                postfix.start()
            assert await mx.recipient("alice@example.org") is not None
            assert await mx.verify_password("alice@example.org", PASSWORD) is not None
        finally:
            await mx.close()

    run(main())


def test_silent_server_times_out() -> None:
    """A server that accepts and never greets (as a SIGSTOPped one would)."""

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        mx = directory("smtp", port, timeout=Duration(0.5))
        try:
            for question in (mx.recipient("alice@example.org"), mx.verify_password("alice@example.org", PASSWORD)):
                started = time.monotonic()
                with pytest.raises(TemporaryFailure, match=r"timed out|no answer"):
                    await question
                assert time.monotonic() - started < 2
            assert accepted
        finally:
            await mx.close()
            for writer in accepted:
                writer.close()
            server.close()

    run(main())


def test_unsupported_questions(postfix: PrivatePostfix) -> None:
    async def main() -> None:
        mx = directory("smtp", postfix.port)
        try:
            assert mx.verifies_passwords
            with pytest.raises(PermanentFailure):
                await mx.principal("alice")
            with pytest.raises(PermanentFailure):
                await mx.email_to_names("alice@example.org")
            with pytest.raises(PermanentFailure):
                await mx.sender_logins("alice@example.org")
            with pytest.raises(PermanentFailure):
                async for _ in mx.individuals():
                    pass
        finally:
            await mx.close()

    run(main())


def test_no_password_in_logs(postfix: PrivatePostfix, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (PASSWORD, base64.b64encode(PASSWORD.encode()).decode())
    errors: list[str] = []

    async def main() -> None:
        mx = directory("smtp", postfix.port, limits=SmtpLimitsConfig(auth_errors=1))
        down = directory("smtp", free_port())
        try:
            assert await mx.verify_password("alice@example.org", PASSWORD) is not None
            assert await mx.verify_password("bob@example.org", PASSWORD) is None
            try:
                await down.verify_password("alice@example.org", PASSWORD)
            except TemporaryFailure as exc:
                errors.append(str(exc))
        finally:
            await mx.close()
            await down.close()

    run(main())
    assert errors
    for secret in secrets:
        assert secret not in caplog.text
        assert all(secret not in error for error in errors)


# Without a server.


def test_config_defaults() -> None:
    def config(kind: str, **kwargs: Any) -> SmtpDirectoryConfig:
        return SmtpDirectoryConfig(**{"type": kind, "host": "mx.example.org", **kwargs})

    assert config("smtp").effective_port == 25
    assert config("smtp", tls=RemoteTlsConfig(enable=True)).effective_port == 465
    assert config("lmtp").effective_port == 24
    assert config("lmtp", port=11200).effective_port == 11200
    assert (config("smtp").limits.rcpt, config("smtp").limits.auth_errors) == (10, 3)
    with pytest.raises(ValueError, match="host"):
        config("smtp", host="")
    with pytest.raises(ValueError, match="rcpt"):
        SmtpLimitsConfig(rcpt=0)


def test_reply_addresses_and_safety() -> None:
    reply = SMTPResponse(250, "2.1.5 Alice <Alice@example.org>\n<bob@example.org>\ncarol@example.org\nsome text")
    assert reply_addresses(reply) == ("alice@example.org", "bob@example.org", "carol@example.org")
    assert is_safe_address("alice+tag@example.org")
    assert not any(is_safe_address(address) for address in INJECTIONS)


# End to end: the daemon, its socketmap, postmap.


def test_example_config() -> None:
    """conf.d/examples/lmtp.toml through the real configuration loader (the end-to-end test below serves it)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "zz-test.toml"
        path.write_text(
            '[directory.lmtp]\nlimits = { rcpt = 2, auth-errors = 5 }\n[directory.mx]\ntype = "smtp"\n'
            'host = "mx.example.org"\ntls.enable = true\n'
        )
        loaded = config_module.load_config([EXAMPLE, path])
    example = loaded.directory["lmtp"]
    assert isinstance(example, SmtpDirectoryConfig)
    assert (example.type, example.host, example.effective_port, example.timeout) == ("lmtp", "127.0.0.1", 24, 10)
    assert (example.limits, example.lookup.domains) == (SmtpLimitsConfig(2, 5), ["example.org"])
    assert (example.pool.max_connections, example.cache.entries) == (10, 10000)
    assert loaded.directory["mx"].effective_port == 465  # type: ignore[union-attr]
    assert isinstance(SmtpDirectory.from_config(example), SmtpDirectory)


def test_daemon_with_lmtp_directory(daemon_factory, postmap, dovecot):  # type: ignore[no-untyped-def]
    """The example file, served by the daemon, queried by postmap through the socketmap."""
    toml = server_toml({"socketmap": "socketmap"}) + (
        f'[directory.lmtp]\nport = {dovecot.lmtp_port}\ntimeout = "3s"\nlimits = {{ rcpt = 2, auth-errors = 2 }}\n'
        "[directory.lmtp.cache]\nentries = 0\n"
    )
    daemon = daemon_factory(toml, wait_for=("socketmap",), before={"40-lmtp.toml": EXAMPLE.read_text()})
    table = f"socketmap:unix:{daemon.socket('socketmap')}"

    result = postmap("alice@example.org", f"{table}:mailbox")
    assert (result.returncode, result.stdout) == (0, "example.org/alice/\n"), result.stderr + daemon.log()
    assert postmap("Bob@Example.org", f"{table}:mailbox").stdout == "example.org/bob/\n"
    result = postmap("nobody@example.org", f"{table}:mailbox")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    assert postmap("EXAMPLE.org", f"{table}:domain").stdout == "example.org\n"
    result = postmap("example.net", f"{table}:domain")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "")

    dovecot.stop()
    try:
        result = postmap("carol@example.org", f"{table}:mailbox")
        assert result.returncode == 1
        assert "socketmap server temporary error" in result.stderr, result.stderr
    finally:
        start_dovecot(dovecot)
    assert postmap("carol@example.org", f"{table}:mailbox").stdout == "example.org/carol/\n"
