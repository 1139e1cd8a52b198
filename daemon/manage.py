"""Management commands of the internal directory: ``mailroster domain|principal|import|export``.

```
mailroster domain add DOMAIN | delete DOMAIN [--force] | list [--json]
mailroster principal add NAME [--type individual|group|list] [--email ADDR]... [--member-of GROUP]...
                              [--member NAME|ADDR]... [--quota SIZE] [--description TEXT]
                              [--password-stdin | --hash HASH]
mailroster principal set NAME [--password-stdin | --hash HASH] [--add-email ADDR]... [--remove-email ADDR]...
                              [--add-member-of G]... [--remove-member-of G]... [--add-member M]...
                              [--remove-member M]... [--quota SIZE] [--description TEXT] [--enable | --disable]
mailroster principal delete NAME | show NAME [--json] | list [--type TYPE] [--json]
mailroster import FILE        # memory-directory TOML, one transaction ("-" reads stdin)
mailroster export             # the same format, to stdout
```

Each takes ``-c PATH...`` and ``--directory NAME`` (default ``storage.directory``), which must be an internal
directory. Exit codes (sysexits, as the other commands): 0 done, 1 refused (the reason on stderr, nothing
changed), 64 unknown directory, 66 unreadable import file, 75 temporary failure, 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mailroster.backends.errors import PermanentFailure, TemporaryFailure
from mailroster.backends.internal_checks import ManagementError, check_secret, hash_password
from mailroster.backends.internal_io import dump_export, parse_import
from mailroster.backends.internal_manage import (
    PRINCIPAL_TYPES,
    InternalManager,
    PrincipalRecord,
    PrincipalUpdate,
)
from mailroster.backends.model import PrincipalType
from mailroster.backends.settings import Size

from . import cli
from .directories import build_stores

EX_REFUSED = 1
EX_NOINPUT = 66

Action = Callable[[InternalManager, argparse.Namespace], Awaitable[int]]


def _size(text: str) -> int:
    try:
        return int(Size.parse(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _leaf(sub: Any, name: str, action: Action, help_text: str) -> argparse.ArgumentParser:
    """A subcommand parser with the options every management command takes, bound to ``action``."""
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
    cli._config_option(parser)
    cli._directory_option(parser)
    parser.set_defaults(handler=lambda args: run(args, action))
    return parser


def _password_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin and store its ARGON2ID hash"
    )
    group.add_argument("--hash", metavar="HASH", help="store this password hash as is (any scheme Dovecot knows)")


def add_parsers(sub: Any) -> None:
    """Add the management subcommands to the ``mailroster`` parser's subparsers."""
    domain = sub.add_parser("domain", help="manage the internal directory's domains")
    domains = domain.add_subparsers(dest="action", required=True, metavar="ACTION")
    _leaf(domains, "add", domain_add, "add a local domain").add_argument("domain")
    delete = _leaf(domains, "delete", domain_delete, "delete a local domain")
    delete.add_argument("domain")
    delete.add_argument(
        "--force", action="store_true", help="also delete the domain's addresses (the principals are kept)"
    )
    _leaf(domains, "list", domain_list, "list the local domains, one a line").add_argument(
        "--json", action="store_true", help="print a JSON array"
    )

    principal = sub.add_parser("principal", help="manage the internal directory's principals")
    principals = principal.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = _leaf(principals, "add", principal_add, "add a principal")
    add.add_argument("name")
    add.add_argument("--type", choices=PRINCIPAL_TYPES, default="individual")
    add.add_argument(
        "--email", action="append", default=[], metavar="ADDR", help="first is primary; @domain: catch-all"
    )
    add.add_argument("--member-of", action="append", default=[], metavar="GROUP")
    add.add_argument("--member", action="append", default=[], metavar="NAME|ADDR", help="a group's or list's member")
    add.add_argument("--quota", type=_size, metavar="SIZE", help='bytes or e.g. "2G"')
    add.add_argument("--description", default="", metavar="TEXT")
    _password_options(add)

    change = _leaf(principals, "set", principal_set, "change a principal")
    change.add_argument("name")
    _password_options(change)
    for option, metavar in (("email", "ADDR"), ("member-of", "GROUP"), ("member", "NAME|ADDR")):
        change.add_argument(f"--add-{option}", action="append", default=[], metavar=metavar)
        change.add_argument(f"--remove-{option}", action="append", default=[], metavar=metavar)
    change.add_argument("--quota", type=_size, metavar="SIZE", help='bytes or e.g. "2G"; 0 removes the quota')
    change.add_argument("--description", metavar="TEXT")
    enabled = change.add_mutually_exclusive_group()
    enabled.add_argument("--enable", dest="enabled", action="store_const", const=True)
    enabled.add_argument("--disable", dest="enabled", action="store_const", const=False)

    _leaf(principals, "delete", principal_delete, "delete a principal").add_argument("name")
    show = _leaf(principals, "show", principal_show, "show a principal (never its secrets)")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    listing = _leaf(principals, "list", principal_list, "list the principals, one name a line")
    listing.add_argument("--type", choices=PRINCIPAL_TYPES)
    listing.add_argument("--json", action="store_true", help="print a JSON array of objects as show --json does")

    importing = _leaf(sub, "import", import_file, "import principals from memory-directory TOML, in one transaction")
    importing.add_argument("file", metavar="FILE", help='a TOML file, or "-" for stdin')
    importing.set_defaults(handler=_read_then_import)
    _leaf(sub, "export", export, "print the directory as memory-directory TOML")


