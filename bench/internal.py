"""The ``internal`` part: socketmap lookups/s of mailroster's internal directory on SQLite, cache off, by size.

One mailroster per size (1 thousand, 100 thousand and 1 million principals by default), each serving its own
SQLite file through its own socketmap listener, with ``[directory.default.cache] entries = 0``: every lookup
reaches the database. The rounds alternate between the sizes (8 connections) and the table compares each size's
CPU per lookup with the smallest size's: the internal directory promises that a lookup costs the same at a
thousand principals as at a million (every lookup column is indexed).

The databases are built directly with the stdlib :mod:`sqlite3` module: the schema is created by mailroster's
own :func:`ensure_schema`, then every principal goes in with ``executemany`` in one transaction (the CLI or the
import API would take minutes for a million). Each principal ``user{i}`` is an individual with one address,
``user{i}@example.com``, in the domain principal ``example.com``: exactly the rows that ``mailroster domain add``
and ``mailroster principal add`` write. At the larger sizes the load generator cycles over an evenly spread
sample of the principals (at most ``keys`` of them), so that its request table stays small while the database
holds every row.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mailroster.backends.internal_schema import ensure_schema
from mailroster.backends.store import SqliteStoreConfig
from mailroster.backends.store_sqlite import SqliteStore

from . import loadgen
from .common import Workload, mailbox_value, netstring, user_address
from .loadgen import ReplyError, RoundResult
from .procs import BenchError, ServerProcess, machine_busy_seconds

__all__ = [
    "DEFAULT_KEYS",
    "DEFAULT_SIZES",
    "QUICK_SIZES",
    "SizesPart",
    "build_database",
    "config",
    "parse_sizes",
    "prepare",
    "run_part",
    "sample_workload",
    "size_label",
]

#: Principals per database, by default and with ``--quick``.
DEFAULT_SIZES = (1_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000, 100_000)
#: At most this many distinct keys per size: the load generator's request table, not the database.
DEFAULT_KEYS = 100_000
#: Connections of every round.
CONNS = 8
DOMAIN = "example.com"
#: The principal ids: the domain first, then user{i} at USER_ID0 + i (as management would number them).
DOMAIN_ID = 1
USER_ID0 = 2
_BATCH = 50_000


def size_label(size: int) -> str:
    """1000 -> ``1k``, 1000000 -> ``1M``; other sizes as they are."""
    for factor, suffix in ((1_000_000, "M"), (1_000, "k")):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{suffix}"
    return str(size)


def parse_sizes(text: str) -> list[int]:
    """``1k,100k,1M`` (or plain numbers) -> sorted distinct sizes, each at least 1."""
    sizes = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        factor = {"k": 1_000, "m": 1_000_000}.get(item[-1].lower(), 1)
        digits = item[:-1] if factor > 1 else item
        if not digits.isdigit() or int(digits) * factor < 1:
            raise ValueError(f"bad size {item!r}: a positive number, optionally with k or M")
        sizes.add(int(digits) * factor)
    if not sizes:
        raise ValueError("no sizes given")
    return sorted(sizes)


def sample_indexes(size: int, keys: int) -> range:
    """At most ``keys`` user indexes evenly spread over ``range(size)``."""
    step = max(1, math.ceil(size / max(1, keys)))
    return range(0, size, step)


def sample_workload(size: int, keys: int) -> Workload:
    """``mailbox user{i}@example.com`` -> ``OK example.com/user{i}/`` for the sampled users of a ``size`` database."""
    indexes = sample_indexes(size, keys)
    return Workload(
        tuple(netstring(b"mailbox " + user_address(i).encode()) for i in indexes),
        tuple(netstring(b"OK " + mailbox_value(i).encode()) for i in indexes),
    )


def check_workload(size: int) -> Workload:
    """A handful of keys checked before measuring: the first, the last and a few between, plus an unknown one."""
    indexes = sorted({0, 1, size // 3, size // 2, (2 * size) // 3, size - 2, size - 1} & set(range(size)))
    requests = [netstring(b"mailbox " + user_address(i).encode()) for i in indexes]
    replies = [netstring(b"OK " + mailbox_value(i).encode()) for i in indexes]
    requests.append(netstring(b"mailbox " + user_address(size).encode()))  # no such principal
    replies.append(netstring(b"NOTFOUND "))
    return Workload(tuple(requests), tuple(replies))


async def _create_schema(path: Path) -> None:
    store = SqliteStore(str(path), SqliteStoreConfig(type="sqlite"))
    try:
        await ensure_schema(store)
    finally:
        await store.close()


def build_database(path: Path, size: int) -> None:
    """A fresh SQLite internal directory at ``path`` with the domain ``example.com`` and ``size`` individuals
    ``user{i}``, each with the one address ``user{i}@example.com`` (seq 0: its primary).
    """
    if path.exists():
        path.unlink()
    asyncio.run(_create_schema(path))  # mailroster's own DDL and seed rows (changes counter, schema version)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a throw-away file: no fsync per commit
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO principals (id, name, type, description, quota, enabled) VALUES (?, ?, 'domain', '', NULL, 1)",
            (DOMAIN_ID, DOMAIN),
        )
        for start in range(0, size, _BATCH):
            batch = range(start, min(size, start + _BATCH))
            conn.executemany(
                "INSERT INTO principals (id, name, type, description, quota, enabled)"
                " VALUES (?, ?, 'individual', '', NULL, 1)",
                ((USER_ID0 + i, f"user{i}") for i in batch),
            )
            conn.executemany(
                "INSERT INTO addresses (address, principal_id, domain_id, seq) VALUES (?, ?, ?, 0)",
                ((user_address(i), USER_ID0 + i, DOMAIN_ID) for i in batch),
            )
        conn.execute("UPDATE changes SET counter = counter + 1 WHERE id = 1")  # as every management write does
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()


def config(tmpdir: Path, socket_name: str, db_name: str) -> str:
    """mailroster's configuration for one size: its socketmap listener, its SQLite store, the cache off."""
    return "\n".join(
        [
            "# Written by bench/internal.py.",
            "[server]",
            f'run-dir = "{tmpdir}"',
            f'state-dir = "{tmpdir}"',
            'event-loop = "uvloop"',
            "",
            "[server.listener.socketmap]",
            'protocol = "socketmap"',
            f'bind = "unix:{socket_name}"',
            'socket = { mode = "0600" }',
            "",
            "[storage]",
            'directory = "default"',
            "",
            "[store.db]",
            'type = "sqlite"',
            f'path = "{db_name}"',
            "",
            "[directory.default]",
            'type = "internal"',
            'store = "db"',
            "",
            "[directory.default.cache]",
            "entries = 0",
            "",
        ]
    )


