"""Outcomes of a lookup, as values: what every protocol turns into its own wire text.

Each protocol has exactly one function that maps an :data:`Outcome` to bytes, written as a ``match`` that ends in
``assert_never`` so that a new outcome cannot be forgotten.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Found:
    """The key exists; ``value`` is the map's answer (never empty)."""

    value: str


@dataclass(frozen=True, slots=True)
class NotFound:
    """The key does not exist. A backend fault is never reported this way."""


@dataclass(frozen=True, slots=True)
class TempFail:
    """The directory could not answer now; the client should retry later. ``reason`` is safe to show."""

    reason: str


@dataclass(frozen=True, slots=True)
class PermFail:
    """The request cannot be answered as asked (bad request, unknown map, misconfiguration)."""

    reason: str


Outcome = Found | NotFound | TempFail | PermFail

NOT_FOUND = NotFound()


@dataclass(frozen=True, slots=True)
class UserFields:
    """A user found by a userdb or passdb lookup: the canonical name and ``key=value`` fields, in order."""

    user: str
    fields: tuple[tuple[str, str], ...] = ()


UserOutcome = UserFields | NotFound | TempFail


class AuthStatus(enum.Enum):
    """How an authentication ended, modelled on Dovecot's passdb results.

    An unknown user and a wrong password are one status, FAILED: a client must not be able to tell them apart.
    DISABLED is only ever reported to a client that gave the right password (Dovecot's ``user_disabled``).
    """

    OK = "ok"
    FAILED = "failed"
    DISABLED = "disabled"
    TEMPFAIL = "tempfail"


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The result of one authentication. ``user`` is the canonical principal name when the login matched one;
    ``fields`` are extra passdb fields for the reply; ``reason`` (TEMPFAIL only) is safe to show."""

    status: AuthStatus
    user: str = ""
    fields: tuple[tuple[str, str], ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ScramCredentials:
    """What a SCRAM exchange needs of a stored secret (RFC 5802): never the password itself."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
