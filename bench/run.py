"""``make bench``: mailroster against the floor, side by side, on the Postfix socketmap ``mailbox`` lookup.

What is measured, and why:

- Both servers run as separate processes on unix sockets in a private temp dir and serve the same ``N`` users
  (mailroster from a memory directory with its cache warmed by one pass over every key, the floor from a dict), so
  the difference is the cost of mailroster's own code path, not of data or I/O.
- For each connection count (1, 8, 32) the rounds alternate, mailroster, floor, mailroster, floor, ..., so that
  drift on the machine (frequency scaling, other load) hits both alike. Ratios are taken within each
  mailroster/floor pair of rounds and the median over the pairs is reported.
- Per round: req/s and p50/p99 latency as the load generator sees them (:mod:`bench.loadgen`), and the server's CPU
  time (utime + stime of the process and its live descendants, from ``/proc/PID/stat``) over the same window, as CPU
  microseconds per request. With many connections req/s is often bounded by the single-threaded load generator
  (its own CPU share is printed as ``gen CPU``); CPU per request stays a fair comparison in that case.
- The whole machine's busy CPU time (``/proc/stat``) is read over the same window; what neither the server nor the
  load generator used is printed as ``other``. Rounds where it exceeds 10% of a core were disturbed by something
  else on the machine, and a note says how many there were.
- When there are at least two CPUs, the servers are pinned to CPUs other than the load generator's, so they do not
  compete with it for a core.
- Every reply is checked; any wrong reply aborts the run.

``--floor-vs-floor`` runs a second floor in mailroster's place: an A/A run whose ratios show the noise of the
setup (they should be close to 1.00).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from .common import Workload, run_event_loop, user_address, uvloop_available
from .loadgen import ReplyError, RoundResult, parse_conns, run_round, verify_all

REPO_ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """The benchmark could not run (a server did not start, died, or answered wrongly)."""


@dataclass(frozen=True, slots=True)
class Settings:
    users: int
    conns: list[int]
    rounds: int
    warmup: float
    duration: float
    start_timeout: float
    pin: bool


def mailroster_config(tmpdir: Path, users: int) -> str:
    """The benchmark's mailroster configuration: one socketmap listener, a memory directory of ``users`` users."""

    def string(value: object) -> str:
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string

    lines = [
        "# Written by bench/run.py.",
        "[server]",
        f"run-dir = {string(tmpdir)}",
        f"state-dir = {string(tmpdir)}",
        'event-loop = "uvloop"',
        "",
        "[server.listener.socketmap]",
        'protocol = "socketmap"',
        'bind = "unix:mr.sock"',
        'socket = { mode = "0600" }',
        "",
        "[storage]",
        'directory = "bench"',
        "",
        "[directory.bench]",
        'type = "memory"',
        "",
        "[directory.bench.cache]",
        "entries = 100000",
    ]
    for i in range(users):
        lines += ["", "[[directory.bench.principals]]", f'name = "user{i}"', f"email = [{string(user_address(i))}]"]
    return "\n".join(lines) + "\n"


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
    """A server under test: its process, socket and log file."""

    name: str
    argv: list[str]
    socket_path: str
    log_path: Path
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None
    pids: list[int] = field(default_factory=list)

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            # A session (and process group) of its own: stop() reaches the server's children too, and a Ctrl-C in
            # the terminal reaches only this process, which then stops the servers in order.
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").rstrip("\n")
        except OSError:
            return "(no log)"
        if not text:
            return "    (no output)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def check_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None:
            raise BenchError(f"{self.name} exited with status {code}; its output:\n{self.log_tail()}")

    def wait_listening(self, timeout: float) -> None:
        """Wait until the socket accepts connections (the process may need a while to read its config)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(self.socket_path)
                except (FileNotFoundError, ConnectionRefusedError):
                    pass
                else:
                    return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} is not listening on {self.socket_path} after {timeout:g}s; its output:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def refresh_pids(self) -> None:
        """Find the process tree whose CPU time is measured (done between rounds: scanning /proc is not free)."""
        assert self.proc is not None
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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Results:
    """Rounds per (connections, server name), in the order they ran."""

    rounds: dict[tuple[int, str], list[RoundResult]] = field(default_factory=dict)
    event_loop: str = "?"

    def add(self, conns: int, server: str, result: RoundResult) -> None:
        self.rounds.setdefault((conns, server), []).append(result)


async def run_rounds(servers: Sequence[ServerProcess], settings: Settings, progress: Callable[[str], None]) -> Results:
    """Warm up and check every server, then run the alternating rounds."""
    results = Results(event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0])
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)

    workload = Workload.mailbox(settings.users)
    for server in servers:
        started = time.perf_counter()
        try:
            await verify_all(server.socket_path, workload)
        except ReplyError as exc:
            server.check_alive()
            raise BenchError(f"{server.name} does not answer as expected: {exc}\n{server.log_tail()}") from exc
        progress(f"{server.name}: all {settings.users} keys answered correctly ({time.perf_counter() - started:.2f}s)")

    for conns in settings.conns:
        for round_no in range(1, settings.rounds + 1):
            for server in servers:
                server.check_alive()
                server.refresh_pids()
                try:
                    result = await run_round(
                        server.socket_path,
                        workload,
                        conns,
                        warmup=settings.warmup,
                        duration=settings.duration,
                        server_cpu=server.cpu_seconds,
                        machine_cpu=machine_busy_seconds,
                    )
                except OSError as exc:
                    server.check_alive()
                    raise BenchError(f"{server.name}: cannot connect: {exc}\n{server.log_tail()}") from exc
                if result.errors:
                    server.check_alive()
                    try:
                        result.raise_for_errors(server.name)
                    except ReplyError as exc:
                        raise BenchError(f"{exc}\n{server.name}'s output:\n{server.log_tail()}") from exc
                results.add(conns, server.name, result)
                progress(f"conns={conns} round {round_no}/{settings.rounds} {server.name:<10} {result.summary()}")
    return results


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_table(results: Results, settings: Settings, subject: str, floor: str) -> str:
    """One row per (connections, server): medians over rounds; on the subject's row, the medians of the per-pair
    ratios subject / floor.
    """
    header = (
        f"{'conns':>5}  {'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
        f" {'srv CPU':>7} {'gen CPU':>7} {'other':>5}  {'req/s ratio':>11} {'CPU ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    for conns in settings.conns:
        subject_rounds = results.rounds.get((conns, subject), [])
        floor_rounds = results.rounds.get((conns, floor), [])
        pairs = list(zip(subject_rounds, floor_rounds, strict=False))
        speed_ratio = _median([s.req_per_s / f.req_per_s for s, f in pairs if f.req_per_s > 0])
        cpu_ratio = _median(
            [
                s.server_cpu_us_per_req / f.server_cpu_us_per_req
                for s, f in pairs
                if f.server_cpu_us_per_req > 0  # NaN compares false too
            ]
        )
        for name, rounds in ((subject, subject_rounds), (floor, floor_rounds)):
            if not rounds:
                continue
            row = (
                f"{conns:>5}  {name:<10} {_median([r.req_per_s for r in rounds]):>9.0f}"
                f" {_median([r.p50_ms for r in rounds]):>8.3f} {_median([r.p99_ms for r in rounds]):>8.3f}"
                f" {_median([r.server_cpu_us_per_req for r in rounds]):>10.1f}"
                f" {_median([(r.server_cpu_s or 0.0) / r.elapsed_s for r in rounds]):>7.0%}"
                f" {_median([r.client_cpu_share for r in rounds]):>7.0%}"
                f" {_median([r.other_cpu_share for r in rounds]):>5.0%}"
            )
            if name == subject:
                row += f"  {speed_ratio:>11.2f} {cpu_ratio:>9.2f}"
            lines.append(row)
    return "\n".join(lines)


#: A round during which the rest of the machine used more than this share of a core is reported as disturbed.
DISTURBED = 0.10


def disturbance_note(results: Results) -> str | None:
    """A warning naming how many rounds shared the machine with other load, or None."""
    rounds = [r for group in results.rounds.values() for r in group]
    disturbed = [r for r in rounds if r.other_cpu_share > DISTURBED]
    if not disturbed:
        return None
    return (
        f"note: {len(disturbed)} of {len(rounds)} rounds ran while other processes used more than {DISTURBED:.0%} of "
        "a core;\nthe medians damp that, but compare req/s and p99 with care (CPU us/req is affected least)."
    )


def legend(subject: str, floor: str) -> str:
    return (
        "req/s, latency (as the client sees it) and CPU: medians over rounds. CPU us/req: the server's user+system\n"
        "CPU time per request. srv/gen CPU: share of one core used by the server / the load generator; gen CPU\n"
        "near 100% means req/s is bounded by the load generator, so compare CPU us/req. other: CPU used by the rest\n"
        "of the machine (incl. steal) during the rounds; when it is high, req/s and p99 are disturbed.\n"
        f"Ratios: {subject} / {floor} within each pair of rounds, median over pairs (req/s: higher is better; CPU:\n"
        "lower)."
    )


def describe_machine(settings: Settings, pinning: str) -> str:
    if uvloop_available():
        from importlib.metadata import version  # noqa: PLC0415

        loop = f"uvloop {version('uvloop')}"
    else:
        loop = "uvloop NOT installed: stock asyncio"
    return (
        f"Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})\n"
        f"{platform.platform()}, {os.cpu_count()} CPUs; {pinning}\n"
        f'event loop: {loop} (load generator and floor); mailroster configured with event-loop = "uvloop"\n'
        f"{settings.users} users, {settings.rounds} round(s) per server and connection count, "
        f"{settings.duration:g}s measured after {settings.warmup:g}s warm-up, alternating"
    )


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


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="short rounds, one per server: a smoke test")
    parser.add_argument("--users", type=int, default=1000, help="users in the directory (default 1000)")
    parser.add_argument("--conns", type=parse_conns, help="connection counts (default 1,8,32)")
    parser.add_argument("--rounds", type=int, help="rounds per server and connection count (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per round (default 3; quick 0.3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each round (default 0.5; quick 0.1)")
    parser.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for a server's socket")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and load generator to CPUs")
    parser.add_argument(
        "--floor-vs-floor", action="store_true", help="A/A run: a second floor in mailroster's place (shows noise)"
    )
    parser.add_argument("--mailroster", type=Path, help="the mailroster script (default: next to this Python)")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, server logs)")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    settings = Settings(
        users=args.users,
        conns=args.conns or [1, 8, 32],
        rounds=max(1, args.rounds if args.rounds is not None else (1 if args.quick else 3)),
        warmup=args.warmup if args.warmup is not None else (0.1 if args.quick else 0.5),
        duration=args.duration if args.duration is not None else (0.3 if args.quick else 3.0),
        start_timeout=args.start_timeout,
        pin=not args.no_pin,
    )
    return args, settings


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)
    floor_argv = [sys.executable, "-m", "bench.floor", "--users", str(settings.users)]
    if uvloop_available():
        floor_argv += ["--event-loop", "uvloop"]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    tmpdir = Path(tempfile.mkdtemp(prefix="mrb-", dir="/tmp"))  # short: sun_path holds ~100 bytes
    floor = ServerProcess(
        "floor",
        [*floor_argv, "--socket", str(tmpdir / "floor.sock")],
        str(tmpdir / "floor.sock"),
        tmpdir / "floor.log",
        REPO_ROOT,
    )
    if args.floor_vs_floor:
        socket_path = str(tmpdir / "floor2.sock")
        subject = ServerProcess(
            "floor-b", [*floor_argv, "--socket", socket_path], socket_path, tmpdir / "floor-b.log", REPO_ROOT
        )
    else:
        confdir = tmpdir / "conf"
        confdir.mkdir()
        (confdir / "bench.toml").write_text(mailroster_config(tmpdir, settings.users))
        script = args.mailroster or Path(sys.executable).parent / "mailroster"
        subject = ServerProcess(
            "mailroster",
            [str(script), "serve", "-c", str(confdir)],
            str(tmpdir / "mr.sock"),
            tmpdir / "mailroster.log",
            tmpdir,
        )
    servers = [subject, floor]

    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with pinned(settings.pin) as cpus:
            for server in servers:
                if not Path(server.argv[0]).exists():
                    raise BenchError(f"{server.name}: {server.argv[0]} not found (is mailroster installed?)")
                server.start()
        pinning = (
            f"servers pinned to CPU {','.join(map(str, sorted(cpus[0])))}, load generator to CPU "
            f"{','.join(map(str, sorted(cpus[1])))}"
            if cpus
            else "no CPU pinning"
        )
        print(describe_machine(settings, pinning), flush=True)
        for server in servers:
            server.wait_listening(settings.start_timeout)
        results = run_event_loop(run_rounds(servers, settings, progress), "uvloop" if uvloop_available() else "asyncio")
        print(f"load generator event loop: {results.event_loop}")
        print()
        print(format_table(results, settings, subject.name, floor.name))
        print()
        note = disturbance_note(results)
        if note:
            print(note)
        print(legend(subject.name, floor.name))
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked twice
        for server in servers:
            server.stop()
        signal.signal(signal.SIGTERM, previous_sigterm)
        if args.keep_tmp:
            print(f"kept {tmpdir}", file=sys.stderr)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
