"""The ``policy`` listener end to end: a real Postfix smtpd consults a real ``mailroster serve`` through
``check_policy_service`` (PROTOCOLS.md §6), driven by swaks up to RCPT (nothing is queued).

The same daemon serves Postfix's Dovecot SASL (``smtpd_sasl_type = dovecot``), so ``sasl_username`` in the policy
requests is what Postfix got from mailroster's own auth reply. Covered:

- over TCP: an authenticated login sending as its own address (250), as another user's or an external address
  (553 5.7.1); an unauthenticated client writing to an unknown local recipient (550 5.1.1), a known one or a
  catch-all domain (250), and sending as a local address (250, and Postfix logs the WARN);
- over a Unix socket, with ``[policy] unknown-recipient = "defer"``: 450 4.1.1 for an unknown recipient;
- a directory that is down (the daemon in-process with a failing directory): 450 4.7.1 "Directory temporarily
  unavailable", or with ``tempfail = "close"`` Postfix's own ``smtpd_policy_service_default_action`` (451 4.3.5);
- no password used in AUTH ever reaches the daemon's log.
"""

from __future__ import annotations

import base64
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DaemonLauncher, RunningDaemon, free_port, require_tool, server_toml
from inprocess import FailingDirectory, ThreadedDaemon
from servers import PrivatePostfix

ALICE_PASSWORD = "Alice-Policy-Secret-71"
BOB_PASSWORD = "Bob-Policy-Secret-72"
WRONG_PASSWORD = "Wrong-Policy-Secret-73"

DIRECTORY = f"""
[storage]
directory = "main"
[directory.main]
type = "memory"
domains = ["example.org", "catchall.example"]
[[directory.main.principals]]
name = "alice"
secret = "{{PLAIN}}{ALICE_PASSWORD}"
email = ["alice@example.org", "a.liddell@example.org"]
[[directory.main.principals]]
name = "bob"
secret = "{{PLAIN}}{BOB_PASSWORD}"
email = ["bob@example.org"]
[[directory.main.principals]]
name = "jane"
email = ["jane@example.org"]
[[directory.main.principals]]
name = "catcher"
email = ["catcher@catchall.example", "@catchall.example"]
"""

AUTH = '[auth]\nmechanisms = ["PLAIN", "LOGIN"]\nfailure-delay = "0s"\n'

#: Relayed domains pass Postfix's relay check without AUTH; SASL users may send anywhere. PrivatePostfix sets
#: ``smtpd_relay_restrictions = permit_sasl_authenticated, reject``, which would refuse every unauthenticated RCPT
#: before the policy service is asked: this later setting wins.
RELAY = (
    "relay_domains = example.org catchall.example\n"
    "smtpd_relay_restrictions = permit_sasl_authenticated, reject_unauth_destination\n"
)


def sasl_main_cf(auth_socket: str) -> str:
    return f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {auth_socket}\nsmtpd_sasl_auth_enable = yes\n"


@dataclass
class Pair:
    daemon: RunningDaemon
    postfix: PrivatePostfix


def start_pair(launcher: DaemonLauncher, toml: str, endpoint: str, name: str) -> Pair:
    """A daemon (``auth`` socket and a ``policy`` listener) and a Postfix asking it through ``check_policy_service
    <endpoint>``; ``{policy}`` in ``endpoint`` is replaced with the daemon's ``policy`` port or socket path."""
    require_tool("postfix")
    require_tool("swaks")
    daemon = launcher.start(toml, wait_for=("auth", *(("policy",) if "unix:" in endpoint else ())))
    target = endpoint.format(policy=daemon.ports.get("policy") or daemon.socket("policy"))
    postfix = PrivatePostfix(
        launcher.base / name,
        sasl_main_cf(daemon.socket("auth")) + RELAY + f"smtpd_recipient_restrictions = check_policy_service {target}\n",
    )
    try:
        postfix.start()
    except BaseException:
        postfix.stop()
        daemon.stop()
        raise
    return Pair(daemon, postfix)


def stop_pair(pair: Pair) -> None:
    pair.postfix.stop()
    assert pair.daemon.stop() == 0, pair.daemon.log()


