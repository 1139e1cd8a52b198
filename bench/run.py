"""``make bench``: mailroster side by side with a reference server, per protocol, as in-round ratios.

Parts (``--only`` picks some; all by default):

- ``socketmap``: the Postfix socketmap ``mailbox`` lookup, mailroster against the *floor* (:mod:`bench.floor`), the
  cheapest correct Python socketmap server, at 1, 8 and 32 connections (:mod:`bench.loadgen`).
- ``auth``: PLAIN logins over Dovecot's auth-client protocol (:mod:`bench.auth`), mailroster's ``dovecot-auth``
  listener against a real Dovecot auth process (:mod:`bench.dovecot`), both with their auth cache on and warm, the
  users' secrets ``{PLAIN}``, at 1, 8 and 32 connections.
- ``userdb``: ``USER`` lookups over the auth-master protocol, mailroster's ``dovecot-master`` listener against
  Dovecot's ``auth-userdb`` socket, at 8 connections.
- ``crypt``: repeated PLAIN logins of users whose secret is ``{SHA512-CRYPT}``, mailroster against Dovecot, at 8
  connections. mailroster's auth cache keeps a keyed hash of each successful (login, password), so a repeated
  login runs no crypt; Dovecot's cache keeps the stored hash and, for plaintext mechanisms, runs crypt again on
  every hit. The target is mailroster >= 20x Dovecot's logins/s.
- ``burst``: socketmap lookups (8 connections, and 1 for the latency of an unloaded client) at mailroster while
  16 other connections fire uncached ``{ARGON2ID}`` logins at it (a second ``dovecot-auth`` listener on a
  directory whose cache has 0 entries), against the same lookups without the burst. The target is a p99 under
  1 ms during the burst.
- ``internal``: socketmap lookups of mailroster's internal directory on SQLite with its cache off, one mailroster
  per size (1k, 100k and 1M principals), compared between sizes at 8 connections (:mod:`bench.internal`): CPU
  per lookup should stay flat from 1k to 1M. About 40 s in all, building the 1M-row database (~7 s) included.
- ``external``: socketmap lookups of the SQL directory on a private PostgreSQL and a private MariaDB and of the
  LDAP directory on a private slapd, cache off, at 8 connections (:mod:`bench.external`), with mailroster's CPU
  and the database server's CPU per lookup. About 35 s, the servers' start included. A backend whose server is
  not installed (or that cannot start it: the servers run as their system users, which needs root) is skipped
  with a note.

What is measured, and why:

- All servers run as separate processes on unix sockets in a private temp dir and serve the same users (mailroster
  from memory directories, the floor from a dict, Dovecot from a passwd-file), so that the difference is the cost
  of each server's own code path, not of data or I/O.
- For each part and connection count the rounds alternate (mailroster, reference, mailroster, reference, ...), so
  that drift on the machine (frequency scaling, other load) hits both alike. Ratios are taken within each pair of
  rounds and the median over the pairs is reported. Before a part, every request of it is sent once and checked:
  that warms the caches, so the rounds measure the steady state.
- Per round: req/s and p50/p99 latency as the load generator sees them, and the server's CPU time (utime + stime
  from ``/proc/PID/stat``: mailroster's process and its live descendants; Dovecot's auth and auth-worker
  processes) over the same window, as CPU microseconds per request. With many connections req/s is often bounded
  by the single-threaded load generator (its own CPU share is printed as ``gen CPU``); CPU per request stays a fair
  comparison in that case.
- The whole machine's busy CPU time (``/proc/stat``) is read over the same window; what neither the server nor the
  load generator used is printed as ``other``. Rounds where it exceeds 10% of a core were disturbed by something
  else on the machine, and a note says how many there were.
- When there are at least two CPUs, the servers are pinned to CPUs other than the load generator's, so they do not
  compete with it for a core.
- Every reply is checked; any wrong reply aborts the run, and the server's log is shown.

``--floor-vs-floor`` runs a second floor in mailroster's place (socketmap only): an A/A run whose ratios show the
noise of the setup (they should be close to 1.00).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from . import auth, external, internal, loadgen
from .common import Workload, run_event_loop, user_address, uvloop_available
from .dovecot import DovecotServer, PasswdEntry, doveadm_hashes, find_tool
from .loadgen import ReplyError, RoundResult, parse_conns
from .procs import BenchError, ServerProcess, machine_busy_seconds, pinned

REPO_ROOT = Path(__file__).resolve().parent.parent

PARTS = ("socketmap", "auth", "userdb", "crypt", "burst", "internal", "external")
#: The parts that compare with a real Dovecot.
DOVECOT_PARTS = frozenset({"auth", "userdb", "crypt"})
#: Slow-hash schemes the crypt and burst parts can use (both servers verify them; doveadm pw makes them).
SLOW_SCHEMES = ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID", "ARGON2I")

#: mailroster's sockets, in its run-dir (the temp dir).
MR_SOCKETMAP = "mr.sock"
MR_AUTH = "mr-auth.sock"
MR_USERDB = "mr-userdb.sock"
MR_SLOW = "mr-slow.sock"

#: What the burst part's users log in with (one hash shared by all of them: without a cache every login hashes).
SLOW_PASSWORD = "slow-Bench"
#: The burst part's target: socketmap p99 during the burst, in milliseconds.
BURST_P99_TARGET_MS = 1.0
#: The crypt part's target: mailroster's logins/s over Dovecot's.
CRYPT_RATIO_TARGET = 20.0


def slow_login(i: int) -> str:
    return f"slow{i}"


@dataclass(frozen=True, slots=True)
class Settings:
    users: int
    conns: list[int]
    rounds: int
    warmup: float
    duration: float
    start_timeout: float
    pin: bool
    parts: tuple[str, ...] = ("socketmap",)
    auth_conns: list[int] = field(default_factory=lambda: [1, 8, 32])
    userdb_conns: list[int] = field(default_factory=lambda: [8])
    crypt_conns: list[int] = field(default_factory=lambda: [8])
    crypt_users: int = 100
    crypt_scheme: str = "SHA512-CRYPT"
    burst_conns: int = 16
    burst_lookup_conns: list[int] = field(default_factory=lambda: [1, 8])
    burst_scheme: str = "ARGON2ID"
    internal_sizes: list[int] = field(default_factory=lambda: list(internal.DEFAULT_SIZES))
    internal_keys: int = internal.DEFAULT_KEYS


def _toml_string(value: object) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def mailroster_config(
    tmpdir: Path,
    users: int,
    *,
    accounts: bool = False,
    crypt_secrets: Sequence[str] = (),
    slow_secret: str | None = None,
    slow_users: int = 0,
) -> str:
    """The benchmark's mailroster configuration.

    - ``bench``: a memory directory of ``users`` users (addresses only) with a cache of 100000 entries, behind the
      socketmap listener;
    - with ``accounts``: a memory directory ``accounts`` with the default cache config, the same ``users`` users
      with ``{PLAIN}`` secrets plus one ``crypt{i}`` user per secret in ``crypt_secrets``, behind a dovecot-auth
      and a dovecot-master listener; userdb fields as Dovecot's passwd-file has them;
    - with ``slow_secret``: a memory directory ``nocache`` (cache of 0 entries: every login hashes) of
      ``slow_users`` users sharing that secret, behind a second dovecot-auth listener.
    """
    lines = [
        "# Written by bench/run.py.",
        "[server]",
        f"run-dir = {_toml_string(tmpdir)}",
        f"state-dir = {_toml_string(tmpdir)}",
        'event-loop = "uvloop"',
        "",
        "[server.listener.socketmap]",
        'protocol = "socketmap"',
        f'bind = "unix:{MR_SOCKETMAP}"',
        'socket = { mode = "0600" }',
    ]
    if accounts:
        lines += [
            "",
            "[server.listener.auth]",
            'protocol = "dovecot-auth"',
            f'bind = "unix:{MR_AUTH}"',
            'socket = { mode = "0600" }',
            'directory = "accounts"',
            "",
            "[server.listener.userdb]",
            'protocol = "dovecot-master"',
            f'bind = "unix:{MR_USERDB}"',
            'socket = { mode = "0600" }',
            'directory = "accounts"',
        ]
    if slow_secret is not None:
        lines += [
            "",
            "[server.listener.auth-slow]",
            'protocol = "dovecot-auth"',
            f'bind = "unix:{MR_SLOW}"',
            'socket = { mode = "0600" }',
            'directory = "nocache"',
        ]
    lines += [
        "",
        "[auth]",
        'failure-delay = "0s"',  # as Dovecot's auth_failure_delay = 0: a wrong reply fails the run at once
        "",
        "[userdb]",
        f"uid = {_toml_string(auth.USERDB_UID)}",
        f"gid = {_toml_string(auth.USERDB_GID)}",
        'home = "/srv/vmail/{domain}/{local}"',
        f"mail = {_toml_string(auth.USERDB_MAIL)}",
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
        lines += [
            "",
            "[[directory.bench.principals]]",
            f'name = "user{i}"',
            f"email = [{_toml_string(user_address(i))}]",
        ]
    if accounts:
        lines += ["", "[directory.accounts]", 'type = "memory"']
        # The default cache (10000 entries a store) holds a principal and an auth entry per user; only a data set
        # that would not fit gets a bigger one, or the rounds would measure cache misses.
        needed = 2 * (users + len(crypt_secrets))
        if needed > 10000:
            lines += ["", "[directory.accounts.cache]", f"entries = {needed}"]
        for i in range(users):
            lines += [
                "",
                "[[directory.accounts.principals]]",
                f"name = {_toml_string(auth.login(i))}",
                f"email = [{_toml_string(user_address(i))}]",
                f"secret = {_toml_string('{PLAIN}' + auth.password(i))}",
            ]
        for i, secret in enumerate(crypt_secrets):
            lines += [
                "",
                "[[directory.accounts.principals]]",
                f"name = {_toml_string(auth.crypt_login(i))}",
                f"email = [{_toml_string(auth.crypt_login(i) + '@example.com')}]",
                f"secret = {_toml_string(secret)}",
            ]
    if slow_secret is not None:
        lines += ["", "[directory.nocache]", 'type = "memory"', "", "[directory.nocache.cache]", "entries = 0"]
        for i in range(slow_users):
            lines += [
                "",
                "[[directory.nocache.principals]]",
                f"name = {_toml_string(slow_login(i))}",
                f"secret = {_toml_string(slow_secret)}",
            ]
    return "\n".join(lines) + "\n"


def dovecot_entries(users: int, crypt_secrets: Sequence[str]) -> list[PasswdEntry]:
    """Dovecot's passwd-file: the same users, passwords and userdb fields as mailroster's ``accounts``."""
    entries = [
        PasswdEntry(
            auth.login(i),
            "{PLAIN}" + auth.password(i),
            auth.USERDB_UID,
            auth.USERDB_GID,
            auth.home(auth.login(i)),
            auth.USERDB_MAIL,
        )
        for i in range(users)
    ]
    entries += [
        PasswdEntry(
            auth.crypt_login(i),
            secret,
            auth.USERDB_UID,
            auth.USERDB_GID,
            auth.home(auth.crypt_login(i)),
            auth.USERDB_MAIL,
        )
        for i, secret in enumerate(crypt_secrets)
    ]
    return entries


def mailroster_hash(script: Path, scheme: str, password: str, timeout: float = 60.0) -> str:
    """A secret made by ``mailroster hash-password`` (no Dovecot needed)."""
    try:
        result = subprocess.run(
            [str(script), "hash-password", "--scheme", scheme],
            input=password + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"mailroster hash-password --scheme {scheme}: {exc}") from exc
    secret = result.stdout.strip()
    if result.returncode != 0 or not secret:
        raise BenchError(f"mailroster hash-password --scheme {scheme} failed ({result.returncode}): {result.stderr}")
    return secret


# Results and tables.


@dataclass(frozen=True, slots=True)
class Ratio:
    """A ratio column: ``metric(subject round) / metric(reference round)`` within each pair, median over pairs."""

    label: str
    metric: Callable[[RoundResult], float]


REQ_RATIO = Ratio("req/s ratio", lambda r: r.req_per_s)
CPU_RATIO = Ratio("CPU ratio", lambda r: r.server_cpu_us_per_req)
P99_RATIO = Ratio("p99 ratio", lambda r: r.p99_ms)


@dataclass(eq=False)
class Part:
    """One table: rounds per (connections, contender), in the order they ran."""

    key: str
    title: str
    conns: list[int]
    subject: str
    reference: str
    ratios: tuple[Ratio, ...] = (REQ_RATIO, CPU_RATIO)
    rounds: dict[tuple[int, str], list[RoundResult]] = field(default_factory=dict)
    #: Results of load run beside the measured one (the burst), per connection count.
    background: dict[int, list[RoundResult]] = field(default_factory=dict)

    def add(self, conns: int, contender: str, result: RoundResult) -> None:
        self.rounds.setdefault((conns, contender), []).append(result)

    def ratio(self, conns: int, ratio: Ratio) -> float:
        """The median over pairs of rounds of subject / reference."""
        pairs = zip(
            self.rounds.get((conns, self.subject), []), self.rounds.get((conns, self.reference), []), strict=False
        )
        values = []
        for s, r in pairs:
            ref = ratio.metric(r)
            if ref > 0:  # NaN compares false too
                values.append(ratio.metric(s) / ref)
        return _median(values)


@dataclass(frozen=True, slots=True)
class Contender:
    """One row of a part: the server whose CPU is measured and how to run a round against it at some conns."""

    name: str
    server: ServerProcess
    run: Callable[[int], Awaitable[RoundResult]]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _nearest_rank(sorted_ns: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted nanoseconds, in milliseconds."""
    if not sorted_ns:
        return math.nan
    return sorted_ns[min(len(sorted_ns) - 1, max(0, math.ceil(fraction * len(sorted_ns)) - 1))] / 1e6


