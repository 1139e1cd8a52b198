"""Build the configured directories: each backend wrapped in its cache.

Backends are registered as ``"module:Class"`` strings and imported only when a directory of that type is
configured, so that a driver (ldap3, asyncpg, ...) is never loaded for nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from mailroster.backends.cache import CachedDirectory
from mailroster.backends.directory import Directory

#: directory ``type`` -> the Directory class, which provides ``from_config(config)``.
DIRECTORY_BACKENDS: dict[str, str] = {
    "memory": "mailroster.backends.memory:MemoryDirectory",
}


def load_class(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def build_directory(config: Any, *, cached: bool = True) -> Directory:
    """The directory for one ``[directory.<id>]`` table, behind its cache unless ``cached`` is false."""
    backend: Directory = load_class(DIRECTORY_BACKENDS[config.type]).from_config(config)
    if cached and config.cache.entries > 0:
        return CachedDirectory(backend, config.cache)
    return backend


def build_directories(directories: dict[str, Any], *, cached: bool = True) -> dict[str, Directory]:
    return {name: build_directory(cfg, cached=cached) for name, cfg in directories.items()}
