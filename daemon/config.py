"""Configuration: TOML files -> frozen dataclasses, every error reported under its file and dotted key.

``load_config`` reads the files named on the command line (a directory stands for the ``*.toml`` files in it, in
name order), deep-merges them, later files winning, and converts the result by following the type hints of the
dataclasses below. Each backend declares its own config dataclass; ``[directory.<id>]`` and ``[store.<id>]`` tables
pick theirs by their ``type`` key from ``DIRECTORY_TYPES`` / ``STORE_TYPES``, imported only when a table uses them.

Conversion does not stop at the first problem: every unknown key, wrong type, bad value, missing required key and
failed cross-check of one run ends up in a single ``ConfigError``, one ``FILE: dotted.key: message`` line each.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib
import ipaddress
import json
import os
import re
import string
import tomllib
import types
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from mailroster.backends.settings import Duration, Secret, Size

SYSTEM_CONFIG_DIR = Path("/etc/mailroster")
CHECKOUT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf.d"

# type name -> "module:ConfigClass". Strings, not classes, so that reading the configuration never imports a driver
# module (and its client library) that no table asks for.
DIRECTORY_TYPES: dict[str, str] = {
    "memory": "mailroster.backends.memory:MemoryDirectoryConfig",
    "sql": "mailroster.backends.sql:SqlDirectoryConfig",
    "internal": "mailroster.backends.internal:InternalDirectoryConfig",
    "ldap": "mailroster.backends.ldap_config:LdapDirectoryConfig",
    "imap": "mailroster.backends.imap:ImapDirectoryConfig",
    "smtp": "mailroster.backends.smtp:SmtpDirectoryConfig",
    "lmtp": "mailroster.backends.smtp:SmtpDirectoryConfig",
}
STORE_TYPES: dict[str, str] = {
    "sqlite": "mailroster.backends.store:SqliteStoreConfig",
    "postgresql": "mailroster.backends.store:PostgresStoreConfig",
    "mysql": "mailroster.backends.store:MysqlStoreConfig",
}

ListenerProtocol = Literal["socketmap", "tcp-table", "policy", "dovecot-auth", "dovecot-master", "dovecot-dict"]
MapName = Literal["domain", "mailbox", "alias", "sender", "recipient", "quota"]
MAP_NAMES: tuple[str, ...] = get_args(MapName)
MAILBOX_PATH_PLACEHOLDERS = ("name", "local", "domain")
USERDB_PLACEHOLDERS = ("name", "local", "domain", "user")
Mechanism = Literal["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256"]

Bind = tuple[Literal["unix"], str] | tuple[Literal["tcp"], str, int] | tuple[Literal["fd"], str]

# A dotted key as a path: table keys, and array indexes for elements of arrays of tables.
_KeyPath = tuple[str | int, ...]

# Linux's sun_path holds 108 bytes including the terminating NUL; a longer path fails only at bind() time.
_SUN_PATH_MAX = 107


class ConfigError(Exception):
    """Every problem found in one run, each a line ``FILE: dotted.key: message``."""

    def __init__(self, errors: list[str]) -> None:
        # The list itself is the only argument, so that the exception pickles back into the same errors.
        super().__init__(list(errors))
        self.errors: list[str] = list(errors)

    def __str__(self) -> str:
        return "\n".join(self.errors)


# Field metadata understood by the converter:
#   "check": a callable run on the converted value; a ValueError becomes an error at that key.
#   "registry": a _Registry; the field is a dict[str, <config class chosen by each table's type key>].
#   "toml": False for a field that is not read from the files.


@dataclass(frozen=True, slots=True)
class _Registry:
    kind: str  # "directory" or "store", for messages
    types: Mapping[str, str]


def _check_mode(mode: str) -> None:
    if not re.fullmatch(r"[0-7]{3,4}", mode):
        raise ValueError('expected an octal mode such as "0660"')


def _check_positive(number: int) -> None:
    if number < 1:
        raise ValueError("must be at least 1")


def _check_separator(separator: str) -> None:
    if "@" in separator:
        raise ValueError('must not contain "@"')
    if not separator:
        raise ValueError("must not be empty (set subaddressing = false to turn subaddressing off)")


def _check_mailbox_path(template: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    unknown = []
    for _text, name, spec, conversion in parsed:
        if name is None:
            continue
        # A conversion or format spec is rejected too: it would be applied to a path component.
        if name not in MAILBOX_PATH_PLACEHOLDERS or spec or conversion:
            unknown.append("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in MAILBOX_PATH_PLACEHOLDERS)
        raise ValueError(f"unknown placeholder {', '.join(unknown)}; allowed: {allowed}")


_FD_NAME = re.compile(r"[!-9;-~]{1,255}")  # systemd's FileDescriptorName=: printable ASCII, no ':' and no space
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_BIND_FORMS = "expected unix:PATH, HOST:PORT, [IPV6]:PORT or fd:NAME"


def parse_bind(bind: str) -> Bind:
    """Split a listener's ``bind``: ``("unix", path)``, ``("tcp", host, port)`` or ``("fd", name)``.

    ``fd:NAME`` is a socket passed by systemd socket activation under ``FileDescriptorName=NAME``. An IPv6 host
    comes back without its brackets. Raises ValueError with a message fit for the user.
    """
    if bind.startswith("unix:"):
        path = bind.removeprefix("unix:")
        if not path:
            raise ValueError("unix: needs a socket path, as in unix:socketmap")
        if "\0" in path:
            raise ValueError("a socket path cannot contain a NUL byte")
        return ("unix", path)
    if bind.startswith("fd:"):
        name = bind.removeprefix("fd:")
        if not _FD_NAME.fullmatch(name):
            raise ValueError("fd: needs a systemd FileDescriptorName: printable ASCII without spaces or ':'")
        return ("fd", name)
    if bind.startswith("["):
        host, bracket, port = bind[1:].partition("]:")
        if not bracket:
            raise ValueError(f"expected [IPV6]:PORT, got {bind!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
        return ("tcp", host, _parse_port(port))
    host, colon, port = bind.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{_BIND_FORMS}, got {bind!r}")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_BIND_FORMS}, got {bind!r}") from None
        raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    elif not _HOST_NAME.fullmatch(host):
        raise ValueError(f"{host!r} is not a host name or an IP address")
    return ("tcp", host, _parse_port(port))


def _parse_port(port: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {port!r}")
    return int(port)


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """Ownership and permissions of a unix socket; an empty owner or group leaves it as created."""

    mode: str = field(default="0660", metadata={"check": _check_mode})
    owner: str = ""
    group: str = ""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """``[server.listener.<id>]``. ``directory`` None means ``storage.directory``; ``idle-timeout`` None means
    ``server.idle-timeout``."""

    protocol: ListenerProtocol
    bind: str = field(metadata={"check": parse_bind})
    socket: SocketOptions = field(default_factory=SocketOptions)
    directory: str | None = None
    map: MapName | None = None
    idle_timeout: Duration | None = None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    run_dir: str = "/run/mailroster"
    state_dir: str = "/var/lib/mailroster"
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    max_connections: int = field(default=4096, metadata={"check": _check_positive})
    idle_timeout: Duration = Duration(300)
    shutdown_timeout: Duration = Duration(10)
    listener: dict[str, ListenerConfig] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    directory: str = "default"


@dataclass(frozen=True, slots=True)
class LookupConfig:
    mailbox_path: str = field(default="{domain}/{local}/", metadata={"check": _check_mailbox_path})
    subaddressing: bool = True
    separator: str = field(default="+", metadata={"check": _check_separator})
    catch_all: bool = True


def _check_userdb_template(template: str) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    unknown = names - set(USERDB_PLACEHOLDERS)
    if unknown:
        allowed = ", ".join("{" + p + "}" for p in USERDB_PLACEHOLDERS)
        raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}; allowed: {allowed}")


def _check_userdb_extra(extra: dict[str, str]) -> None:
    for key, template in extra.items():
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_/+.-]*", key):
            raise ValueError(f"{key!r} is not a Dovecot field name")
        _check_userdb_template(template)


def _check_failure_delay(delay: float) -> None:
    # Postfix gives its Dovecot SASL exchange 10 s in all (AUTH_TIMEOUT): a longer delay turns 535 into a timeout.
    if delay > 5:
        raise ValueError("must be at most 5s: Postfix times out an authentication after 10s")


@dataclass(frozen=True, slots=True)
class MasterUserConfig:
    """A master user: ``login*master`` (or SASL PLAIN authzid) with the master's password logs in as ``login``."""

    user: str
    secret: Secret


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """``[auth]``: how the Dovecot auth protocols authenticate."""

    mechanisms: list[Mechanism] = field(default_factory=lambda: ["PLAIN", "LOGIN"])
    failure_delay: Duration = field(default=Duration(2), metadata={"check": _check_failure_delay})
    login_by_email: bool = True
    tempfail: Literal["reply", "close"] = "reply"
    request_timeout: Duration = Duration(150)
    master: MasterUserConfig | None = None
    master_separator: str = "*"


