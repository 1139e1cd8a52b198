"""Configuration value types that backends declare in their own config dataclasses.

The TOML loader (``mailroster.daemon.config``) turns raw values into these types; it knows them by class, so a
backend only has to annotate a field with ``Duration``, ``Size`` or ``Secret``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)


class Duration(float):
    """Seconds. Written in TOML as a number of seconds or a string such as ``"30s"``, ``"10m"``, ``"1h"``, ``"1d"``."""

    @classmethod
    def parse(cls, raw: object) -> Duration:
        if isinstance(raw, bool):
            raise ValueError('expected a duration such as "30s" or "10m"')
        if isinstance(raw, int | float):
            if raw < 0:
                raise ValueError("a duration cannot be negative")
            return cls(raw)
        if isinstance(raw, str):
            match = _DURATION_RE.match(raw)
            if match:
                return cls(float(match.group(1)) * _DURATION_UNITS[match.group(2)])
        raise ValueError(f'expected a duration such as "30s" or "10m", got {raw!r}')


class Size(int):
    """Bytes. Written in TOML as a number of bytes or a string such as ``"500M"``, ``"2G"``."""

    @classmethod
    def parse(cls, raw: object) -> Size:
        if isinstance(raw, bool):
            raise ValueError('expected a size such as "500M" or a number of bytes')
        if isinstance(raw, int):
            if raw < 0:
                raise ValueError("a size cannot be negative")
            return cls(raw)
        if isinstance(raw, str):
            match = _SIZE_RE.match(raw)
            if match:
                return cls(int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
        raise ValueError(f'expected a size such as "500M" or a number of bytes, got {raw!r}')


@dataclass(frozen=True, slots=True)
class Secret:
    """A password or key from the configuration, given inline or as ``{ file = "/path" }``.

    Its value never appears in ``repr`` or ``str``, so it cannot leak into a log line or an error message.
    """

    value: str = field(repr=False)
    source: str = "inline"

    def __str__(self) -> str:
        return f"<secret from {self.source}>"


@dataclass(frozen=True, slots=True)
class CacheTtl:
    positive: Duration = Duration(3600)
    negative: Duration = Duration(600)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """``[directory.<id>.cache]``: Stalwart's keys. ``entries = 0`` turns the cache off."""

    entries: int = 10000
    ttl: CacheTtl = field(default_factory=CacheTtl)
