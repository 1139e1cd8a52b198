"""Changes made with the CLI reach every running daemon at once, and lookups never see half of one.

- Two daemons on one PostgreSQL store, caches of an hour: a password change and a new alias are answered by both
  within 1 s of the CLI's exit, overturning a cached successful login and a cached "not found".
- Lookups hammering the store while the CLI writes get only before-or-after answers, never a temporary failure.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailroster.protocols.netstring import NetstringDecoder, encode_netstring

from conftest import MAILROSTER, RunningDaemon, require_tool, server_toml

DAEMON = """
[auth]
failure-delay = "0s"
[storage]
directory = "default"
[directory.default]
type = "internal"
store = "db"
[directory.default.cache]
entries = {entries}
ttl = {{ positive = "1h", negative = "1h" }}
{store}
"""


def daemon_toml(state_dir: Path, entries: int, store: str) -> str:
    """Socketmap and Dovecot auth on the internal directory in ``store``, caching ``entries`` for an hour."""
    listeners = {"socketmap": "socketmap", "auth": "dovecot-auth"}
    return server_toml(listeners, state_dir=str(state_dir)) + DAEMON.format(entries=entries, store=store)


def store_toml(kind: str, request: pytest.FixtureRequest) -> str:
    if kind == "sqlite":
        return '[store.db]\ntype = "sqlite"\npath = "directory.sqlite3"\n'
    config = request.getfixturevalue("postgres_db").store_config()
    password = json.dumps(config.password.value) if config.password else '""'
    return (
        f'[store.db]\ntype = "postgresql"\nhost = "{config.host}"\nport = {config.port}\n'
        f'database = "{config.database}"\nuser = "{config.user}"\npassword = {password}\n'
    )


def query(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(encode_netstring(request))
        decoder = NetstringDecoder()
        while True:
            frames = decoder.feed(sock.recv(4096))
            if frames:
                return frames[0]


def cli(config: Path, *args: str, password: str | None = None) -> None:
    depth = 2 if args[0] in ("domain", "principal") else 1
    command = [MAILROSTER, *args[:depth], "-c", str(config), *args[depth:]]
    result = subprocess.run(command, input=password, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def until(deadline: float, check: Callable[[], bool]) -> bool:
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_two_daemons_on_postgresql_see_cli_changes_within_a_second(
    daemon_factory, short_tmp: Path, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    doveadm = require_tool("doveadm")
    text = daemon_toml(short_tmp, 10000, store_toml("postgresql", request))
    config = short_tmp / "cli.toml"
    config.write_text(text.replace("{run}", str(short_tmp / "clirun")))
    cli(config, "domain", "add", "example.org")
    cli(config, "principal", "add", "alice", "--email", "alice@example.org", "--password-stdin", password="old-pw-1\n")
    daemons: list[RunningDaemon] = [daemon_factory(text, wait_for=("socketmap", "auth")) for _ in range(2)]

    def auth(daemon: RunningDaemon, password: str) -> bool:
        result = subprocess.run(
            [doveadm, "-c", "/dev/null", "auth", "test", "-a", daemon.socket("auth"), "alice", password],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return result.returncode == 0

    def alias(daemon: RunningDaemon) -> bytes:
        return query(daemon.socket("socketmap"), b"alias new@example.org")

    for daemon in daemons:  # cache a successful login and a "not found"
        assert auth(daemon, "old-pw-1")
        assert alias(daemon) == b"NOTFOUND "
    cli(
        config, "principal", "set", "alice", "--password-stdin", "--add-email", "new@example.org", password="new-pw-2\n"
    )
    deadline = time.monotonic() + 1.0
    for daemon in daemons:
        assert until(deadline, lambda d=daemon: alias(d) == b"OK alice@example.org"), daemon.log()
        assert until(deadline, lambda d=daemon: not auth(d, "old-pw-1")), daemon.log()
        assert auth(daemon, "new-pw-2")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_lookups_during_cli_writes_see_before_or_after_never_a_failure(
    daemon_factory, short_tmp: Path, request: pytest.FixtureRequest, kind: str
) -> None:  # type: ignore[no-untyped-def]
    """With the cache off every lookup reads the store while the CLI swaps alice's aliases in transactions."""
    text = daemon_toml(short_tmp, 0, store_toml(kind, request))
    config = short_tmp / "cli.toml"
    config.write_text(text.replace("{run}", str(short_tmp / "clirun")))
    cli(config, "domain", "add", "example.org")
    cli(config, "principal", "add", "alice", "--email", "alice@example.org", "--email", "a0@example.org")
    daemon = daemon_factory(text, wait_for=("socketmap",))
    path = daemon.socket("socketmap")
    stop = threading.Event()
    seen: dict[bytes, set[bytes]] = {}

    def hammer() -> None:
        while not stop.is_set():
            for key in (b"mailbox alice@example.org", b"alias a0@example.org", b"alias a1@example.org"):
                seen.setdefault(key, set()).add(query(path, key))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(4):  # each set is one transaction: a1 replaces a0, then back
            cli(
                config, "principal", "set", "alice", "--add-email", "a1@example.org", "--remove-email", "a0@example.org"
            )
            cli(
                config, "principal", "set", "alice", "--add-email", "a0@example.org", "--remove-email", "a1@example.org"
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert seen[b"mailbox alice@example.org"] == {b"OK example.org/alice/"}
    for key in (b"alias a0@example.org", b"alias a1@example.org"):
        assert seen[key] <= {b"OK alice@example.org", b"NOTFOUND "}, seen[key]
    # Every answer above was a before or an after state (a TEMP would have failed the subsets); and the last
    # transaction left a0 in place.
    assert query(path, b"alias a0@example.org") == b"OK alice@example.org"
    assert query(path, b"alias a1@example.org") == b"NOTFOUND "