def prepare(
    script: Path, tmpdir: Path, sizes: Sequence[int], log_level: str, progress: Callable[[str], None]
) -> list[ServerProcess]:
    """Build one database and configuration per size; the servers (named by size, e.g. ``1M``), not started."""
    servers = []
    for size in sizes:
        label = size_label(size)
        started = time.perf_counter()
        db_name = f"internal-{label}.sqlite3"
        build_database(tmpdir / db_name, size)
        progress(f"internal: {size} principals written to {db_name} ({time.perf_counter() - started:.2f}s)")
        confdir = tmpdir / f"conf-internal-{label}"
        confdir.mkdir()
        socket_name = f"mr-int-{label}.sock"
        (confdir / "bench.toml").write_text(config(tmpdir, socket_name, db_name))
        servers.append(
            ServerProcess(
                label,
                [str(script), "serve", "-c", str(confdir), "--log-level", log_level],
                str(tmpdir / socket_name),
                tmpdir / f"mailroster-internal-{label}.log",
                tmpdir,
            )
        )
    return servers


@dataclass(eq=False)
class SizesPart:
    """The internal part's rounds per (connections, size label), in the order they ran; compared by size."""

    key: str
    title: str
    conns: list[int]
    sizes: list[str]
    rounds: dict[tuple[int, str], list[RoundResult]] = field(default_factory=dict)

    def add(self, conns: int, size: str, result: RoundResult) -> None:
        self.rounds.setdefault((conns, size), []).append(result)

    def cpu_ratio(self, conns: int, size: str) -> float:
        """Median over rounds of this size's CPU us/req over the smallest size's in the same round pass."""
        base = self.rounds.get((conns, self.sizes[0]), [])
        values = [
            r.server_cpu_us_per_req / b.server_cpu_us_per_req
            for r, b in zip(self.rounds.get((conns, size), []), base, strict=False)
            if b.server_cpu_us_per_req > 0
        ]
        return statistics.median(values) if values else math.nan

    def table(self) -> str:
        header = (
            f"{'conns':>5}  {'size':<6} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
            f" {'srv CPU':>7} {'gen CPU':>7} {'other':>5}  {f'CPU vs {self.sizes[0]}':>11}"
        )
        lines = [header, "-" * len(header)]
        for conns in self.conns:
            for size in self.sizes:
                rounds = self.rounds.get((conns, size), [])
                if not rounds:
                    continue
                lines.append(
                    f"{conns:>5}  {size:<6} {_median([r.req_per_s for r in rounds]):>9.0f}"
                    f" {_median([r.p50_ms for r in rounds]):>8.3f} {_median([r.p99_ms for r in rounds]):>8.3f}"
                    f" {_median([r.server_cpu_us_per_req for r in rounds]):>10.1f}"
                    f" {_median([(r.server_cpu_s or 0.0) / r.elapsed_s for r in rounds]):>7.0%}"
                    f" {_median([r.client_cpu_share for r in rounds]):>7.0%}"
                    f" {_median([r.other_cpu_share for r in rounds]):>5.0%}  {self.cpu_ratio(conns, size):>11.2f}"
                )
        return "\n".join(lines)

    def notes(self, keys: int, sizes: Sequence[int]) -> list[str]:
        largest = self.sizes[-1]
        ratio = self.cpu_ratio(CONNS, largest)
        return [
            "internal: one mailroster per size, each on its own SQLite file, [directory.default.cache] entries = 0"
            f" (every lookup queries the database); keys cycle over at most {keys} principals evenly spread over"
            " each database.",
            f"internal: CPU per lookup at {largest} / at {self.sizes[0]} = {ratio:.2f} (the goal: flat, near 1.00)",
            f"internal: sizes {', '.join(map(str, sizes))}; CPU vs {self.sizes[0]}: per round pass, this size's CPU"
            f" us/req over {self.sizes[0]}'s, median over passes. Part of the default run (~40 s with 1M rows,"
            " the build included); alone: --only internal.",
        ]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