def format_table(part: Part) -> str:
    """One row per (connections, contender): medians over rounds; on the subject's row, the medians of the per-pair
    ratios subject / reference.
    """
    header = (
        f"{'conns':>5}  {'server':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
        f" {'srv CPU':>7} {'gen CPU':>7} {'other':>5} "
    ) + "".join(f" {ratio.label:>11}" for ratio in part.ratios)
    lines = [header, "-" * len(header)]
    for conns in part.conns:
        for name in (part.subject, part.reference):
            rounds = part.rounds.get((conns, name), [])
            if not rounds:
                continue
            row = (
                f"{conns:>5}  {name:<10} {_median([r.req_per_s for r in rounds]):>9.0f}"
                f" {_median([r.p50_ms for r in rounds]):>8.3f} {_median([r.p99_ms for r in rounds]):>8.3f}"
                f" {_median([r.server_cpu_us_per_req for r in rounds]):>10.1f}"
                f" {_median([(r.server_cpu_s or 0.0) / r.elapsed_s for r in rounds]):>7.0%}"
                f" {_median([r.client_cpu_share for r in rounds]):>7.0%}"
                f" {_median([r.other_cpu_share for r in rounds]):>5.0%} "
            )
            if name == part.subject:
                row += "".join(f" {part.ratio(conns, ratio):>11.2f}" for ratio in part.ratios)
            lines.append(row)
    return "\n".join(lines)


