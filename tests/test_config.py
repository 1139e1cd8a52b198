"""daemon/config.py: reading, merging and converting TOML, and every error it reports."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mailroster.backends.memory import MemoryDirectoryConfig, MemoryPrincipalConfig
from mailroster.backends.settings import Duration, Secret, Size
from mailroster.daemon import config as config_module
from mailroster.daemon.config import (
    CHECKOUT_CONFIG_DIR,
    DIRECTORY_TYPES,
    MAP_NAMES,
    Config,
    ConfigError,
    ListenerConfig,
    SocketOptions,
    load_config,
    parse_bind,
    resolve_path,
)

DIRECTORY_CHOICES = ", ".join(sorted(DIRECTORY_TYPES))

DATA = Path(__file__).parent / "data" / "config"

# The smallest valid configuration: storage.directory defaults to "default", which must exist.
BASE = """
[directory.default]
type = "memory"
"""


def write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(textwrap.dedent(text))
    return path


def errors_of(*paths: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(list(paths))
    return info.value.errors


def one_error(path: Path) -> str:
    (error,) = errors_of(path)
    return error


@dataclass(frozen=True, slots=True)
class VaultDirectoryConfig:
    """A directory type that exists only in these tests, for the field types no real backend uses yet."""

    type: Literal["vault"]
    password: Secret
    tokens: list[Secret] = field(default_factory=list)
    weight: float = 1.0


@pytest.fixture
def vault(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DIRECTORY_TYPES, "vault", f"{__name__}:VaultDirectoryConfig")


# --- reading and merging


def test_minimal_config_has_the_documented_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "mailroster.toml", BASE)
    config = load_config([path])
    assert config.sources == (str(path),)
    assert config.server.run_dir == "/run/mailroster"
    assert config.server.state_dir == "/var/lib/mailroster"
    assert config.server.event_loop == "auto"
    assert config.server.max_connections == 4096
    assert config.server.idle_timeout == 300
    assert config.server.shutdown_timeout == 10
    assert config.server.listener == {}
    assert config.storage.directory == "default"
    assert config.lookup.mailbox_path == "{domain}/{local}/"
    assert config.lookup.subaddressing is True
    assert config.lookup.separator == "+"
    assert config.lookup.catch_all is True
    assert config.store == {}
    assert config.directory == {"default": MemoryDirectoryConfig(type="memory")}


def test_shipped_example_split_by_concern_with_a_local_override() -> None:
    config = load_config([DATA / "full", DATA / "local.toml"])
    assert config.sources == tuple(str(p) for p in [*sorted((DATA / "full").glob("*.toml")), DATA / "local.toml"])
    assert config.server.run_dir == "/tmp/mailroster-test"  # local.toml wins
    assert config.server.event_loop == "asyncio"
    assert config.server.shutdown_timeout == 30
    assert config.server.listener == {
        # Inline tables are tables: local.toml's socket.mode merges with the shipped group.
        "socketmap": ListenerConfig(
            protocol="socketmap", bind="unix:socketmap", socket=SocketOptions(mode="0666", group="postfix")
        ),
        "mailbox-tcp": ListenerConfig(
            protocol="tcp-table", bind="127.0.0.1:10031", map="mailbox", idle_timeout=Duration(30)
        ),
        "auth": ListenerConfig(protocol="dovecot-auth", bind="fd:auth", directory="static"),
    }
    static = config.directory["static"]
    assert isinstance(static, MemoryDirectoryConfig)
    assert static.domains == ["example.net"]  # arrays are replaced, not merged
    assert static.cache.entries == 500
    assert (static.cache.ttl.positive, static.cache.ttl.negative) == (3600, 600)
    jane, sales = static.principals
    assert jane == MemoryPrincipalConfig(
        name="jane",
        class_="individual",
        secret=["{PLAIN}not-a-real-password"],
        email=["jane@example.org", "jane.doe@example.org"],
        email_list=["info@example.org"],
        member_of=["sales"],
        quota=Size(5 << 30),
    )
    assert (sales.class_, sales.email) == ("group", ["sales@example.org"])
    assert config.lookup.mailbox_path == "{domain}/{local}/Maildir/"
    assert (config.lookup.separator, config.lookup.catch_all) == ("-", False)


def test_a_directory_is_read_in_name_order_skipping_hidden_and_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "conf.d"
    write(folder, "20-late.toml", '[server]\nrun-dir = "/late"\n')
    write(folder, "10-early.toml", BASE + '[server]\nrun-dir = "/early"\nstate-dir = "/early-state"\n')
    write(folder, ".30-hidden.toml", '[server]\nrun-dir = "/hidden"\n')
    write(folder, "40-notes.txt", "not TOML at all [")
    write(folder, "sub/50-nested.toml", "not read: directories are not recursed into [")
    config = load_config([folder])
    assert config.sources == (str(folder / "10-early.toml"), str(folder / "20-late.toml"))
    assert config.server.run_dir == "/late"
    assert config.server.state_dir == "/early-state"


def test_paths_are_read_in_order_and_may_repeat(tmp_path: Path) -> None:
    first = write(tmp_path, "first.toml", BASE + '[server]\nrun-dir = "/first"\n')
    second = write(tmp_path, "second.toml", '[server]\nrun-dir = "/second"\nstate-dir = "/second"\n')
    config = load_config([first, second, first])
    assert config.server.run_dir == "/first"
    assert config.server.state_dir == "/second"
    assert config.sources == (str(first), str(second), str(first))
    assert load_config([str(first), str(second)]).server.run_dir == "/second"


def test_arrays_and_arrays_of_tables_are_replaced_not_merged(tmp_path: Path) -> None:
    shipped = write(
        tmp_path,
        "shipped.toml",
        """
        [directory.default]
        type = "memory"
        domains = ["a.example", "b.example"]
        [[directory.default.principals]]
        name = "one"
        [[directory.default.principals]]
        name = "two"
        """,
    )
    local = write(
        tmp_path,
        "local.toml",
        """
        [directory.default]
        domains = ["c.example"]
        [[directory.default.principals]]
        name = "three"
        """,
    )
    directory = load_config([shipped, local]).directory["default"]
    assert directory.domains == ["c.example"]
    assert [p.name for p in directory.principals] == ["three"]


def test_a_value_replaces_a_table_and_a_table_replaces_a_value(tmp_path: Path) -> None:
    first = write(tmp_path, "1.toml", BASE + '[lookup]\nmailbox-path = "{name}/"\n')
    second = write(tmp_path, "2.toml", "lookup = 5\n")
    third = write(tmp_path, "3.toml", "[lookup]\nseparator = '-'\n")
    assert errors_of(first, second) == [f"{second}: lookup: expected table, got integer"]
    config = load_config([first, second, third])
    assert config.lookup.separator == "-"
    assert config.lookup.mailbox_path == "{domain}/{local}/"  # the first file's table is gone


def test_without_paths_etc_mailroster_is_read_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    path = write(etc, "10-base.toml", BASE)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_DIR", etc)
    monkeypatch.setattr(config_module, "CHECKOUT_CONFIG_DIR", tmp_path / "checkout")
    assert load_config([]).sources == (str(path),)


def test_without_paths_the_checkout_conf_d_is_the_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkout = tmp_path / "checkout"
    path = write(checkout, "10-base.toml", BASE)
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG_DIR", tmp_path / "etc")
    monkeypatch.setattr(config_module, "CHECKOUT_CONFIG_DIR", checkout)
    assert load_config([]).sources == (str(path),)
    assert Path(__file__).resolve().parent.parent / "conf.d" == CHECKOUT_CONFIG_DIR


def test_a_single_path_instead_of_a_sequence_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        load_config(str(tmp_path))


def test_reading_config_imports_a_backend_only_when_a_table_uses_it() -> None:
    code = textwrap.dedent(
        """
        import sys
        from mailroster.daemon import config
        print(sorted(m for m in sys.modules if m.startswith("mailroster.backends.")))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['mailroster.backends.settings']"


