"""The servers under test as processes: starting and stopping them, and reading their CPU time from ``/proc``.

Every server runs in a session (and process group) of its own, so that stopping it reaches the children it
spawned (Dovecot's auth process, for one) and a Ctrl-C in the terminal reaches only the orchestrator, which then
stops the servers in order. CPU time is ``utime + stime`` from ``/proc/PID/stat`` (all threads of a process); the
machine's busy time is read from ``/proc/stat`` over the same window, so that what other processes used shows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CLOCK_TICKS",
    "BenchError",
    "ServerProcess",
    "cpu_seconds",
    "file_tail",
    "machine_busy_seconds",
    "pinned",
    "process_cmdline",
    "process_tree",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run (a server did not start, died, or answered wrongly)."""


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, ()))
    return tree


def process_cmdline(pid: int) -> str:
    """The command line of ``pid`` as ``ps`` shows it (a process may have rewritten it: Dovecot's children show
    ``dovecot/auth``), or ``""`` when the process is gone.
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` (all their threads), from ``/proc/PID/stat`` fields 14 and 15."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                # Fields after the parenthesised command name start at field 3 (state): utime is the 12th of them.
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine, all CPUs: the non-idle, non-iowait fields of ``/proc/stat``'s
    ``cpu`` line (user, nice, system, irq, softirq, steal; guest time is already inside user).
    """
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass(eq=False)
class ServerProcess:
    """A server under test: its process, the socket it is reached on, and its log file.

    ``wait_sockets`` are further sockets that must accept connections before the server counts as started.
    """

    name: str
    argv: list[str]
    socket_path: str
    log_path: Path
    cwd: Path
    wait_sockets: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def check_alive(self) -> None:
        if self.proc is None:
            raise BenchError(f"{self.name} was never started")
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; its output:\n{self.log_tail()}")

    def wait_listening(self, timeout: float) -> None:
        """Wait until every socket accepts connections (the process may need a while to read its config)."""
        deadline = time.monotonic() + timeout
        for path in [self.socket_path, *self.wait_sockets]:
            while True:
                self.check_alive()
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(path)
                    except (FileNotFoundError, ConnectionRefusedError):
                        pass
                    else:
                        break
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{self.name} is not listening on {path} after {timeout:g}s; its output:\n{self.log_tail()}"
                    )
                time.sleep(0.05)

    def refresh_pids(self) -> None:
        """Find the process tree whose CPU time is measured (done between rounds: scanning /proc is not free)."""
        if self.proc is None:
            raise BenchError(f"{self.name} was never started")
        self.pids = process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pids)

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after 5 s; only ever the group this object started."""
        if self.proc is None:
            return
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                continue
            if signum == signal.SIGTERM:
                # The leader is gone; give any child it left behind in its group the same short grace.
                deadline = time.monotonic() + 2
                while _group_alive(self.proc.pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _group_alive(self.proc.pid):
                    continue
            return


def file_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of ``path``, indented, for an error message."""
    try:
        text = path.read_text(errors="replace").rstrip("\n")
    except OSError:
        return "    (no log)"
    if not text:
        return "    (no output)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def pinned(enabled: bool) -> Iterator[tuple[set[int], set[int]] | None]:
    """While servers are started, restrict this process (whose affinity they inherit) to all CPUs but one; the
    load generator (this process) then keeps that one CPU to itself.
    """
    allowed = os.sched_getaffinity(0)
    if not enabled or len(allowed) < 2:
        yield None
        return
    generator_cpu = {max(allowed)}
    server_cpus = allowed - generator_cpu
    os.sched_setaffinity(0, server_cpus)
    try:
        yield server_cpus, generator_cpu
    finally:
        os.sched_setaffinity(0, generator_cpu)