def part_notes(part: Part, settings: Settings) -> list[str]:
    """Lines printed under a part's table: its targets and the load that ran beside it."""
    notes: list[str] = []
    if part.key == "crypt":
        for conns in part.conns:
            ratio = part.ratio(conns, REQ_RATIO)
            verdict = "met" if ratio >= CRYPT_RATIO_TARGET else "NOT met"
            notes.append(
                f"crypt, {conns} conns: mailroster / dovecot logins/s = {ratio:.1f}x "
                f"(target >= {CRYPT_RATIO_TARGET:g}x: {verdict}); CPU per login dovecot / mailroster = "
                f"{1 / part.ratio(conns, CPU_RATIO):.1f}x (less sensitive to other load)"
            )
    if part.key == "burst":
        for conns in part.conns:
            burst = part.background.get(conns, [])
            if burst:
                logins = sum(r.completed for r in burst)
                seconds = sum(r.elapsed_s for r in burst)
                latencies = sorted(ns for r in burst for ns in r.latencies_ns)
                summary = (
                    f"{logins} logins in {seconds:.1f}s, {logins / seconds:.1f}/s; login latency p50 "
                    f"{_nearest_rank(latencies, 0.5):.0f} ms, max {_nearest_rank(latencies, 1.0):.0f} ms"
                    if logins
                    else f"no login completed within {seconds:.1f}s"
                )
                notes.append(
                    f"the burst beside {conns} lookup conns: {settings.burst_conns} conns of uncached "
                    f"{settings.burst_scheme} logins: {summary}"
                )
            p99 = _median([r.p99_ms for r in part.rounds.get((conns, part.subject), [])])
            quiet = _median([r.p99_ms for r in part.rounds.get((conns, part.reference), [])])
            verdict = "met" if p99 < BURST_P99_TARGET_MS else "NOT met"
            notes.append(
                f"socketmap p99 at {conns} conns: {p99:.3f} ms during the burst, {quiet:.3f} ms without "
                f"(target < {BURST_P99_TARGET_MS:g} ms during the burst: {verdict})"
            )
    return notes