# --- files that cannot be read


def test_a_missing_path_is_an_error(tmp_path: Path) -> None:
    assert errors_of(tmp_path / "nope.toml") == [f"{tmp_path / 'nope.toml'}: no such file or directory"]


def test_a_toml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", "[server]\nrun-dir\n")
    assert one_error(path) == (
        f"{path}: invalid TOML: Expected '=' after a key in a key/value pair (at line 2, column 8)"
    )


def test_unreadable_entries_of_a_directory_are_errors(tmp_path: Path) -> None:
    folder = tmp_path / "conf.d"
    write(folder, "10-base.toml", BASE)
    (folder / "20-dangling.toml").symlink_to(tmp_path / "missing.toml")
    (folder / "30-folder.toml").mkdir()
    assert errors_of(folder) == [
        f"{folder / '20-dangling.toml'}: cannot read: No such file or directory",
        f"{folder / '30-folder.toml'}: cannot read: Is a directory",
    ]


def test_a_file_that_is_not_utf8_is_an_error_that_does_not_quote_it(tmp_path: Path) -> None:
    path = write(tmp_path, "latin1.toml", b'password = "s\xe9cret"\n')
    error = one_error(path)
    assert error == f"{path}: not UTF-8 text (at byte 13)"


def test_file_errors_of_every_path_are_reported_together(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.toml", "x = \n")
    assert errors_of(tmp_path / "missing", bad) == [
        f"{tmp_path / 'missing'}: no such file or directory",
        f"{bad}: invalid TOML: Invalid value (at line 1, column 5)",
    ]


# --- values


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [('"30s"', 30), ('"10m"', 600), ('"1h"', 3600), ('"1d"', 86400), ('"250ms"', 0.25), ("45", 45), ("2.5", 2.5)],
)
def test_durations(tmp_path: Path, raw: str, seconds: float) -> None:
    config = load_config([write(tmp_path, "c.toml", BASE + f"[server]\nidle-timeout = {raw}\n")])
    assert config.server.idle_timeout == seconds
    assert isinstance(config.server.idle_timeout, Duration)