PolicyMode = Literal["reject", "defer", "warn", "off"]


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """``[policy]``: the checks a ``policy`` listener (Postfix ``check_policy_service``) makes, each ``reject``,
    ``defer``, ``warn`` (Postfix logs it, the mail goes on) or ``off``; ``tempfail``: when the directory is down,
    answer ``DEFER`` (``defer``) or close without a reply (``close``: Postfix retries, then applies its
    ``smtpd_policy_service_default_action``)."""

    sender_login_mismatch: PolicyMode = "reject"
    unknown_recipient: PolicyMode = "reject"
    unauthenticated_local_sender: PolicyMode = "warn"
    tempfail: Literal["defer", "close"] = "defer"


@dataclass(frozen=True, slots=True)
class UserdbConfig:
    """``[userdb]``: templates of the userdb fields; empty ones are left out of replies. ``quota-rule`` empty means
    ``*:bytes=<quota>`` from the principal's quota (nothing when it has none)."""

    uid: str = field(default="", metadata={"check": _check_userdb_template})
    gid: str = field(default="", metadata={"check": _check_userdb_template})
    home: str = field(default="", metadata={"check": _check_userdb_template})
    mail: str = field(default="", metadata={"check": _check_userdb_template})
    quota_rule: str = field(default="", metadata={"check": _check_userdb_template})
    extra: dict[str, str] = field(default_factory=dict, metadata={"check": _check_userdb_extra})


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration. ``directory`` and ``store`` hold instances of the classes their ``type`` names."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    lookup: LookupConfig = field(default_factory=LookupConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    userdb: UserdbConfig = field(default_factory=UserdbConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    directory: dict[str, Any] = field(
        default_factory=dict, metadata={"registry": _Registry("directory", DIRECTORY_TYPES)}
    )
    store: dict[str, Any] = field(default_factory=dict, metadata={"registry": _Registry("store", STORE_TYPES)})
    sources: tuple[str, ...] = field(default=(), metadata={"toml": False})


