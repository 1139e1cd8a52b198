"""The ``mailroster`` command line.

Exit codes follow sysexits(3), as Postfix and Dovecot tools do: 0 found/ok, 1 not found, 64 usage, 75 temporary
failure (EX_TEMPFAIL), 78 configuration error (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence
from typing import assert_never

from mailroster.backends import secrets
from mailroster.backends.outcome import AuthStatus, Found, NotFound, PermFail, TempFail

from .accounts import AccountService
from .config import MAP_NAMES, Config, ConfigError, load_config
from .directories import build_directories, build_directory
from .lookups import LookupService
from .server import Daemon, StartupError

log = logging.getLogger("mailroster")

EX_OK = 0
EX_NOTFOUND = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_CONFIG = 78


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        default=[],
        metavar="PATH",
        help="configuration file or directory of *.toml (repeatable, later wins; "
        "default /etc/mailroster, else conf.d/ of the checkout)",
    )


def _directory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--directory", metavar="NAME", help="directory to use (default: storage.directory)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailroster", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the daemon")
    _config_option(serve)
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    check = sub.add_parser("check-config", help="validate the configuration without connecting to any backend")
    _config_option(check)

    lookup = sub.add_parser("lookup", help="look a key up in a map, as Postfix would")
    _config_option(lookup)
    _directory_option(lookup)
    lookup.add_argument("map", choices=MAP_NAMES, metavar="MAP", help=f"one of: {', '.join(MAP_NAMES)}")
    lookup.add_argument("key")

    auth = sub.add_parser("auth", help="check a password (read from stdin) as Dovecot's auth would")
    _config_option(auth)
    _directory_option(auth)
    auth.add_argument("user")
    auth.add_argument("--service", default="mailroster", help="service name passed to the check (default: %(default)s)")

    hash_password = sub.add_parser("hash-password", help="hash a password read from stdin")
    hash_password.add_argument(
        "--scheme", default="ARGON2ID", type=str.upper, help="Dovecot scheme name (default: %(default)s)"
    )

    # Imported here: manage builds on this module's helpers (options, password reading, config loading).
    from . import manage  # noqa: PLC0415

    manage.add_parsers(sub)
    return parser


def read_password() -> str:
    """A password from stdin, less one trailing newline (as ``echo secret |`` adds)."""
    text = sys.stdin.readline() if not sys.stdin.isatty() else getpass.getpass("Password: ")
    return text[:-1] if text.endswith("\n") else text


def _load(paths: Sequence[str]) -> Config | None:
    try:
        config = load_config(paths)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None
    return config


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )


def _event_loop_factory(choice: str) -> type[asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415 - optional dependency
    except ImportError:
        if choice == "uvloop":
            raise StartupError('event-loop = "uvloop" but uvloop is not installed') from None
        return None
    return uvloop.Loop  # type: ignore[no-any-return,unused-ignore]


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    config = _load(args.config)
    if config is None:
        return EX_CONFIG

    async def run() -> None:
        daemon = Daemon(config, build_directories(config), load=lambda: load_config(args.config))
        await daemon.serve_forever()

    try:
        loop_class = _event_loop_factory(config.server.event_loop)
        with asyncio.Runner(loop_factory=loop_class) as runner:
            log.info("starting event_loop=%s", "uvloop" if loop_class else "asyncio")
            runner.run(run())
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    return EX_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    try:
        # Memory directories are built from the configuration alone; nothing here connects anywhere.
        build_directories(config, [k for k, v in config.directory.items() if v.type == "memory"], cached=False)
    except ValueError as exc:
        print(f"{config.sources[0] if config.sources else '-'}: {exc}", file=sys.stderr)
        return EX_CONFIG
    print(
        f"configuration OK: {len(config.sources)} files, {len(config.server.listener)} listeners, "
        f"{len(config.directory)} directories"
    )
    return EX_OK


def _directory_name(args: argparse.Namespace, config: Config) -> str | None:
    """The directory a command works on (``--directory``, else ``storage.directory``); None, said, if unknown."""
    name: str = args.directory or config.storage.directory
    if name not in config.directory:
        print(f"no directory named {name!r}", file=sys.stderr)
        return None
    return name


def cmd_lookup(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    name = _directory_name(args, config)
    if name is None:
        return EX_USAGE

    async def run() -> int:
        directory = build_directory(config, name, cached=False)
        try:
            outcome = await LookupService(directory, config.lookup).lookup(args.map, args.key)
        finally:
            await directory.close()
        match outcome:
            case Found(value):
                print(value)
                return EX_OK
            case NotFound():
                return EX_NOTFOUND
            case TempFail(reason):
                print(f"temporary failure: {reason}", file=sys.stderr)
                return EX_TEMPFAIL
            case PermFail(reason):
                print(f"error: {reason}", file=sys.stderr)
                return EX_CONFIG
            case _:
                assert_never(outcome)

    return asyncio.run(run())


def cmd_auth(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EX_CONFIG
    name = _directory_name(args, config)
    if name is None:
        return EX_USAGE
    password = read_password()

    async def run() -> int:
        directory = build_directory(config, name, cached=False)
        try:
            accounts = AccountService(directory, LookupService(directory, config.lookup), config.auth, config.userdb)
            outcome = await accounts.authenticate(args.user, password, service=args.service)
        finally:
            await directory.close()
        match outcome.status:
            case AuthStatus.OK:
                print(f"authenticated as {outcome.user}")
                return EX_OK
            case AuthStatus.FAILED | AuthStatus.DISABLED:
                print("authentication failed", file=sys.stderr)
                return EX_NOTFOUND
            case AuthStatus.TEMPFAIL:
                print(f"temporary failure: {outcome.reason}", file=sys.stderr)
                return EX_TEMPFAIL
            case _:
                assert_never(outcome.status)

    return asyncio.run(run())


def cmd_hash_password(args: argparse.Namespace) -> int:
    password = read_password()
    if not password:
        print("refusing to hash an empty password", file=sys.stderr)
        return EX_USAGE
    try:
        print(secrets.hash_password(password, args.scheme))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_USAGE
    return EX_OK


COMMANDS = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "lookup": cmd_lookup,
    "auth": cmd_auth,
    "hash-password": cmd_hash_password,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # Management subcommands (daemon/manage.py) carry their handler; the others are looked up by name.
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        return int(handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