@pytest.mark.parametrize(("raw", "size"), [('"500M"', 500 << 20), ('"2G"', 2 << 30), ('"64k"', 65536), ("1024", 1024)])
def test_sizes(tmp_path: Path, raw: str, size: int) -> None:
    text = BASE + f'[[directory.default.principals]]\nname = "jane"\nquota = {raw}\n'
    quota = load_config([write(tmp_path, "c.toml", text)]).directory["default"].principals[0].quota
    assert quota == size
    assert isinstance(quota, Size)


def test_a_bad_duration_and_a_bad_size(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [server]
        idle-timeout = "10 minutes"
        shutdown-timeout = -1
        [[directory.default.principals]]
        name = "jane"
        quota = "5X"
        """,
    )
    assert errors_of(path) == [
        f"""{path}: server.idle-timeout: expected a duration such as "30s" or "10m", got '10 minutes'""",
        f"{path}: server.shutdown-timeout: a duration cannot be negative",
        f"""{path}: directory.default.principals[0].quota: expected a size such as "500M" or a number of bytes, """
        "got '5X'",
    ]


def test_toml_names_of_fields_and_a_single_value_for_a_list(tmp_path: Path) -> None:
    text = BASE + (
        "[[directory.default.principals]]\n"
        'name = "info"\nclass = "list"\nsecret = "{PLAIN}x"\nemail = "info@example.org"\n'
        'email-list = "all@example.org"\nmember-of = ["staff"]\n'
    )
    principal = load_config([write(tmp_path, "c.toml", text)]).directory["default"].principals[0]
    assert principal.class_ == "list"
    assert principal.secret == ["{PLAIN}x"]
    assert principal.email == ["info@example.org"]
    assert principal.email_list == ["all@example.org"]
    assert principal.member_of == ["staff"]


def test_a_float_field_accepts_an_integer(tmp_path: Path, vault: None) -> None:
    path = write(tmp_path, "c.toml", BASE + '[directory.v]\ntype = "vault"\npassword = "x"\nweight = 2\n')
    weight = load_config([path]).directory["v"].weight
    assert (weight, type(weight)) == (2.0, float)


# --- secrets


def test_secret_inline_and_from_files(tmp_path: Path, vault: None) -> None:
    one = write(tmp_path, "one.secret", "first\n")
    two = write(tmp_path, "two.secret", b"second\r\n")
    three = write(tmp_path, "three.secret", "third\n\n")
    text = BASE + (
        '[directory.v]\ntype = "vault"\npassword = "inline-value"\n'
        f'tokens = [{{ file = "{one}" }}, {{ file = "{two}" }}, {{ file = "{three}" }}, "plain"]\n'
    )
    vault_config = load_config([write(tmp_path, "c.toml", text)]).directory["v"]
    assert vault_config.password == Secret("inline-value", "inline")
    assert vault_config.tokens == [
        Secret("first", f"file {one}"),
        Secret("second", f"file {two}"),
        Secret("third\n", f"file {three}"),  # only one trailing newline is removed
        Secret("plain", "inline"),
    ]


def test_a_single_secret_table_for_a_list_of_secrets(tmp_path: Path, vault: None) -> None:
    token = write(tmp_path, "token", "t0ken")
    path = write(tmp_path, "c.toml", BASE + f'[directory.v]\ntype = "vault"\npassword = "x"\ntokens.file = "{token}"\n')
    assert load_config([path]).directory["v"].tokens == [Secret("t0ken", f"file {token}")]


def test_secret_errors(tmp_path: Path, vault: None) -> None:
    latin1 = write(tmp_path, "latin1.secret", b"s\xe9cret\n")
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + f"""
        [directory.a]
        type = "vault"
        password = {{ file = "{tmp_path}/missing.secret" }}
        [directory.b]
        type = "vault"
        password = {{ path = "/etc/x" }}
        [directory.c]
        type = "vault"
        password = 1234
        [directory.d]
        type = "vault"
        password = {{ file = "{latin1}" }}
        tokens = [{{ file = 5 }}]
        """,
    )
    assert errors_of(path) == [
        f"{path}: directory.a.password.file: cannot read {tmp_path}/missing.secret: No such file or directory",
        f"{path}: directory.b.password.path: unknown key",
        f"{path}: directory.b.password.file: missing required key",
        f"{path}: directory.c.password: expected a string or {{ file = PATH }}, got integer",
        f"{path}: directory.d.password.file: {latin1} is not UTF-8 text",
        f"{path}: directory.d.tokens[0].file: expected string, got integer",
    ]


def test_a_secret_value_never_reaches_an_error_or_a_repr(tmp_path: Path, vault: None) -> None:
    secret_file = write(tmp_path, "pw", "hunter2-from-file\n")
    good = (
        '[directory.v]\ntype = "vault"\npassword = "hunter2-inline"\n'
        f'tokens = [{{ file = "{secret_file}" }}]\n'
        '[[directory.default.principals]]\nname = "jane"\nsecret = "{PLAIN}hunter2-hash"\n'
    )
    config = load_config([write(tmp_path, "good.toml", BASE + good)])
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.directory["v"].password)
    assert "hunter2" not in f"{config.directory['v'].tokens}"

    bad = (
        '[directory.w]\ntype = "vault"\npassword = ["hunter2-array"]\n'
        'tokens = [{ file = "/nonexistent", passwd = "hunter2-extra" }, 7]\nweight = "hunter2-weight"\n'
        '[[directory.default.principals]]\nname = "jane"\nsecret = "{PLAIN}hunter2-hash"\nclass = "hunter2-class"\n'
        "secret-hint = 'hunter2-hint'\n"
        "[server]\nmax-connections = 'hunter2'\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config([write(tmp_path, "bad.toml", BASE + good + bad)])
    assert len(info.value.errors) == 7
    assert "hunter2" not in str(info.value)
    assert "hunter2" not in repr(info.value)


# --- conversion errors, each with the file that set the key


def test_unknown_keys_with_and_without_a_hint(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        'sources = ["not a key"]\n'
        + BASE
        + """
        [server]
        run_dir = "/run"
        max-conections = 10
        colour = "blue"
        [userdbs]
        uid = "5000"
        [[directory.default.principals]]
        name = "jane"
        emails = ["jane@example.org"]
        """,
    )
    assert errors_of(path) == [
        f"{path}: sources: unknown key",
        f'{path}: userdbs: unknown key (did you mean "userdb"?)',
        f'{path}: server.run_dir: unknown key (did you mean "run-dir"?)',
        f'{path}: server.max-conections: unknown key (did you mean "max-connections"?)',
        f"{path}: server.colour: unknown key",
        f'{path}: directory.default.principals[0].emails: unknown key (did you mean "email"?)',
    ]


def test_wrong_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [server]
        run-dir = 1979-05-27
        max-connections = "many"
        idle-timeout = true
        [server.listener.a]
        protocol = 5
        bind = "unix:a"
        socket = "0660"
        [lookup]
        subaddressing = "yes"
        catch-all = 1
        [[directory.default.principals]]
        name = ["jane"]
        enabled = 1.0
        email = [1]
        [directory.default.cache]
        entries = 1.5
        ttl = "1h"
        """,
    )
    assert errors_of(path) == [
        f"{path}: server.run-dir: expected string, got date",
        f"{path}: server.max-connections: expected integer, got string",
        f"{path}: server.idle-timeout: expected duration, got boolean",
        f"{path}: server.listener.a.protocol: expected string, got integer",
        f"{path}: server.listener.a.socket: expected table, got string",
        f"{path}: lookup.subaddressing: expected boolean, got string",
        f"{path}: lookup.catch-all: expected boolean, got integer",
        f"{path}: directory.default.principals[0].name: expected string, got array",
        f"{path}: directory.default.principals[0].email[0]: expected string, got integer",
        f"{path}: directory.default.principals[0].enabled: expected boolean, got float",
        f"{path}: directory.default.cache.entries: expected integer, got float",
        f"{path}: directory.default.cache.ttl: expected table, got string",
    ]