TCP_CONFIG = (
    server_toml({"auth": "dovecot-auth"})
    + '[server.listener.policy]\nprotocol = "policy"\nbind = "127.0.0.1:{port:policy}"\n'
    + AUTH
    + DIRECTORY
)
UNIX_DEFER_CONFIG = (
    server_toml({"auth": "dovecot-auth", "policy": "policy"})
    + AUTH
    + '[policy]\nunknown-recipient = "defer"\n'
    + DIRECTORY
)


@pytest.fixture(scope="module")
def tcp(module_launcher: DaemonLauncher) -> Iterator[Pair]:
    """Default ``[policy]`` modes, the policy listener on 127.0.0.1."""
    pair = start_pair(module_launcher, TCP_CONFIG, "inet:127.0.0.1:{policy}", "pf-tcp")
    yield pair
    stop_pair(pair)


@pytest.fixture(scope="module")
def unix_defer(module_launcher: DaemonLauncher) -> Iterator[Pair]:
    """``unknown-recipient = "defer"``, the policy listener on a Unix socket (mode 0666)."""
    pair = start_pair(module_launcher, UNIX_DEFER_CONFIG, "unix:{policy}", "pf-unix")
    yield pair
    stop_pair(pair)


@dataclass(frozen=True)
class Transcript:
    """What swaks printed: its exit code and the SMTP lines, direction markers kept (``<-``, ``<**``, `` ->``)."""

    returncode: int
    lines: list[str]

    def reply_to(self, command: str) -> str:
        """The (last line of the) server's reply to the client's first line starting with ``command``."""
        sent = next((i for i, line in enumerate(self.lines) if line.startswith(f" -> {command}")), None)
        assert sent is not None, f"swaks never sent {command}:\n{self.text}"
        for line in self.lines[sent + 1 :]:
            if line.startswith(("<-  ", "<** ")) and line[7:8] != "-":
                return line[4:]
        raise AssertionError(f"no reply to {command}:\n{self.text}")

    @property
    def rcpt(self) -> str:
        return self.reply_to("RCPT TO:")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def swaks(port: int, sender: str, recipient: str, login: str | None = None, password: str = "") -> Transcript:
    """One SMTP session up to RCPT, with AUTH PLAIN when ``login`` is given."""
    args = [require_tool("swaks"), "--server", "127.0.0.1", "--port", str(port), "--quit-after", "RCPT"]
    args += ["--timeout", "30", "--from", sender, "--to", recipient]
    if login is not None:
        args += ["--auth", "PLAIN", "--auth-user", login, "--auth-password", password]
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return Transcript(result.returncode, (result.stdout + result.stderr).splitlines())


def authenticated(port: int, sender: str, recipient: str, login: str = "alice", password: str = ALICE_PASSWORD) -> str:
    """The RCPT reply for a session authenticated as ``login`` (asserting that AUTH succeeded)."""
    transcript = swaks(port, sender, recipient, login, password)
    assert transcript.reply_to("AUTH").startswith("235 "), transcript.text
    return transcript.rcpt


def wait_for_log(postfix: PrivatePostfix, needle: str, seen: int) -> int:
    """How many times ``needle`` is in Postfix's log once it is there more than ``seen`` times (postlogd writes
    after smtpd has replied), or after 10 s."""
    deadline = time.monotonic() + 10
    while (count := postfix.log().count(needle)) <= seen and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


# Authenticated senders: sender-login-mismatch (default reject).


@pytest.mark.parametrize(
    ("login", "sender"),
    [
        ("alice", "alice@example.org"),
        ("alice", "a.liddell@example.org"),  # an alias of hers
        ("alice", "alice+lists@example.org"),  # +detail is ignored
        ("alice@example.org", "alice@example.org"),  # login by address: Postfix's sasl_username is the name
        ("bob", "bob@example.org"),
    ],
)
def test_login_sending_as_its_own_address_passes(tcp: Pair, login: str, sender: str) -> None:
    password = ALICE_PASSWORD if login.startswith("alice") else BOB_PASSWORD
    assert authenticated(tcp.postfix.port, sender, "jane@example.org", login, password).startswith("250 2.1.5 ")