async def run_part(
    servers: Sequence[ServerProcess],
    sizes: Sequence[int],
    keys: int,
    *,
    rounds: int,
    warmup: float,
    duration: float,
    progress: Callable[[str], None],
) -> SizesPart:
    """Check a handful of keys on every server, then ``rounds`` passes over the sizes, ``CONNS`` connections each."""
    labels = [server.name for server in servers]
    part = SizesPart(
        "internal",
        f"socketmap `mailbox` lookups, internal directory on SQLite, cache off, at {', '.join(labels)} principals",
        [CONNS],
        labels,
    )
    workloads = []
    for server, size in zip(servers, sizes, strict=True):
        started = time.perf_counter()
        checks = check_workload(size)
        try:
            await loadgen.verify_all(server.socket_path, checks, conns=1)
        except ReplyError as exc:
            server.check_alive()
            raise BenchError(f"internal {server.name} does not answer as expected: {exc}\n{server.log_tail()}") from exc
        progress(
            f"internal {server.name}: {len(checks)} keys answered correctly ({time.perf_counter() - started:.2f}s)"
        )
        workloads.append(sample_workload(size, keys))
    for round_no in range(1, rounds + 1):
        for server, workload in zip(servers, workloads, strict=True):
            server.check_alive()
            server.refresh_pids()
            try:
                result = await loadgen.run_round(
                    server.socket_path,
                    workload,
                    CONNS,
                    warmup=warmup,
                    duration=duration,
                    server_cpu=server.cpu_seconds,
                    machine_cpu=machine_busy_seconds,
                )
                result.raise_for_errors(f"internal: {server.name}")
            except (OSError, ReplyError) as exc:
                server.check_alive()
                raise BenchError(
                    f"internal: {server.name}: {exc}\n{server.name}'s output:\n{server.log_tail()}"
                ) from exc
            part.add(CONNS, server.name, result)
            progress(f"internal {server.name:<5} round {round_no}/{rounds} {result.summary()}")
    return part
