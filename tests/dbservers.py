"""Private PostgreSQL and MariaDB servers for the SQL store tests (see shared/TESTING.md).

Registered as a pytest plugin by ``conftest.py`` (``pytest_plugins``). Each server is started once per session in
a short directory under /tmp, listens on a free loopback port, logs into that directory, and is stopped by its
own pid; nothing touches the system's clusters or services. The servers refuse to run as root, so they run as
the ``postgres`` and ``mysql`` users, which the packages create.

Fixtures:

- ``postgres_server`` / ``mariadb_server`` (session): a :class:`PrivatePostgres` / :class:`PrivateMariadb`,
  with ``host``, ``port``, ``database`` (created for the session), ``user``, ``password``, and ``start()``,
  ``stop()``, ``frozen()`` (SIGSTOP while the block runs), ``sql(statement)`` (run as the administrator),
  ``create_database()`` and ``store_config(...)``.
- ``postgres_db`` / ``mariadb_db`` (function): a :class:`ServerDatabase`, a fresh, empty database on that server
  for one test, with the same attributes and methods, bound to its database.

Without the binaries, the ``postgres``/``mysql`` users or root, the fixtures skip; under CI=true they fail.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Generic, Literal, TypeVar

import pytest

from mailroster.backends.pool import PoolConfig
from mailroster.backends.settings import Duration, Secret
from mailroster.backends.store import MysqlStoreConfig, PostgresStoreConfig, ServerStoreConfig

from conftest import free_port, require_tool, unavailable, wait_for_socket

__all__ = [
    "DatabaseServer",
    "PrivateMariadb",
    "PrivatePostgres",
    "ServerDatabase",
    "mariadb_db",
    "mariadb_server",
    "postgres_db",
    "postgres_server",
]

#: The account the stores log in with (not a superuser: the tests see what the daemon would see).
TEST_USER = "mailroster"
START_TIMEOUT = 30.0

ConfigT = TypeVar("ConfigT", bound=ServerStoreConfig)


def _require_account(name: str) -> pwd.struct_passwd:
    """The system account a server runs as; starting it as another user needs root."""
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        unavailable(f"no {name!r} system user (its server package creates it)")
    if os.geteuid() != 0:
        unavailable(f"starting a private server as {name!r} needs root")
    return account


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (PostgreSQL's backends and auxiliary processes), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:  # the process exited while we looked
            continue
        # The command name is in parentheses and may itself contain spaces or parentheses.
        fields = text[text.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class DatabaseServer(abc.ABC, Generic[ConfigT]):
    """What the two private servers have in common: a process on a loopback port, a test account, admin SQL.

    A server class supplies the commands: creating the data directory (:meth:`_set_up`), running the server
    (:meth:`_spawn`), the administrator's client (:meth:`_sql_command`), and its account and database statements.
    """

    kind: str
    host = "127.0.0.1"
    #: The store configuration that reaches this server, and its ``type`` key.
    config_class: type[ConfigT]
    store_type: Literal["postgresql", "mysql"]

    def __init__(self, prefix: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.base.chmod(0o755)  # the server's user must traverse it
        self.data_dir = self.base / "data"
        self.run_dir = self.base / "run"
        self.port = free_port()
        self.user = TEST_USER
        # Random per session, and with characters that need quoting in a connection string.
        self.password = "pw-" + secrets.token_urlsafe(12) + "'\"%"
        self.database = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._frozen: list[int] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _set_up(self, program: str, command: list[str]) -> None:
        """Make the data directory with ``command``, start the server, create the test account and the session's
        database; remove everything again if any of it fails."""
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.base)
            if result.returncode != 0:
                raise RuntimeError(f"{program} failed:\n{result.stdout}{result.stderr}")
            self.start()
            self.sql(self._create_user_statement())
            self.database = self.create_database()
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _create_user_statement(self) -> str:
        """The statement that creates the test account, with its password."""

    def start(self) -> None:
        """Start the server (again) on its port and data directory; return once it accepts connections."""
        if self.running:
            return
        self.proc = self._spawn()
        self._wait_ready(self._ready)

    @abc.abstractmethod
    def _spawn(self) -> subprocess.Popen[bytes]:
        """The server process, started; its pid is the server's (the one to signal)."""

    @abc.abstractmethod
    def _ready(self) -> bool:
        """Whether the server accepts connections now."""

    @abc.abstractmethod
    def _stop_signal(self) -> int: ...

    def stop(self, timeout: float = 20) -> None:
        """Shut the server down (clients are disconnected) and wait for it to exit."""
        self.resume()
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(self._stop_signal())
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def processes(self) -> list[int]:
        """The server's pids: the main process first."""
        if not self.running:
            return []
        assert self.proc is not None
        return [self.proc.pid, *_descendants(self.proc.pid)]

    def freeze(self) -> None:
        """SIGSTOP every server process: TCP handshakes still complete (the kernel queues them), nothing answers.

        Stopping PostgreSQL's postmaster alone would hang only new connections: its backends are stopped too.
        """
        if not self.running:
            return
        assert self.proc is not None
        # The main process first, so that it cannot fork a new backend after we list its children.
        os.kill(self.proc.pid, signal.SIGSTOP)
        self._frozen.append(self.proc.pid)
        for pid in _descendants(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            self._frozen.append(pid)

    def resume(self) -> None:
        frozen, self._frozen = self._frozen, []
        for pid in reversed(frozen):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """A hung server for the duration of the block."""
        self.freeze()
        try:
            yield
        finally:
            self.resume()

    def sql(self, statement: str, database: str | None = None) -> list[tuple[str, ...]]:
        """Run ``statement`` as the administrator (in ``database``, or none); the rows as text."""
        command = self._sql_command(statement, database)
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed on {statement!r}: {result.stderr.strip()}")
        return [tuple(line.split("\t")) for line in result.stdout.splitlines() if line]

    @abc.abstractmethod
    def _sql_command(self, statement: str, database: str | None) -> list[str]:
        """The client command that runs ``statement`` as the administrator, printing rows as tab-separated text."""

    @abc.abstractmethod
    def create_database(self) -> str:
        """A new empty database the test account owns; its name."""

    @abc.abstractmethod
    def drop_database(self, name: str) -> None: ...

    def store_config(
        self,
        *,
        database: str | None = None,
        timeout: float = 5,
        pool: PoolConfig | None = None,
        password: str | None = None,
    ) -> ConfigT:
        """The store configuration for the test account (``database`` defaults to the session's)."""
        return self.config_class(
            type=self.store_type,
            database=database or self.database,
            host=self.host,
            port=self.port,
            user=self.user,
            password=Secret(self.password if password is None else password, "inline"),
            timeout=Duration(timeout),
            pool=pool or PoolConfig(),
        )

    def log(self) -> str:
        path = self.log_path()
        return path.read_text(errors="replace") if path.exists() else ""

    @abc.abstractmethod
    def log_path(self) -> Path: ...

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    def _wait_ready(self, ready: Callable[[], bool]) -> None:
        """Poll ``ready()`` until it is true, the process dies, or START_TIMEOUT passes."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.kind} did not start:\n{self.log()[-4000:]}")
            time.sleep(0.02)


class PrivatePostgres(DatabaseServer[PostgresStoreConfig]):
    """A PostgreSQL cluster made by initdb in its own directory, password (SCRAM) authentication over TCP.

    The administrator (``postgres``) connects over the Unix socket in the run directory with ``trust``; the test
    account only over TCP, with its password, like the daemon. ``fsync`` is off: the data is thrown away.
    """

    kind = "postgresql"
    config_class = PostgresStoreConfig
    store_type = "postgresql"

    def __init__(self) -> None:
        self.account = _require_account("postgres")
        self.bindir = self._bindir()
        super().__init__("mrpg")
        for path in (self.data_dir, self.run_dir):
            path.mkdir(mode=0o700)
            os.chown(path, self.account.pw_uid, self.account.pw_gid)
        initdb = [
            require_tool("runuser"),
            "-u",
            "postgres",
            "--",
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "--no-locale",
            "--encoding=UTF8",
        ]
        self._set_up("initdb", initdb)

    def _create_user_statement(self) -> str:
        quoted = self.password.replace("'", "''")
        return f"CREATE ROLE {self.user} LOGIN PASSWORD '{quoted}'"

    @staticmethod
    def _bindir() -> Path:
        """Debian keeps the server binaries out of PATH, under /usr/lib/postgresql/<major>/bin."""
        versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
        versions.sort(key=lambda bindir: int(bindir.parent.name) if bindir.parent.name.isdigit() else 0)
        return versions[-1] if versions else Path(require_tool("initdb")).parent

    def log_path(self) -> Path:
        return self.base / "postgres.log"

    def _stop_signal(self) -> int:
        # SIGTERM is a "smart" shutdown that waits for every client to leave (forever, with a pool): SIGINT is fast.
        return signal.SIGINT

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path().open("ab") as log:
            # Popen's user/group rather than runuser: runuser stays as a parent process, so signals for the
            # postmaster (SIGINT, SIGSTOP) would reach runuser instead. Here the Popen pid is the postmaster.
            return subprocess.Popen(
                [
                    str(self.bindir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-k",
                    str(self.run_dir),
                    "-p",
                    str(self.port),
                    "-c",
                    f"listen_addresses={self.host}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base,
                user=self.account.pw_uid,
                group=self.account.pw_gid,
                extra_groups=[],
            )

    def _ready(self) -> bool:
        # The postmaster writes "ready" on the 8th line of postmaster.pid once it accepts connections; before
        # that, a client gets "the database system is starting up".
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[7].strip() != "ready":
            return False
        try:
            wait_for_socket((self.host, self.port), 0, None)
        except RuntimeError:
            return False
        return True

    def _sql_command(self, statement: str, database: str | None) -> list[str]:
        return [
            str(self.bindir / "psql"),
            "-h",
            str(self.run_dir),
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            database or "postgres",
            "-X",
            "-q",
            "-A",
            "-t",
            "-F",
            "\t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            statement,
        ]

    def create_database(self) -> str:
        name = "mrt_" + secrets.token_hex(4)
        self.sql(f"CREATE DATABASE {name} OWNER {self.user}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a store the test forgot to close must not keep the database alive.
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class PrivateMariadb(DatabaseServer[MysqlStoreConfig]):
    """A MariaDB made by mariadb-install-db in its own directory, no option files read (``--no-defaults``).

    The administrator (``root``, no password) connects over the Unix socket; the test account over TCP with its
    password. The server character set is utf8mb4: compiled-in defaults (what ``--no-defaults`` leaves) are
    latin1, where Debian's packaged configuration would have said utf8mb4.
    """

    kind = "mariadb"
    config_class = MysqlStoreConfig
    store_type = "mysql"

    def __init__(self) -> None:
        account = _require_account("mysql")
        self.mariadbd = require_tool("mariadbd")
        self.client = require_tool("mariadb")
        install_db = require_tool("mariadb-install-db")
        super().__init__("mrmy")
        self.run_dir.mkdir(mode=0o750)
        os.chown(self.run_dir, account.pw_uid, account.pw_gid)
        self.socket_path = self.run_dir / "mysqld.sock"
        install = [
            install_db,
            "--no-defaults",
            "--user=mysql",
            f"--datadir={self.data_dir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ]
        self._set_up("mariadb-install-db", install)

    def _create_user_statement(self) -> str:
        quoted = self.password.replace("\\", "\\\\").replace("'", "\\'")
        return f"CREATE USER '{self.user}'@'%' IDENTIFIED BY '{quoted}'"

    def log_path(self) -> Path:
        return self.run_dir / "error.log"

    def _stop_signal(self) -> int:
        return signal.SIGTERM  # a normal shutdown, which disconnects clients

    def _spawn(self) -> subprocess.Popen[bytes]:
        # mariadbd switches to --user itself; the Popen pid is the server (one process, many threads).
        return subprocess.Popen(
            [
                self.mariadbd,
                "--no-defaults",
                "--user=mysql",
                f"--datadir={self.data_dir}",
                f"--socket={self.socket_path}",
                f"--pid-file={self.run_dir / 'mysqld.pid'}",
                f"--port={self.port}",
                f"--bind-address={self.host}",
                "--skip-networking=0",
                f"--log-error={self.log_path()}",
                "--skip-name-resolve",  # no reverse DNS on every connection
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_general_ci",
                "--innodb-buffer-pool-size=32M",
                "--innodb-flush-log-at-trx-commit=0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.base,
        )

    def _ready(self) -> bool:
        # mariadbd opens its socket and port only once it is ready for connections.
        try:
            wait_for_socket(str(self.socket_path), 0, None)
            wait_for_socket((self.host, self.port), 0, None)
        except RuntimeError:
            return False
        return True

    def _sql_command(self, statement: str, database: str | None) -> list[str]:
        command = [self.client, "--no-defaults", "-S", str(self.socket_path), "-uroot", "-N", "-B"]
        if database:
            command += ["-D", database]
        return [*command, "-e", statement]

    def create_database(self) -> str:
        name = "mrt_" + secrets.token_hex(4)
        self.sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4; GRANT ALL ON {name}.* TO '{self.user}'@'%'")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name}")


class ServerDatabase:
    """One fresh database on a private server, for one test: the server's interface, bound to that database.

    ``stop``, ``start`` and ``frozen`` act on the whole (session-wide) server.
    """

    def __init__(self, server: PrivatePostgres | PrivateMariadb, database: str) -> None:
        self.server = server
        self.database = database

    @property
    def kind(self) -> str:
        return self.server.kind

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def user(self) -> str:
        return self.server.user

    @property
    def password(self) -> str:
        return self.server.password

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def frozen(self) -> contextlib.AbstractContextManager[None]:
        return self.server.frozen()

    def sql(self, statement: str) -> list[tuple[str, ...]]:
        return self.server.sql(statement, database=self.database)

    def store_config(
        self, *, timeout: float = 5, pool: PoolConfig | None = None, password: str | None = None
    ) -> PostgresStoreConfig | MysqlStoreConfig:
        return self.server.store_config(database=self.database, timeout=timeout, pool=pool, password=password)


def _fresh_database(server: PrivatePostgres | PrivateMariadb) -> Iterator[ServerDatabase]:
    server.start()  # a test that stopped the server and failed before restarting it must not sink the next ones
    name = server.create_database()
    yield ServerDatabase(server, name)
    server.resume()
    if server.running:
        with contextlib.suppress(RuntimeError):
            server.drop_database(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PrivatePostgres]:
    """A private PostgreSQL for the whole session (initdb runs once)."""
    server = PrivatePostgres()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[PrivateMariadb]:
    """A private MariaDB for the whole session."""
    server = PrivateMariadb()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_db(postgres_server: PrivatePostgres) -> Iterator[ServerDatabase]:
    """A fresh, empty PostgreSQL database for one test."""
    yield from _fresh_database(postgres_server)


@pytest.fixture
def mariadb_db(mariadb_server: PrivateMariadb) -> Iterator[ServerDatabase]:
    """A fresh, empty MariaDB database for one test."""
    yield from _fresh_database(mariadb_server)
