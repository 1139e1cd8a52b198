"""Build the configured directories: each backend wrapped in its cache, with the stores it needs.

Backends and stores are registered as ``"module:Class"`` strings and imported only when a directory of that type
is configured, so that a driver (ldap3, asyncpg, ...) is never loaded for nothing.

A directory class provides ``from_config(config)``, or ``from_config(config, stores)`` when its configuration
names a ``store`` (internal, sql): ``stores`` maps store ids to :class:`Store` instances, built once from the
``[store.<id>]`` tables (a store class provides ``from_config(config, state_dir)``) and shared by every directory
built in the same call, so that directories on one database share its connection pool. Building connects
nowhere: stores open their connections on first use.

A directory whose data changes under the daemon (the internal directory, written to by ``mailroster principal
...`` from any host sharing the store) provides ``change_counter()``; its cache is a :class:`ChangeWatchingCache`,
which polls the counter and forgets every cached answer once it moves, so that a change is served within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Protocol

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.errors import DirectoryError, PermanentFailure
from mailroster.backends.settings import CacheConfig
from mailroster.backends.store import STORE_BACKENDS, Store

from .config import Config

log = logging.getLogger(__name__)

#: How often a ChangeWatchingCache reads the change counter: DESIGN asks for changes to show within 1 s.
CHANGE_POLL_INTERVAL = 0.5

#: directory ``type`` -> the Directory class, which provides ``from_config(config[, stores])``.
DIRECTORY_BACKENDS: dict[str, str] = {
    "memory": "mailroster.backends.memory:MemoryDirectory",
    "sql": "mailroster.backends.sql:SqlDirectory",
    "internal": "mailroster.backends.internal:InternalDirectory",
    "ldap": "mailroster.backends.ldap:LdapDirectory",
    "imap": "mailroster.backends.imap:ImapDirectory",
    "smtp": "mailroster.backends.smtp:SmtpDirectory",
    "lmtp": "mailroster.backends.smtp:SmtpDirectory",
}


class ChangingDirectory(Protocol):
    async def change_counter(self) -> int: ...


class ChangeWatchingCache(CachedDirectory):
    """A cache that forgets everything when the directory's change counter moves (one primary-key read per poll).

    The poll starts with the first answer cached (nothing can be stale before), on the loop that serves lookups,
    and its first reading flushes what was cached before it: a change made in between would otherwise be missed.
    A failed reading is logged and retried; the counter is compared again once the store answers.
    """

    def __init__(
        self, inner: Directory, config: CacheConfig, *, interval: float = CHANGE_POLL_INTERVAL, **kwargs: Any
    ) -> None:
        super().__init__(inner, config, **kwargs)
        self._interval = interval
        self._watcher: asyncio.Task[None] | None = None
        self.seen: int | None = None

    def store(self, kind: str, key: Hashable, value: object, *, found: bool | None = None) -> None:
        if self._watcher is None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to serve, nothing to watch
                self._watcher = asyncio.get_running_loop().create_task(self._watch())
        super().store(kind, key, value, found=found)

    async def _watch(self) -> None:
        changing: ChangingDirectory = self.inner  # type: ignore[assignment]
        while True:
            try:
                counter = await changing.change_counter()
            except DirectoryError as exc:
                log.warning("cannot read the directory's change counter: %s", exc)
            except Exception:  # a bug here must not end propagation for good: log it, poll again
                log.exception("reading the directory's change counter failed")
            else:
                if counter != self.seen:
                    if self.seen is not None:
                        log.info("directory changed (counter %d -> %d): cache flushed", self.seen, counter)
                    self.flush()
                    self.seen = counter
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            if self._watcher.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await self._watcher
        await super().close()


def load_class(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_stores(config: Config, names: Iterable[str]) -> dict[str, Store]:
    """The stores named ``names`` (``[store.<id>]`` ids), built but not connected."""
    stores: dict[str, Store] = {}
    for name in dict.fromkeys(names):
        store_config = config.store.get(name)
        if store_config is None:
            raise PermanentFailure(f"no store named {name!r}")
        stores[name] = load_class(STORE_BACKENDS[store_config.type]).from_config(store_config, config.server.state_dir)
    return stores


def build_directory(
    config: Config, name: str, *, stores: Mapping[str, Store] | None = None, cached: bool = True
) -> Directory:
    """Directory ``name`` (a ``[directory.<id>]`` id), behind its cache unless ``cached`` is false.

    Without ``stores``, the store the directory names (if any) is built for it alone.
    """
    directory_config = config.directory[name]
    cls = load_class(DIRECTORY_BACKENDS[directory_config.type])
    store_name = getattr(directory_config, "store", None)
    backend: Directory
    if store_name is None:
        backend = cls.from_config(directory_config)
    else:
        backend = cls.from_config(
            directory_config, stores if stores is not None else build_stores(config, [store_name])
        )
    if cached and directory_config.cache.entries > 0:
        if hasattr(backend, "change_counter"):
            return ChangeWatchingCache(backend, directory_config.cache)
        return CachedDirectory(backend, directory_config.cache)
    return backend


def build_directories(
    config: Config, names: Iterable[str] | None = None, *, cached: bool = True
) -> dict[str, Directory]:
    """The directories named ``names`` (default: every configured one), sharing their stores."""
    selected = list(config.directory if names is None else names)
    stores = build_stores(
        config, (s for n in selected if (s := getattr(config.directory[n], "store", None)) is not None)
    )
    return {name: build_directory(config, name, stores=stores, cached=cached) for name in selected}