def test_a_boolean_is_not_an_integer_and_tables_are_not_arrays(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE + "[server]\nmax-connections = true\n[directory.default.principals]\nname = 'jane'\n[[server.listener]]\n",
    )
    assert errors_of(path) == [
        f"{path}: server.max-connections: expected integer, got boolean",
        f"{path}: server.listener: expected table, got array",
        f"{path}: directory.default.principals: expected array, got table",
    ]


def test_values_outside_their_choices(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [server]
        event-loop = "trio"
        [server.listener.a]
        protocol = "smtp"
        bind = "unix:a"
        [server.listener.b]
        protocol = "tcp-table"
        bind = "127.0.0.1:10031"
        map = "users"
        [[directory.default.principals]]
        name = "jane"
        class = "superuser"
        """,
    )
    assert errors_of(path) == [
        f"{path}: server.event-loop: must be one of: auto, uvloop, asyncio",
        f"{path}: server.listener.a.protocol: must be one of: socketmap, tcp-table, policy, dovecot-auth, "
        "dovecot-master, dovecot-dict",
        f"{path}: server.listener.b.map: must be one of: {', '.join(MAP_NAMES)}",
        f"{path}: directory.default.principals[0].class: must be one of: individual, admin, group, list",
    ]


def test_missing_required_keys_name_the_file_that_set_the_table(tmp_path: Path) -> None:
    first = write(tmp_path, "1.toml", BASE + '[server.listener.a]\nprotocol = "socketmap"\n')
    second = write(
        tmp_path,
        "2.toml",
        """
        [server.listener.a]
        socket = { group = "postfix" }
        [server.listener.b]
        bind = "unix:b"
        [server.listener."with.dot"]
        protocol = "policy"
        [[directory.default.principals]]
        email = ["x@example.org"]
        """,
    )
    assert errors_of(first, second) == [
        f"{first}: server.listener.a.bind: missing required key",
        f"{second}: server.listener.b.protocol: missing required key",
        f'{second}: server.listener."with.dot".bind: missing required key',
        f"{second}: directory.default.principals[0].name: missing required key",
    ]


def test_an_error_in_a_key_no_file_set_names_the_first_file(tmp_path: Path) -> None:
    first = write(tmp_path, "1.toml", "[lookup]\ncatch-all = false\n")
    second = write(tmp_path, "2.toml", "[server]\nrun-dir = '/run'\n")
    assert errors_of(first, second) == [
        f'{first}: storage.directory: no directory "default"; no [directory.<id>] table is defined'
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert errors_of(empty) == [
        f'{empty}: storage.directory: no directory "default"; no [directory.<id>] table is defined'
    ]


def test_directory_and_store_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [directory.nis]
        type = "nis"
        url = "ldap://localhost"
        [directory.untyped]
        domains = ["example.org"]
        [directory.numbered]
        type = 3
        [directory.flat]
        [store.sqlite]
        type = "sqlite"
        [store.cassandra]
        type = "cassandra"
        [store.pg]
        type = "postgresql"
        [store.bare]
        path = "x"
        """,
    )
    scalar = write(tmp_path, "scalar.toml", '[directory]\nscalar = "memory"\n')
    assert errors_of(path, scalar) == [
        f"{path}: directory.nis.type: must be one of: {DIRECTORY_CHOICES}",
        f"{path}: directory.untyped.type: missing required key",
        f"{path}: directory.numbered.type: expected string, got integer",
        f"{path}: directory.flat.type: missing required key",
        f"{scalar}: directory.scalar: expected table, got string",
        f"{path}: store.cassandra.type: must be one of: mysql, postgresql, sqlite",
        f"{path}: store.pg.database: missing required key",
        f"{path}: store.bare.type: missing required key",
    ]


