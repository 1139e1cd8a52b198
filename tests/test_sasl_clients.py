"""Real, independent SASL clients through a real Postfix smtpd whose Dovecot SASL server is a real mailroster.

The clients are GNU SASL's command-line tool ``gsasl`` (it authenticates and quits) and msmtp (built on libgsasl;
it sends one message). Postfix's smtpd (``smtpd_sasl_type = dovecot``) relays each exchange to ``mailroster
serve``'s dovecot-auth socket; Postfix sends no ``final-resp-ok``, so mailroster sends the SCRAM server-final
message as a CONT, which gsasl checks and answers with an empty response before Postfix says 235.

- SCRAM-SHA-256 and SCRAM-SHA-1 for users whose secret is plaintext ({PLAIN}, {CLEAR}, UTF-8) and for users whose
  secret is stored SCRAM keys made by ``doveadm pw -s SCRAM-SHA-*`` at setup: 235 with the right password (and the
  stored salt and iteration count in the server-first message), 535 with a wrong one;
- a user with only a one-way hash (SHA512-CRYPT), or keys of the other SCRAM algorithm, fails SCRAM but logs in
  with PLAIN; a disabled user and an unknown user fail; SCRAM's saslname escaping and authzid;
- CRAM-MD5 for a {PLAIN} user and a ``doveadm pw -s CRAM-MD5`` user;
- a second daemon whose ``[auth] mechanisms`` lists no SCRAM: Postfix's EHLO offers none, and gsasl's SCRAM fails;
- msmtp sends a message after SCRAM-SHA-256 (Postfix logs ``sasl_method=SCRAM-SHA-256``), and fails with 535;
- no password, stored key or client response in the daemon's log.

gsasl's command line: ``gsasl --smtp --connect 127.0.0.1:PORT --no-starttls --quiet --mechanism M
--authentication-id U --password P`` with stdin at EOF (it would otherwise read application data). It prints the
SMTP transcript on stdout (``--verbose`` adds only progress notes on stderr; ``-d`` is --application-data, not
debug) and exits 0 only when the server said 235 and, for SCRAM, the server signature checked out. In SMTP mode it
sends no initial response: ``AUTH M``, then the client-first message after Postfix's empty 334.
"""

from __future__ import annotations

import base64
import json
import re
import smtplib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import DaemonLauncher, RunningDaemon, require_tool, server_toml
from servers import PrivatePostfix

PASSWORD = "Correct-Horse-7"
WRONG = "Wrong-Horse-7"
UTF8_PASSWORD = "Grüße-Straße-7"
APP_MESSAGE = "Subject: SCRAM through Postfix\n\nsent by msmtp after AUTH SCRAM-SHA-256\n"

CONFIG = (
    server_toml({"auth": "dovecot-auth"})
    + """
[auth]
mechanisms = MECHANISMS
failure-delay = "0s"
[storage]
directory = "main"
[directory.main]
type = "memory"
"""
)
ALL_MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]
NO_SCRAM = ["PLAIN", "LOGIN", "CRAM-MD5"]
DISABLED = "u-off"