def resolve_path(base: str, path: str) -> str:
    """``path`` itself when absolute, else ``path`` under ``base`` (unix: socket paths resolve against run-dir)."""
    return os.path.join(base, path)


def default_config_paths() -> list[Path]:
    """Where the configuration is read from when no path is given: /etc/mailroster, else the checkout's conf.d."""
    return [SYSTEM_CONFIG_DIR if SYSTEM_CONFIG_DIR.exists() else CHECKOUT_CONFIG_DIR]


def load_config(paths: Sequence[str | Path]) -> Config:
    """Read, merge and convert the configuration; raise ConfigError listing every problem found.

    Each path is a file or a directory, whose ``*.toml`` files (not hidden, not recursive) are read in name order.
    Later files win: tables merge key by key, any other value (arrays included) replaces the earlier one. With no
    paths, ``default_config_paths()`` is read.
    """
    if isinstance(paths, str | Path):
        # A str is a Sequence too: load_config("a.toml") would otherwise read the files "a", ".", "t", ...
        raise TypeError("load_config() takes a sequence of paths")
    targets = [Path(p) for p in paths] or default_config_paths()
    errors: list[str] = []
    files = _config_files(targets, errors)
    documents = [(str(path), _read_toml(path, errors)) for path in files]
    if errors:
        raise ConfigError(errors)

    merged: dict[str, Any] = {}
    origins: dict[_KeyPath, str] = {}
    for origin, document in documents:
        _merge(merged, document, origin, origins, ())

    converter = _Converter(origins, fallback=str(files[0] if files else targets[0]))
    config = converter.convert(Config, merged, ())
    # A directory whose table has errors still exists as far as references to it are concerned.
    defined = merged.get("directory")
    stores = merged.get("store")
    _cross_check(
        config,
        defined if isinstance(defined, dict) else {},
        stores if isinstance(stores, dict) else {},
        converter.report,
    )
    if converter.errors:
        raise ConfigError(converter.errors)
    assert isinstance(config, Config)
    return dataclasses.replace(config, sources=tuple(origin for origin, _ in documents))


