"""Dovecot dict proxy protocol v3, server side, as Dovecot 2.3.19's ``proxy`` dict client speaks it
(``src/lib-dict/dict-client.{c,h}``; reference server ``src/dict/dict-{connection,commands}.c``; PROTOCOLS.md §3),
so that ``passdb { driver = dict }`` and ``userdb { driver = dict }`` with ``uri = proxy:<socket>:<name>`` look
users up here.

The client opens with ``H3 <minor> <value type> <user> <dict name>`` and the server **never answers it**: any line
the client did not ask for fails its next command (the protocol document's OK reply is not in the code). The dict
name selects a directory. Then, one command letter per line:

- ``L<key> <user>`` -> ``O<value>`` | ``N`` | ``F<error>``. Keys served: ``shared/passdb/<login>`` and
  ``shared/userdb/<login>`` (flat JSON objects, Dovecot's ``format = json``), and ``shared/<map>/<key>`` for the
  lookup maps (the map's plain value). Anything else is ``N``.
- ``I<flags> <max rows> <path> <user>`` -> ``O<full key> <value>`` rows, then an empty line | ``F<error>``. Only
  ``shared/userdb/`` is listed, for Dovecot's user iteration (``doveadm user '*'`` through a dict userdb).
- ``B``, ``S``, ``U``, ``A``, ``T``, ``R`` get no reply; ``C<txid>`` gets ``F<txid> <error>``: this dict is
  read-only.

Replies carry no async ids: the client matches them to its oldest pending command, so they go out strictly in
order, an iteration complete before anything after it. The optional timing fields are not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import assert_never

from mailroster.backends.errors import DirectoryError
from mailroster.backends.outcome import Found, NotFound, Outcome, PermFail, TempFail, UserFields, UserOutcome

from .dovecot import OrderedLineSession, ReplySlot, is_text, join_line, parse_uint, split_line
from .errors import BadRequest
from .service import ConnectionObserver, DictService, UserService

log = logging.getLogger(__name__)

#: Longest client line, LF included (``DICT_CLIENT_MAX_LINE_LENGTH``).
MAX_LINE = 64 * 1024
MAJOR_VERSION = 3
#: ``enum dict_data_type``: string, uint32.
VALUE_TYPES = 2
#: Maps served as ``shared/<map>/<key>``.
MAP_NAMES = frozenset({"domain", "mailbox", "alias", "sender", "recipient", "quota"})
PASSDB_PREFIX = "shared/passdb/"
USERDB_PREFIX = "shared/userdb/"
READ_ONLY = "mailroster's dict is read-only"

# Iterate flags (``enum dict_iterate_flags``).
ITERATE_RECURSE = 0x01
ITERATE_SORT_BY_KEY = 0x02
ITERATE_SORT_BY_VALUE = 0x04
ITERATE_NO_VALUE = 0x08
ITERATE_EXACT_KEY = 0x10

#: Userdb lookups an iteration keeps in flight for its row values.
ITERATE_WINDOW = 16
#: Rows written between two waits for the client to read.
ITERATE_BATCH = 256

END_OF_ITERATION = b"\n"


# Requests (sans-IO).


@dataclass(frozen=True, slots=True)
class Hello:
    major: int
    minor: int
    value_type: int
    user: str
    name: str


@dataclass(frozen=True, slots=True)
class Lookup:
    key: str
    user: str = ""


@dataclass(frozen=True, slots=True)
class Iterate:
    flags: int
    max_rows: int
    path: str
    user: str = ""


@dataclass(frozen=True, slots=True)
class Begin:
    txid: int


@dataclass(frozen=True, slots=True)
class Change:
    """``S``, ``U``, ``A`` or ``T`` inside a transaction: nothing to answer, nothing to keep."""

    command: str
    txid: int


@dataclass(frozen=True, slots=True)
class Rollback:
    txid: int


@dataclass(frozen=True, slots=True)
class Commit:
    txid: int


Command = Lookup | Iterate | Begin | Change | Rollback | Commit

# Least number of arguments of each transaction command after its letter.
_CHANGE_ARGS = {"S": 3, "U": 2, "A": 3, "T": 3}


def parse_hello(line: bytes) -> Hello:
    """``H<major> <minor> <value type> <user> <dict name>``. Raises :class:`BadRequest`."""
    fields = split_line(line)
    if len(fields) < 5 or not fields[0].startswith("H"):
        raise BadRequest("expected HELLO")
    major = parse_uint(fields[0][1:], "major version")
    if major != MAJOR_VERSION:
        raise BadRequest(f"unsupported dict protocol major version {major}")
    value_type = parse_uint(fields[2], "value type")
    if value_type >= VALUE_TYPES:
        raise BadRequest("unknown value type")
    return Hello(major, parse_uint(fields[1], "minor version"), value_type, fields[3], fields[4])


def parse_command(line: bytes) -> Command:
    """One command line after HELLO. Raises :class:`BadRequest` for anything Dovecot's server disconnects on."""
    letter = line[:1].decode("latin-1")
    args = split_line(line[1:])
    match letter:
        case "L":
            return Lookup(args[0], args[1] if len(args) > 1 else "")
        case "I":
            if len(args) < 3:
                raise BadRequest("broken ITERATE")
            max_rows = args[1]
            if not max_rows.isascii() or not max_rows.isdigit():
                raise BadRequest("ITERATE max_rows is not a number")
            return Iterate(
                parse_uint(args[0], "ITERATE flags"), int(max_rows), args[2], args[3] if len(args) > 3 else ""
            )
        case "B":
            return Begin(parse_uint(args[0], "transaction id"))
        case "S" | "U" | "A" | "T":
            if len(args) < _CHANGE_ARGS[letter]:
                raise BadRequest(f"broken {letter} command")
            return Change(letter, parse_uint(args[0], "transaction id"))
        case "R":
            return Rollback(parse_uint(args[0], "transaction id"))
        case "C":
            return Commit(parse_uint(args[0], "transaction id"))
        case _:
            raise BadRequest("unknown command")


