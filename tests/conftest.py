"""Fixtures that start the real daemon and find the real clients.

Unix socket paths are limited to ~100 bytes, so daemons get short directories under /tmp rather than pytest's
deep tmp_path. Under CI=true a missing client (postmap) fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

pytest_plugins = ["dbservers"]  # private PostgreSQL and MariaDB fixtures

MAILROSTER = str(Path(sys.executable).parent / "mailroster")
IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(message: str) -> NoReturn:
    """Something a test needs is missing: skip, but fail under CI=true, where .ci/run installs everything."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of an external tool; skip without it, fail under CI=true."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
    )
    if path is None:
        unavailable(f"{name} is not installed (.ci/run installs it)")
    return path


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_for_socket(address: str | tuple[str, int], deadline: float, proc: subprocess.Popen[bytes] | None) -> None:
    while True:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(address)
                return
            except OSError:
                pass
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"daemon did not start listening on {address}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_toml(listeners: dict[str, str], state_dir: str = "{run}") -> str:
    """The ``[server]`` table of a test daemon: run directory ``{run}``, state directory ``state_dir``, a Unix-socket
    listener ``unix:NAME`` per name (name -> protocol), mode 0666 as Postfix and Dovecot connect unprivileged."""
    text = f'[server]\nrun-dir = "{{run}}"\nstate-dir = "{state_dir}"\n'
    for name, protocol in listeners.items():
        text += f'[server.listener.{name}]\nprotocol = "{protocol}"\nbind = "unix:{name}"\n'
        text += 'socket = { mode = "0666" }\n'
    return text


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningDaemon:
    """A ``mailroster serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    config_dir: Path
    run_dir: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)

    def socket(self, name: str) -> str:
        return str(self.run_dir / name)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


class DaemonLauncher:
    """Starts ``mailroster serve`` subprocesses on configs written from TOML text, and stops them all.

    ``{run}`` in the text is replaced with the run directory, ``{port:NAME}`` with a free TCP port (remembered in
    ``daemon.ports[NAME]``); ``before`` maps file names (sorting before ``mailroster.toml``, e.g. an example
    configuration) to their text. ``start`` returns once every socket named in ``wait_for`` (relative to the run
    directory) and every port accepts connections.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.started: list[RunningDaemon] = []

    def start(
        self,
        toml: str,
        wait_for: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        before: dict[str, str] | None = None,
    ) -> RunningDaemon:
        base = self.base / f"d{len(self.started)}"
        config_dir, run_dir = base / "etc", base / "run"
        config_dir.mkdir(parents=True)
        run_dir.mkdir(parents=True)
        ports: dict[str, int] = {}
        while "{port:" in toml:
            start_i = toml.index("{port:")
            end_i = toml.index("}", start_i)
            ports[toml[start_i + 6 : end_i]] = port = free_port()
            toml = toml[:start_i] + str(port) + toml[end_i + 1 :]
        (config_dir / "mailroster.toml").write_text(toml.replace("{run}", str(run_dir)))
        for name, text in (before or {}).items():  # files read before mailroster.toml (name order): examples
            (config_dir / name).write_text(text)
        log_path = base / "daemon.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [MAILROSTER, "serve", "-c", str(config_dir), "--log-level", "debug"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        daemon = RunningDaemon(proc, config_dir, run_dir, log_path, ports)
        self.started.append(daemon)
        deadline = time.monotonic() + 15
        try:
            for name in wait_for:
                wait_for_socket(str(run_dir / name), deadline, proc)
            for port in ports.values():
                wait_for_socket(("127.0.0.1", port), deadline, proc)
        except RuntimeError:
            daemon.stop(signal.SIGKILL)
            raise RuntimeError(f"daemon failed to start:\n{daemon.log()}") from None
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)


@pytest.fixture
def daemon_factory(short_tmp: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """Start real daemons for one test (see :class:`DaemonLauncher`)."""
    launcher = DaemonLauncher(short_tmp)
    yield launcher.start
    launcher.stop_all()


@pytest.fixture(scope="module")
def module_launcher() -> Iterator[DaemonLauncher]:
    """A launcher whose daemons live for a whole test module (one daemon serving many queries)."""
    base = Path(tempfile.mkdtemp(prefix="mr", dir="/tmp"))
    base.chmod(0o755)
    launcher = DaemonLauncher(base)
    try:
        yield launcher
    finally:
        launcher.stop_all()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postmap() -> Callable[[str, str], subprocess.CompletedProcess[str]]:
    """``postmap -q KEY TABLE`` with a private, empty main.cf (socketmap and tcp are built in)."""
    binary = require_tool("postmap")
    config_dir = Path(tempfile.mkdtemp(prefix="mrpf", dir="/tmp"))
    (config_dir / "main.cf").write_text("")

    def query(key: str, table: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "-c", str(config_dir), "-q", key, table], capture_output=True, text=True, timeout=30
        )

    return query
