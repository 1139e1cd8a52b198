"""The command line, run as a user runs it: exit codes, output, configuration errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import MAILROSTER

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "directory.toml"


def mailroster(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILROSTER, *args], capture_output=True, text=True, timeout=30)


def test_check_config_accepts_the_shipped_conf_d() -> None:
    result = mailroster("check-config", "-c", str(ROOT / "conf.d"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: 3 files, 1 listeners, 1 directories")


def test_first_ten_minutes_on_the_shipped_conf_d(tmp_path: Path) -> None:
    """README's "first ten minutes": the shipped internal directory, managed and queried from the CLI."""
    local = tmp_path / "local.toml"
    local.write_text(f'[server]\nstate-dir = "{tmp_path / "state"}"\nrun-dir = "{tmp_path / "run"}"\n')
    c = ("-c", str(ROOT / "conf.d"), "-c", str(local))

    def ok(*args: str, password: str | None = None) -> str:
        # Options follow the (sub)command: `mailroster principal add -c ... alice`, `mailroster lookup -c ... MAP`.
        depth = 2 if args[0] in ("domain", "principal") else 1
        command = [MAILROSTER, *args[:depth], *c, *args[depth:]]
        result = subprocess.run(command, input=password, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (args, result.stderr)
        return result.stdout

    ok("domain", "add", "example.org")
    ok("principal", "add", "alice", "--email", "alice@example.org", "--quota", "2G", "--password-stdin",
       password="a long secret\n")  # fmt: skip
    ok("principal", "set", "alice", "--add-email", "postmaster@example.org")
    ok("principal", "add", "staff", "--type", "group", "--email", "staff@example.org")
    ok("principal", "set", "alice", "--add-member-of", "staff")
    assert ok("lookup", "mailbox", "Alice@Example.org") == "example.org/alice/\n"
    assert ok("lookup", "alias", "postmaster@example.org") == "alice@example.org\n"
    assert ok("lookup", "alias", "staff@example.org") == "alice@example.org\n"
    assert ok("lookup", "quota", "alice") == "2147483648\n"
    assert ok("auth", "alice", password="a long secret\n") == "authenticated as alice\n"
    assert (tmp_path / "state" / "directory.sqlite3").exists()


@pytest.mark.parametrize(
    ("map_name", "key", "code", "stdout"),
    [
        ("mailbox", "alice+x@example.org", 0, "example.org/alice/\n"),
        ("quota", "alice", 0, "2147483648\n"),
        ("mailbox", "nobody@example.org", 1, ""),
        ("domain", "not a domain", 1, ""),
    ],
)
def test_lookup_exit_codes(tmp_path: Path, map_name: str, key: str, code: int, stdout: str) -> None:
    (tmp_path / "c.toml").write_text(DATA.read_text())
    result = mailroster("lookup", "-c", str(tmp_path / "c.toml"), map_name, key)
    assert (result.returncode, result.stdout) == (code, stdout), result.stderr


def test_lookup_with_another_directory_and_an_unknown_one(tmp_path: Path) -> None:
    text = DATA.read_text() + '[directory.other]\ntype = "memory"\ndomains = ["other.test"]\n'
    (tmp_path / "c.toml").write_text(text)
    assert mailroster("lookup", "-c", str(tmp_path), "domain", "other.test").returncode == 1
    found = mailroster("lookup", "-c", str(tmp_path), "--directory", "other", "domain", "other.test")
    assert (found.returncode, found.stdout) == (0, "other.test\n")
    unknown = mailroster("lookup", "-c", str(tmp_path), "--directory", "nope", "domain", "other.test")
    assert unknown.returncode == 64
    assert "no directory named 'nope'" in unknown.stderr


def test_unknown_map_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(DATA.read_text())
    result = mailroster("lookup", "-c", str(tmp_path), "nosuchmap", "x")
    assert result.returncode == 2  # argparse
    assert "invalid choice" in result.stderr


def test_configuration_errors_stop_every_command_with_all_errors_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[server]\nrun-dri = "/tmp"\nidle-timeout = "soon"\n'
        '[server.listener.x]\nprotocol = "socketmap"\n'
        '[directory.default]\ntype = "memory"\n'
    )
    for command in (["serve"], ["check-config"], ["lookup", "domain", "x"]):
        result = mailroster(*command[:1], "-c", str(path), *command[1:])
        assert result.returncode == 78, command
        lines = result.stderr.strip().splitlines()
        assert f'{path}: server.run-dri: unknown key (did you mean "run-dir"?)' in lines
        assert any(line.startswith(f"{path}: server.idle-timeout: ") for line in lines)
        assert f"{path}: server.listener.x.bind: missing required key" in lines


def test_check_config_takes_a_policy_listener_and_checks_the_policy_modes(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    listener = '[server.listener.policy]\nprotocol = "policy"\nbind = "127.0.0.1:10040"\n'
    path.write_text(DATA.read_text() + listener + '[policy]\nunknown-recipient = "defer"\ntempfail = "close"\n')
    result = mailroster("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr
    path.write_text(DATA.read_text() + listener + '[policy]\nunknown-recipient = "bounce"\n')
    result = mailroster("check-config", "-c", str(path))
    assert result.returncode == 78
    assert "policy.unknown-recipient: must be one of: reject, defer, warn, off" in result.stderr
