"""The real daemon, its real directory and password schemes, driven by the real Dovecot and Postfix clients.

- ``doveadm auth test`` against mailroster's dovecot-auth socket, for a user of every scheme (hashes made by
  ``doveadm pw`` at setup), a wrong password, an unknown user, and a directory that is down;
- ``doveadm user`` against its dovecot-master socket (templated fields, not found, LIST);
- Postfix smtpd with ``smtpd_sasl_type = dovecot`` pointing at mailroster, driven by swaks (PLAIN, LOGIN,
  CRAM-MD5): 235 and 535;
- a private Dovecot whose passdb and userdb are ``driver = dict`` over mailroster's dict socket;
- and nowhere in the daemon's log a password or a hash.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from mailroster.backends import secrets

from conftest import RunningDaemon, require_tool, server_toml
from inprocess import FailingDirectory, ThreadedDaemon
from servers import PrivatePostfix, dict_auth_dovecot

SCHEMES = [
    "ARGON2I", "ARGON2ID", "BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "MD5-CRYPT", "CRYPT", "DES-CRYPT",
    "PBKDF2", "SSHA", "SSHA256", "SSHA512", "SHA", "SHA1", "SHA256", "SHA512", "SMD5", "MD5", "PLAIN-MD5",
    "LDAP-MD5", "PLAIN", "CLEAR", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256",
]  # fmt: skip
PASSWORD = "Correct-Horse-7"  # DES-CRYPT reads 8 characters: the wrong password below differs in the first ones


def user_of(scheme: str) -> str:
    return "u-" + scheme.lower()


def doveadm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("doveadm"), "-c", "/dev/null", *args], capture_output=True, text=True, timeout=60
    )


def principals() -> str:
    """A memory directory with one user per scheme, plus Stalwart's untagged and app-password forms."""
    entries = []
    for scheme in SCHEMES:
        result = doveadm("pw", "-s", scheme, "-p", PASSWORD)
        assert result.returncode == 0, result.stderr
        entries.append((user_of(scheme), [result.stdout.strip()], "2G"))
    bcrypt = doveadm("pw", "-s", "BLF-CRYPT", "-p", PASSWORD).stdout.strip().removeprefix("{BLF-CRYPT}")
    entries.append(("u-untagged", [bcrypt], None))
    entries.append(("u-app", [secrets.hash_password("main-password-1"), f"$app$phone${bcrypt}"], None))
    entries.append(("u-scrypt", [secrets.hash_password(PASSWORD, "SCRYPT")], None))
    text = ""
    for name, hashes, quota in entries:
        text += f'[[directory.main.principals]]\nname = "{name}"\nemail = ["{name}@example.org"]\n'
        text += f"secret = {json.dumps(hashes)}\n" + (f'quota = "{quota}"\n' if quota else "")
    text += '[[directory.main.principals]]\nname = "off"\nemail = ["off@example.org"]\n'
    text += f'secret = "{{PLAIN}}{PASSWORD}"\nenabled = false\n'
    text += '[[directory.main.principals]]\nname = "team"\nclass = "group"\nemail = ["team@example.org"]\n'
    return text


CONFIG = (
    server_toml({"auth": "dovecot-auth", "userdb": "dovecot-master", "dict": "dovecot-dict"})
    + """
[auth]
mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5"]
failure-delay = "0.2s"
[userdb]
uid = "5000"
gid = "5000"
home = "/srv/vmail/{domain}/{local}"
mail = "maildir:~/Maildir"
extra = { sieve = "/srv/sieve/{name}.sieve" }
[storage]
directory = "main"
[directory.main]
type = "memory"
"""
)


@pytest.fixture(scope="module")
def daemon(module_launcher) -> RunningDaemon:  # type: ignore[no-untyped-def]
    require_tool("doveadm")
    running = module_launcher.start(CONFIG + principals(), wait_for=("auth", "userdb", "dict"))
    yield running
    assert running.stop() == 0
    log = running.log()
    assert PASSWORD not in log and "main-password-1" not in log
    assert "$argon2" not in log and "$6$" not in log and "$2y$" not in log


def auth_test(socket: str, user: str, password: str) -> subprocess.CompletedProcess[str]:
    return doveadm("auth", "test", "-a", socket, user, password)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_doveadm_auth_test_every_scheme(daemon: RunningDaemon, scheme: str) -> None:
    ok = auth_test(daemon.socket("auth"), f"{user_of(scheme)}@example.org", PASSWORD)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"passdb: {user_of(scheme)}@example.org auth succeeded" in ok.stdout
    assert f"  user={user_of(scheme)}\n" in ok.stdout  # the canonical name
    bad = auth_test(daemon.socket("auth"), user_of(scheme), "Wrong-Horse-7")
    assert bad.returncode == 77, bad.stdout


@pytest.mark.parametrize(("user", "password"), [("u-untagged", PASSWORD), ("u-app", PASSWORD), ("u-scrypt", PASSWORD)])
def test_stalwart_forms(daemon: RunningDaemon, user: str, password: str) -> None:
    assert auth_test(daemon.socket("auth"), user, password).returncode == 0
    assert auth_test(daemon.socket("auth"), user, "nope").returncode == 77


def test_app_password_and_main_password_both_work(daemon: RunningDaemon) -> None:
    assert auth_test(daemon.socket("auth"), "u-app", "main-password-1").returncode == 0


@pytest.mark.parametrize("user", ["nobody", "nobody@example.org", "team", "off"])
def test_unknown_group_and_disabled_users_fail(daemon: RunningDaemon, user: str) -> None:
    result = auth_test(daemon.socket("auth"), user, PASSWORD)
    assert result.returncode == 77
    assert "temp_fail" not in result.stdout