#: A round during which the rest of the machine used more than this share of a core is reported as disturbed.
DISTURBED = 0.10


def disturbance_note(parts: Sequence[Part | internal.SizesPart | external.ExternalPart]) -> str | None:
    """A warning naming how many rounds shared the machine with other load, or None."""
    rounds = [r for part in parts for group in part.rounds.values() for r in group]
    disturbed = [r for r in rounds if r.other_cpu_share > DISTURBED]
    if not disturbed:
        return None
    return (
        f"note: {len(disturbed)} of {len(rounds)} rounds ran while other processes used more than {DISTURBED:.0%} of "
        "a core;\nthe medians damp that, but compare req/s and p99 with care (CPU us/req is affected least)."
    )


def legend(parts: Sequence[Part | internal.SizesPart | external.ExternalPart]) -> str:
    text = (
        "req/s, latency (as the client sees it) and CPU: medians over rounds. CPU us/req: the server's user+system\n"
        "CPU time per request (Dovecot: its auth and auth-worker processes). srv/gen CPU: share of one core used by\n"
        "the server / the load generator; gen CPU near 100% means req/s is bounded by the load generator, so compare\n"
        "CPU us/req. other: CPU used by the rest of the machine (incl. steal) during the rounds; when it is high,\n"
        "req/s and p99 are disturbed.\n"
        "Ratios: first row / second row within each pair of rounds, median over pairs (req/s: higher is better;\n"
        "CPU and p99: lower)."
    )
    if any(part.key == "burst" for part in parts):
        text += (
            "\nburst rows: mailroster's CPU includes the slow hashes of the burst, so CPU us/req there is not the\n"
            "cost of a lookup."
        )
    return text


def describe_machine(settings: Settings, pinning: str, log_level: str) -> str:
    if uvloop_available():
        from importlib.metadata import version  # noqa: PLC0415

        loop = f"uvloop {version('uvloop')}"
    else:
        loop = "uvloop NOT installed: stock asyncio"
    text = (
        f"Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})\n"
        f"{platform.platform()}, {os.cpu_count()} CPUs; {pinning}\n"
        f'event loop: {loop} (load generator and floor); mailroster configured with event-loop = "uvloop"\n'
        f"{settings.users} users, {settings.rounds} round(s) per server and connection count, "
        f"{settings.duration:g}s measured after {settings.warmup:g}s warm-up, alternating\n"
        f"parts: {', '.join(settings.parts)}; mailroster --log-level {log_level}"
    )
    if DOVECOT_PARTS & set(settings.parts):
        version_text = _dovecot_version()
        text += f"\nDovecot {version_text}: auth_cache_size = 10M, auth_cache_ttl = 1h, passwd-file passdb and userdb"
    return text


