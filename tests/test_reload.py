"""SIGHUP: the real daemon reads its configuration again and serves from new directories, without dropping a
connection; a configuration with errors, or a directory that cannot be opened, changes nothing."""

from __future__ import annotations

import signal
import socket
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from mailroster.protocols.netstring import encode_netstring

from conftest import RunningDaemon, server_toml

LISTENERS = server_toml({"socketmap": "socketmap", "userdb": "dovecot-master", "policy": "policy"})


def memory_directory(*names: str, home: str = "/srv/{domain}/{local}") -> str:
    text = (
        f'[userdb]\nuid = "5000"\nhome = "{home}"\n[storage]\ndirectory = "main"\n[directory.main]\ntype = "memory"\n'
    )
    for name in names:
        text += f'[[directory.main.principals]]\nname = "{name}"\nemail = ["{name}@example.org"]\n'
    return text


def write_config(daemon: RunningDaemon, text: str) -> None:
    """Replace the daemon's configuration file (DaemonLauncher substituted {run} at start; so does this)."""
    (daemon.config_dir / "mailroster.toml").write_text(text.replace("{run}", str(daemon.run_dir)))


class Client:
    """A persistent connection, as Postfix and Dovecot keep theirs."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""

    def until(self, end: bytes) -> bytes:
        while end not in self.buffer:
            data = self.sock.recv(65536)
            assert data, f"connection closed; got {self.buffer!r}"
            self.buffer += data
        reply, _, self.buffer = self.buffer.partition(end)
        return reply + end

    def socketmap(self, map_name: str, key: str) -> bytes:
        self.sock.sendall(encode_netstring(f"{map_name} {key}".encode()))
        reply = self.until(b",")
        return reply[reply.index(b":") + 1 : -1]

    def close(self) -> None:
        self.sock.close()


def reload(daemon: RunningDaemon, done: Callable[[], bool]) -> None:
    """Send SIGHUP, then wait (up to 10 s) until ``done()``, polling as a client would."""
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, daemon.log()
        assert daemon.proc.poll() is None, daemon.log()
        time.sleep(0.05)


def log_says(daemon: RunningDaemon, text: str) -> Callable[[], bool]:
    return lambda: text in daemon.log()


def test_new_principals_are_served_on_connections_opened_before(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(LISTENERS + memory_directory("jane"), wait_for=("socketmap",))
    client = Client(daemon.socket("socketmap"))
    assert client.socketmap("mailbox", "jane@example.org") == b"OK example.org/jane/"
    assert client.socketmap("mailbox", "john@example.org") == b"NOTFOUND "  # now in the negative cache
    write_config(daemon, LISTENERS + memory_directory("jane", "john"))
    reload(daemon, log_says(daemon, "reloaded: 1 directories"))
    # The same connection: not dropped, and answered from the new directory (the old cache went with the old one).
    assert client.socketmap("mailbox", "john@example.org") == b"OK example.org/john/"
    assert client.socketmap("mailbox", "jane@example.org") == b"OK example.org/jane/"
    write_config(daemon, LISTENERS + memory_directory("john"))
    reload(daemon, lambda: daemon.log().count("reloaded:") == 2)
    assert client.socketmap("mailbox", "jane@example.org") == b"NOTFOUND "
    client.close()
    assert daemon.stop() == 0


def test_a_configuration_with_errors_changes_nothing(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(LISTENERS + memory_directory("jane"), wait_for=("socketmap",))
    client = Client(daemon.socket("socketmap"))
    assert client.socketmap("mailbox", "jane@example.org") == b"OK example.org/jane/"
    write_config(daemon, LISTENERS + memory_directory("john") + "[lookup]\nmailbox-path = 42\n[broken\n")
    reload(daemon, log_says(daemon, "reload failed"))
    assert "invalid TOML" in daemon.log()
    assert client.socketmap("mailbox", "jane@example.org") == b"OK example.org/jane/"
    assert client.socketmap("mailbox", "john@example.org") == b"NOTFOUND "
    # An unknown key is an error too: all of them are logged, nothing is applied.
    write_config(daemon, LISTENERS + memory_directory("john") + '[lookup]\nmailbox-paht = "{local}"\n')
    reload(daemon, lambda: daemon.log().count("reload failed") == 2)
    assert "lookup.mailbox-paht" in daemon.log()
    assert client.socketmap("mailbox", "john@example.org") == b"NOTFOUND "
    # Fixed: applied.
    write_config(daemon, LISTENERS + memory_directory("john"))
    reload(daemon, log_says(daemon, "reloaded:"))
    assert Client(daemon.socket("socketmap")).socketmap("mailbox", "john@example.org") == b"OK example.org/john/"
    assert daemon.stop() == 0


def test_userdb_and_policy_settings_apply_to_open_connections(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(LISTENERS + memory_directory("jane"), wait_for=("userdb", "policy"))
    userdb = Client(daemon.socket("userdb"))
    userdb.until(b"SPID\t")
    userdb.until(b"\n")
    userdb.sock.sendall(b"VERSION\t1\t0\nUSER\t1\tjane\tservice=lmtp\n")
    assert userdb.until(b"\n") == b"USER\t1\tjane\tuid=5000\thome=/srv/example.org/jane\n"
    policy = Client(daemon.socket("policy"))
    request = b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=\nrecipient=nobody@example.org\n\n"
    policy.sock.sendall(request)
    assert policy.until(b"\n\n") == b"action=550 5.1.1 Recipient address <nobody@example.org> does not exist\n\n"

    write_config(
        daemon,
        LISTENERS + memory_directory("jane", home="/home/{local}") + '[policy]\nunknown-recipient = "defer"\n',
    )
    reload(daemon, log_says(daemon, "reloaded:"))
    userdb.sock.sendall(b"USER\t2\tjane\tservice=lmtp\n")
    assert userdb.until(b"\n") == b"USER\t2\tjane\tuid=5000\thome=/home/jane\n"
    policy.sock.sendall(request)
    assert policy.until(b"\n\n") == b"action=450 4.1.1 Recipient address <nobody@example.org> does not exist\n\n"
    userdb.close()
    policy.close()
    assert daemon.stop() == 0


def test_server_changes_need_a_restart(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(LISTENERS + memory_directory("jane"), wait_for=("socketmap",))
    extra = server_toml({"more": "socketmap"}).split("\n", 3)[3]  # the listener table alone
    write_config(daemon, LISTENERS + extra + memory_directory("jane", "john"))
    reload(daemon, log_says(daemon, "reloaded:"))
    assert "[server] changed" in daemon.log()
    assert not Path(daemon.socket("more")).exists()
    # The rest was applied.
    assert Client(daemon.socket("socketmap")).socketmap("mailbox", "john@example.org") == b"OK example.org/john/"
    assert daemon.stop() == 0


def test_a_directory_that_cannot_be_opened_changes_nothing(daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """An internal directory whose schema is newer than this code is refused at a reload as at start-up."""
    database = tmp_path / "newer.sqlite3"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE schema_version (id SMALLINT NOT NULL PRIMARY KEY, version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1, 999)")
    daemon = daemon_factory(LISTENERS + memory_directory("jane"), wait_for=("socketmap",))
    internal = (
        '[storage]\ndirectory = "main"\n[directory.main]\ntype = "internal"\nstore = "db"\n'
        f'[store.db]\ntype = "sqlite"\npath = "{database}"\n'
    )
    write_config(daemon, LISTENERS + internal)
    reload(daemon, log_says(daemon, "reload failed"))
    assert "999" in daemon.log()
    assert Client(daemon.socket("socketmap")).socketmap("mailbox", "jane@example.org") == b"OK example.org/jane/"
    assert daemon.stop() == 0


def test_systemd_is_told_of_the_reload(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    """Type=notify: RELOADING=1 when the reload begins, READY=1 when it is over (ExecReload sends SIGHUP)."""
    notify_path = str(short_tmp / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    daemon = daemon_factory(
        LISTENERS + memory_directory("jane"), wait_for=("socketmap",), env={"NOTIFY_SOCKET": notify_path}
    )
    assert notify.recv(1024).startswith(b"READY=1")
    daemon.proc.send_signal(signal.SIGHUP)
    assert notify.recv(1024) == b"RELOADING=1"
    assert notify.recv(1024).startswith(b"READY=1")
    assert daemon.stop() == 0
    notify.close()
