"""Run the real daemon in a thread of the test process, with directories the test supplies.

Used where a test needs a backend it controls (one that fails on demand) behind the real listeners, protocols
and lookup service, queried by real clients.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from mailroster.backends.directory import Directory
from mailroster.backends.errors import TemporaryFailure
from mailroster.daemon.config import load_config
from mailroster.daemon.server import Daemon


class ThreadedDaemon:
    def __init__(self, config_dir: Path, directories: dict[str, Directory]) -> None:
        self.config = load_config([config_dir])
        self.directories = directories
        self.loop = asyncio.new_event_loop()
        self.daemon: Daemon | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.daemon = Daemon(self.config, self.directories)
            self.loop.run_until_complete(self.daemon.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.daemon.shutdown())
        self.loop.close()

    def __enter__(self) -> ThreadedDaemon:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def begin_shutdown(self) -> None:
        """What SIGTERM does: stop listening, drain, close; returns at once."""
        assert self.daemon is not None
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.daemon.shutdown()))  # type: ignore[union-attr]

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


class FailingDirectory(Directory):
    """A backend that is down: every call raises TemporaryFailure (optionally only when ``down`` is set)."""

    def __init__(self, inner: Directory | None = None) -> None:
        self.inner = inner
        self.down = True

    def _check(self) -> Directory:
        if self.down or self.inner is None:
            raise TemporaryFailure("backend unavailable")
        return self.inner

    async def principal(self, name):  # type: ignore[no-untyped-def]
        return await self._check().principal(name)

    async def recipient(self, address):  # type: ignore[no-untyped-def]
        return await self._check().recipient(address)

    async def is_local_domain(self, domain):  # type: ignore[no-untyped-def]
        return await self._check().is_local_domain(domain)

    async def email_to_names(self, address):  # type: ignore[no-untyped-def]
        return await self._check().email_to_names(address)

    async def sender_logins(self, address):  # type: ignore[no-untyped-def]
        return await self._check().sender_logins(address)

    async def vrfy(self, address):  # type: ignore[no-untyped-def]
        return await self._check().vrfy(address)

    async def individuals(self):  # type: ignore[no-untyped-def]
        async for name in self._check().individuals():
            yield name

    async def expn(self, address):  # type: ignore[no-untyped-def]
        return await self._check().expn(address)


class SlowDirectory(FailingDirectory):
    """A backend that is up but takes ``delay`` seconds to answer ``recipient``."""

    def __init__(self, inner: Directory, delay: float) -> None:
        super().__init__(inner)
        self.down = False
        self.delay = delay

    async def recipient(self, address):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay)
        return await self._check().recipient(address)