def _dovecot_version() -> str:
    dovecot = find_tool("dovecot")
    if dovecot is None:
        return "(not found)"
    try:
        return subprocess.run(
            [dovecot, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "(version unknown)"


# Running the parts.


@dataclass(eq=False)
class Servers:
    """The server processes of a run (only those its parts need)."""

    subject: ServerProcess  # mailroster, or a second floor in an A/A run
    floor: ServerProcess | None = None
    dovecot: DovecotServer | None = None
    internal: list[ServerProcess] = field(default_factory=list)
    external: external.Externals = field(default_factory=external.Externals)

    def all(self) -> list[ServerProcess]:
        return (
            [s for s in (self.subject, self.floor, self.dovecot) if s is not None]
            + self.internal
            + [backend.mailroster for backend in self.external.backends]
        )


def _socket(tmpdir: Path, name: str) -> str:
    return str(tmpdir / name)


async def verify(server: ServerProcess, what: str, check: Awaitable[None], progress: Callable[[str], None]) -> None:
    """Await ``check`` (a ``verify_all`` of some workload against ``server``); a failure becomes a BenchError with
    the server's log.
    """
    started = time.perf_counter()
    try:
        await check
    except ReplyError as exc:
        server.check_alive()
        raise BenchError(f"{server.name} does not answer as expected: {exc}\n{server.log_tail()}") from exc
    progress(f"{server.name}: {what} answered correctly ({time.perf_counter() - started:.2f}s)")


async def alternate(
    part: Part, contenders: Sequence[Contender], settings: Settings, progress: Callable[[str], None]
) -> None:
    """The rounds of one part: for each connection count, ``settings.rounds`` rounds of every contender in turn."""
    for conns in part.conns:
        for round_no in range(1, settings.rounds + 1):
            for contender in contenders:
                server = contender.server
                server.check_alive()
                server.refresh_pids()
                try:
                    result = await contender.run(conns)
                except (OSError, ReplyError) as exc:
                    server.check_alive()
                    raise BenchError(
                        f"{part.key}: {contender.name}: {exc}\n{server.name}'s output:\n{server.log_tail()}"
                    ) from exc
                if result.errors:
                    server.check_alive()
                    try:
                        result.raise_for_errors(f"{part.key}: {contender.name}")
                    except ReplyError as exc:
                        raise BenchError(f"{exc}\n{server.name}'s output:\n{server.log_tail()}") from exc
                part.add(conns, contender.name, result)
                progress(
                    f"{part.key} conns={conns} round {round_no}/{settings.rounds} {contender.name:<10} "
                    f"{result.summary()}"
                )


def _socketmap_run(
    server: ServerProcess, workload: Workload, settings: Settings
) -> Callable[[int], Awaitable[RoundResult]]:
    def run(conns: int) -> Awaitable[RoundResult]:
        return loadgen.run_round(
            server.socket_path,
            workload,
            conns,
            warmup=settings.warmup,
            duration=settings.duration,
            server_cpu=server.cpu_seconds,
            machine_cpu=machine_busy_seconds,
        )

    return run


def _line_run(
    server: ServerProcess, socket_path: str, workload: auth.LineWorkload, settings: Settings
) -> Callable[[int], Awaitable[RoundResult]]:
    def run(conns: int) -> Awaitable[RoundResult]:
        return auth.run_round(
            socket_path,
            workload,
            conns,
            warmup=settings.warmup,
            duration=settings.duration,
            server_cpu=server.cpu_seconds,
            machine_cpu=machine_busy_seconds,
        )

    return run


async def run_parts(
    servers: Servers, tmpdir: Path, settings: Settings, progress: Callable[[str], None]
) -> tuple[list[Part | internal.SizesPart | external.ExternalPart], str]:
    """Run the parts of ``settings`` in order; returns them and the load generator's event loop module."""
    event_loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    subject, floor, dovecot = servers.subject, servers.floor, servers.dovecot
    users = settings.users
    parts: list[Part | internal.SizesPart | external.ExternalPart] = []

    socketmap_workload = Workload.mailbox(users)
    if "socketmap" in settings.parts:
        assert floor is not None
        part = Part("socketmap", "socketmap `mailbox` lookups", settings.conns, subject.name, floor.name)
        for server in (subject, floor):
            check = loadgen.verify_all(server.socket_path, socketmap_workload)
            await verify(server, f"all {users} socketmap keys", check, progress)
        contenders = [
            Contender(server.name, server, _socketmap_run(server, socketmap_workload, settings))
            for server in (subject, floor)
        ]
        await alternate(part, contenders, settings, progress)
        parts.append(part)

    line_parts: list[tuple[str, str, list[int], auth.LineWorkload, str, str]] = []
    if "auth" in settings.parts:
        title = f"PLAIN logins (auth-client), {users} users with {{PLAIN}} secrets, auth caches warm"
        line_parts.append(("auth", title, settings.auth_conns, auth.plain_workload(users), MR_AUTH, "auth"))
    if "userdb" in settings.parts:
        title = f"userdb USER lookups (auth-master, service=lmtp), {users} users"
        line_parts.append(("userdb", title, settings.userdb_conns, auth.userdb_workload(users), MR_USERDB, "userdb"))
    if "crypt" in settings.parts:
        title = (
            f"repeated PLAIN logins of {settings.crypt_users} users with {{{settings.crypt_scheme}}} secrets "
            "(auth-client), auth caches warm"
        )
        credentials = [(auth.crypt_login(i), auth.crypt_password(i)) for i in range(settings.crypt_users)]
        workload = auth.LineWorkload.plain_auth(credentials)
        line_parts.append(("crypt", title, settings.crypt_conns, workload, MR_AUTH, "auth"))
    for key, title, conns_list, workload, mr_socket, dovecot_socket in line_parts:
        assert dovecot is not None
        part = Part(key, title, conns_list, subject.name, dovecot.name)
        sockets = {
            subject.name: _socket(tmpdir, mr_socket),
            dovecot.name: dovecot.socket_path if dovecot_socket == "auth" else dovecot.userdb_socket,
        }
        for server in (subject, dovecot):
            check = auth.verify_all(sockets[server.name], workload)
            await verify(server, f"all {len(workload)} {key} requests", check, progress)
        contenders = [
            Contender(server.name, server, _line_run(server, sockets[server.name], workload, settings))
            for server in (subject, dovecot)
        ]
        await alternate(part, contenders, settings, progress)
        parts.append(part)

    if "burst" in settings.parts:
        parts.append(await run_burst(subject, tmpdir, socketmap_workload, settings, progress))
    if "internal" in settings.parts:
        parts.append(
            await internal.run_part(
                servers.internal,
                settings.internal_sizes,
                settings.internal_keys,
                rounds=settings.rounds,
                warmup=settings.warmup,
                duration=settings.duration,
                progress=progress,
            )
        )
    if "external" in settings.parts:
        parts.append(
            await external.run_part(
                servers.external,
                settings.users,
                rounds=settings.rounds,
                warmup=settings.warmup,
                duration=settings.duration,
                progress=progress,
            )
        )
    return parts, event_loop


async def run_burst(
    mailroster: ServerProcess,
    tmpdir: Path,
    workload: Workload,
    settings: Settings,
    progress: Callable[[str], None],
) -> Part:
    """Socketmap rounds with and without a burst of uncached slow-hash logins at the same mailroster."""
    part = Part(
        "burst",
        f"socketmap lookups during a burst of {settings.burst_conns} conns of uncached {settings.burst_scheme} "
        "logins at the same mailroster",
        settings.burst_lookup_conns,
        "burst",
        "no-burst",
        ratios=(REQ_RATIO, P99_RATIO),
    )
    slow_socket = _socket(tmpdir, MR_SLOW)
    slow_workload = auth.LineWorkload.plain_auth([(slow_login(i), SLOW_PASSWORD) for i in range(settings.burst_conns)])
    await verify(
        mailroster,
        f"all {len(workload)} socketmap keys",
        loadgen.verify_all(mailroster.socket_path, workload),
        progress,
    )
    await verify(
        mailroster,
        f"{settings.burst_conns} uncached {settings.burst_scheme} logins",
        auth.verify_all(slow_socket, slow_workload),
        progress,
    )
    quiet = _socketmap_run(mailroster, workload, settings)

    async def with_burst(conns: int) -> RoundResult:
        burst = auth.BackgroundLoad(slow_socket, slow_workload, settings.burst_conns)
        await burst.start()
        try:
            result = await quiet(conns)
        except BaseException:
            burst.close()  # no draining when the round failed or the run is interrupted
            raise
        burst_result = await burst.stop()
        if burst_result.errors:
            burst_result.raise_for_errors(f"burst of {settings.burst_scheme} logins")
        part.background.setdefault(conns, []).append(burst_result)
        return result

    contenders = [Contender("no-burst", mailroster, quiet), Contender("burst", mailroster, with_burst)]
    await alternate(part, contenders, settings, progress)
    return part


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _parse_parts(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"parts are a comma-separated subset of {','.join(PARTS)}")
    return tuple(name for name in PARTS if name in names)  # in the order they run


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="short rounds, one per server: a smoke test")
    parser.add_argument(
        "--only",
        type=_parse_parts,
        help=f"run only these parts: comma-separated subset of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--users", type=int, default=1000, help="users in the directory (default 1000)")
    parser.add_argument("--conns", type=parse_conns, help="socketmap connection counts (default 1,8,32)")
    parser.add_argument("--auth-conns", type=parse_conns, help="PLAIN auth connection counts (default 1,8,32)")
    parser.add_argument("--userdb-conns", type=parse_conns, help="userdb connection counts (default 8)")
    parser.add_argument("--crypt-conns", type=parse_conns, help="slow-hash login connection counts (default 8)")
    parser.add_argument("--crypt-users", type=int, default=100, help="users with slow-hash secrets (default 100)")
    parser.add_argument(
        "--crypt-scheme", default="SHA512-CRYPT", type=str.upper, choices=SLOW_SCHEMES, help="(default SHA512-CRYPT)"
    )
    parser.add_argument(
        "--burst-conns", type=int, default=16, help="connections firing uncached slow-hash logins (default 16)"
    )
    parser.add_argument(
        "--burst-lookup-conns", type=parse_conns, help="socketmap connection counts during the burst (default 1,8)"
    )
    parser.add_argument(
        "--burst-scheme", default="ARGON2ID", type=str.upper, choices=SLOW_SCHEMES, help="(default ARGON2ID)"
    )
    parser.add_argument(
        "--internal-sizes",
        type=internal.parse_sizes,
        help="principals per internal-directory database, e.g. 1k,100k,1M (default; quick 1k,10k,100k)",
    )
    parser.add_argument(
        "--internal-keys",
        type=int,
        default=internal.DEFAULT_KEYS,
        help=f"distinct keys per internal size, spread over its principals (default {internal.DEFAULT_KEYS})",
    )
    parser.add_argument("--rounds", type=int, help="rounds per server and connection count (default 3; quick 1)")
    parser.add_argument("--duration", type=float, help="measured seconds per round (default 3; quick 0.3)")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each round (default 0.5; quick 0.1)")
    parser.add_argument("--start-timeout", type=float, default=30.0, help="seconds to wait for a server's socket")
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and load generator to CPUs")
    parser.add_argument(
        "--floor-vs-floor",
        action="store_true",
        help="A/A run: a second floor in mailroster's place (shows noise; socketmap only)",
    )
    parser.add_argument("--mailroster", type=Path, help="the mailroster script (default: next to this Python)")
    parser.add_argument(
        "--mailroster-log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="mailroster's --log-level (default info, the daemon's default: one line per authentication)",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (config, server logs)")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error("--users must be at least 1")
    if args.crypt_users < 1 or args.burst_conns < 1 or args.internal_keys < 1:
        parser.error("--crypt-users, --burst-conns and --internal-keys must be at least 1")
    if args.floor_vs_floor:
        if args.only and args.only != ("socketmap",):
            parser.error("--floor-vs-floor runs the socketmap part only")
        parts: tuple[str, ...] = ("socketmap",)
    else:
        parts = args.only or PARTS
    settings = Settings(
        users=args.users,
        conns=args.conns or [1, 8, 32],
        rounds=max(1, args.rounds if args.rounds is not None else (1 if args.quick else 3)),
        warmup=args.warmup if args.warmup is not None else (0.1 if args.quick else 0.5),
        duration=args.duration if args.duration is not None else (0.3 if args.quick else 3.0),
        start_timeout=args.start_timeout,
        pin=not args.no_pin,
        parts=parts,
        auth_conns=args.auth_conns or [1, 8, 32],
        userdb_conns=args.userdb_conns or [8],
        crypt_conns=args.crypt_conns or [8],
        crypt_users=args.crypt_users,
        crypt_scheme=args.crypt_scheme,
        burst_conns=args.burst_conns,
        burst_lookup_conns=args.burst_lookup_conns or [1, 8],
        burst_scheme=args.burst_scheme,
        internal_sizes=args.internal_sizes or list(internal.QUICK_SIZES if args.quick else internal.DEFAULT_SIZES),
        internal_keys=args.internal_keys,
    )
    return args, settings