def _config_files(targets: list[Path], errors: list[str]) -> list[Path]:
    files: list[Path] = []
    for target in targets:
        if target.is_dir():
            try:
                # Hidden files are skipped: editors leave lock files such as .#name.toml behind.
                names = sorted(p.name for p in target.iterdir() if p.suffix == ".toml" and not p.name.startswith("."))
            except OSError as exc:
                errors.append(f"{target}: cannot read: {exc.strerror}")
                continue
            files.extend(target / name for name in names)
        elif target.exists():
            files.append(target)
        else:
            errors.append(f"{target}: no such file or directory")
    return files


def _read_toml(path: Path, errors: list[str]) -> dict[str, Any]:
    try:
        with path.open("rb") as fp:
            return tomllib.load(fp)
    except OSError as exc:
        errors.append(f"{path}: cannot read: {exc.strerror}")
    except UnicodeDecodeError as exc:
        # Not str(exc): it quotes the offending byte, which may belong to a password.
        errors.append(f"{path}: not UTF-8 text (at byte {exc.start})")
    except tomllib.TOMLDecodeError as exc:
        errors.append(f"{path}: invalid TOML: {exc}")
    return {}


def _merge(
    into: dict[str, Any], new: Mapping[str, Any], origin: str, origins: dict[_KeyPath, str], at: _KeyPath
) -> None:
    """Deep-merge ``new`` into ``into`` and note which file set each key. A table merged into an existing table
    keeps the file that first defined it: that is where a missing required key of it is reported."""
    for key, value in new.items():
        path = (*at, key)
        current = into.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            _merge(current, value, origin, origins, path)
            continue
        for stale in [p for p in origins if p[: len(path)] == path]:
            del origins[stale]
        into[key] = value
        _note_origin(value, origin, origins, path)


def _note_origin(value: object, origin: str, origins: dict[_KeyPath, str], path: _KeyPath) -> None:
    origins[path] = origin
    if isinstance(value, dict):
        for key, item in value.items():
            _note_origin(item, origin, origins, (*path, key))


class _Invalid:
    """The result of a value that could not be converted (its error is already reported)."""


_INVALID: Any = _Invalid()


@dataclass(slots=True)
class _Partial:
    """What converted of a table that had errors: the cross-checks still look at the rest of it."""

    cls: type[Any]
    values: dict[str, Any]