def test_a_registered_type_that_cannot_be_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(DIRECTORY_TYPES, "ghost", "mailroster.backends.no_such_module:GhostConfig")
    path = write(tmp_path, "c.toml", BASE + '[directory.g]\ntype = "ghost"\n')
    assert one_error(path) == (
        f"""{path}: directory.g.type: directory type "ghost" is not available: """
        "No module named 'mailroster.backends.no_such_module'"
    )


def test_errors_of_every_kind_and_file_come_in_one_config_error(tmp_path: Path) -> None:
    first = write(
        tmp_path,
        "10-first.toml",
        """
        [server]
        max-connections = "lots"
        [server.listener.tcp]
        protocol = "tcp-table"
        bind = "localhost:10031"
        [directory.default]
        type = "nis"
        """,
    )
    second = write(
        tmp_path,
        "20-second.toml",
        """
        [server]
        idel-timeout = "5m"
        [server.listener.sm]
        bind = "unix:socketmap"
        [lookup]
        separator = "@"
        [storage]
        directory = "sql"
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config([tmp_path])
    assert info.value.errors == [
        f'{second}: server.idel-timeout: unknown key (did you mean "idle-timeout"?)',
        f"{first}: server.max-connections: expected integer, got string",
        f"{second}: server.listener.sm.protocol: missing required key",
        f'{second}: lookup.separator: must not contain "@"',
        f"{first}: directory.default.type: must be one of: {DIRECTORY_CHOICES}",
        f'{second}: storage.directory: no directory "sql"; defined: default',
        f"{first}: server.listener.tcp.map: a tcp-table listener needs a map, one of: {', '.join(MAP_NAMES)}",
    ]
    assert str(info.value) == "\n".join(info.value.errors)
    assert pickle.loads(pickle.dumps(info.value)).errors == info.value.errors


# --- field checks and cross-checks


def test_socket_mode_must_be_octal(tmp_path: Path) -> None:
    text = BASE + "[server.listener.a]\nprotocol = 'socketmap'\nbind = 'unix:a'\nsocket = { mode = '0680' }\n"
    path = write(tmp_path, "c.toml", text)
    assert one_error(path) == f'{path}: server.listener.a.socket.mode: expected an octal mode such as "0660"'
    ok = BASE + "[server.listener.a]\nprotocol = 'socketmap'\nbind = 'unix:a'\nsocket = { mode = '600' }\n"
    assert load_config([write(tmp_path, "ok.toml", ok)]).server.listener["a"].socket.mode == "600"


def test_max_connections_must_be_positive(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", BASE + "[server]\nmax-connections = 0\n")
    assert one_error(path) == f"{path}: server.max-connections: must be at least 1"


def test_storage_directory_must_exist(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", BASE + '[directory.other]\ntype = "memory"\n[storage]\ndirectory = "ldap"\n')
    assert one_error(path) == f'{path}: storage.directory: no directory "ldap"; defined: default, other'


def test_a_directory_with_errors_still_counts_as_defined(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", '[directory.default]\ntype = "nis"\n')
    assert one_error(path) == f"{path}: directory.default.type: must be one of: {DIRECTORY_CHOICES}"


def test_a_listener_directory_must_exist(tmp_path: Path) -> None:
    text = BASE + "[server.listener.a]\nprotocol = 'dovecot-auth'\nbind = 'unix:auth'\ndirectory = 'sql'\n"
    path = write(tmp_path, "c.toml", text)
    assert one_error(path) == f'{path}: server.listener.a.directory: no directory "sql"; defined: default'


def test_tcp_table_needs_a_map_and_nothing_else_takes_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [server.listener.tcp]
        protocol = "tcp-table"
        bind = "127.0.0.1:10031"
        [server.listener.ok]
        protocol = "tcp-table"
        bind = "127.0.0.1:10032"
        map = "alias"
        [server.listener.sm]
        protocol = "socketmap"
        bind = "unix:socketmap"
        map = "mailbox"
        """,
    )
    assert errors_of(path) == [
        f"{path}: server.listener.tcp.map: a tcp-table listener needs a map, one of: "
        "domain, mailbox, alias, sender, recipient, quota",
        f"{path}: server.listener.sm.map: only tcp-table listeners take a map",
    ]
    assert MAP_NAMES == ("domain", "mailbox", "alias", "sender", "recipient", "quota")