def run(args: argparse.Namespace, action: Action) -> int:
    """Load the configuration, open the directory's store, run ``action``, map failures to exit codes."""
    config = cli._load(args.config)
    if config is None:
        return cli.EX_CONFIG
    name = args.directory or config.storage.directory
    directory = config.directory.get(name)
    if directory is None:
        print(f"no directory named {name!r}", file=sys.stderr)
        return cli.EX_USAGE
    if directory.type != "internal":
        print(
            f"directory {name!r} is a {directory.type} directory: management commands work on internal ones only",
            file=sys.stderr,
        )
        return cli.EX_CONFIG
    # Read before the event loop starts: stdin may be a terminal, and getpass blocks.
    args.password = cli.read_password() if getattr(args, "password_stdin", False) else None

    async def main() -> int:
        store = build_stores(config, [directory.store])[directory.store]
        try:
            return await action(InternalManager(store), args)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except ManagementError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_REFUSED
    except TemporaryFailure as exc:
        print(f"temporary failure: {exc}", file=sys.stderr)
        return cli.EX_TEMPFAIL
    except PermanentFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.EX_CONFIG


async def _secret(args: argparse.Namespace) -> str | None:
    """The stored secret that ``--password-stdin`` or ``--hash`` asks for, if any."""
    if args.password is not None:
        return await hash_password(args.password)
    if args.hash is not None:
        return check_secret(args.hash, imported_hash=True)
    return None


def _as_json(record: PrincipalRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "type": record.type.value,
        "emails": list(record.emails),
        "member_of": list(record.member_of),
        "quota": record.quota,
        "description": record.description,
        "enabled": record.enabled,
    }


# Domains.


async def domain_add(manager: InternalManager, args: argparse.Namespace) -> int:
    print(f"domain {await manager.add_domain(args.domain)} added")
    return cli.EX_OK


async def domain_delete(manager: InternalManager, args: argparse.Namespace) -> int:
    removed = await manager.delete_domain(args.domain, force=args.force)
    print(f"domain {args.domain} deleted" + (f" with {removed} address(es)" if removed else ""))
    return cli.EX_OK


async def domain_list(manager: InternalManager, args: argparse.Namespace) -> int:
    domains = await manager.list_domains()
    if args.json:
        print(json.dumps(domains))
    else:
        for domain in domains:
            print(domain)
    return cli.EX_OK


# Principals.


async def principal_add(manager: InternalManager, args: argparse.Namespace) -> int:
    secret = await _secret(args)
    record = PrincipalRecord(
        name=args.name,
        type=PrincipalType(args.type),
        secrets=(secret,) if secret is not None else (),
        emails=tuple(args.email),
        member_of=tuple(args.member_of),
        members=tuple(args.member),
        description=args.description,
        quota=args.quota,
    )
    print(f"principal {await manager.add_principal(record)} added")
    return cli.EX_OK


async def principal_set(manager: InternalManager, args: argparse.Namespace) -> int:
    update = PrincipalUpdate(
        secret=await _secret(args),
        add_emails=tuple(args.add_email),
        remove_emails=tuple(args.remove_email),
        add_member_of=tuple(args.add_member_of),
        remove_member_of=tuple(args.remove_member_of),
        add_members=tuple(args.add_member),
        remove_members=tuple(args.remove_member),
        quota=args.quota,
        description=args.description,
        enabled=args.enabled,
    )
    await manager.update_principal(args.name, update)
    print(f"principal {args.name} changed")
    return cli.EX_OK


async def principal_delete(manager: InternalManager, args: argparse.Namespace) -> int:
    await manager.delete_principal(args.name)
    print(f"principal {args.name} deleted")
    return cli.EX_OK


async def principal_show(manager: InternalManager, args: argparse.Namespace) -> int:
    record = await manager.show_principal(args.name)
    if args.json:
        print(json.dumps(_as_json(record), ensure_ascii=False))
        return cli.EX_OK
    lines = [
        ("name", record.name),
        ("type", record.type.value),
        ("emails", ", ".join(record.emails)),
        ("member-of", ", ".join(record.member_of)),
        ("quota", str(record.quota) if record.quota is not None else "none"),
        ("description", record.description),
        ("enabled", "yes" if record.enabled else "no"),
    ]
    if record.type is not PrincipalType.INDIVIDUAL:
        lines.append(("members", ", ".join(record.members)))
    if record.email_list:
        lines.append(("email-list", ", ".join(record.email_list)))
    for key, value in lines:
        print(f"{key}: {value}")
    return cli.EX_OK


async def principal_list(manager: InternalManager, args: argparse.Namespace) -> int:
    records = await manager.list_principals(PrincipalType(args.type) if args.type else None)
    if args.json:
        print(json.dumps([_as_json(r) for r in records], ensure_ascii=False))
    else:
        for record in records:
            print(record.name)
    return cli.EX_OK


# Import and export.


def _read_then_import(args: argparse.Namespace) -> int:
    try:
        args.text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        print(f"cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EX_NOINPUT
    except UnicodeDecodeError as exc:
        print(f"cannot read {args.file}: not UTF-8 text (at byte {exc.start})", file=sys.stderr)
        return EX_NOINPUT
    return run(args, import_file)


async def import_file(manager: InternalManager, args: argparse.Namespace) -> int:
    summary = await manager.import_data(parse_import(args.text))
    print(f"imported {summary.principals} principal(s), created {summary.domains_created} domain(s)")
    return cli.EX_OK


async def export(manager: InternalManager, args: argparse.Namespace) -> int:
    sys.stdout.write(dump_export(await manager.export_data()))
    return cli.EX_OK
