"""A private Dovecot for the benchmark: the real auth process that mailroster's Dovecot protocols are compared with.

``dovecot -F -c CONF`` runs in a directory of its own with the settings that keep it private (shared/TESTING.md):
its own ``base_dir``, ``state_dir``, ``instance_name`` and ``log_path``, ``protocols = none``, ``ssl = no``,
``disable_plaintext_auth = no``, ``auth_failure_delay = 0`` and the anvil auth penalty off. Its passdb and userdb
are passwd-files holding the benchmark's users (the same users, passwords and userdb fields mailroster serves
from its memory directory), with Dovecot's auth cache on (``auth_cache_size = 10M``, ``auth_cache_ttl = 1h``).
Clients reach its ``auth-client`` and ``auth-userdb`` sockets in ``base_dir``.

The server CPU measured is that of Dovecot's ``auth`` process and of any ``auth-worker`` processes (the children of
the master whose title is ``dovecot[-instance]/auth...``), not of the master, log, config, anvil or stats
processes, which a deployment runs anyway. Dovecot starts ``auth`` on the first connection and may start or stop
workers at any time, so the processes are looked up again at every reading.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .procs import BenchError, ServerProcess, cpu_seconds, file_tail, process_cmdline, process_tree

__all__ = [
    "DovecotServer",
    "PasswdEntry",
    "doveadm_hashes",
    "dovecot_config",
    "find_tool",
    "passdb_file",
    "userdb_file",
]


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    """A user of the passwd-files (``user:password:uid:gid:gecos:home:shell:extra_fields``)."""

    user: str
    secret: str
    uid: str
    gid: str
    home: str
    mail: str

    def __post_init__(self) -> None:
        if any(":" in value or "\n" in value for value in (self.user, self.secret, self.uid, self.gid, self.home)):
            raise ValueError(f"passwd-file fields cannot hold ':' or newlines: {self.user!r}")
        if "\n" in self.mail:
            raise ValueError(f"passwd-file fields cannot hold newlines: {self.user!r}")

    def passdb_line(self) -> str:
        return f"{self.user}:{self.secret}"

    def userdb_line(self) -> str:
        return f"{self.user}::{self.uid}:{self.gid}::{self.home}::userdb_mail={self.mail}"


def passdb_file(entries: Sequence[PasswdEntry]) -> str:
    """The passdb's passwd-file: names and secrets only. (With extra fields in it, even ``userdb_`` ones only,
    Dovecot's OK reply ends with an empty field, ``OK <id> user=<u> <TAB>``.)
    """
    return "".join(entry.passdb_line() + "\n" for entry in entries)


def userdb_file(entries: Sequence[PasswdEntry]) -> str:
    """The userdb's passwd-file. The mail location as the extra field ``userdb_mail`` makes Dovecot's USER reply
    list ``uid gid home mail`` in the order mailroster sends them, so one expected reply fits both servers.
    """
    return "".join(entry.userdb_line() + "\n" for entry in entries)


def dovecot_config(base: Path, passdb: Path, userdb: Path, instance: str) -> str:
    """The private Dovecot's configuration; ``base`` holds its run and state directories and its log."""
    return f"""# Written by bench/run.py: a private Dovecot whose auth process is measured beside mailroster.
base_dir = {base / "run"}
state_dir = {base / "state"}
instance_name = {instance}
log_path = {base / "dovecot.log"}
protocols = none
ssl = no
disable_plaintext_auth = no
auth_failure_delay = 0
auth_mechanisms = plain
auth_cache_size = 10M
auth_cache_ttl = 1h
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {passdb}
}}
userdb {{
  driver = passwd-file
  args = {userdb}
}}
"""


@dataclass(eq=False)
class DovecotServer(ServerProcess):
    """``dovecot -F``; :attr:`socket_path` is its auth-client socket and :attr:`userdb_socket` its auth-userdb."""

    userdb_socket: str = ""
    dovecot_log: Path | None = None

    @classmethod
    def create(cls, name: str, base: Path, entries: Sequence[PasswdEntry], dovecot: str = "dovecot") -> DovecotServer:
        """Write the configuration and passwd-file under ``base`` (made readable for the ``dovecot`` user, as which
        the auth process runs) and return the server, not yet started.
        """
        base.mkdir(mode=0o755)
        (base / "state").mkdir(mode=0o755)
        passdb, userdb = base / "passdb", base / "userdb"
        passdb.write_text(passdb_file(entries))
        userdb.write_text(userdb_file(entries))
        config = base / "dovecot.conf"
        config.write_text(dovecot_config(base, passdb, userdb, base.parent.name))
        for path in (passdb, userdb, config):
            path.chmod(0o644)
        run_dir = base / "run"
        return cls(
            name,
            [dovecot, "-F", "-c", str(config)],
            str(run_dir / "auth-client"),
            base / "dovecot.out",
            base,
            wait_sockets=[str(run_dir / "auth-userdb")],
            userdb_socket=str(run_dir / "auth-userdb"),
            dovecot_log=base / "dovecot.log",
        )

    def log_tail(self, lines: int = 40) -> str:
        text = f"  dovecot -F output ({self.log_path}):\n{file_tail(self.log_path, lines)}"
        if self.dovecot_log is not None:
            text += f"\n  Dovecot's log ({self.dovecot_log}):\n{file_tail(self.dovecot_log, lines)}"
        return text

    def auth_pids(self) -> list[int]:
        """The auth and auth-worker processes among the master's descendants."""
        if self.proc is None:
            raise BenchError(f"{self.name} was never started")
        pids = []
        for pid in process_tree(self.proc.pid)[1:]:
            title = process_cmdline(pid).split(" ", 1)[0]
            if title.startswith("dovecot") and title.rsplit("/", 1)[-1].startswith("auth"):
                pids.append(pid)
        return pids

    def refresh_pids(self) -> None:
        self.pids = self.auth_pids()
        if not self.pids:
            raise BenchError(f"{self.name}: no auth process found under the master\n{self.log_tail()}")

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.auth_pids())


def doveadm_hashes(scheme: str, passwords: Sequence[str], doveadm: str = "doveadm", timeout: float = 60.0) -> list[str]:
    """``{SCHEME}...`` secrets of ``passwords``, made by ``doveadm pw -s SCHEME`` (a few processes at a time)."""

    def one(password: str) -> str:
        try:
            result = subprocess.run(
                [doveadm, "-c", "/dev/null", "pw", "-s", scheme, "-p", password],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"doveadm pw -s {scheme}: {exc}") from exc
        secret = result.stdout.strip()
        if result.returncode != 0 or not secret.startswith("{"):
            raise BenchError(f"doveadm pw -s {scheme} failed ({result.returncode}): {result.stderr.strip()}")
        return secret

    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return list(pool.map(one, passwords))


def find_tool(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories Debian installs Dovecot into (often not on a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
