"""Listeners and the daemon's life cycle.

One protocol factory serves every listener of a protocol, on a Unix socket, a TCP port or a socket inherited from
systemd. A :class:`ServerState` tracks live connections: it enforces the global connection limit and idle
timeouts and, on SIGTERM, lets in-flight requests finish before closing connections (a second SIGTERM forces).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, assert_never

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.errors import DirectoryError, PermanentFailure, TemporaryFailure
from mailroster.protocols.dovecot_auth import DovecotAuthSession
from mailroster.protocols.dovecot_dict import DovecotDictSession
from mailroster.protocols.dovecot_master import DovecotMasterSession
from mailroster.protocols.policy import PolicySession
from mailroster.protocols.service import Connection
from mailroster.protocols.socketmap import SocketmapSession
from mailroster.protocols.tcptable import TcpTableSession

from . import systemd
from .accounts import AccountService
from .config import AuthConfig, Config, ConfigError, ListenerConfig, PolicyConfig, parse_bind, resolve_path
from .directories import build_directories
from .lookups import LookupService
from .policy import PolicyService

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
SWEEP_INTERVAL = 1.0
#: How long start-up waits for a directory to check its schema before going on without it.
OPEN_TIMEOUT = 10.0


class StartupError(Exception):
    """The daemon cannot start as configured (a socket in use, a missing group, a missing systemd socket)."""


class ServerState:
    """Live connections, for the connection limit, idle timeouts and draining."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.connections: dict[Connection, float] = {}  # connection -> its idle timeout
        self.draining = False
        self._refused = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    def observer(self, idle_timeout: float) -> ListenerObserver:
        return ListenerObserver(self, idle_timeout)

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than their listener's timeout."""
        for conn, timeout in list(self.connections.items()):
            if not conn.busy and now - conn.last_active > timeout:
                log.info("closing idle connection after %.0fs", timeout)
                conn.close()

    def drain(self) -> None:
        """Stop taking connections; close those with nothing in flight now and the others as they finish."""
        self.draining = True
        for conn in list(self.connections):
            if not conn.busy:
                conn.close()

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.close()

    async def wait_closed(self) -> None:
        await self._all_closed.wait()


@dataclass(slots=True)
class ListenerObserver:
    """The :class:`~mailroster.protocols.service.ConnectionObserver` of one listener."""

    state: ServerState
    idle_timeout: float

    def opened(self, conn: Connection) -> bool:
        state = self.state
        if state.draining:
            return False
        if len(state.connections) >= state.max_connections:
            state._refused += 1
            if state._refused == 1 or state._refused % 1000 == 0:
                log.warning("connection limit of %d reached, refused=%d", state.max_connections, state._refused)
            return False
        state.connections[conn] = self.idle_timeout
        state._all_closed.clear()
        return True

    def closed(self, conn: Connection) -> None:
        state = self.state
        state.connections.pop(conn, None)
        if not state.connections:
            state._all_closed.set()

    def idle(self, conn: Connection) -> None:
        if self.state.draining:
            conn.close()


def _session(
    listener: ListenerConfig,
    *,
    directory: str,
    services: dict[str, LookupService],
    accounts: dict[str, AccountService],
    policies: dict[str, PolicyService],
    auth: AuthConfig,
    policy: PolicyConfig,
    observer: ListenerObserver,
) -> asyncio.Protocol:
    """A session of one listener, for a new connection: made with the settings in force when it is accepted."""
    service, account = services[directory], accounts[directory]
    match listener.protocol:
        case "socketmap":
            return SocketmapSession(service, observer)
        case "tcp-table":
            return TcpTableSession(service, listener.map or "mailbox", observer)
        case "policy":
            return PolicySession(policies[directory], observer, tempfail_close=policy.tempfail == "close")
        case "dovecot-auth":
            return DovecotAuthSession(
                account,
                observer,
                failure_delay=float(auth.failure_delay),
                tempfail_close=auth.tempfail == "close",
                request_timeout=float(auth.request_timeout),
            )
        case "dovecot-master":
            return DovecotMasterSession(account, observer)
        case "dovecot-dict":
            # The dict name Dovecot sends in HELLO picks the directory: proxy:<socket>:<directory id>.
            return DovecotDictSession(accounts, observer)
        case _:
            assert_never(listener.protocol)