def test_cross_checks_still_run_on_a_listener_with_other_errors(tmp_path: Path) -> None:
    text = BASE + "[server.listener.tcp]\nprotocol = 'tcp-table'\nbind = '127.0.0.1:10031'\nsocket = 5\n"
    path = write(tmp_path, "c.toml", text)
    assert errors_of(path) == [
        f"{path}: server.listener.tcp.socket: expected table, got integer",
        f"{path}: server.listener.tcp.map: a tcp-table listener needs a map, one of: {', '.join(MAP_NAMES)}",
    ]


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{user}/", "unknown placeholder {user}; allowed: {name}, {local}, {domain}"),
        ("{domain}/{0}/{}", "unknown placeholder {0}, {}; allowed: {name}, {local}, {domain}"),
        ("{local!r}/{domain:>9}", "unknown placeholder {local!r}, {domain:>9}; allowed: {name}, {local}, {domain}"),
        ("{local.upper}", "unknown placeholder {local.upper}; allowed: {name}, {local}, {domain}"),
        ("{domain/", "not a valid template: expected '}' before end of string"),
        ("domain}/", "not a valid template: Single '}' encountered in format string"),
    ],
)
def test_mailbox_path_placeholders(tmp_path: Path, template: str, message: str) -> None:
    path = write(tmp_path, "c.toml", BASE + f"[lookup]\nmailbox-path = '{template}'\n")
    assert one_error(path) == f"{path}: lookup.mailbox-path: {message}"


