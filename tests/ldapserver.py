"""Private OpenLDAP servers for the LDAP directory tests (see shared/TESTING.md, "OpenLDAP").

Each :class:`Slapd` runs ``slapd -d 0`` in the foreground (so that its pid is ours to signal) on a free loopback
port, with a slapd.conf and an mdb database in its own directory under /tmp, loaded over LDAP with ``ldapadd``
from ``tests/data/ldap/directory.ldif``: the memberof overlay, when enabled, only maintains memberOf for groups
added over LDAP, never for ``slapadd``. The monitor database is on, readable by the root DN, so that tests can
count the connections slapd sees.

Import the fixtures explicitly in a test module (conftest.py is shared)::

    from ldapserver import slapd, slapd_factory  # noqa: F401

Under CI=true a missing slapd or ldapadd fails the tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import free_port, require_tool, wait_for_socket

DATA = Path(__file__).parent / "data" / "ldap"
SUFFIX = "dc=example,dc=org"
# ldapadd and ldapsearch must not read /etc/ldap/ldap.conf or ~/.ldaprc (a TLS or base setting there would change them).
_CLIENT_ENV = {**os.environ, "LDAPNOINIT": "1"}
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "admin-secret"  # a throw-away test server
SERVICE_DN = f"cn=mailroster,{SUFFIX}"
SERVICE_PASSWORD = "service-secret-4Tq"
CONTRACT_BASE = f"ou=contract,{SUFFIX}"
AUTH_BASE = f"ou=auth,{SUFFIX}"

_SCHEMAS = ("core", "cosine", "inetorgperson", "nis", "misc")

_SLAPD_CONF = """\
{includes}
include {data}/mailroster.schema
{tls}
pidfile {base}/slapd.pid
argsfile {base}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
{memberof_module}
# Every lookup in these tests is unindexed: small data, and no log noise either way.
loglevel none

database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "{root_dn}"
rootpw {root_password}
directory {base}/db
{memberof_overlay}
# The service account reads password hashes (bind.auth.method = "default"); anyone may bind (bind auth); bound
# users read everything else; anonymous clients may only bind.
access to attrs=userPassword
    by dn.exact="{service_dn}" read
    by anonymous auth
    by * none
access to *
    by users read
    by anonymous auth

database monitor
access to *
    by dn.exact="{root_dn}" read
    by * none
"""


class Slapd:
    """One private slapd. ``stop``/``start`` keep the data and the port; ``pause``/``resume`` SIGSTOP/SIGCONT it.

    With ``tls``, it also offers STARTTLS and listens on ``ldaps_url``, with a self-signed certificate for
    127.0.0.1 that no client trusts.
    """

    def __init__(self, base: Path, *, memberof: bool, tls: bool = False) -> None:
        self.binary = require_tool("slapd")
        self.ldapadd = require_tool("ldapadd")
        self.base = base
        self.memberof = memberof
        self.port = free_port()
        self.ldaps_port = free_port() if tls else None
        self.proc: subprocess.Popen[bytes] | None = None
        (base / "db").mkdir(parents=True, exist_ok=True)
        tls_lines = ""
        if tls:
            key, cert = str(base / "key.pem"), str(base / "cert.pem")
            request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
            subprocess.run(
                [require_tool("openssl"), *request, "-keyout", key, "-out", cert],
                check=True,
                capture_output=True,
                timeout=60,
            )
            tls_lines = f"TLSCertificateFile {cert}\nTLSCertificateKeyFile {key}"
        self.conf = base / "slapd.conf"
        self.conf.write_text(
            _SLAPD_CONF.format(
                includes="\n".join(f"include /etc/ldap/schema/{name}.schema" for name in _SCHEMAS),
                tls=tls_lines,
                data=DATA,
                base=base,
                suffix=SUFFIX,
                root_dn=ROOT_DN,
                root_password=ROOT_PASSWORD,
                service_dn=SERVICE_DN,
                memberof_module="moduleload memberof" if memberof else "",
                memberof_overlay="overlay memberof" if memberof else "",
            )
        )

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        assert self.ldaps_port is not None, "started without tls"
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    def start(self) -> Slapd:
        listen = f"{self.url}/" + (f" {self.ldaps_url}/" if self.ldaps_port else "")
        log = (self.base / "slapd.log").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [self.binary, "-d", "0", "-h", listen, "-f", str(self.conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for_socket(("127.0.0.1", self.port), time.monotonic() + 15, self.proc)
        except RuntimeError:
            self.kill()
            raise RuntimeError(f"slapd did not start:\n{self.log()}") from None
        return self

    def load(self, ldif: Path = DATA / "directory.ldif") -> Slapd:
        done = subprocess.run(
            [*self._client(self.ldapadd), "-f", str(ldif)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_CLIENT_ENV,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ldapadd failed ({done.returncode}): {done.stderr}")
        return self

    def _client(self, tool: str) -> list[str]:
        """An OpenLDAP client command line bound as the root DN."""
        return [tool, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD]

    def log(self) -> str:
        path = self.base / "slapd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (after a SIGCONT, in case it is paused) and wait; SIGKILL if it does not go."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def monitor_counter(self, dn: str) -> int:
        """A ``monitorCounter`` of the monitor database, e.g. ``cn=Current,cn=Connections,cn=Monitor``."""
        done = subprocess.run(
            [*self._client("ldapsearch"), "-LLL", "-s", "base", "-b", dn, "monitorCounter"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=_CLIENT_ENV,
        )
        for line in done.stdout.splitlines():
            if line.startswith("monitorCounter:"):
                return int(line.split(":", 1)[1])
        raise RuntimeError(f"no monitorCounter in {dn}: {done.stdout}")

    def open_connections(self) -> int:
        """Connections open now, not counting the one that asks."""
        return self.monitor_counter("cn=Current,cn=Connections,cn=Monitor") - 1


class SlapdFactory:
    """Starts loaded slapds on demand and stops them all at teardown."""

    def __init__(self) -> None:
        self.servers: list[Slapd] = []
        self.bases: list[Path] = []

    def __call__(self, *, memberof: bool = False, tls: bool = False, load: bool = True) -> Slapd:
        base = Path(tempfile.mkdtemp(prefix="mrldap", dir="/tmp"))
        self.bases.append(base)
        server = Slapd(base, memberof=memberof, tls=tls)
        self.servers.append(server)
        server.start()
        return server.load() if load else server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        for base in self.bases:
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module", params=["memberof", "plain"])
def slapd(request: pytest.FixtureRequest) -> Iterator[Slapd]:
    """A loaded slapd for a whole module, once with the memberof overlay and once without."""
    factory = SlapdFactory()
    try:
        yield factory(memberof=request.param == "memberof")
    finally:
        factory.close()


@pytest.fixture
def slapd_factory() -> Iterator[Callable[..., Slapd]]:
    """Fresh slapds for one test (fault tests stop, pause and restart them)."""
    factory = SlapdFactory()
    try:
        yield factory
    finally:
        factory.close()


def dead_url() -> str:
    """An ldap:// URL on a loopback port where nothing listens (connection refused)."""
    return f"ldap://127.0.0.1:{free_port()}"