class _Converter:
    """Builds dataclasses from the merged TOML following their type hints, collecting errors as it goes."""

    def __init__(self, origins: Mapping[_KeyPath, str], fallback: str) -> None:
        self._origins = origins
        self._fallback = fallback
        self.errors: list[str] = []

    def report(self, path: _KeyPath, message: str) -> None:
        self.errors.append(f"{self._origin(path)}: {_dotted(path)}: {message}")

    def _origin(self, path: _KeyPath) -> str:
        # A key no file set (a missing key, a default, an array element) belongs to the nearest parent one did set.
        for end in range(len(path), 0, -1):
            origin = self._origins.get(path[:end])
            if origin is not None:
                return origin
        return self._fallback

    def _reject_unknown_keys(self, table: Mapping[str, object], known: Collection[str], path: _KeyPath) -> None:
        for key in table:
            if key not in known:
                # Above difflib's default 0.6, which offers "store" for "sources": a wrong hint is worse than none.
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
                self.report((*path, key), "unknown key" + (f' (did you mean "{close[0]}"?)' if close else ""))

    def _wrong_type(self, expected: str, value: object, path: _KeyPath) -> Any:
        self.report(path, f"expected {expected}, got {_toml_type(value)}")
        return _INVALID

    def convert(self, tp: Any, value: object, path: _KeyPath) -> Any:
        """``value`` as an instance of the annotation ``tp``, or _INVALID / a _Partial after reporting why."""
        origin = get_origin(tp)
        if tp is Secret:
            return self._secret(value, path)
        if tp is Duration or tp is Size:
            return self._parsed(tp, value, path)
        if tp is bool:
            return value if isinstance(value, bool) else self._wrong_type("boolean", value, path)
        if tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            return self._wrong_type("integer", value, path)
        if tp is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            return self._wrong_type("float", value, path)
        if tp is str:
            return value if isinstance(value, str) else self._wrong_type("string", value, path)
        if tp is Any:
            return value
        if origin is Literal:
            if not isinstance(value, str):
                return self._wrong_type("string", value, path)
            if value not in get_args(tp):
                self.report(path, f"must be one of: {', '.join(get_args(tp))}")
                return _INVALID
            return value
        if origin is Union or origin is types.UnionType:
            # TOML has no null: a key that is present is never None, so X | None converts as X.
            members = [arg for arg in get_args(tp) if arg is not type(None)]
            if len(members) != 1:
                raise TypeError(f"{_dotted(path)}: only X | None unions are supported, not {tp!r}")
            return self.convert(members[0], value, path)
        if origin is list:
            (item_type,) = get_args(tp)
            if not isinstance(value, list):
                if not _is_scalar(item_type):
                    return self._wrong_type("array", value, path)
                value = [value]  # secret = "x" for a list of secrets
            items = (self.convert(item_type, item, (*path, i)) for i, item in enumerate(value))
            return [item for item in items if item is not _INVALID]
        if origin is dict:
            if not isinstance(value, dict):
                return self._wrong_type("table", value, path)
            _, value_type = get_args(tp)
            converted = {key: self.convert(value_type, item, (*path, key)) for key, item in value.items()}
            return {key: item for key, item in converted.items() if item is not _INVALID}
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._dataclass(tp, value, path)
        raise TypeError(f"{_dotted(path)}: no conversion for the annotation {tp!r}")

    def _dataclass(self, cls: type[Any], value: object, path: _KeyPath) -> Any:
        if not isinstance(value, dict):
            return self._wrong_type("table", value, path)
        errors_before = len(self.errors)
        by_key = {_toml_key(f.name): f for f in dataclasses.fields(cls) if f.metadata.get("toml", True)}
        self._reject_unknown_keys(value, by_key, path)
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for key, f in by_key.items():
            key_path = (*path, key)
            if key not in value:
                if f.default is not MISSING:
                    values[f.name] = f.default
                elif f.default_factory is not MISSING:
                    values[f.name] = f.default_factory()
                else:
                    self.report(key_path, "missing required key")
                continue
            registry = f.metadata.get("registry")
            if registry is not None:
                converted = self._registered(registry, value[key], key_path)
            else:
                converted = self.convert(hints[f.name], value[key], key_path)
            if converted is _INVALID:
                continue
            check: Callable[[Any], object] | None = f.metadata.get("check")
            if check is not None and not isinstance(converted, _Partial):
                try:
                    check(converted)
                except ValueError as exc:
                    self.report(key_path, str(exc))
                    continue
            values[f.name] = converted
        if len(self.errors) > errors_before:
            return _Partial(cls, values)
        try:
            return cls(**values)
        except ValueError as exc:  # a __post_init__ check across several keys of the table
            self.report(path, str(exc))
            return _Partial(cls, values)

    def _registered(self, registry: _Registry, value: object, path: _KeyPath) -> Any:
        """A table of ``<id> = { type = "...", ... }`` tables, each converted to the class its type names."""
        if not isinstance(value, dict):
            return self._wrong_type("table", value, path)
        converted = {}
        for ident, table in value.items():
            item_path = (*path, ident)
            cls = self._registered_class(registry, table, item_path)
            if cls is not None:
                converted[ident] = self._dataclass(cls, table, item_path)
        return converted

    def _registered_class(self, registry: _Registry, table: object, path: _KeyPath) -> type[Any] | None:
        if not isinstance(table, dict):
            self._wrong_type("table", table, path)
            return None
        type_path = (*path, "type")
        kind = table.get("type")
        if kind is None:
            self.report(type_path, "missing required key")
            return None
        if not isinstance(kind, str):
            self._wrong_type("string", kind, type_path)
            return None
        spec = registry.types.get(kind)
        if spec is None:
            if registry.types:
                self.report(type_path, f"must be one of: {', '.join(sorted(registry.types))}")
            else:
                self.report(type_path, f"unknown {registry.kind} type; none is available yet")
            return None
        try:
            return _load_class(spec)
        except ImportError as exc:
            # An optional driver that is not installed: the message says which module is missing.
            self.report(type_path, f'{registry.kind} type "{kind}" is not available: {exc}')
            return None

    def _parsed(self, tp: type[Duration] | type[Size], value: object, path: _KeyPath) -> Any:
        accepted: tuple[type, ...] = (str, int, float) if tp is Duration else (str, int)
        if isinstance(value, bool) or not isinstance(value, accepted):
            return self._wrong_type(tp.__name__.lower(), value, path)
        try:
            return tp.parse(value)
        except ValueError as exc:
            self.report(path, str(exc))
            return _INVALID

    def _secret(self, value: object, path: _KeyPath) -> Any:
        # No message below may quote the value: it is the password itself.
        if isinstance(value, str):
            return Secret(value, "inline")
        if not isinstance(value, dict):
            return self._wrong_type("a string or { file = PATH }", value, path)
        errors_before = len(self.errors)
        self._reject_unknown_keys(value, ("file",), path)
        file_path = (*path, "file")
        name = value.get("file")
        if name is None:
            self.report(file_path, "missing required key")
        elif not isinstance(name, str):
            self._wrong_type("string", name, file_path)
        if len(self.errors) > errors_before or not isinstance(name, str):
            return _INVALID
        try:
            # Bytes, not read_text(): universal newlines would rewrite a "\r" inside the secret.
            text = Path(name).read_bytes().decode("utf-8")
        except OSError as exc:
            self.report(file_path, f"cannot read {name}: {exc.strerror}")
            return _INVALID
        except UnicodeDecodeError:
            self.report(file_path, f"{name} is not UTF-8 text")
            return _INVALID
        # One trailing newline is what `echo secret > file` adds; more than one is kept as part of the value.
        text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
        return Secret(text, f"file {name}")