def test_mailbox_path_may_use_every_placeholder_and_escaped_braces(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", BASE + "[lookup]\nmailbox-path = '{domain}/{local}/{name}/{{x}}'\n")
    assert load_config([path]).lookup.mailbox_path == "{domain}/{local}/{name}/{{x}}"


@pytest.mark.parametrize(
    ("separator", "message"),
    [
        ("@", 'must not contain "@"'),
        ("+@", 'must not contain "@"'),
        ("", "must not be empty (set subaddressing = false to turn subaddressing off)"),
    ],
)
def test_separator(tmp_path: Path, separator: str, message: str) -> None:
    path = write(tmp_path, "c.toml", BASE + f"[lookup]\nseparator = '{separator}'\n")
    assert one_error(path) == f"{path}: lookup.separator: {message}"


def test_two_listeners_may_not_share_a_bind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.toml",
        BASE
        + """
        [server]
        run-dir = "/run/mr"
        [server.listener.a]
        protocol = "socketmap"
        bind = "unix:socketmap"
        [server.listener.b]
        protocol = "policy"
        bind = "unix:/run/mr/socketmap"
        [server.listener.c]
        protocol = "tcp-table"
        bind = "LocalHost:10031"
        map = "domain"
        [server.listener.d]
        protocol = "tcp-table"
        bind = "localhost:10031"
        map = "mailbox"
        [server.listener.e]
        protocol = "dovecot-auth"
        bind = "fd:auth"
        [server.listener.f]
        protocol = "dovecot-master"
        bind = "fd:auth"
        [server.listener.g]
        protocol = "dovecot-dict"
        bind = "localhost:10032"
        """,
    )
    assert errors_of(path) == [
        f'{path}: server.listener.b.bind: listener "a" already binds unix:/run/mr/socketmap',
        f'{path}: server.listener.d.bind: listener "c" already binds localhost:10031',
        f'{path}: server.listener.f.bind: listener "e" already binds fd:auth',
    ]


def test_a_unix_socket_path_must_fit_in_sun_path(tmp_path: Path) -> None:
    name = "s" * 100
    text = BASE + f"[server.listener.a]\nprotocol = 'socketmap'\nbind = 'unix:{name}'\n"
    path = write(tmp_path, "c.toml", text)
    assert one_error(path) == (
        f"{path}: server.listener.a.bind: the socket path /run/mailroster/{name} is longer than 107 bytes"
    )


