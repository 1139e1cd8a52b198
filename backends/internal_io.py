"""Import and export of the internal directory in the memory directory's TOML format.

```toml
domains = ["example.net"]            # local domains besides those of the addresses
[[principals]]
name = "jane"
class = "individual"                 # individual | admin (= individual) | group | list
secret = "{ARGON2ID}$argon2id$..."   # string or array: passwords and app passwords, stored as given
description = "Jane Example"
quota = "1G"                         # bytes, or a size string; 0 or absent: no quota
email = ["jane@example.org", "@example.org"]   # first is primary; "@domain" is a catch-all
email-list = ["info@example.org"]    # list addresses jane receives
member-of = ["sales"]                # groups (may be defined later in the file)
members = ["bill", "partner@external.test"]    # groups and lists: principal names or external addresses
enabled = true
```

This module only converts between text and :class:`DirectoryData`; what the data may say is checked by
:meth:`InternalManager.import_data`, in the transaction that writes it. TOML is read with :mod:`tomllib` and
written with ``tomli_w``, so that no quoting is ever done by hand.
"""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w

from .internal_checks import ManagementError
from .internal_manage import DirectoryData, PrincipalRecord
from .model import PrincipalType
from .settings import Size

_CLASSES = {
    "individual": PrincipalType.INDIVIDUAL,
    "admin": PrincipalType.INDIVIDUAL,  # Stalwart's; mailroster has no administrators in the directory
    "group": PrincipalType.GROUP,
    "list": PrincipalType.LIST,
}
_LIST_KEYS = {"secret": "secrets", "email": "emails", "email-list": "email_list", "member-of": "member_of"}
_KEYS = ("name", "class", "secret", "description", "quota", "email", "email-list", "member-of", "members", "enabled")


def _strings(value: object, key: str) -> tuple[str, ...]:
    # A single string stands for a one-element array, as in the memory directory's configuration.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ManagementError(f"{key}: expected a string or an array of strings")


def _principal(entry: object) -> PrincipalRecord:
    if not isinstance(entry, dict):
        raise ManagementError("expected a table")
    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise ManagementError(f"unknown key {unknown[0]!r}; known: {', '.join(_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ManagementError("name: missing, or not a string")
    kind = entry.get("class", "individual")
    if kind not in _CLASSES:
        raise ManagementError(f"class: must be one of {', '.join(_CLASSES)}")
    fields: dict[str, Any] = {"name": name, "type": _CLASSES[kind]}
    for key, attr in (*_LIST_KEYS.items(), ("members", "members")):
        if key in entry:
            fields[attr] = _strings(entry[key], key)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ManagementError("description: expected a string")
    fields["description"] = description
    if "quota" in entry:
        try:
            fields["quota"] = int(Size.parse(entry["quota"])) or None
        except ValueError as exc:
            raise ManagementError(f"quota: {exc}") from None
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ManagementError("enabled: expected true or false")
    fields["enabled"] = enabled
    return PrincipalRecord(**fields)


def parse_import(text: str) -> DirectoryData:
    """The directory a TOML document describes. Raises :class:`ManagementError` naming the entry at fault."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManagementError(f"invalid TOML: {exc}") from None
    unknown = sorted(set(document) - {"domains", "principals"})
    if unknown:
        raise ManagementError(f"unknown top-level key {unknown[0]!r}; expected domains and [[principals]]")
    domains = _strings(document.get("domains", []), "domains")
    entries = document.get("principals", [])
    if not isinstance(entries, list):
        raise ManagementError("principals: expected [[principals]] tables")
    principals = []
    for i, entry in enumerate(entries):
        try:
            principals.append(_principal(entry))
        except ManagementError as exc:
            name = entry.get("name") if isinstance(entry, dict) else None
            label = f"principals[{i}]" + (f" (name {name!r})" if isinstance(name, str) else "")
            raise ManagementError(f"{label}: {exc}") from None
    return DirectoryData(domains, tuple(principals))


def _entry(record: PrincipalRecord) -> dict[str, Any]:
    """One ``[[principals]]`` table, leaving out what is empty or the default (as a hand-written file would)."""
    entry: dict[str, Any] = {"name": record.name, "class": record.type.value}
    if record.secrets:
        entry["secret"] = record.secrets[0] if len(record.secrets) == 1 else list(record.secrets)
    if record.description:
        entry["description"] = record.description
    if record.quota is not None:
        entry["quota"] = record.quota
    for key, values in (
        ("email", record.emails),
        ("email-list", record.email_list),
        ("member-of", record.member_of),
        ("members", record.members),
    ):
        if values:
            entry[key] = list(values)
    if not record.enabled:
        entry["enabled"] = False
    return entry


def dump_export(data: DirectoryData) -> str:
    """``data`` as a TOML document that :func:`parse_import` reads back into the same data."""
    document = {"domains": list(data.domains), "principals": [_entry(p) for p in data.principals]}
    return tomli_w.dumps(document)