def _lookup_id(name: str, kind: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid if kind == "owner" else grp.getgrnam(name).gr_gid
    except KeyError:
        raise StartupError(f"unknown {'user' if kind == 'owner' else 'group'} {name!r}") from None


def bind_unix(path: str, mode: int, owner: str, group: str) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``/``owner``/``group`` applied before anyone can connect.

    A stale socket left by a crashed daemon is replaced; a live one (something answers on it) is not.
    """
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: stale
        else:
            raise StartupError(f"{path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)  # nobody but us until the mode below is set
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        uid = _lookup_id(owner, "owner") if owner else -1
        gid = _lookup_id(group, "group") if group else -1
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    sock.setblocking(False)
    return sock


class Daemon:
    """Everything ``mailroster serve`` runs: directories, lookup services, listeners, signals."""

    def __init__(
        self, config: Config, directories: dict[str, Directory], *, load: Callable[[], Config] | None = None
    ) -> None:
        """``load`` reads the configuration again, for a reload (SIGHUP); without it a reload changes nothing."""
        self.config = config
        self.directories: dict[str, Directory] = {}
        self.state = ServerState(config.server.max_connections)
        # Per directory name, for as long as the daemon runs: sessions keep these objects, a reload rebinds them.
        self.services: dict[str, LookupService] = {}
        self.accounts: dict[str, AccountService] = {}
        self.policies: dict[str, PolicyService] = {}
        self._bind_services(config, directories)
        self._load = load
        self._reloading = asyncio.Lock()
        self._retired: list[Directory] = []  # replaced by a reload, closed once in-flight requests are done
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[tuple[str, int]] = []  # (path, inode) to remove on stop, if still ours
        self._stop = asyncio.Event()
        self._force = False
        self._tasks: list[asyncio.Task[Any]] = []

    def _bind_services(self, config: Config, directories: dict[str, Directory]) -> None:
        """Serve ``directories`` under ``config`` from now on: new service objects for new names, the same ones
        rebound for names already served. A name no longer configured keeps its services (its connections may
        still use them) on its old directory."""
        for name, directory in directories.items():
            if name in self.services:
                self.services[name].rebind(directory, config.lookup)
                self.accounts[name].rebind(directory, config.auth, config.userdb)
                self.policies[name].rebind(config.policy)
            else:
                self.services[name] = LookupService(directory, config.lookup)
                self.accounts[name] = AccountService(directory, self.services[name], config.auth, config.userdb)
                self.policies[name] = PolicyService(self.services[name], config.policy)
        self.directories = {**self.directories, **directories}

    async def open_directories(self, directories: dict[str, Directory] | None = None) -> None:
        """Let directories that keep a schema (the internal directory) create or check it now, so that a schema
        newer than this code stops start-up. A database that is down does not: the daemon starts and answers
        temporary failures until it is back."""
        for name, directory in (self.directories if directories is None else directories).items():
            backend = directory.inner if isinstance(directory, CachedDirectory) else directory
            opener = getattr(backend, "open", None)
            if opener is None:
                continue
            try:
                await asyncio.wait_for(opener(), OPEN_TIMEOUT)
            except (TemporaryFailure, TimeoutError) as exc:
                log.warning("directory=%s unavailable at start, answering temporary failures: %s", name, exc)
            except PermanentFailure as exc:
                raise StartupError(f"directory {name}: {exc}") from None

    async def start(self) -> None:
        """Bind every listener. On any error, what was bound is closed again and StartupError raised."""
        await self.open_directories()
        loop = asyncio.get_running_loop()
        inherited = systemd.listen_fds()
        server_cfg = self.config.server
        try:
            for name, listener in server_cfg.listener.items():
                idle = float(listener.idle_timeout if listener.idle_timeout is not None else server_cfg.idle_timeout)
                factory = functools.partial(self._new_session, listener, self.state.observer(idle))
                server = await self._bind(name, listener, factory, inherited)
                self._servers.append(server)
                log.info("listening listener=%s protocol=%s bind=%s", name, listener.protocol, listener.bind)
        except BaseException:
            await self._close_listeners()
            raise
        self._tasks.append(loop.create_task(self._sweeper()))
        interval = systemd.watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(self._watchdog(interval)))

    def _new_session(self, listener: ListenerConfig, observer: ListenerObserver) -> asyncio.Protocol:
        config = self.config
        return _session(
            listener,
            directory=listener.directory or config.storage.directory,
            services=self.services,
            accounts=self.accounts,
            policies=self.policies,
            auth=config.auth,
            policy=config.policy,
            observer=observer,
        )

    async def reload(self) -> bool:
        """Read the configuration again and serve from new directories, without dropping a connection (SIGHUP).

        Everything but ``[server]`` is applied: directories, stores and their caches are built anew (so every
        cached answer is dropped), and the lookup, auth, userdb and policy settings take effect for every
        connection, new or open. ``[server]`` (listeners, paths, limits) needs a restart. A configuration with
        errors, or a directory that cannot be opened, changes nothing: the daemon goes on as it was.
        """
        async with self._reloading:
            if self._load is None:
                log.warning("reload: the configuration was not read from files; nothing to reload")
                return False
            systemd.notify("RELOADING=1")
            try:
                return await self._reload(self._load)
            finally:
                systemd.notify("READY=1\nSTATUS=serving")

    async def _reload(self, load: Callable[[], Config]) -> bool:
        try:
            config = load()
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload: %s", line)
            log.error("reload failed: the configuration has errors; still serving the previous one")
            return False
        try:
            directories = build_directories(config)
        except (ValueError, DirectoryError) as exc:
            log.error("reload failed: %s; still serving the previous configuration", exc)
            return False
        try:
            await self.open_directories(directories)
        except StartupError as exc:
            log.error("reload failed: %s; still serving the previous configuration", exc)
            await self._close_directories(directories.values())
            return False
        if config.server != self.config.server:
            log.warning("reload: [server] changed (listeners, paths or limits): it takes a restart to apply")
        retired = [d for name, d in self.directories.items() if name in directories]
        self._bind_services(config, directories)
        self.config = dataclasses.replace(config, server=self.config.server)
        self._retired.extend(retired)
        self._spawn(self._retire(retired))
        log.info("reloaded: %d directories from %d files", len(directories), len(config.sources))
        return True

    async def _retire(self, directories: list[Directory]) -> None:
        """Close directories a reload replaced, once requests that were using them are done."""
        await asyncio.sleep(float(self.config.server.shutdown_timeout))
        await self._close_directories(directories)
        self._retired = [d for d in self._retired if d not in directories]

    @staticmethod
    async def _close_directories(directories: Iterable[Directory]) -> None:
        for directory in directories:
            try:
                await directory.close()
            except Exception:
                log.exception("closing a directory failed")

    async def _bind(
        self,
        name: str,
        listener: ListenerConfig,
        factory: Callable[[], asyncio.Protocol],
        inherited: dict[str, socket.socket],
    ) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        match parse_bind(listener.bind):
            case ("unix", relative):
                path = resolve_path(self.config.server.run_dir, relative)
                opts = listener.socket
                try:
                    sock = bind_unix(path, int(opts.mode, 8), opts.owner, opts.group)
                except OSError as exc:
                    raise StartupError(f"listener {name}: cannot bind {path}: {exc.strerror}") from None
                self._unix_paths.append((path, os.stat(path).st_ino))
                return await loop.create_unix_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
            case ("tcp", host, port):
                try:
                    return await loop.create_server(factory, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
                except OSError as exc:
                    raise StartupError(f"listener {name}: cannot bind {listener.bind}: {exc.strerror}") from None
            case ("fd", fd_name):
                inherited_sock = inherited.pop(fd_name, None)
                if inherited_sock is None:
                    raise StartupError(f"listener {name}: systemd passed no socket named {fd_name!r}")
                inherited_sock.setblocking(False)
                if inherited_sock.family == socket.AF_UNIX:
                    return await loop.create_unix_server(factory, sock=inherited_sock, backlog=LISTEN_BACKLOG)
                return await loop.create_server(factory, sock=inherited_sock, backlog=LISTEN_BACKLOG)
        raise StartupError(f"listener {name}: cannot bind {listener.bind!r}")

    def stop(self) -> None:
        """Begin a graceful stop; called a second time, stop at once."""
        if self._stop.is_set():
            self._force = True
            self.state.abort_all()
        self._stop.set()

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
            systemd.notify("READY=1\nSTATUS=serving")
            log.info("ready listeners=%d pid=%d", len(self._servers), os.getpid())
            await self._stop.wait()
            log.info("stopping: draining %d connections", len(self.state.connections))
            systemd.notify("STOPPING=1")
            await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        self._spawn(self.reload())

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """A background task that shutdown cancels (done ones are forgotten here)."""
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(coro))

    async def shutdown(self) -> None:
        """Stop listening, let in-flight requests finish (up to shutdown-timeout), close directories."""
        await self._close_listeners()
        self.state.drain()
        try:
            await asyncio.wait_for(self.state.wait_closed(), float(self.config.server.shutdown_timeout))
        except TimeoutError:
            log.warning("shutdown timeout: closing %d busy connections", len(self.state.connections))
            self.state.abort_all()
        for task in self._tasks:
            task.cancel()
        await self._close_directories([*self.directories.values(), *self._retired])

    async def _close_listeners(self) -> None:
        # Server.wait_closed() is not awaited: from Python 3.12 on it also waits for every connection, which
        # shutdown() drains on its own terms.
        for server in self._servers:
            server.close()
        self._servers.clear()
        for path, inode in self._unix_paths:
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == inode:  # do not remove a socket another daemon has since bound
                    os.unlink(path)
        self._unix_paths.clear()

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            self.state.sweep(time.monotonic())

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)