def _without_dovecot(args: argparse.Namespace, settings: Settings) -> tuple[Settings, str | None]:
    """Drop the Dovecot parts when Dovecot is not installed and they were not asked for by name."""
    wanted = DOVECOT_PARTS & set(settings.parts)
    if not wanted or (find_tool("dovecot") and find_tool("doveadm")):
        return settings, None
    if args.only:
        raise BenchError(
            f"the {', '.join(sorted(wanted))} part(s) need Dovecot (dovecot and doveadm; Debian: dovecot-core)"
        )
    parts = tuple(p for p in settings.parts if p not in DOVECOT_PARTS)
    note = f"note: dovecot/doveadm not found: skipping the {', '.join(sorted(wanted))} parts"
    return dataclasses.replace(settings, parts=parts), note


def prepare(args: argparse.Namespace, settings: Settings, tmpdir: Path, progress: Callable[[str], None]) -> Servers:
    """Write the configurations (making the slow hashes they hold) and return the servers, not started."""
    parts = set(settings.parts)
    floor_argv = [sys.executable, "-m", "bench.floor", "--users", str(settings.users)]
    if uvloop_available():
        floor_argv += ["--event-loop", "uvloop"]
    floor = None
    if "socketmap" in parts:
        socket_path = _socket(tmpdir, "floor.sock")
        floor = ServerProcess(
            "floor", [*floor_argv, "--socket", socket_path], socket_path, tmpdir / "floor.log", REPO_ROOT
        )
    if args.floor_vs_floor:
        socket_path = _socket(tmpdir, "floor2.sock")
        subject = ServerProcess(
            "floor-b", [*floor_argv, "--socket", socket_path], socket_path, tmpdir / "floor-b.log", REPO_ROOT
        )
        return Servers(subject, floor)

    script = args.mailroster or Path(sys.executable).parent / "mailroster"
    if not script.exists():
        raise BenchError(f"mailroster: {script} not found (is mailroster installed?)")
    crypt_secrets: list[str] = []
    if "crypt" in parts:
        started = time.perf_counter()
        doveadm = find_tool("doveadm") or "doveadm"
        passwords = [auth.crypt_password(i) for i in range(settings.crypt_users)]
        crypt_secrets = doveadm_hashes(settings.crypt_scheme, passwords, doveadm)
        progress(f"{len(crypt_secrets)} {settings.crypt_scheme} hashes made ({time.perf_counter() - started:.2f}s)")
    slow_secret = None
    if "burst" in parts:
        slow_secret = mailroster_hash(script, settings.burst_scheme, SLOW_PASSWORD)
    confdir = tmpdir / "conf"
    confdir.mkdir()
    (confdir / "bench.toml").write_text(
        mailroster_config(
            tmpdir,
            settings.users,
            accounts=bool(parts & {"auth", "userdb", "crypt"}),
            crypt_secrets=crypt_secrets,
            slow_secret=slow_secret,
            slow_users=settings.burst_conns,
        )
    )
    wait = [_socket(tmpdir, MR_AUTH), _socket(tmpdir, MR_USERDB)] if parts & DOVECOT_PARTS else []
    if slow_secret is not None:
        wait.append(_socket(tmpdir, MR_SLOW))
    subject = ServerProcess(
        "mailroster",
        [str(script), "serve", "-c", str(confdir), "--log-level", args.mailroster_log_level],
        _socket(tmpdir, MR_SOCKETMAP),
        tmpdir / "mailroster.log",
        tmpdir,
        wait_sockets=wait,
    )
    dovecot = None
    if parts & DOVECOT_PARTS:
        tmpdir.chmod(0o711)  # Dovecot's auth process runs as the dovecot user and reads the passwd-file below
        entries = dovecot_entries(settings.users, crypt_secrets)
        dovecot = DovecotServer.create("dovecot", tmpdir / "dc", entries, find_tool("dovecot") or "dovecot")
    internal_servers = []
    if "internal" in parts:
        internal_servers = internal.prepare(
            script, tmpdir, settings.internal_sizes, args.mailroster_log_level, progress
        )
    externals = external.Externals()
    if "external" in parts:  # last: nothing after it can fail and leave its servers running
        externals = external.prepare(script, tmpdir, settings.users, args.mailroster_log_level, progress)
    return Servers(subject, floor, dovecot, internal_servers, externals)


