"""Every lookup map, queried by the real Postfix client (postmap) through socketmap and tcp_table."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import free_port, server_toml
from inprocess import FailingDirectory, ThreadedDaemon

DATA = Path(__file__).parent / "data" / "directory.toml"

LISTENERS = server_toml({"socketmap": "socketmap"})
TCP_MAPS = ("domain", "mailbox", "alias", "sender", "recipient", "quota")

# (map, key, expected value or None for not found)
CASES = [
    ("domain", "example.org", "example.org"),
    ("domain", "EXAMPLE.Org", "example.org"),
    ("domain", "example.net", "example.net"),
    ("domain", "bücher.example", "xn--bcher-kva.example"),
    ("domain", "unknown.test", None),
    ("mailbox", "alice@example.org", "example.org/alice/"),
    ("mailbox", "A.Liddell@Example.ORG", "example.org/alice/"),
    ("mailbox", "alice+tag@example.org", "example.org/alice/"),
    ("mailbox", "bob@example.org", "example.org/bob/"),
    ("mailbox", "jürgen@bücher.example", "xn--bcher-kva.example/jürgen/"),
    ("mailbox", "nobody@example.org", None),
    ("mailbox", "sales@example.org", None),
    ("alias", "a.liddell@example.org", "alice@example.org"),
    ("alias", "alice@example.org", None),
    ("alias", "sales@example.org", "alice@example.org,bob@example.org"),
    ("alias", "Sales+Q4@example.org", "alice@example.org,bob@example.org"),
    ("alias", "partners@example.org", "alice@example.org,friend@external.test"),
    ("alias", "announce@example.org", "bob@example.org,carol@example.org"),
    ("alias", "nobody@example.org", "carol@example.org"),
    ("alias", "nobody@unknown.test", None),
    ("sender", "alice@example.org", "alice"),
    ("sender", "a.liddell+x@example.org", "alice"),
    ("sender", "sales@example.org", "alice,bob"),
    ("sender", "nobody@example.org", None),
    ("recipient", "alice@example.org", "OK"),
    ("recipient", "nobody@example.org", "OK"),
    ("recipient", "announce@example.org", "OK"),
    ("recipient", "nobody@unknown.test", None),
    ("quota", "alice", "2147483648"),
    ("quota", "Alice@Example.org", "2147483648"),
    ("quota", "bob", "0"),
    ("quota", "sales", None),
    ("quota", "nobody@example.org", None),
]


def _config(tcp: bool = True) -> str:
    text = LISTENERS
    if tcp:
        for name in TCP_MAPS:
            text += f'[server.listener.tcp-{name}]\nprotocol = "tcp-table"\nbind = "127.0.0.1:{{port:{name}}}"\n'
            text += f'map = "{name}"\n'
    return text + DATA.read_text()


@pytest.fixture(scope="module")
def served(module_launcher):  # type: ignore[no-untyped-def]
    """One daemon for the whole module: socketmap plus a tcp_table port per map."""
    daemon = module_launcher.start(_config(), wait_for=("socketmap",))
    yield daemon
    assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize(("map_name", "key", "expected"), CASES, ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_socketmap_with_postmap(served, postmap, map_name, key, expected):  # type: ignore[no-untyped-def]
    result = postmap(key, f"socketmap:unix:{served.socket('socketmap')}:{map_name}")
    if expected is None:
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"


@pytest.mark.parametrize(("map_name", "key", "expected"), CASES, ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_tcp_table_with_postmap(served, postmap, map_name, key, expected):  # type: ignore[no-untyped-def]
    result = postmap(key, f"tcp:127.0.0.1:{served.ports[map_name]}")
    if expected is None:
        assert (result.returncode, result.stdout, result.stderr) == (1, "", "")
    else:
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected + "\n"


def test_backend_fault_is_temp_not_notfound(short_tmp, postmap):  # type: ignore[no-untyped-def]
    """A directory that is down answers TEMP on socketmap and 400 on tcp_table, for every map."""
    port = free_port()
    run = short_tmp / "run"
    run.mkdir()
    text = LISTENERS.replace("{run}", str(run)) + (
        f'[server.listener.tcp]\nprotocol = "tcp-table"\nbind = "127.0.0.1:{port}"\nmap = "alias"\n'
        '[storage]\ndirectory = "down"\n[directory.down]\ntype = "memory"\n'
    )
    (short_tmp / "mailroster.toml").write_text(text)
    failing = FailingDirectory()
    with ThreadedDaemon(short_tmp / "mailroster.toml", {"down": failing}):
        for map_name in TCP_MAPS:
            result = postmap("alice@example.org", f"socketmap:unix:{run / 'socketmap'}:{map_name}")
            assert result.returncode == 1
            assert "socketmap server temporary error: backend unavailable" in result.stderr
        result = postmap("alice@example.org", f"tcp:127.0.0.1:{port}")
        assert result.returncode == 1
        assert "query error" in result.stderr