def doveadm_pw(scheme: str, password: str = PASSWORD) -> str:
    result = subprocess.run(
        [require_tool("doveadm"), "-c", "/dev/null", "pw", "-s", scheme, "-p", password],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass(frozen=True)
class Users:
    """The stored secrets made at setup, by user name."""

    secrets: dict[str, list[str]]

    def toml(self) -> str:
        text = ""
        for name, hashes in self.secrets.items():
            text += f"[[directory.main.principals]]\nname = {json.dumps(name)}\n"
            text += f'email = ["{name}@example.org"]\n' if "=" not in name else ""
            text += f"secret = {json.dumps(hashes)}\n" + ("enabled = false\n" if name == DISABLED else "")
        return text

    def scram_salt_and_iterations(self, name: str, mechanism: str) -> tuple[bytes, int] | None:
        """Of ``name``'s ``{SCRAM-SHA-*}iterations,salt,stored-key,server-key`` secret for ``mechanism``, if any."""
        for secret in self.secrets[name]:
            if secret.startswith(f"{{{mechanism}}}"):
                iterations, salt, _, _ = secret.partition("}")[2].split(",")
                return base64.b64decode(salt), int(iterations)
        return None


@pytest.fixture(scope="module")
def users() -> Users:
    return Users(
        {
            "u-plain": [f"{{PLAIN}}{PASSWORD}"],
            "u-clear": [f"{{CLEAR}}{PASSWORD}"],
            "u-utf8": [f"{{PLAIN}}{UTF8_PASSWORD}"],
            "u-scram256": [doveadm_pw("SCRAM-SHA-256")],
            "u-scram1": [doveadm_pw("SCRAM-SHA-1")],
            "u-both": [doveadm_pw("SCRAM-SHA-1"), doveadm_pw("SCRAM-SHA-256")],
            "u-crypt": [doveadm_pw("SHA512-CRYPT")],
            "u-cram": [doveadm_pw("CRAM-MD5")],
            DISABLED: [f"{{PLAIN}}{PASSWORD}"],
            "odd=name,x": [f"{{PLAIN}}{PASSWORD}"],  # SCRAM escapes "=" and "," in the saslname
        }
    )


@dataclass
class Server:
    daemon: RunningDaemon
    postfix: PrivatePostfix


def start_server(launcher: DaemonLauncher, users: Users, mechanisms: list[str], name: str) -> Server:
    require_tool("postfix")
    daemon = launcher.start(CONFIG.replace("MECHANISMS", json.dumps(mechanisms)) + users.toml(), wait_for=("auth",))
    postfix = PrivatePostfix(
        launcher.base / name,
        f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {daemon.socket('auth')}\nsmtpd_sasl_auth_enable = yes\n"
        "default_transport = discard\n",  # msmtp's message goes nowhere
    )
    try:
        postfix.start()
    except BaseException:
        postfix.stop()
        raise
    return Server(daemon, postfix)


def stop_server(server: Server) -> None:
    server.postfix.stop()
    assert server.daemon.stop() == 0, server.daemon.log()


@pytest.fixture(scope="module")
def server(module_launcher: DaemonLauncher, users: Users) -> Iterator[Server]:
    """mailroster offering every mechanism, behind a Postfix smtpd."""
    require_tool("gsasl")
    running = start_server(module_launcher, users, ALL_MECHANISMS, "pf")
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def no_scram(module_launcher: DaemonLauncher, users: Users) -> Iterator[Server]:
    """mailroster whose ``[auth] mechanisms`` lists no SCRAM, behind another Postfix smtpd."""
    require_tool("gsasl")
    running = start_server(module_launcher, users, NO_SCRAM, "pf-noscram")
    yield running
    stop_server(running)


@dataclass(frozen=True)
class Exchange:
    """What gsasl did: its exit code and the SMTP transcript it printed (both directions, no markers)."""

    returncode: int
    lines: list[str]
    stderr: str

    @property
    def reply(self) -> str:
        """Postfix's answer to the AUTH exchange (235, 535, 454...), or the whole output if none came."""
        return next((line for line in self.lines if line[:3] in ("235", "454", "504", "535")), self.text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + "\n" + self.stderr

    @property
    def auth_command(self) -> str:
        return next(line for line in self.lines if line.startswith("AUTH "))

    def challenges(self) -> list[bytes]:
        """The decoded 334 challenges, Postfix's relay of mailroster's CONTs."""
        return [base64.b64decode(line[4:]) for line in self.lines if line.startswith("334")]

    def responses(self) -> list[str]:
        """The client's lines that answer a 334 (base64, or empty)."""
        return [self.lines[i + 1] for i, line in enumerate(self.lines[:-1]) if line.startswith("334")]


def gsasl(port: int, mechanism: str | None, user: str, password: str, *extra: str) -> Exchange:
    args = [require_tool("gsasl"), "--smtp", "--connect", f"127.0.0.1:{port}", "--no-starttls", "--quiet"]
    args += ["--mechanism", mechanism] if mechanism else []
    args += ["--authentication-id", user, "--password", password, *extra]
    result = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    return Exchange(result.returncode, [line.rstrip("\r") for line in result.stdout.splitlines()], result.stderr)


def log_lines(postfix: PrivatePostfix, pattern: str) -> int:
    """How many lines of Postfix's log match ``pattern``."""
    return len(re.findall(pattern, postfix.log(), re.MULTILINE))


def wait_for_log_line(postfix: PrivatePostfix, pattern: str, seen: int) -> int:
    """How many lines match ``pattern`` once more than ``seen`` do (postlogd writes the log after smtpd has
    replied), or after 10 s."""
    deadline = time.monotonic() + 10
    while (count := log_lines(postfix, pattern)) <= seen and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def assert_authenticated(exchange: Exchange) -> None:
    assert exchange.returncode == 0, exchange.text
    assert exchange.reply.startswith("235 2.7.0 "), exchange.text


def assert_rejected(exchange: Exchange) -> None:
    assert exchange.returncode != 0, exchange.text
    assert exchange.reply.startswith("535 5.7.8 "), exchange.text


SCRAM_LOGINS = [
    ("SCRAM-SHA-256", "u-plain"),
    ("SCRAM-SHA-256", "u-clear"),
    ("SCRAM-SHA-256", "u-scram256"),
    ("SCRAM-SHA-256", "u-both"),
    ("SCRAM-SHA-1", "u-plain"),
    ("SCRAM-SHA-1", "u-clear"),
    ("SCRAM-SHA-1", "u-scram1"),
    ("SCRAM-SHA-1", "u-both"),
]


@pytest.mark.parametrize(("mechanism", "user"), SCRAM_LOGINS)
def test_scram_right_password(server: Server, users: Users, mechanism: str, user: str) -> None:
    exchange = gsasl(server.postfix.port, mechanism, user, PASSWORD)
    assert_authenticated(exchange)
    assert exchange.auth_command == f"AUTH {mechanism}"
    # 334 (empty: gsasl sends no initial response in SMTP), server-first, server-final; then an empty response.
    empty, server_first, server_final = exchange.challenges()
    assert empty == b""
    assert server_final.startswith(b"v=")
    assert exchange.responses()[-1] == ""
    fields = dict(field.split("=", 1) for field in server_first.decode().split(","))
    stored = users.scram_salt_and_iterations(user, mechanism)
    if stored is not None:  # the salt and iteration count that doveadm stored, not derived ones
        assert (base64.b64decode(fields["s"]), int(fields["i"])) == stored
    else:
        assert fields["i"] == "4096"


@pytest.mark.parametrize(("mechanism", "user"), SCRAM_LOGINS)
def test_scram_wrong_password(server: Server, mechanism: str, user: str) -> None:
    needle = rf"warning: .*: SASL {mechanism} authentication failed: .*, sasl_username={re.escape(user)}$"
    seen = log_lines(server.postfix, needle)
    exchange = gsasl(server.postfix.port, mechanism, user, WRONG)
    assert_rejected(exchange)
    assert len(exchange.challenges()) == 2  # the exchange ran to the proof: no server-final message
    assert wait_for_log_line(server.postfix, needle, seen) == seen + 1


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_utf8_password(server: Server, mechanism: str) -> None:
    assert_authenticated(gsasl(server.postfix.port, mechanism, "u-utf8", UTF8_PASSWORD))
    assert_rejected(gsasl(server.postfix.port, mechanism, "u-utf8", "Grüsse-Strasse-7"))


def test_scram_login_by_email(server: Server) -> None:
    assert_authenticated(gsasl(server.postfix.port, "SCRAM-SHA-256", "u-scram256@example.org", PASSWORD))
    assert_authenticated(gsasl(server.postfix.port, "SCRAM-SHA-1", "U-Plain@Example.ORG", PASSWORD))


def test_scram_saslname_escaping(server: Server) -> None:
    exchange = gsasl(server.postfix.port, "SCRAM-SHA-256", "odd=name,x", PASSWORD)
    assert_authenticated(exchange)
    client_first = base64.b64decode(exchange.responses()[0]).decode()
    assert client_first.startswith("n,,n=odd=3Dname=2Cx,r="), client_first


def test_gsasl_picks_scram_sha_256_when_offered(server: Server) -> None:
    exchange = gsasl(server.postfix.port, None, "u-scram256", PASSWORD)
    assert exchange.auth_command == "AUTH SCRAM-SHA-256"
    assert_authenticated(exchange)


@pytest.mark.parametrize(
    ("mechanism", "user"),
    [
        ("SCRAM-SHA-256", "u-crypt"),  # a one-way hash: no SCRAM keys
        ("SCRAM-SHA-1", "u-crypt"),
        ("SCRAM-SHA-256", "u-cram"),
        ("SCRAM-SHA-1", "u-scram256"),  # keys of the other algorithm
        ("SCRAM-SHA-256", "u-scram1"),
        ("SCRAM-SHA-256", DISABLED),
        ("SCRAM-SHA-256", "nobody"),
    ],
)
def test_scram_without_usable_keys_fails_with_the_right_password(server: Server, mechanism: str, user: str) -> None:
    exchange = gsasl(server.postfix.port, mechanism, user, PASSWORD)
    assert_rejected(exchange)
    assert len(exchange.challenges()) == 2  # made-up salt and keys: the exchange does not tell why


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_one_way_hash_user_logs_in_with_plaintext_mechanisms(server: Server, mechanism: str) -> None:
    assert_authenticated(gsasl(server.postfix.port, mechanism, "u-crypt", PASSWORD))
    assert_rejected(gsasl(server.postfix.port, mechanism, "u-crypt", WRONG))


def test_scram_authzid_other_than_the_login_is_refused(server: Server) -> None:
    exchange = gsasl(server.postfix.port, "SCRAM-SHA-256", "u-plain", PASSWORD, "--authorization-id", "u-scram1")
    assert_rejected(exchange)
    assert "Authorization identity not supported with SCRAM" in exchange.reply
    same = gsasl(server.postfix.port, "SCRAM-SHA-256", "u-plain", PASSWORD, "--authorization-id", "u-plain")
    assert_authenticated(same)


@pytest.mark.parametrize("user", ["u-plain", "u-cram"])
def test_cram_md5(server: Server, user: str) -> None:
    exchange = gsasl(server.postfix.port, "CRAM-MD5", user, PASSWORD)
    assert_authenticated(exchange)
    (challenge,) = exchange.challenges()
    assert challenge.startswith(b"<") and challenge.endswith(b">")
    assert_rejected(gsasl(server.postfix.port, "CRAM-MD5", user, WRONG))


def test_cram_md5_fails_for_a_one_way_hash(server: Server) -> None:
    assert_rejected(gsasl(server.postfix.port, "CRAM-MD5", "u-crypt", PASSWORD))


def ehlo_auth(port: int) -> list[str]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        code, _ = smtp.ehlo("client.test.invalid")
        assert code == 250
        return smtp.esmtp_features.get("auth", "").split()


def test_ehlo_offers_the_configured_mechanisms(server: Server, no_scram: Server) -> None:
    assert sorted(ehlo_auth(server.postfix.port)) == sorted(ALL_MECHANISMS)
    assert sorted(ehlo_auth(no_scram.postfix.port)) == sorted(NO_SCRAM)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_not_configured_fails(no_scram: Server, mechanism: str) -> None:
    exchange = gsasl(no_scram.postfix.port, mechanism, "u-plain", PASSWORD)
    assert exchange.returncode != 0, exchange.text
    assert exchange.reply.startswith("535 5.7.8 "), exchange.text
    assert "Invalid authentication mechanism" in exchange.reply  # Postfix refuses it: mailroster did not list it
    assert exchange.challenges() == []


def test_without_scram_gsasl_picks_another_mechanism(no_scram: Server) -> None:
    exchange = gsasl(no_scram.postfix.port, None, "u-plain", PASSWORD)
    assert_authenticated(exchange)
    assert "SCRAM" not in exchange.auth_command
    assert_authenticated(gsasl(no_scram.postfix.port, "CRAM-MD5", "u-cram", PASSWORD))


def msmtp(server: Server, user: str, password: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    password_file = tmp_path / "password"
    password_file.write_text(password + "\n")
    return subprocess.run(
        [
            require_tool("msmtp"), "--file=/dev/null", "--host=127.0.0.1", f"--port={server.postfix.port}",
            "--tls=off", "--auth=scram-sha-256", f"--user={user}", f"--passwordeval=cat {password_file}",
            "--from=u-plain@example.org", "--debug", "rcpt@remote.test.invalid",
        ],
        input=APP_MESSAGE, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_msmtp_sends_after_scram_sha_256(server: Server, tmp_path: Path) -> None:
    needle = r": client=localhost\[127\.0\.0\.1\], sasl_method=SCRAM-SHA-256, sasl_username=u-plain$"  # not the address
    seen = log_lines(server.postfix, needle)
    result = msmtp(server, "u-plain@example.org", PASSWORD, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-- 235 2.7.0 " in result.stdout + result.stderr
    assert "<-- 250 2.0.0 Ok: queued as " in result.stdout + result.stderr
    assert wait_for_log_line(server.postfix, needle, seen) == seen + 1, server.postfix.log()


def test_msmtp_wrong_password(server: Server, tmp_path: Path) -> None:
    result = msmtp(server, "u-scram256", WRONG, tmp_path)
    assert result.returncode != 0
    assert "535 5.7.8 " in result.stdout + result.stderr
    assert "queued as" not in result.stdout + result.stderr


def test_no_secret_in_the_daemon_log(server: Server, users: Users) -> None:
    """After right and wrong passwords in every mechanism, the log holds no password, stored key or hash, nor any
    of the client's responses (PLAIN's and LOGIN's carry the password; SCRAM's the proof)."""
    logins = [(mechanism, "u-plain", password) for mechanism in ALL_MECHANISMS for password in (PASSWORD, WRONG)]
    logins += [("SCRAM-SHA-256", "u-scram256", PASSWORD), ("SCRAM-SHA-1", "u-scram1", PASSWORD)]
    logins += [("CRAM-MD5", "u-cram", PASSWORD), ("PLAIN", "u-crypt", PASSWORD), ("PLAIN", "u-utf8", UTF8_PASSWORD)]
    exchanges = [gsasl(server.postfix.port, *login) for login in logins]
    assert [exchange.returncode == 0 for exchange in exchanges] == [i % 2 == 0 for i in range(10)] + [True] * 5
    log = server.daemon.log()
    assert "u-scram256" in log  # the log covers these logins
    for password in (PASSWORD, WRONG, UTF8_PASSWORD):
        assert password not in log
    for hashes in users.secrets.values():
        for stored in hashes:
            scheme, _, value = stored[1:].partition("}")
            for part in value.split(",")[2:] if scheme.startswith("SCRAM-") else [value]:
                assert part not in log, stored
    responses = {response for exchange in exchanges for response in exchange.responses() if response}
    assert len(responses) >= 20
    for response in responses:
        assert response not in log