def _cross_check(
    config: object, directories: Collection[str], stores: Collection[str], report: Callable[[_KeyPath, str], None]
) -> None:
    """Checks that span several keys, run on what converted (a table with errors is a _Partial)."""

    def unknown_directory(name: str) -> str:
        if directories:
            return f'no directory "{name}"; defined: {", ".join(sorted(directories))}'
        return f'no directory "{name}"; no [directory.<id>] table is defined'

    converted = _get(config, "directory")
    for ident, directory in (converted if isinstance(converted, dict) else {}).items():
        # Directories kept in a database (internal, sql) name a [store.<id>] table.
        store = directory.values.get("store") if isinstance(directory, _Partial) else getattr(directory, "store", None)
        if isinstance(store, str) and store not in stores:
            known = f"defined: {', '.join(sorted(stores))}" if stores else "no [store.<id>] table is defined"
            report(("directory", ident, "store"), f'no store "{store}"; {known}')

    storage_directory = _get(config, "storage", "directory")
    if isinstance(storage_directory, str) and storage_directory not in directories:
        report(("storage", "directory"), unknown_directory(storage_directory))

    listeners = _get(config, "server", "listener")
    run_dir = _get(config, "server", "run_dir")
    bound: dict[object, str] = {}
    for ident, listener in (listeners if isinstance(listeners, dict) else {}).items():
        path: _KeyPath = ("server", "listener", ident)
        directory = _get(listener, "directory")
        if isinstance(directory, str) and directory not in directories:
            report((*path, "directory"), unknown_directory(directory))
        protocol, map_name = _get(listener, "protocol"), _get(listener, "map")
        if protocol == "tcp-table" and map_name is None:
            # tcp_table(5) carries no map name on the wire, so each map needs a listener of its own.
            report((*path, "map"), f"a tcp-table listener needs a map, one of: {', '.join(MAP_NAMES)}")
        elif isinstance(protocol, str) and protocol != "tcp-table" and isinstance(map_name, str):
            report((*path, "map"), "only tcp-table listeners take a map")
        bind = _get(listener, "bind")
        if not isinstance(bind, str):
            continue
        # Compare what would actually be bound: "unix:x" is "unix:/run/mailroster/x", host names ignore case.
        address: tuple[object, ...]
        match parse_bind(bind):  # a bind that did not parse is absent from a _Partial
            case ("unix", socket_path):
                if isinstance(run_dir, str):
                    socket_path = resolve_path(run_dir, socket_path)
                    if len(os.fsencode(socket_path)) > _SUN_PATH_MAX:
                        report((*path, "bind"), f"the socket path {socket_path} is longer than {_SUN_PATH_MAX} bytes")
                address = ("unix", os.path.normpath(socket_path))
            case ("tcp", host, port):
                address = ("tcp", host.lower(), port)
            case other:
                address = other
        if address in bound:
            report((*path, "bind"), f'listener "{bound[address]}" already binds {bind}')
        else:
            bound[address] = ident


