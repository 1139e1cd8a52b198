"""Private Postfix and Dovecot instances for end-to-end tests (see shared/TESTING.md).

Each lives in its own directory, listens on loopback ports chosen at start, logs into that directory and is
stopped by its own pid; nothing touches /etc/postfix, /etc/dovecot or the system services.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from conftest import free_port, require_tool, wait_for_socket

POSTFIX_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PrivatePostfix:
    """A Postfix whose smtpd listens on 127.0.0.1:<port>, every service unchrooted."""

    def __init__(self, base: Path, main_cf: str) -> None:
        require_tool("postfix")
        self.base = base
        self.port = free_port()
        self.config_dir = base / "etc"
        self.queue_dir = base / "queue"
        self.log_path = base / "postfix.log"
        for path in (self.config_dir, self.queue_dir, base / "data"):
            path.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.queue_dir, "postfix")
        shutil.chown(base / "data", "postfix")
        (self.config_dir / "main.cf").write_text(
            f"compatibility_level = 3.6\n"
            f"queue_directory = {self.queue_dir}\n"
            f"data_directory = {base / 'data'}\n"
            f"inet_interfaces = 127.0.0.1\ninet_protocols = ipv4\n"
            f"myhostname = mx.test.invalid\nmydestination =\nmynetworks = 127.0.0.0/8\n"
            f"maillog_file = {self.log_path}\nmaillog_file_prefixes = /tmp, /var\n"
            f"smtpd_relay_restrictions = permit_sasl_authenticated, reject\n" + main_cf
        )
        (self.config_dir / "master.cf").write_text(f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + POSTFIX_SERVICES)

    def start(self) -> PrivatePostfix:
        subprocess.run(["postfix", "-c", str(self.config_dir), "start"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                wait_for_socket(("127.0.0.1", self.port), time.monotonic() + 0.2, None)
                return self
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"postfix did not start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.config_dir), "stop"], capture_output=True, timeout=60)
        pid_file = self.queue_dir / "pid" / "master.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)


class PrivateDovecot:
    """A Dovecot (``dovecot -F``) whose configuration is the given text plus the settings that keep it private."""

    def __init__(self, base: Path, conf: str) -> None:
        require_tool("dovecot")
        self.base = base
        self.log_path = base / "dovecot.log"
        self.base_dir = base / "run"
        self.base_dir.mkdir(parents=True, exist_ok=True)
        (base / "state").mkdir(exist_ok=True)
        self.config = base / "dovecot.conf"
        self.config.write_text(
            f"base_dir = {self.base_dir}\nstate_dir = {base / 'state'}\n"
            f"instance_name = mr{base.name}\nlog_path = {self.log_path}\n"
            "ssl = no\ndisable_plaintext_auth = no\nauth_failure_delay = 0\nlisten = 127.0.0.1\n"
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n" + conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_for: str = "auth-userdb") -> PrivateDovecot:
        self.proc = subprocess.Popen(
            ["dovecot", "-F", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        try:
            wait_for_socket(str(self.base_dir / wait_for), time.monotonic() + 20, self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"dovecot did not start:\n{self.log()}") from None
        return self

    def doveadm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["doveadm", "-c", str(self.config), *args], capture_output=True, text=True, timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


DICT_AUTH_KEYS = """\
iterate_prefix = userdb/
key passdb {
  key = passdb/%u
  format = json
}
key userdb {
  key = userdb/%u
  format = json
}
passdb_objects = passdb
userdb_objects = userdb
"""


def dict_auth_dovecot(base: Path, uri: str, *settings: str) -> PrivateDovecot:
    """A Dovecot (in ``base/dc``, not started, serving no protocols) whose passdb and userdb are the dict at ``uri``:
    records ``passdb/<user>`` and ``userdb/<user>`` in JSON, users listed under ``userdb/``. ``settings`` are more
    lines of the args file, ``base/dict-auth.conf.ext``."""
    args = base / "dict-auth.conf.ext"
    args.write_text("".join(f"{line}\n" for line in (f"uri = {uri}", *settings)) + DICT_AUTH_KEYS)
    return PrivateDovecot(
        base / "dc",
        f"protocols = none\npassdb {{\n  driver = dict\n  args = {args}\n}}\n"
        f"userdb {{\n  driver = dict\n  args = {args}\n}}\n",
    )
