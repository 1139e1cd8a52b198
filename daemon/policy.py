"""Policy delegation decisions (the ``policy`` listener, Postfix ``check_policy_service``).

Three checks, each ``reject``, ``defer``, ``warn`` or ``off`` under ``[policy]``:

``sender-login-mismatch`` (default ``reject``)
    an authenticated client (``sasl_username``) sends as a MAIL FROM address its login does not own, as the
    ``sender`` map says (the address's owner, or a member of the group that owns it), ``+detail`` ignored. This is
    Postfix's ``reject_authenticated_sender_login_mismatch`` with mailroster's own map.
``unknown-recipient`` (default ``reject``)
    at RCPT, a recipient in a local domain that the ``recipient`` map does not know (catch-alls count as known).
``unauthenticated-local-sender`` (default ``warn``)
    a client that did not authenticate sends as an address of a local domain.

The strongest verdict wins (reject over defer over warn); with none, ``DUNNO``. The checks use the lookup maps, so
their answers come from the cache as the maps' do. A directory fault is a :class:`TempFail`, never a rejection:
the session answers it with ``DEFER`` (or closes, see ``[policy] tempfail``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from mailroster.backends.outcome import Found, Outcome, PermFail, TempFail

from .config import PolicyConfig, PolicyMode
from .lookups import LookupService

log = logging.getLogger(__name__)

DUNNO = Found("DUNNO")
_STRENGTH = {"reject": 3, "defer": 2, "warn": 1}


@dataclass(frozen=True, slots=True)
class _Verdict:
    mode: PolicyMode
    reject: str  # "5NN d.d.d text"; defer turns it into 450 4.d.d
    warning: str

    def action(self) -> str:
        if self.mode == "warn":
            return f"WARN {self.warning}"
        if self.mode == "defer":
            _code, dsn, text = self.reject.split(" ", 2)
            return f"450 4{dsn[1:]} {text}"
        return self.reject


class _Fault(Exception):
    """A map lookup that failed: the request gets a temporary failure."""

    def __init__(self, outcome: TempFail | PermFail) -> None:
        super().__init__(outcome.reason)
        self.outcome = outcome


class PolicyService:
    """The ``PolicyService`` of one directory's lookup service."""

    def __init__(self, lookups: LookupService, config: PolicyConfig) -> None:
        self._lookups = lookups
        self._config = config

    def rebind(self, config: PolicyConfig) -> None:
        """Decide as ``config`` says from now on (a reload); the lookup service is rebound on its own."""
        self._config = config

    async def _found(self, map_name: str, key: str) -> str | None:
        """The map's value for ``key``, ``None`` when not found. Raises :class:`_Fault`."""
        outcome = await self._lookups.lookup(map_name, key)
        match outcome:
            case Found(value):
                return value
            case TempFail() | PermFail():
                raise _Fault(outcome)
        return None

    async def _is_local(self, address: str) -> bool:
        _local, at, domain = address.rpartition("@")
        return bool(at and domain) and await self._found("domain", domain) is not None

    async def decide(self, request: Mapping[str, str]) -> Outcome:
        try:
            verdicts = await self._verdicts(request)
        except _Fault as fault:
            log.warning("policy: directory fault: %s", fault)
            return TempFail(str(fault) or "directory unavailable")
        if not verdicts:
            return DUNNO
        verdict = max(verdicts, key=lambda v: _STRENGTH[v.mode])
        log.info(
            "policy client=%s queue_id=%s %s: %s",
            request.get("client_address", ""),
            request.get("queue_id", ""),
            verdict.mode,
            verdict.warning,
        )
        return Found(verdict.action())

    async def _verdicts(self, request: Mapping[str, str]) -> list[_Verdict]:
        config = self._config
        sender = request.get("sender", "")
        login = request.get("sasl_username", "")
        recipient = request.get("recipient", "")
        verdicts = []
        if sender and login and config.sender_login_mismatch != "off":
            owners = await self._found("sender", sender)
            if login.lower() not in (owners or "").split(","):
                verdicts.append(
                    _Verdict(
                        config.sender_login_mismatch,
                        f"553 5.7.1 Sender address <{sender}> is not owned by user {login}",
                        f"sender <{sender}> not owned by user {login}",
                    )
                )
        if sender and not login and config.unauthenticated_local_sender != "off" and await self._is_local(sender):
            verdicts.append(
                _Verdict(
                    config.unauthenticated_local_sender,
                    f"553 5.7.1 Sender address <{sender}> of a local domain requires authentication",
                    f"unauthenticated sender <{sender}> of a local domain",
                )
            )
        if (
            recipient
            and request.get("protocol_state", "").upper() == "RCPT"
            and config.unknown_recipient != "off"
            and await self._is_local(recipient)
            and await self._found("recipient", recipient) is None
        ):
            verdicts.append(
                _Verdict(
                    config.unknown_recipient,
                    f"550 5.1.1 Recipient address <{recipient}> does not exist",
                    f"unknown recipient <{recipient}>",
                )
            )
        return verdicts