def test_a_bad_bind_in_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", BASE + "[server.listener.a]\nprotocol = 'socketmap'\nbind = 'socketmap'\n")
    assert one_error(path) == (
        f"{path}: server.listener.a.bind: expected unix:PATH, HOST:PORT, [IPV6]:PORT or fd:NAME, got 'socketmap'"
    )


# --- parse_bind and resolve_path


@pytest.mark.parametrize(
    ("bind", "parsed"),
    [
        ("unix:socketmap", ("unix", "socketmap")),
        ("unix:/run/mailroster/auth", ("unix", "/run/mailroster/auth")),
        ("127.0.0.1:10031", ("tcp", "127.0.0.1", 10031)),
        ("0.0.0.0:65535", ("tcp", "0.0.0.0", 65535)),
        ("localhost:1", ("tcp", "localhost", 1)),
        ("mail.example.org:25", ("tcp", "mail.example.org", 25)),
        ("[::1]:10031", ("tcp", "::1", 10031)),
        ("[::]:24", ("tcp", "::", 24)),
        ("[fe80::1%eth0]:24", ("tcp", "fe80::1%eth0", 24)),
        ("fd:socketmap", ("fd", "socketmap")),
        ("fd:auth-userdb.1", ("fd", "auth-userdb.1")),
    ],
)
def test_parse_bind(bind: str, parsed: tuple[object, ...]) -> None:
    assert parse_bind(bind) == parsed


@pytest.mark.parametrize(
    ("bind", "message"),
    [
        ("socketmap", "expected unix:PATH, HOST:PORT, [IPV6]:PORT or fd:NAME, got 'socketmap'"),
        (":10031", "expected unix:PATH, HOST:PORT, [IPV6]:PORT or fd:NAME, got ':10031'"),
        ("tcp:127.0.0.1:25", "expected unix:PATH, HOST:PORT, [IPV6]:PORT or fd:NAME, got 'tcp:127.0.0.1:25'"),
        ("unix:", "unix: needs a socket path, as in unix:socketmap"),
        ("unix:a\0b", "a socket path cannot contain a NUL byte"),
        ("fd:", "fd: needs a systemd FileDescriptorName: printable ASCII without spaces or ':'"),
        ("fd:a b", "fd: needs a systemd FileDescriptorName: printable ASCII without spaces or ':'"),
        ("fd:a:b", "fd: needs a systemd FileDescriptorName: printable ASCII without spaces or ':'"),
        ("127.0.0.1:0", "the port must be a number from 1 to 65535, got '0'"),
        ("127.0.0.1:65536", "the port must be a number from 1 to 65535, got '65536'"),
        ("127.0.0.1:smtp", "the port must be a number from 1 to 65535, got 'smtp'"),
        ("127.0.0.1:", "the port must be a number from 1 to 65535, got ''"),
        ("127.0.0.1:-1", "the port must be a number from 1 to 65535, got '-1'"),
        ("300.1.2.3:25", "'300.1.2.3' is not an IPv4 address"),
        ("bad_host:25", "'bad_host' is not a host name or an IP address"),
        ("-dash.example:25", "'-dash.example' is not a host name or an IP address"),
        ("::1:25", "an IPv6 address needs brackets: [::1]:25"),
        ("[::1]25", "expected [IPV6]:PORT, got '[::1]25'"),
        ("[127.0.0.1]:25", "'127.0.0.1' is not an IPv6 address"),
        ("[::1]:99999", "the port must be a number from 1 to 65535, got '99999'"),
    ],
)
def test_parse_bind_rejects(bind: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bind(bind)
    assert str(info.value) == message


def test_resolve_path() -> None:
    assert resolve_path("/run/mailroster", "socketmap") == "/run/mailroster/socketmap"
    assert resolve_path("/run/mailroster", "sub/auth") == "/run/mailroster/sub/auth"
    assert resolve_path("/run/mailroster", "/var/spool/postfix/private/auth") == "/var/spool/postfix/private/auth"


def test_config_defaults_without_files() -> None:
    assert Config().sources == ()
    assert Config().directory == {}