def main(argv: Sequence[str] | None = None) -> int:
    args, settings = parse_args(argv)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    started = time.monotonic()
    tmpdir = Path(tempfile.mkdtemp(prefix="mrb-", dir="/tmp"))  # short: sun_path holds ~100 bytes
    servers: list[ServerProcess] = []
    plan: Servers | None = None
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        settings, skipped = _without_dovecot(args, settings)
        if skipped:
            print(skipped, flush=True)
        plan = prepare(args, settings, tmpdir, progress)
        with pinned(settings.pin) as cpus:
            for server in plan.all():
                servers.append(server)  # stopped in the finally clause, however far start() got
                server.start()
        pinning = (
            f"servers pinned to CPU {','.join(map(str, sorted(cpus[0])))}, load generator to CPU "
            f"{','.join(map(str, sorted(cpus[1])))}"
            if cpus
            else "no CPU pinning"
        )
        print(describe_machine(settings, pinning, args.mailroster_log_level), flush=True)
        for server in servers:
            server.wait_listening(settings.start_timeout)
        parts, event_loop = run_event_loop(
            run_parts(plan, tmpdir, settings, progress), "uvloop" if uvloop_available() else "asyncio"
        )
        print(f"load generator event loop: {event_loop}")
        for part in parts:
            print()
            print(f"{part.key}: {part.title}")
            if isinstance(part, internal.SizesPart):
                print(part.table())
                notes = part.notes(settings.internal_keys, settings.internal_sizes)
            elif isinstance(part, external.ExternalPart):
                print(part.table())
                notes = part.notes(settings.users)
            else:
                print(format_table(part))
                notes = part_notes(part, settings)
            for line in notes:
                print(line)
        print()
        note = disturbance_note(parts)
        if note:
            print(note)
        print(legend(parts))
        print(f"bench took {time.monotonic() - started:.0f}s")
        return 0
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the clean-up even if asked twice
        for server in reversed(servers):
            server.stop()
        if plan is not None:
            plan.external.close()  # the database servers, after the mailrosters that use them
        signal.signal(signal.SIGTERM, previous_sigterm)
        if args.keep_tmp:
            print(f"kept {tmpdir}", file=sys.stderr)
        else:
            shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