@dataclass(frozen=True, slots=True)
class RecordKey:
    """``shared/passdb/<login>`` or ``shared/userdb/<login>``."""

    db: str
    login: str


@dataclass(frozen=True, slots=True)
class MapKey:
    """``shared/<map>/<key>``."""

    map_name: str
    key: str


def parse_key(key: str) -> RecordKey | MapKey | None:
    """What a lookup key asks for; ``None`` for a key this dict does not hold (``priv/`` keys included)."""
    scope, _, rest = key.partition("/")
    name, sep, item = rest.partition("/")
    if scope != "shared" or not sep or not item or not is_text(item):
        return None
    if name in ("passdb", "userdb"):
        return RecordKey(name, item)
    if name in MAP_NAMES:
        return MapKey(name, item)
    return None


# Replies (sans-IO).


def record_json(record: UserFields, login: str) -> str:
    """A user record as the flat JSON object Dovecot's ``format = json`` takes: string values only.

    When the directory's canonical name differs from the login, a ``user`` field tells Dovecot to switch to it
    (the same as ``user=`` in an auth-client OK).
    """
    values = dict(record.fields)
    if record.user and record.user != login:
        values.setdefault("user", record.user)
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"))


def encode_value(outcome: Outcome) -> bytes:
    """The reply to a map lookup: the only place where map outcomes become dict text."""
    match outcome:
        case Found(value):
            return join_line(["O" + value])
        case NotFound():
            return b"N\n"
        case TempFail(reason) | PermFail(reason):
            return join_line(["F" + reason])
        case _:
            assert_never(outcome)


def encode_record(outcome: UserOutcome, login: str) -> bytes:
    """The reply to a passdb/userdb lookup: the only place where user outcomes become dict text."""
    match outcome:
        case UserFields():
            return join_line(["O" + record_json(outcome, login)])
        case NotFound():
            return b"N\n"
        case TempFail(reason):
            return join_line(["F" + reason])
        case _:
            assert_never(outcome)


def encode_row(key: str, value: str) -> bytes:
    """One iteration row: the full key, then a TAB even when the value is empty (the client needs the field)."""
    return join_line(["O" + key, value])


def encode_commit_failed(txid: int) -> bytes:
    return join_line([f"F{txid}", READ_ONLY])


# The session.