def test_login_sending_as_another_users_address_is_rejected(tcp: Pair) -> None:
    reply = authenticated(tcp.postfix.port, "bob@example.org", "jane@example.org")
    assert reply == (
        "553 5.7.1 <jane@example.org>: Recipient address rejected: "
        "Sender address <bob@example.org> is not owned by user alice"
    )


def test_login_sending_as_an_external_address_is_rejected(tcp: Pair) -> None:
    reply = authenticated(tcp.postfix.port, "someone@elsewhere.test", "jane@example.org")
    assert reply == (
        "553 5.7.1 <jane@example.org>: Recipient address rejected: "
        "Sender address <someone@elsewhere.test> is not owned by user alice"
    )


def test_authenticated_mismatch_is_rejected_for_an_external_recipient_too(tcp: Pair) -> None:
    """Relaying (allowed to SASL users) goes through the same check."""
    assert authenticated(tcp.postfix.port, "alice@example.org", "friend@elsewhere.test").startswith("250 2.1.5 ")
    reply = authenticated(tcp.postfix.port, "jane@example.org", "friend@elsewhere.test")
    assert reply.startswith("553 5.7.1 <friend@elsewhere.test>: Recipient address rejected: Sender address <jane@")


# Unauthenticated clients: unknown-recipient (default reject), unauthenticated-local-sender (default warn).


def test_unknown_local_recipient_is_rejected(tcp: Pair) -> None:
    transcript = swaks(tcp.postfix.port, "someone@elsewhere.test", "nobody@example.org")
    assert transcript.rcpt == (
        "550 5.1.1 <nobody@example.org>: Recipient address rejected: "
        "Recipient address <nobody@example.org> does not exist"
    ), transcript.text


@pytest.mark.parametrize(
    "recipient", ["jane@example.org", "Jane@Example.ORG", "jane+news@example.org", "anything@catchall.example"]
)
def test_known_recipient_and_catch_all_pass(tcp: Pair, recipient: str) -> None:
    transcript = swaks(tcp.postfix.port, "someone@elsewhere.test", recipient)
    assert transcript.rcpt.startswith("250 2.1.5 "), transcript.text


def test_relaying_elsewhere_is_still_refused_by_postfix(tcp: Pair) -> None:
    """The policy service comes after Postfix's relay check: it cannot open the relay."""
    transcript = swaks(tcp.postfix.port, "someone@elsewhere.test", "friend@elsewhere.test")
    assert transcript.rcpt.startswith("554 5.7.1 <friend@elsewhere.test>: Relay access denied"), transcript.text


def test_unauthenticated_local_sender_passes_with_a_warning(tcp: Pair) -> None:
    needle = (
        "NOQUEUE: warn: RCPT from localhost[127.0.0.1]: unauthenticated sender <bob@example.org> of a local domain; "
        "from=<bob@example.org> to=<jane@example.org>"
    )
    seen = tcp.postfix.log().count(needle)
    transcript = swaks(tcp.postfix.port, "bob@example.org", "jane@example.org")
    assert transcript.rcpt.startswith("250 2.1.5 "), transcript.text
    assert wait_for_log(tcp.postfix, needle, seen) == seen + 1, tcp.postfix.log()
    assert "warn: unauthenticated sender <bob@example.org> of a local domain" in tcp.daemon.log()


def test_unknown_recipient_and_local_sender_the_reject_wins(tcp: Pair) -> None:
    transcript = swaks(tcp.postfix.port, "bob@example.org", "ghost@example.org")
    assert transcript.rcpt.startswith("550 5.1.1 <ghost@example.org>: "), transcript.text


# Modes, over a Unix socket.


def test_defer_mode_answers_450_for_an_unknown_recipient(unix_defer: Pair) -> None:
    transcript = swaks(unix_defer.postfix.port, "someone@elsewhere.test", "nobody@example.org")
    assert transcript.rcpt == (
        "450 4.1.1 <nobody@example.org>: Recipient address rejected: "
        "Recipient address <nobody@example.org> does not exist"
    ), transcript.text


