"""Outcomes of a lookup, as values: what every protocol turns into its own wire text.

Each protocol has exactly one function that maps an :data:`Outcome` to bytes, written as a ``match`` that ends in
``assert_never`` so that a new outcome cannot be forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass


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
