"""What the internal directory accepts as a name, a domain, an address or a stored secret.

Each check returns the normalised value (lower-cased, IDNA A-label domains) or raises :class:`ManagementError`
with a message for the administrator. The memory directory takes whatever its configuration says; the internal
directory is written to by commands, so it refuses what Postfix or Dovecot could not use: a comma in a name or an
address would split a socketmap answer, a space would break a Dovecot passdb reply.
"""

from __future__ import annotations

import asyncio
import re

from . import secrets
from .address import normalize_address, normalize_domain
from .errors import PermanentFailure


class ManagementError(PermanentFailure):
    """A management request was refused and nothing was changed; the message says why."""


MAX_NAME = 255
MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 253
MAX_ADDRESS = 320  # the column's size: local part, "@", domain

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.ASCII)
# RFC 5322 atext; non-ASCII letters are allowed too (RFC 6531, SMTPUTF8).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-")


def check_name(name: str) -> str:
    """A principal's login name, lower-cased: 1 to 255 printable characters without spaces or commas."""
    folded = name.lower()
    if not folded:
        raise ManagementError("a principal name cannot be empty")
    if len(folded) > MAX_NAME:
        raise ManagementError(f"a principal name is at most {MAX_NAME} characters")
    if any(ch.isspace() or not ch.isprintable() or ch == "," for ch in folded):
        raise ManagementError(f"invalid principal name {name!r}: no spaces, control characters or commas")
    return folded


def check_domain(domain: str) -> str:
    """A mail domain in its lower-case A-label form: at least two labels of letters, digits and hyphens."""
    try:
        folded = normalize_domain(domain)
    except ValueError as exc:
        raise ManagementError(f"invalid domain {domain!r}: {exc}") from None
    labels = folded.split(".")
    if (
        len(folded) > MAX_DOMAIN
        or len(labels) < 2
        or not all(_LABEL.fullmatch(label) for label in labels)
        or labels[-1].isdigit()  # an IP address is not a mail domain
    ):
        raise ManagementError(f"invalid domain {domain!r}")
    return folded


def _local_char(ch: str) -> bool:
    return ch in _ATEXT or ch == "." or (ord(ch) > 127 and ch.isprintable() and not ch.isspace())


def check_address(address: str, *, catch_all: bool = False) -> str:
    """An address, normalised; ``@domain`` (a catch-all) only when ``catch_all`` is true.

    Local parts are dot-atoms (RFC 5322 atext, plus non-ASCII letters): quoted local parts are refused, as
    Postfix's lookup tables and Dovecot's user names could not carry them faithfully.
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        raise ManagementError(f"invalid address {address!r}: no @domain")
    try:
        check_domain(domain)
    except ManagementError:
        raise ManagementError(f"invalid address {address!r}: invalid domain {domain!r}") from None
    if not local:
        if not catch_all:
            raise ManagementError(f"invalid address {address!r}: a catch-all @domain is not allowed here")
    elif (
        len(local) > MAX_LOCAL
        or any(not part for part in local.split("."))
        or not all(
            ch in _ATEXT or ch == "." or (ord(ch) > 127 and ch.isprintable() and not ch.isspace()) for ch in local
        )
    ):
        raise ManagementError(f"invalid address {address!r}")
    try:
        normalized = normalize_address(address)
    except ValueError as exc:
        raise ManagementError(f"invalid address {address!r}: {exc}") from None
    if len(normalized) > MAX_ADDRESS:
        raise ManagementError(f"invalid address {address!r}: longer than {MAX_ADDRESS} characters")
    return normalized


def domain_of(address: str) -> str:
    """The domain of a normalised address."""
    return address.rpartition("@")[2]


def check_secret(secret: str, *, imported_hash: bool = False) -> str:
    """A stored secret in any scheme :func:`secrets.identify` knows.

    With ``imported_hash`` (``--hash``), an untagged secret that is no known hash is refused: it would be stored as
    a plaintext password, which is rarely what was meant; write ``{PLAIN}secret`` to store one on purpose.
    """
    if not secret:
        raise ManagementError("a secret cannot be empty")
    if "\n" in secret or "\0" in secret:
        raise ManagementError("a secret cannot contain a newline or a NUL byte")
    try:
        scheme = secrets.identify(secret)
    except secrets.UnsupportedScheme as exc:
        raise ManagementError(f"cannot store this secret: {exc}") from None
    if imported_hash and scheme == "PLAIN" and not secret.startswith("{"):
        raise ManagementError("--hash takes a password hash, e.g. from `mailroster hash-password`; this is none")
    return secret


async def hash_password(password: str, scheme: str = "ARGON2ID") -> str:
    """A new stored secret for ``password``, hashed off the event loop (ARGON2ID takes ~100 ms and 64 MiB)."""
    try:
        return await asyncio.to_thread(secrets.hash_password, password, scheme)
    except ValueError as exc:
        raise ManagementError(f"cannot hash the password: {exc}") from None