def _get(obj: object, *names: str) -> object:
    """Walk attributes through instances, _Partials and dicts; _INVALID where something did not convert."""
    for name in names:
        if isinstance(obj, _Partial):
            obj = obj.values.get(name, _INVALID)
        elif isinstance(obj, dict):
            obj = obj.get(name, _INVALID)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = getattr(obj, name)
        else:
            return _INVALID
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    # Cached: a memory directory may hold thousands of [[principals]] of one class.
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


def _load_class(spec: str) -> type[Any]:
    module_name, _, class_name = spec.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{spec} is not a dataclass")
    return cls


def _is_scalar(tp: Any) -> bool:
    """Whether a single value may stand for a one-element list of ``tp`` (a Secret table is one value)."""
    if tp is Secret:
        return True
    return get_origin(tp) not in (list, dict) and not dataclasses.is_dataclass(tp)


def _toml_key(field_name: str) -> str:
    """``class_`` -> ``class``, ``email_list`` -> ``email-list``."""
    return field_name.removesuffix("_").replace("_", "-")


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _dotted(path: _KeyPath) -> str:
    """The key path as TOML would write it: ``server.listener."a.b".bind``, ``principals[0].name``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{key}" if text else key
    return text


_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "boolean"),  # before int: bool is an int
    (int, "integer"),
    (float, "float"),
    (str, "string"),
    (list, "array"),
    (dict, "table"),
    (datetime.datetime, "datetime"),  # before date: datetime is a date
    (datetime.date, "date"),
    (datetime.time, "time"),
)


def _toml_type(value: object) -> str:
    return next((name for cls, name in _TOML_TYPES if isinstance(value, cls)), type(value).__name__)