class DovecotDictSession(OrderedLineSession):
    """One client connection to a dovecot-dict listener; ``services`` maps dict names to directories."""

    protocol_name = "dovecot-dict"
    max_line = MAX_LINE

    def __init__(self, services: Mapping[str, DictService], observer: ConnectionObserver | None = None) -> None:
        super().__init__(observer)
        self._services = services
        self._service: DictService | None = None
        self._transactions: set[int] = set()

    def line_received(self, line: bytes) -> None:
        if self._service is None:
            hello = parse_hello(line)
            service = self._services.get(hello.name)
            if service is None:
                raise BadRequest(f"unknown dict name {hello.name!r}")
            self._service = service  # and no reply: the client would take one for the answer to its first command
            return
        command = parse_command(line)
        match command:
            case Lookup(key):
                self._lookup(self._service, key)
            case Iterate():
                self._iterate(self._service, command)
            case Begin(txid):
                if txid in self._transactions:
                    raise BadRequest(f"transaction {txid} already exists")
                self._transactions.add(txid)
            case Change(_, txid):
                self._transaction(txid)
            case Rollback(txid):
                self._transactions.discard(self._transaction(txid))
            case Commit(txid):
                self._transactions.discard(self._transaction(txid))
                self.reply(encode_commit_failed(txid))
            case _:
                assert_never(command)

    def _transaction(self, txid: int) -> int:
        if txid not in self._transactions:
            raise BadRequest(f"transaction {txid} does not exist")
        return txid

    def _lookup(self, service: DictService, key: str) -> None:
        target = parse_key(key)
        match target:
            case None:
                self.reply(b"N\n")
            case RecordKey("passdb", login):
                self.submit(lambda slot: self._record(slot, service, "passdb", login))
            case RecordKey(_, login):
                self.submit(lambda slot: self._record(slot, service, "userdb", login))
            case MapKey(map_name, map_key):
                hit = service.cached(map_name, map_key)
                if hit is not None:
                    self.reply(encode_value(hit))
                else:
                    self.submit(lambda slot: self._map(slot, service, map_name, map_key))
            case _:
                assert_never(target)

    @staticmethod
    async def _record(slot: ReplySlot, service: DictService, db: str, login: str) -> None:
        if db == "passdb":
            # Dovecot's dict passdb verifies the password itself: it needs the stored {SCHEME}hash.
            outcome = await service.passdb(login, with_password=True)
        else:
            outcome = await service.userdb(login)
        slot.write(encode_record(outcome, login))

    @staticmethod
    async def _map(slot: ReplySlot, service: DictService, map_name: str, key: str) -> None:
        slot.write(encode_value(await service.lookup(map_name, key)))

    def _iterate(self, service: DictService, command: Iterate) -> None:
        path = command.path if command.path.endswith("/") else command.path + "/"
        if path != USERDB_PREFIX or command.flags & ITERATE_EXACT_KEY:
            self.reply(END_OF_ITERATION)
            return
        self.submit(lambda slot: self._iterate_userdb(slot, service, command))

    async def _iterate_userdb(self, slot: ReplySlot, service: DictService, command: Iterate) -> None:
        flags = command.flags
        sort = flags & (ITERATE_SORT_BY_KEY | ITERATE_SORT_BY_VALUE)
        collected: list[tuple[str, str]] = []
        written = 0
        await slot.ready()  # rows stream out: only once every earlier reply is written
        # When sorting, max_rows applies to the sorted rows, so every row has to be read first.
        rows = userdb_rows(service, flags, 0 if sort else command.max_rows)
        try:
            async with contextlib.aclosing(rows):
                async for key, value in rows:
                    if sort:
                        collected.append((key, value))
                        continue
                    slot.write(encode_row(key, value))
                    written += 1
                    if written % ITERATE_BATCH == 0:
                        await slot.ready()
        except IterationFailed as exc:
            log.warning("dict iteration of %r failed: %s", command.path, exc)
            slot.write(join_line(["F" + str(exc)]))  # the client takes F in place of the empty line
            return
        if sort:
            collected.sort(key=lambda row: row[1] if flags & ITERATE_SORT_BY_VALUE else row[0])
            slot.write(b"".join(encode_row(key, value) for key, value in collected[: command.max_rows or None]))
        slot.write(END_OF_ITERATION)


class IterationFailed(Exception):
    """An iteration cannot be completed; the message is safe to send."""


async def userdb_rows(service: UserService, flags: int, limit: int) -> AsyncGenerator[tuple[str, str], None]:
    """The rows of an iteration of ``shared/userdb/``: ``(full key, value)`` in the order ``users()`` lists them,
    at most ``limit`` (0: all). Values are looked up :data:`ITERATE_WINDOW` users at a time; a user whose record
    is gone by then is skipped. Raises :class:`IterationFailed`.
    """
    users = service.users()
    window: deque[tuple[str, asyncio.Task[UserOutcome] | None]] = deque()
    loop = asyncio.get_running_loop()
    produced = 0
    exhausted = False
    failure = ""
    try:
        while True:
            while not exhausted and len(window) < ITERATE_WINDOW and (not limit or produced + len(window) < limit):
                try:
                    login = await anext(users)
                except StopAsyncIteration:
                    exhausted = True
                except DirectoryError as exc:
                    # The users listed so far still get their rows; the failure ends the iteration after them.
                    exhausted, failure = True, str(exc) or "temporary failure"
                else:
                    # Direct children only, unless RECURSE: Dovecot asserts that each key is <prefix><user>.
                    if login and ("/" not in login or flags & ITERATE_RECURSE):
                        lookup = None if flags & ITERATE_NO_VALUE else loop.create_task(service.userdb(login))
                        window.append((login, lookup))
            if not window:
                break
            login, lookup = window.popleft()
            value = ""
            if lookup is not None:
                outcome = await lookup
                match outcome:
                    case UserFields():
                        value = record_json(outcome, login)
                    case NotFound():
                        continue
                    case TempFail(reason):
                        raise IterationFailed(reason)
                    case _:
                        assert_never(outcome)
            produced += 1
            yield USERDB_PREFIX + login, value
    finally:
        for _, lookup in window:
            if lookup is not None:
                lookup.cancel()
        aclose = getattr(users, "aclose", None)
        if aclose is not None:
            await aclose()
    if failure:
        raise IterationFailed(failure)