def test_directory_down_is_a_temporary_failure(short_tmp: Path) -> None:
    require_tool("doveadm")
    (short_tmp / "c.toml").write_text(
        CONFIG.replace("{run}", str(short_tmp)).replace('failure-delay = "0.2s"', 'failure-delay = "0s"')
    )
    with ThreadedDaemon(short_tmp / "c.toml", {"main": FailingDirectory()}):
        result = auth_test(str(short_tmp / "auth"), "u-plain", PASSWORD)
        assert result.returncode == 77
        assert "temp_fail" in result.stdout + result.stderr
        user = doveadm("user", "-a", str(short_tmp / "userdb"), "u-plain")
        assert user.returncode == 75, user.stdout + user.stderr


def test_doveadm_user_fields(daemon: RunningDaemon) -> None:
    result = doveadm("user", "-a", daemon.socket("userdb"), "U-SHA512-CRYPT@example.org")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(None, 1) for line in result.stdout.splitlines() if line.strip())
    assert fields["field"] == "value"
    assert fields["user"] == "u-sha512-crypt"
    assert fields["uid"] == "5000"
    assert fields["home"] == "/srv/vmail/example.org/u-sha512-crypt"
    assert fields["mail"] == "maildir:~/Maildir"
    assert fields["quota_rule"] == "*:bytes=2147483648"
    assert fields["sieve"] == "/srv/sieve/u-sha512-crypt.sieve"


@pytest.mark.parametrize("user", ["nobody@example.org", "team", "off"])
def test_doveadm_user_not_found(daemon: RunningDaemon, user: str) -> None:
    assert doveadm("user", "-a", daemon.socket("userdb"), user).returncode == 67


def test_doveadm_user_list(daemon: RunningDaemon) -> None:
    result = doveadm("user", "-a", daemon.socket("userdb"), "u-sha*")
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == [
        "u-sha",
        "u-sha1",
        "u-sha256",
        "u-sha256-crypt",
        "u-sha512",
        "u-sha512-crypt",
    ]


def test_doveadm_auth_lookup_is_pass(daemon: RunningDaemon) -> None:
    result = doveadm("auth", "lookup", "-a", daemon.socket("userdb"), "u-plain")
    assert result.returncode == 0, result.stderr
    assert "u-plain" in result.stdout
    assert PASSWORD not in result.stdout  # auth-master PASS carries no password


def test_postfix_smtpd_sasl_through_mailroster(daemon: RunningDaemon, short_tmp: Path) -> None:
    swaks = require_tool("swaks")
    postfix = PrivatePostfix(
        short_tmp / "pf",
        f"smtpd_sasl_type = dovecot\nsmtpd_sasl_path = {daemon.socket('auth')}\nsmtpd_sasl_auth_enable = yes\n",
    ).start()

    def smtp_auth(mechanism: str, user: str, password: str) -> str:
        out = subprocess.run(
            [swaks, "--server", "127.0.0.1", "--port", str(postfix.port), "--quit-after", "AUTH", "--timeout", "30",
             "--auth", mechanism, "--auth-user", user, "--auth-password", password],
            capture_output=True, text=True, timeout=60,
        ).stdout  # fmt: skip
        replies = [line[4:] for line in out.splitlines() if line.startswith(("<-  ", "<** "))]
        return next((r for r in replies if r[:3] in ("235", "535", "454")), out)

    try:
        assert smtp_auth("PLAIN", "u-sha512-crypt@example.org", PASSWORD).startswith("235 ")
        assert smtp_auth("PLAIN", "u-sha512-crypt@example.org", "Wrong-Horse-7").startswith("535 ")
        assert smtp_auth("LOGIN", "U-ARGON2ID", PASSWORD).startswith("235 ")
        assert smtp_auth("LOGIN", "U-ARGON2ID", "Wrong-Horse-7").startswith("535 ")
        assert smtp_auth("CRAM-MD5", "u-plain", PASSWORD).startswith("235 ")
        assert smtp_auth("CRAM-MD5", "u-cram-md5", PASSWORD).startswith("235 ")
        assert smtp_auth("CRAM-MD5", "u-plain", "Wrong-Horse-7").startswith("535 ")
        assert smtp_auth("PLAIN", "nobody", PASSWORD).startswith("535 ")
    finally:
        postfix.stop()


def test_dovecot_with_mailroster_as_dict_passdb_and_userdb(daemon: RunningDaemon, short_tmp: Path) -> None:
    dovecot = dict_auth_dovecot(short_tmp, f"proxy:idle_msecs=30000:{daemon.socket('dict')}:main").start()
    try:
        client = str(dovecot.base_dir / "auth-client")
        userdb = str(dovecot.base_dir / "auth-userdb")
        for scheme in ("SHA512-CRYPT", "BLF-CRYPT", "ARGON2ID", "SSHA512", "PLAIN"):
            ok = dovecot.doveadm("auth", "test", "-a", client, user_of(scheme), PASSWORD)
            assert ok.returncode == 0, ok.stdout + ok.stderr + dovecot.log()
        assert dovecot.doveadm("auth", "test", "-a", client, "u-plain", "Wrong-Horse-7").returncode == 77
        assert dovecot.doveadm("auth", "test", "-a", client, "off", PASSWORD).returncode == 77
        home = dovecot.doveadm("user", "-a", userdb, "-f", "home", "u-plain")
        assert (home.returncode, home.stdout) == (0, "/srv/vmail/example.org/u-plain\n"), home.stderr
        assert dovecot.doveadm("user", "-a", userdb, "nobody").returncode == 67
    finally:
        dovecot.stop()
        shutil.rmtree(short_tmp / "dc", ignore_errors=True)
