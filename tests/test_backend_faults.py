"""A backend that goes away mid-run, seen through the real daemon and real clients.

PostgreSQL, MariaDB (SQL directory on Stalwart's schema) and slapd (LDAP directory), each configured by its
shipped example: while the server is stopped every map answers socketmap ``TEMP`` and Dovecot's auth reports
``temp_fail``, never "not found" or "wrong password"; once it is back, the daemon answers again within a second,
without a restart of its own. Caches are off so that every request reaches the backend.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mailroster.backends.store_mysql import MysqlStore
from mailroster.backends.store_postgresql import PostgresStore
from mailroster.protocols.netstring import NetstringDecoder, encode_netstring

from conftest import RunningDaemon, require_tool, server_toml
from ldapserver import CONTRACT_BASE, SERVICE_DN, SERVICE_PASSWORD, Slapd, SlapdFactory
from sqldata import load_contract_data

EXAMPLES = Path(__file__).resolve().parent.parent / "conf.d" / "examples"
MAPS = [
    (b"mailbox jane@example.org", b"OK example.org/jane/"),
    (b"alias jane.example@example.org", b"OK jane@example.org"),
    (b"domain example.org", b"OK example.org"),
    (b"sender jane@example.org", b"OK jane"),
    (b"recipient bill@example.org", b"OK OK"),
    (b"quota jane", b"OK 1073741824"),
]
LISTENERS = server_toml({"socketmap": "socketmap", "auth": "dovecot-auth"}) + '[auth]\nfailure-delay = "0s"\n'


def toml_value(value: object) -> str:
    return json.dumps(value)  # strings and numbers: JSON's syntax is TOML's


def query(path: str, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(path)
        sock.sendall(encode_netstring(request))
        decoder = NetstringDecoder()
        while True:
            data = sock.recv(4096)
            if not data:
                return b"<closed>"
            frames = decoder.feed(data)
            if frames:
                return frames[0]


def auth(daemon: RunningDaemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("doveadm"), "-c", "/dev/null", "auth", "test", "-a", daemon.socket("auth"), "jane",
         "jane-password-7Qx"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def answers_everything(daemon: RunningDaemon) -> bool:
    return all(query(daemon.socket("socketmap"), q) == a for q, a in MAPS) and auth(daemon).returncode == 0


def check_outage(daemon: RunningDaemon, stop: Callable[[], None], start: Callable[[], None]) -> None:
    assert answers_everything(daemon), daemon.log()
    stop()
    for request, _ in MAPS:
        reply = query(daemon.socket("socketmap"), request)
        assert reply.startswith(b"TEMP "), (request, reply)
    failed = auth(daemon)
    assert failed.returncode == 77
    assert "temp_fail" in failed.stdout + failed.stderr
    start()
    deadline = time.monotonic() + 1.0
    while not answers_everything(daemon):
        assert time.monotonic() < deadline, f"not served again within 1s:\n{daemon.log()}"
        time.sleep(0.05)


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_sql_server_stopped_and_back(daemon_factory, request: pytest.FixtureRequest, kind: str) -> None:  # type: ignore[no-untyped-def]
    database = request.getfixturevalue("postgres_db" if kind == "postgresql" else "mariadb_db")
    config = database.store_config(timeout=2)
    store = PostgresStore(config) if kind == "postgresql" else MysqlStore(config)

    async def load() -> None:
        await load_contract_data(store)
        await store.close()

    asyncio.run(load())
    example = EXAMPLES / ("sql-stalwart.toml" if kind == "postgresql" else "sql-stalwart-mysql.toml")
    assert config.password is not None
    text = LISTENERS + (
        f"[store.stalwart]\nhost = {toml_value(config.host)}\nport = {config.port}\n"
        f"database = {toml_value(config.database)}\nuser = {toml_value(config.user)}\n"
        f'password = {toml_value(config.password.value)}\ntimeout = "2s"\n'
        "[directory.stalwart.cache]\nentries = 0\n"
    )
    daemon = daemon_factory(text, wait_for=("socketmap", "auth"), before={"10-example.toml": example.read_text()})
    check_outage(daemon, database.stop, database.start)


def test_slapd_stopped_and_back(daemon_factory) -> None:  # type: ignore[no-untyped-def]
    factory = SlapdFactory()
    try:
        slapd: Slapd = factory(memberof=False)
        text = LISTENERS + (
            f"[directory.ldap]\nurl = [{toml_value(slapd.url)}]\nbase-dn = {toml_value(CONTRACT_BASE)}\n"
            f'timeout = "2s"\ntls = {{ enable = false }}\n'
            f"bind = {{ dn = {toml_value(SERVICE_DN)}, secret = {toml_value(SERVICE_PASSWORD)} }}\n"
            "[directory.ldap.cache]\nentries = 0\n"
        )
        example = (EXAMPLES / "ldap-openldap.toml").read_text()
        daemon = daemon_factory(text, wait_for=("socketmap", "auth"), before={"10-example.toml": example})
        check_outage(daemon, slapd.stop, slapd.start)
    finally:
        factory.close()
