"""The ``external`` part: uncached socketmap lookups/s of mailroster's SQL and LDAP directories on real servers.

Three backends, each behind a mailroster of its own with its socketmap listener and
``[directory.<id>.cache] entries = 0`` (every lookup reaches the server):

- ``postgresql``: the SQL directory on Stalwart's sample schema (``tests/data/sql/stalwart.sql``) in a private
  PostgreSQL, configured by the shipped ``conf.d/examples/sql-stalwart.toml``;
- ``mariadb``: the same on a private MariaDB, by ``conf.d/examples/sql-stalwart-mysql.toml``;
- ``ldap``: the LDAP directory on a private slapd, by ``conf.d/examples/ldap-openldap.toml``.

Each example is read first and an override file after it (mailroster reads a config dir in name order) sets the
server's address and credentials and turns the cache off, as ``tests/test_backend_faults.py`` does. The private
servers come from the test helpers (``tests/dbservers.py``, ``tests/ldapserver.py``); a backend whose server
binaries (or system account) are missing is skipped with a note. Every backend holds the same ``users``
individuals ``user{i}`` with the one address ``user{i}@example.com``.

The rounds alternate between the backends at 8 connections, every reply checked. Besides mailroster's CPU per
lookup, the database server's CPU per lookup is read from ``/proc`` (PostgreSQL's postmaster and backends,
mariadbd's threads, slapd's threads) over the same window.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from mailroster.backends.store import Store

from . import loadgen
from .common import Workload, mailbox_value, netstring, user_address
from .loadgen import ReplyError, RoundResult
from .procs import BenchError, ServerProcess, cpu_seconds, machine_busy_seconds

__all__ = ["BACKENDS", "CONNS", "DEFAULT_USERS", "Backend", "ExternalPart", "Externals", "prepare", "run_part"]

REPO_ROOT = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO_ROOT / "tests"
EXAMPLES = REPO_ROOT / "conf.d" / "examples"
#: The backends, in the order they run.
BACKENDS = ("postgresql", "mariadb", "ldap")
#: Users per backend by default.
DEFAULT_USERS = 1000
#: Connections of every round.
CONNS = 8
#: The LDAP entries' parent (the example's base-dn is overridden with it).
LDAP_BASE_RDN = "ou=bench"


def test_helpers() -> tuple[ModuleType, ModuleType, ModuleType]:
    """``tests/dbservers.py``, ``tests/ldapserver.py`` and ``tests/sqldata.py``, the private servers and the schema
    the test suite uses.

    The one place the bench reaches into ``tests/``: those modules import ``conftest`` (and each other) as
    top-level modules, so the tests folder goes on ``sys.path``, as pytest's rootdir-relative import does.
    """
    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    import dbservers  # noqa: PLC0415
    import ldapserver  # noqa: PLC0415
    import sqldata  # noqa: PLC0415

    return dbservers, ldapserver, sqldata


def _unavailable_errors() -> tuple[type[BaseException], ...]:
    """What the test helpers raise for a missing binary or account (pytest's skip, or fail under CI=true), plus a
    server that would not start.
    """
    import pytest  # noqa: PLC0415

    return (pytest.skip.Exception, pytest.fail.Exception, RuntimeError, OSError)


def _toml(value: object) -> str:
    import json  # noqa: PLC0415

    return json.dumps(value)  # strings and numbers: JSON's syntax is TOML's


@dataclass(eq=False)
class Backend:
    """One backend: the external server (with its pids for CPU), and the mailroster that serves it."""

    name: str
    mailroster: ServerProcess
    server_pids: Callable[[], list[int]]
    pids: list[int] = field(default_factory=list)

    def refresh_pids(self) -> None:
        self.mailroster.refresh_pids()
        self.pids = self.server_pids()

    def server_cpu_seconds(self) -> float:
        return cpu_seconds(self.pids)


@dataclass(eq=False)
class Externals:
    """The external part's backends and the servers it started (stopped by :meth:`close`)."""

    backends: list[Backend] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as exc:  # clean-up goes on for the other servers
                print(f"external: clean-up failed: {exc}", file=sys.stderr)
        self.closers.clear()


def _listener_config(tmpdir: Path, socket_name: str) -> list[str]:
    return [
        "# Written by bench/external.py, read after the example (name order).",
        "[server]",
        f"run-dir = {_toml(str(tmpdir))}",
        f"state-dir = {_toml(str(tmpdir))}",
        'event-loop = "uvloop"',
        "",
        "[server.listener.socketmap]",
        'protocol = "socketmap"',
        f'bind = "unix:{socket_name}"',
        'socket = { mode = "0600" }',
        "",
    ]


def _mailroster(
    script: Path, tmpdir: Path, name: str, *, example: str, override: list[str], log_level: str
) -> ServerProcess:
    """A mailroster (not started) reading ``example`` then the listener and ``override`` lines."""
    confdir = tmpdir / f"conf-external-{name}"
    confdir.mkdir()
    socket_name = f"mr-ext-{name}.sock"
    (confdir / "10-example.toml").write_text((EXAMPLES / example).read_text())
    (confdir / "50-bench.toml").write_text("\n".join([*_listener_config(tmpdir, socket_name), *override]) + "\n")
    return ServerProcess(
        name,
        [str(script), "serve", "-c", str(confdir), "--log-level", log_level],
        str(tmpdir / socket_name),
        tmpdir / f"mailroster-external-{name}.log",
        tmpdir,
    )


async def _load_sql(store: Store, statements: list[str], users: int) -> None:
    """Stalwart's sample schema and ``users`` active individuals, each with one primary address."""
    try:
        await store.executescript(statements)
        async with store.transaction() as tx:
            for i in range(users):
                await tx.execute(
                    "INSERT INTO accounts (name, secret, description, type, quota, active)"
                    " VALUES ($1, NULL, '', 'individual', 0, true)",
                    f"user{i}",
                )
                await tx.execute(
                    "INSERT INTO emails (name, address, type) VALUES ($1, $2, 'primary')", f"user{i}", user_address(i)
                )
    finally:
        await store.close()


def _sql_backend(kind: str, script: Path, tmpdir: Path, *, users: int, log_level: str, externals: Externals) -> Backend:
    """Start a private PostgreSQL or MariaDB, load the users into a fresh database, configure its mailroster."""
    dbservers, _ldapserver, sqldata = test_helpers()
    if kind == "postgresql":
        from mailroster.backends.store_postgresql import PostgresStore  # noqa: PLC0415

        server: Any = dbservers.PrivatePostgres()  # starts it (initdb, a role and a database)
        externals.closers.append(server.close)
        database = server.create_database()
        store: Store = PostgresStore(server.store_config(database=database))
        example = "sql-stalwart.toml"
    else:
        from mailroster.backends.store_mysql import MysqlStore  # noqa: PLC0415

        server = dbservers.PrivateMariadb()
        externals.closers.append(server.close)
        database = server.create_database()
        store = MysqlStore(server.store_config(database=database))
        example = "sql-stalwart-mysql.toml"
    asyncio.run(_load_sql(store, sqldata.schema_statements(), users))
    override = [
        "[store.stalwart]",
        f"host = {_toml(server.host)}",
        f"port = {server.port}",
        f"database = {_toml(database)}",
        f"user = {_toml(server.user)}",
        f"password = {_toml(server.password)}",
        "",
        "[directory.stalwart.cache]",
        "entries = 0",
    ]
    mailroster = _mailroster(script, tmpdir, kind, example=example, override=override, log_level=log_level)
    return Backend(kind, mailroster, server.processes)


def ldif(users: int, suffix: str) -> str:
    """The LDAP data: the suffix, the service account (as ``tests/data/ldap/directory.ldif`` has it) and ``users``
    inetOrgPerson entries ``uid=user{i}`` with ``mail: user{i}@example.com`` under ``ou=bench``.
    """
    blocks_of_file = (TESTS_DIR / "data" / "ldap" / "directory.ldif").read_text().split("\n\n")
    entries = [
        "\n".join(line for line in block.splitlines() if not line.startswith("#")).strip() for block in blocks_of_file
    ]
    service_entry = next(entry for entry in entries if entry.startswith("dn: cn=mailroster,"))
    blocks = [
        f"dn: {suffix}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example",
        service_entry,
        f"dn: {LDAP_BASE_RDN},{suffix}\nobjectClass: organizationalUnit\nou: bench",
    ]
    blocks += [
        f"dn: uid=user{i},{LDAP_BASE_RDN},{suffix}\nobjectClass: inetOrgPerson\nuid: user{i}\ncn: user{i}\n"
        f"sn: user{i}\nmail: {user_address(i)}"
        for i in range(users)
    ]
    return "\n\n".join(blocks) + "\n"


def _ldap_backend(script: Path, tmpdir: Path, users: int, log_level: str, externals: Externals) -> Backend:
    """Start a private slapd, load the users over LDAP, configure its mailroster."""
    _dbservers, ldapserver, _sqldata = test_helpers()
    factory = ldapserver.SlapdFactory()
    externals.closers.append(factory.close)
    slapd = factory(memberof=False, load=False)
    data = tmpdir / "external.ldif"
    data.write_text(ldif(users, ldapserver.SUFFIX))
    slapd.load(data)
    override = [
        "[directory.ldap]",
        f"url = [{_toml(slapd.url)}]",
        f"base-dn = {_toml(f'{LDAP_BASE_RDN},{ldapserver.SUFFIX}')}",
        "tls = { enable = false }",
        f"bind = {{ dn = {_toml(ldapserver.SERVICE_DN)}, secret = {_toml(ldapserver.SERVICE_PASSWORD)} }}",
        "",
        "[directory.ldap.cache]",
        "entries = 0",
    ]
    mailroster = _mailroster(
        script, tmpdir, "ldap", example="ldap-openldap.toml", override=override, log_level=log_level
    )

    def pids() -> list[int]:
        return [slapd.proc.pid] if slapd.proc is not None and slapd.proc.poll() is None else []

    return Backend("ldap", mailroster, pids)


def prepare(script: Path, tmpdir: Path, users: int, log_level: str, progress: Callable[[str], None]) -> Externals:
    """Start and load the external servers (each one that can run); their mailrosters, not started."""
    externals = Externals()
    try:
        unavailable = _unavailable_errors()
        test_helpers()
    except ImportError as exc:  # pytest, a development dependency, is not installed
        externals.notes.append(f"external: skipped: the test helpers cannot be imported: {exc}")
        progress(externals.notes[-1])
        return externals
    for name in BACKENDS:
        started = time.perf_counter()
        try:
            if name == "ldap":
                backend = _ldap_backend(script, tmpdir, users, log_level, externals)
            else:
                backend = _sql_backend(name, script, tmpdir, users=users, log_level=log_level, externals=externals)
        except unavailable as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            externals.notes.append(f"external: {name} skipped: {first_line}")
            progress(f"external: {name} skipped: {exc}")
            continue
        except BaseException:
            externals.close()
            raise
        externals.backends.append(backend)
        progress(f"external: {name} started with {users} users ({time.perf_counter() - started:.2f}s)")
    return externals


def check_workload(users: int) -> Workload:
    """A handful of keys checked before measuring: the first, the last and a few between, plus an unknown one."""
    indexes = sorted({0, users // 2, users - 1} & set(range(users)))
    requests = [netstring(b"mailbox " + user_address(i).encode()) for i in indexes]
    replies = [netstring(b"OK " + mailbox_value(i).encode()) for i in indexes]
    requests.append(netstring(b"mailbox " + user_address(users).encode()))  # no such user
    replies.append(netstring(b"NOTFOUND "))
    return Workload(tuple(requests), tuple(replies))


@dataclass(eq=False)
class ExternalPart:
    """The external part's rounds per backend, in the order they ran, with the server's CPU per round."""

    key: str
    title: str
    conns: list[int]
    backends: list[str]
    skipped: list[str]
    rounds: dict[tuple[int, str], list[RoundResult]] = field(default_factory=dict)
    #: The external server's CPU seconds over each round's measured window, by backend.
    server_cpu: dict[str, list[float]] = field(default_factory=dict)

    def add(self, conns: int, backend: str, result: RoundResult, server_cpu_s: float) -> None:
        self.rounds.setdefault((conns, backend), []).append(result)
        self.server_cpu.setdefault(backend, []).append(server_cpu_s)

    def table(self) -> str:
        header = (
            f"{'conns':>5}  {'backend':<10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'CPU us/req':>10}"
            f" {'db us/req':>9} {'srv CPU':>7} {'gen CPU':>7} {'other':>5}"
        )
        lines = [header, "-" * len(header)]
        for conns in self.conns:
            for name in self.backends:
                rounds = self.rounds.get((conns, name), [])
                if not rounds:
                    continue
                db_cpu = zip(rounds, self.server_cpu[name], strict=True)
                db = [cpu * 1e6 / r.completed for r, cpu in db_cpu if r.completed]
                lines.append(
                    f"{conns:>5}  {name:<10} {_median([r.req_per_s for r in rounds]):>9.0f}"
                    f" {_median([r.p50_ms for r in rounds]):>8.3f} {_median([r.p99_ms for r in rounds]):>8.3f}"
                    f" {_median([r.server_cpu_us_per_req for r in rounds]):>10.1f} {_median(db):>9.1f}"
                    f" {_median([(r.server_cpu_s or 0.0) / r.elapsed_s for r in rounds]):>7.0%}"
                    f" {_median([r.client_cpu_share for r in rounds]):>7.0%}"
                    f" {_median([r.other_cpu_share for r in rounds]):>5.0%}"
                )
        return "\n".join(lines)

    def notes(self, users: int) -> list[str]:
        return [
            f"external: {users} users per backend; one mailroster per backend, configured by its shipped example"
            " (conf.d/examples) plus an override, [directory.<id>.cache] entries = 0: every lookup queries the"
            " server.",
            "external: CPU us/req is mailroster's; db us/req the database server's (PostgreSQL's postmaster and"
            " backends, mariadbd, slapd) over the same window. srv CPU is mailroster's share of a core.",
            *self.skipped,
            "external: other excludes the database server's CPU. About 35 s with the servers' start; alone: --only"
            " external (needs root: the servers run as their system users; a missing one is skipped).",
        ]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _sampling(backend: Backend, samples: list[float]) -> Callable[[], float]:
    """mailroster's CPU reader for the load generator (read at the start and the end of the measured window),
    recording the external server's CPU in ``samples`` at the same moments.
    """

    def read() -> float:
        # The server's processes are listed again at each reading: PostgreSQL forks a backend per connection,
        # and mailroster's pool may open some during the round.
        backend.pids = backend.server_pids()
        samples.append(backend.server_cpu_seconds())
        return backend.mailroster.cpu_seconds()

    return read


async def run_part(
    externals: Externals,
    users: int,
    *,
    rounds: int,
    warmup: float,
    duration: float,
    progress: Callable[[str], None],
) -> ExternalPart:
    """Check a handful of keys on every backend, then ``rounds`` passes over the backends, ``CONNS`` connections."""
    names = [backend.name for backend in externals.backends]
    part = ExternalPart(
        "external",
        f"socketmap `mailbox` lookups, SQL and LDAP directories on real servers, cache off, {users} users",
        [CONNS],
        names,
        list(externals.notes),
    )
    checks = check_workload(users)
    workload = Workload.mailbox(users)
    for backend in externals.backends:
        server = backend.mailroster
        started = time.perf_counter()
        try:
            await loadgen.verify_all(server.socket_path, checks, conns=1)
        except ReplyError as exc:
            server.check_alive()
            raise BenchError(f"external {server.name} does not answer as expected: {exc}\n{server.log_tail()}") from exc
        progress(
            f"external {server.name}: {len(checks)} keys answered correctly ({time.perf_counter() - started:.2f}s)"
        )
    for round_no in range(1, rounds + 1):
        for backend in externals.backends:
            server = backend.mailroster
            server.check_alive()
            backend.refresh_pids()
            samples: list[float] = []
            try:
                result = await loadgen.run_round(
                    server.socket_path,
                    workload,
                    CONNS,
                    warmup=warmup,
                    duration=duration,
                    server_cpu=_sampling(backend, samples),
                    machine_cpu=machine_busy_seconds,
                )
                result.raise_for_errors(f"external: {server.name}")
            except (OSError, ReplyError) as exc:
                server.check_alive()
                raise BenchError(
                    f"external: {server.name}: {exc}\n{server.name}'s output:\n{server.log_tail()}"
                ) from exc
            db_cpu_s = samples[-1] - samples[0] if len(samples) >= 2 else math.nan
            if result.machine_cpu_s is not None and not math.isnan(db_cpu_s):
                # The database server is part of the setup, not "other" load on the machine.
                result = dataclasses.replace(result, machine_cpu_s=result.machine_cpu_s - db_cpu_s)
            part.add(CONNS, server.name, result, db_cpu_s)
            progress(f"external {server.name:<10} round {round_no}/{rounds} {result.summary()}")
    return part
