"""Address and domain normalisation shared by every backend and the lookup maps.

Postfix sends socketmap and tcp_table keys verbatim (no case folding, no ``+detail`` stripping, no ``@domain``
partial keys), so the folding and the fallbacks below are ours to do.
"""

from __future__ import annotations

from collections.abc import Iterator

import idna


def normalize_domain(domain: str) -> str:
    """Lower-case a domain and, when it is not ASCII, turn it into its IDNA A-label form.

    Raises ``ValueError`` for a non-ASCII domain that IDNA rejects. An ASCII domain is only folded (the hot path
    of every lookup): a malformed one simply matches nothing.
    """
    if domain.isascii():
        return domain.lower().rstrip(".")
    try:
        return idna.encode(domain.rstrip("."), uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise ValueError(f"invalid domain: {exc}") from None


def normalize_address(address: str) -> str:
    """Lower-case an address (local part too, as Postfix/Dovecot administrators expect) and IDNA its domain.

    A catch-all ``@domain`` keeps its empty local part. Raises ``ValueError`` for a key that is not an address.
    """
    if address.isascii():
        folded = address.lower()
        if folded.count("@") == 1 and folded[-1] not in "@.":
            return folded
    local, sep, domain = address.rpartition("@")
    if not sep or not domain:
        raise ValueError("not an address")
    return f"{local.lower()}@{normalize_domain(domain)}"


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> ``(local, domain)``; the domain is split at the last ``@``."""
    local, _, domain = address.rpartition("@")
    return local, domain


def strip_detail(address: str, separator: str) -> str | None:
    """``local+detail@domain`` -> ``local@domain``; ``None`` when there is no detail to strip.

    The local part is split at the first separator character, like Postfix's ``recipient_delimiter``; several
    separator characters may be configured (e.g. ``"+-"``).
    """
    if not separator:
        return None
    local, domain = split_address(address)
    cut = min((i for i in (local.find(c) for c in separator) if i > 0), default=-1)
    if cut <= 0:
        return None
    return f"{local[:cut]}@{domain}"


def candidates(address: str, separator: str, catch_all: bool) -> Iterator[str]:
    """The keys to try for an already normalised address, in order: itself, without detail, ``@domain``."""
    yield address
    stripped = strip_detail(address, separator)
    if stripped is not None:
        yield stripped
    if catch_all:
        local, domain = split_address(address)
        if local:
            yield "@" + domain