def test_defer_mode_keeps_the_other_checks(unix_defer: Pair) -> None:
    port = unix_defer.postfix.port
    assert swaks(port, "someone@elsewhere.test", "jane@example.org").rcpt.startswith("250 2.1.5 ")
    assert authenticated(port, "alice@example.org", "jane@example.org").startswith("250 2.1.5 ")
    assert authenticated(port, "bob@example.org", "jane@example.org").startswith("553 5.7.1 <jane@example.org>: ")


# The directory is down.


@pytest.fixture
def down_base(short_tmp: Path) -> Path:
    require_tool("postfix")
    require_tool("swaks")
    return short_tmp


def down_rcpt(base: Path, tempfail: str, main_cf: str = "") -> tuple[str, str]:
    """The RCPT reply of a Postfix whose policy service is a daemon (in this process) over a directory that is
    down, with ``[policy] tempfail``; and Postfix's log."""
    port = free_port()
    run = base / "run"
    run.mkdir()
    config = base / "mailroster.toml"
    config.write_text(
        server_toml({}).replace("{run}", str(run))
        + f'[server.listener.policy]\nprotocol = "policy"\nbind = "127.0.0.1:{port}"\n'
        + f'[policy]\ntempfail = "{tempfail}"\n'
        + '[storage]\ndirectory = "main"\n[directory.main]\ntype = "memory"\n'
    )
    postfix = PrivatePostfix(
        base / "pf", RELAY + f"smtpd_recipient_restrictions = check_policy_service inet:127.0.0.1:{port}\n" + main_cf
    )
    with ThreadedDaemon(config, {"main": FailingDirectory()}):
        try:
            postfix.start()
            transcript = swaks(postfix.port, "someone@elsewhere.test", "jane@example.org")
        finally:
            postfix.stop()
    return transcript.rcpt, postfix.log()


def test_directory_down_defers(down_base: Path, caplog: pytest.LogCaptureFixture) -> None:
    reply, log = down_rcpt(down_base, "defer")
    assert reply == "450 4.7.1 <jane@example.org>: Recipient address rejected: Directory temporarily unavailable", log
    assert "policy: directory fault: backend unavailable" in caplog.text


def test_directory_down_with_tempfail_close_gets_postfixs_default_action(
    down_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon closes without a reply; with ``smtpd_policy_service_try_limit = 1`` Postfix does not retry and
    applies ``smtpd_policy_service_default_action`` (451 4.3.5 Server configuration problem)."""
    reply, log = down_rcpt(
        down_base,
        "close",
        "smtpd_policy_service_try_limit = 1\nsmtpd_policy_service_retry_delay = 1s\n"
        "smtpd_policy_service_timeout = 10s\n",
    )
    assert reply == "451 4.3.5 <jane@example.org>: Recipient address rejected: Server configuration problem", log
    assert re.search(r"warning: problem talking to server 127\.0\.0\.1:\d+", log), log
    assert "Connection refused" not in log  # the daemon was reached: it closed on the fault
    assert caplog.text.count("protocol=policy peer=") == 1  # one try, no retry
    assert "closing on a directory fault: backend unavailable" in caplog.text


# Secrets.


def test_no_password_in_the_daemon_log(tcp: Pair) -> None:
    port = tcp.postfix.port
    assert authenticated(port, "alice@example.org", "jane@example.org").startswith("250 ")
    assert authenticated(port, "bob@example.org", "jane@example.org").startswith("553 ")
    assert authenticated(port, "bob@example.org", "jane@example.org", "bob", BOB_PASSWORD).startswith("250 ")
    failed = swaks(port, "alice@example.org", "jane@example.org", "alice", WRONG_PASSWORD)
    assert failed.reply_to("AUTH").startswith("535 5.7.8 "), failed.text
    log = tcp.daemon.log()
    # The log covers these sessions: the policy decision and the failed login.
    assert "policy client=127.0.0.1 queue_id= reject: sender <bob@example.org> not owned by user alice" in log
    assert "result=failed" in log
    for password in (ALICE_PASSWORD, BOB_PASSWORD, WRONG_PASSWORD):
        assert password not in log
    for login, password in (("alice", ALICE_PASSWORD), ("bob", BOB_PASSWORD), ("alice", WRONG_PASSWORD)):
        assert base64.b64encode(f"\0{login}\0{password}".encode()).decode() not in log  # the AUTH PLAIN response
