"""The real daemon's life cycle: sockets, limits, idle timeouts, draining on SIGTERM, systemd notification."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mailroster.backends.memory import MemoryDirectory
from mailroster.backends.model import Principal
from mailroster.protocols.netstring import NetstringDecoder, encode_netstring

from conftest import MAILROSTER, free_port
from inprocess import SlowDirectory, ThreadedDaemon

DIRECTORY = """
[storage]
directory = "main"
[directory.main]
type = "memory"
[[directory.main.principals]]
name = "alice"
email = ["alice@example.org"]
"""


def config(extra: str = "", server: str = "") -> str:
    return f"""
[server]
run-dir = "{{run}}"
state-dir = "{{run}}"
{server}
[server.listener.socketmap]
protocol = "socketmap"
bind = "unix:socketmap"
socket = {{ mode = "0640" }}
{extra}
{DIRECTORY}"""


def query(sock: socket.socket, request: bytes) -> bytes:
    sock.sendall(encode_netstring(request))
    decoder = NetstringDecoder()
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed")
        frames = decoder.feed(data)
        if frames:
            return frames[0]


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def test_unix_socket_mode_and_group_applied_and_removed_on_stop(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    group = "nogroup" if _group_exists("nogroup") else "root"
    daemon = daemon_factory(
        config().replace('socket = { mode = "0640" }', f'socket = {{ mode = "0640", group = "{group}" }}'),
        wait_for=("socketmap",),
    )
    path = daemon.socket("socketmap")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert grp.getgrgid(st.st_gid).gr_name == group
    assert daemon.stop() == 0
    assert not os.path.exists(path)


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def test_stale_socket_is_replaced_but_a_live_one_is_not(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    first = daemon_factory(config(), wait_for=("socketmap",))
    path = first.socket("socketmap")
    # A second daemon on the same path must refuse: the socket is alive.
    (short_tmp / "second").mkdir()
    (short_tmp / "second" / "c.toml").write_text(config().replace("{run}", str(first.run_dir)))
    second = subprocess.run(
        [MAILROSTER, "serve", "-c", str(short_tmp / "second")], capture_output=True, text=True, timeout=20
    )
    assert second.returncode == 78
    assert "in use by another process" in second.stderr
    with connect(path) as sock:
        assert query(sock, b"domain example.org") == b"OK example.org"
    # Kill the first without cleanup: its socket file stays behind, stale.
    first.stop(signal.SIGKILL)
    assert os.path.exists(path)
    third = daemon_factory(config().replace("{run}", str(first.run_dir)))
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(path) as sock:
                assert query(sock, b"domain example.org") == b"OK example.org"
            break
        except OSError:
            assert time.monotonic() < deadline, third.log()
            time.sleep(0.05)
    assert third.stop() == 0


def test_idle_connections_are_closed_and_active_ones_kept(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(config(server='idle-timeout = "1s"'), wait_for=("socketmap",))
    idle = connect(daemon.socket("socketmap"))
    active = connect(daemon.socket("socketmap"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert query(active, b"domain example.org") == b"OK example.org"
        time.sleep(0.2)
    idle.settimeout(1)
    assert idle.recv(10) == b""  # closed by the daemon
    assert query(active, b"domain example.org") == b"OK example.org"


def test_connection_limit_refuses_extra_connections_and_serves_the_rest(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(config(server="max-connections = 3"), wait_for=("socketmap",))
    held = [connect(daemon.socket("socketmap")) for _ in range(3)]
    for sock in held:
        assert query(sock, b"domain example.org") == b"OK example.org"
    extra = connect(daemon.socket("socketmap"))
    with pytest.raises(ConnectionError):
        query(extra, b"domain example.org")
    held[0].close()
    time.sleep(0.2)
    with connect(daemon.socket("socketmap")) as again:
        assert query(again, b"domain example.org") == b"OK example.org"
    assert "connection limit of 3 reached" in daemon.log()


def test_hundreds_of_idle_connections_do_not_starve_an_active_one(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    daemon = daemon_factory(config(), wait_for=("socketmap",))
    idle = [connect(daemon.socket("socketmap")) for _ in range(300)]
    for sock in idle[::2]:
        sock.sendall(b"5:half")  # a partial frame, never completed
    with connect(daemon.socket("socketmap")) as active:
        for _ in range(50):
            assert query(active, b"mailbox alice@example.org") == b"OK example.org/alice/"
    for sock in idle:
        sock.close()


def test_sigterm_exits_cleanly_and_notifies_systemd(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    notify_path = str(short_tmp / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(10)
    daemon = daemon_factory(config(), wait_for=("socketmap",), env={"NOTIFY_SOCKET": notify_path})
    assert notify.recv(1024).startswith(b"READY=1")
    with connect(daemon.socket("socketmap")) as sock:
        assert query(sock, b"domain example.org") == b"OK example.org"
        daemon.proc.send_signal(signal.SIGTERM)
        assert notify.recv(1024) == b"STOPPING=1"
        sock.settimeout(5)
        assert sock.recv(10) == b""  # an idle connection is closed at once
    assert daemon.proc.wait(10) == 0
    notify.close()


def test_tcp_listener_and_bad_config_exit_code(daemon_factory, short_tmp: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    daemon = daemon_factory(
        config(extra=f'[server.listener.tcp]\nprotocol = "tcp-table"\nbind = "127.0.0.1:{port}"\nmap = "domain"\n'),
        wait_for=("socketmap",),
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"get example.org\nget example.com\n")
        data = b""
        while data.count(b"\n") < 2:
            data += sock.recv(4096)
    assert data == b"200 example.org\n500 not%20found\n"
    assert daemon.stop() == 0
    # A port already taken: start-up fails with a clear message and EX_CONFIG.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        (short_tmp / "busy").mkdir()
        (short_tmp / "busy" / "c.toml").write_text(
            config(
                extra=f'[server.listener.tcp]\nprotocol = "tcp-table"\nbind = "127.0.0.1:{busy}"\nmap = "domain"\n'
            ).replace("{run}", str(short_tmp / "busy"))
        )
        result = subprocess.run(
            [MAILROSTER, "serve", "-c", str(short_tmp / "busy")], capture_output=True, text=True, timeout=20
        )
    assert result.returncode == 78
    assert f"cannot bind 127.0.0.1:{busy}" in result.stderr
    assert not os.path.exists(short_tmp / "busy" / "socketmap")  # what was bound is cleaned up


def test_shutdown_drains_in_flight_requests(short_tmp: Path) -> None:
    """A request in flight when the daemon is told to stop still gets its answer; then the connection closes."""
    (short_tmp / "c.toml").write_text(config().replace("{run}", str(short_tmp)))
    slow = SlowDirectory(MemoryDirectory([Principal("alice", emails=("alice@example.org",))]), delay=0.5)
    with (
        ThreadedDaemon(short_tmp / "c.toml", {"main": slow}) as threaded,
        connect(str(short_tmp / "socketmap")) as sock,
    ):
        sock.sendall(encode_netstring(b"mailbox alice@example.org"))
        time.sleep(0.1)
        threaded.begin_shutdown()
        time.sleep(0.1)
        assert not os.path.exists(short_tmp / "socketmap")  # no longer listening
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data == encode_netstring(b"OK example.org/alice/")
