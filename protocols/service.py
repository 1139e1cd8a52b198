"""What a protocol session needs from the daemon: the lookup service interface, and a connection observer.

The daemon's ``LookupService`` implements :class:`MapService`; sessions never see which directory answers.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol

from mailroster.backends.outcome import Outcome


class MapService(Protocol):
    """Answers the lookup maps (domain, mailbox, alias, sender, recipient, quota)."""

    def cached(self, map_name: str, key: str) -> Outcome | None:
        """A fresh cached answer, or ``None``: synchronous, so that a hit costs no coroutine at all."""
        ...

    def lookup(self, map_name: str, key: str) -> Coroutine[Any, Any, Outcome]:
        """Look ``key`` up in ``map_name``. Never raises: failures are :class:`TempFail` / :class:`PermFail`."""
        ...


class Connection(Protocol):
    """What the daemon sees of one client connection."""

    last_active: float

    @property
    def busy(self) -> bool:
        """Whether a request is being answered (draining waits for it)."""
        ...

    def close(self) -> None:
        """Close after the replies already written have been sent."""
        ...


class ConnectionObserver(Protocol):
    """Tracks live connections for the connection limit, idle timeouts and draining."""

    def opened(self, conn: Connection) -> bool:
        """Register a new connection; ``False`` means refuse it (over the limit, or shutting down)."""
        ...

    def closed(self, conn: Connection) -> None:
        """The connection is gone."""
        ...

    def idle(self, conn: Connection) -> None:
        """The connection has answered every request it had; a draining daemon may close it now."""
        ...
