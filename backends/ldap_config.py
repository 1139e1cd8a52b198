"""Configuration of the LDAP directory (``type = "ldap"``): Stalwart's keys, and the filter and DN templates.

```toml
[directory.ldap]
type = "ldap"
url = ["ldap://ldap1.example.org", "ldap://ldap2.example.org"]   # tried in order; one string is fine too
base-dn = "dc=example,dc=org"
timeout = "10s"                      # bounds every lookup as a whole, and each network wait
bind.dn = "cn=mailroster,dc=example,dc=org"
bind.secret = { file = "/etc/mailroster/ldap.secret" }
bind.auth.method = "lookup"          # default | template | lookup
[directory.ldap.filter]
name = "(&(objectClass=inetOrgPerson)(uid=?))"
email = "(&(objectClass=inetOrgPerson)(|(mail=?)(mailAlias=?)))"
```

Placeholders in filters and templates: ``?``, ``{user}``, ``{username}`` and ``{email}`` stand for the whole value
looked up, ``{local}`` and ``{domain}`` for its parts (split at the last ``@``; without one, ``{local}`` is the whole
value and ``{domain}`` empty). ``filter.members`` is searched for one member at a time: there the whole value is
the member's DN, and ``{name}`` its login name (for posixGroup's ``memberUid``). Every value is escaped, parts
included (Stalwart leaves ``{local}`` and ``{domain}`` unescaped: a login such as ``*)(uid=*`` would widen the
search): with RFC 4515 escapes in filters, RFC 4514 escapes in DN templates.

This module imports ldap3 only when a configuration is checked: daemon/accounts.py imports
:class:`BindAuthenticator` from here whatever the directories, and should not load an LDAP library for nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol, runtime_checkable

from .model import Principal
from .pool import PoolConfig
from .settings import CacheConfig, Duration, Secret

# The whole looked-up value, the parts of an address, and (filter.members only) the member's login name.
_PLACEHOLDER = re.compile(r"\?|\{(user|username|email|local|domain|name)\}")
_UNKNOWN_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
_WHOLE = "value"
_VALUE_SLOTS = {"?": _WHOLE, "user": _WHOLE, "username": _WHOLE, "email": _WHOLE, "local": "local", "domain": "domain"}
_MEMBER_SLOTS = {**_VALUE_SLOTS, "name": "name"}
_PLACEHOLDERS_TEXT = "?, {user}, {username}, {email}, {local}, {domain}"


@dataclass(frozen=True, slots=True)
class Template:
    """A filter or DN template cut at its placeholders: ``parts[i]`` is the text before ``slots[i]``."""

    parts: tuple[str, ...]
    slots: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, *, member: bool = False) -> Template:
        """Raise ValueError for an unknown ``{placeholder}``; a template without any placeholder is fine here."""
        allowed = _MEMBER_SLOTS if member else _VALUE_SLOTS
        parts: list[str] = []
        slots: list[str] = []
        start = 0
        for match in _PLACEHOLDER.finditer(text):
            slot = allowed.get(match.group(1) or "?")
            if slot is None:
                raise ValueError(f"{match.group(0)} is only a placeholder in filter.members")
            parts.append(text[start : match.start()])
            slots.append(slot)
            start = match.end()
        parts.append(text[start:])
        for part in parts:
            unknown = _UNKNOWN_PLACEHOLDER.search(part)
            if unknown:
                extra = ", {name}" if member else ""
                raise ValueError(f"unknown placeholder {unknown.group(0)}; allowed: {_PLACEHOLDERS_TEXT}{extra}")
        return cls(tuple(parts), tuple(slots))

    def fill(self, value: str, escape: Callable[[str], str], *, name: str = "") -> str:
        """The template with every placeholder replaced by the escaped value (or part, or name)."""
        local, at, domain = value.rpartition("@")
        if not at:
            local, domain = value, ""
        values = {_WHOLE: value, "local": local, "domain": domain, "name": name}
        out = [self.parts[0]]
        for slot, part in zip(self.slots, self.parts[1:], strict=True):
            out.append(escape(values[slot]))
            out.append(part)
        return "".join(out)

    def match_all(self) -> str:
        """The filter with every placeholder replaced by an unescaped ``*``: every entry it could ever match."""
        return self.fill("", lambda _: "*")


def _check_filter(key: str, text: str, *, member: bool = False, needs_placeholder: bool = True) -> None:
    try:
        template = Template.parse(text, member=member)
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}") from None
    if needs_placeholder and not template.slots:
        raise ValueError(f"{key}: the filter has no placeholder ({_PLACEHOLDERS_TEXT}), so it cannot look anything up")
    # ldap3's own parser, the one every search goes through: a typo is reported by check-config, not at the
    # first lookup. Imported here, not at the top: see the module docstring.
    from ldap3.core.exceptions import LDAPInvalidFilterError  # noqa: PLC0415 - see the module docstring
    from ldap3.operation.search import parse_filter  # noqa: PLC0415

    try:
        parse_filter(template.fill("x", str), None, False, False, None, False)
    except LDAPInvalidFilterError as exc:
        raise ValueError(f"{key}: not a valid LDAP filter: {exc}") from None


@dataclass(frozen=True, slots=True)
class LdapAuthConfig:
    """``bind.auth``: how passwords are checked.

    ``default``: the caller verifies the principal's ``secret`` attribute values (needs read access to them).
    ``template``: bind, on a fresh connection, as the DN ``template`` makes of the login. ``lookup``: search the
    login's entry over the service connection, then bind as its DN. ``search``: with ``template``, read the bound
    user's entry over the user's own connection (true) or over the service pool (false).
    """

    method: Literal["default", "template", "lookup"] = "default"
    template: str = ""
    search: bool = True

    def __post_init__(self) -> None:
        if self.method == "template" and not self.template:
            raise ValueError('template: required when method = "template", e.g. "uid=?,ou=people,dc=example,dc=org"')
        if self.template:
            try:
                template = Template.parse(self.template)
            except ValueError as exc:
                raise ValueError(f"template: {exc}") from None
            if not template.slots:
                raise ValueError(f"template: the DN template has no placeholder ({_PLACEHOLDERS_TEXT})")


@dataclass(frozen=True, slots=True)
class LdapBindConfig:
    """``bind``: the service account of the pooled connections (anonymous when ``dn`` is empty)."""

    dn: str = ""
    secret: Secret | None = None
    auth: LdapAuthConfig = field(default_factory=LdapAuthConfig)

    def __post_init__(self) -> None:
        if self.dn and self.secret is None:
            raise ValueError("secret: required with bind.dn (an empty password would be an anonymous bind)")
        if self.secret is not None and not self.dn:
            raise ValueError("dn: required with bind.secret")
        if self.secret is not None and not self.secret.value:
            raise ValueError("secret: empty (an empty password would be an anonymous bind)")


# Defaults for an OpenLDAP directory of inetOrgPerson accounts and groupOfNames groups; "" means unused or derived.
_NAME_FILTER = (
    "(|(&(objectClass=inetOrgPerson)(uid=?))(&(|(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))(cn=?)))"
)
_EMAIL_FILTER = (
    "(&(|(objectClass=inetOrgPerson)(objectClass=groupOfNames)(objectClass=groupOfUniqueNames))"
    "(|(mail=?)(mailAlias=?)))"
)


@dataclass(frozen=True, slots=True)
class LdapFilterConfig:
    """``filter``: one search filter per question. Empty ones are unused or derived:

    - ``name`` (login -> entry) and ``email`` (address -> the entries that carry it) are always used.
    - ``verify`` (VRFY: address -> mailboxes): ``email`` when empty.
    - ``expand`` (list address -> the entries subscribed to it, as Stalwart's legacy ``(mailList=?)``): unused.
    - ``domains`` (domain -> any entry): derived from the email attributes, ``(|(mail=*@?)(mailAlias=*@?))``.
    - ``members`` (member DN -> its groups, the reverse group search for directories without memberOf, e.g.
      ``(&(objectClass=groupOfNames)(member=?))``): unused, memberships come from ``attributes.groups`` only.
    - ``list`` (every individual, no placeholder): ``name`` with ``*`` for each placeholder.
    """

    name: str = _NAME_FILTER
    email: str = _EMAIL_FILTER
    verify: str = ""
    expand: str = ""
    domains: str = ""
    members: str = ""
    list: str = ""  # last: the field's name shadows the builtin in the rest of the class body

    def __post_init__(self) -> None:
        for f in fields(self):
            text: str = getattr(self, f.name)
            if f.name in ("name", "email") and not text:
                raise ValueError(f"{f.name}: required, the LDAP directory cannot answer without it")
            if f.name == "list" and _PLACEHOLDER.search(text):
                raise ValueError("list: lists every individual and takes no placeholder")
            if text:
                _check_filter(f.name, text, member=f.name == "members", needs_placeholder=f.name != "list")


def _one(name: str) -> list[str]:
    return [name]


@dataclass(frozen=True, slots=True)
class LdapAttributesConfig:
    """``attributes``: which LDAP attributes hold what; each a list (a single string is accepted).

    ``members`` (not a Stalwart key) names the attributes of a group or list entry that list its members: a value
    with ``=`` is a DN, one with ``@`` an external address, anything else a login name (posixGroup's memberUid).
    """

    name: list[str] = field(default_factory=lambda: _one("uid"))
    class_: list[str] = field(default_factory=lambda: _one("objectClass"))
    groups: list[str] = field(default_factory=lambda: _one("memberOf"))
    description: list[str] = field(default_factory=lambda: _one("description"))
    secret: list[str] = field(default_factory=lambda: _one("userPassword"))
    email: list[str] = field(default_factory=lambda: _one("mail"))
    email_alias: list[str] = field(default_factory=lambda: _one("mailAlias"))
    quota: list[str] = field(default_factory=lambda: _one("diskQuota"))
    members: list[str] = field(default_factory=lambda: ["member", "uniqueMember", "memberUid", "rfc822MailMember"])

    def __post_init__(self) -> None:
        for f in fields(self):
            for attribute in getattr(self, f.name):
                if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(\.[0-9]+)+", attribute):
                    key = f.name.rstrip("_").replace("_", "-")
                    raise ValueError(f"{key}: {attribute!r} is not an attribute name")


@dataclass(frozen=True, slots=True)
class LdapTlsConfig:
    """``tls``: ``enable`` runs STARTTLS on ldap:// URLs (ldaps:// is TLS from the start)."""

    enable: bool = False
    allow_invalid_certs: bool = False


@dataclass(frozen=True, slots=True)
class LdapDirectoryConfig:
    """``[directory.<id>]`` with ``type = "ldap"``."""

    type: Literal["ldap"]
    url: list[str]
    base_dn: str
    timeout: Duration = Duration(30)
    bind: LdapBindConfig = field(default_factory=LdapBindConfig)
    filter: LdapFilterConfig = field(default_factory=LdapFilterConfig)
    attributes: LdapAttributesConfig = field(default_factory=LdapAttributesConfig)
    tls: LdapTlsConfig = field(default_factory=LdapTlsConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("url: at least one ldap:// or ldaps:// URL is required")
        for url in self.url:
            if not re.fullmatch(r"ldaps?://[^/?#\s]+/?", url, re.IGNORECASE):
                raise ValueError(f"url: {url!r} is not an ldap://HOST[:PORT] or ldaps://HOST[:PORT] URL")
        from ldap3.core.exceptions import LDAPInvalidDnError  # noqa: PLC0415 - see the module docstring
        from ldap3.utils.dn import parse_dn  # noqa: PLC0415

        if not self.base_dn:
            raise ValueError('base-dn: required, e.g. "dc=example,dc=org"')
        try:
            parse_dn(self.base_dn)
        except LDAPInvalidDnError:
            raise ValueError(f"base-dn: {self.base_dn!r} is not a DN") from None
        if self.timeout <= 0:
            raise ValueError("timeout: must be more than 0s")


@runtime_checkable
class BindAuthenticator(Protocol):
    """A directory that checks passwords itself, by binding (LDAP ``bind.auth.method`` template or lookup).

    The caller (daemon/accounts.py) asks it instead of verifying ``principal.secrets`` when
    ``authenticates_by_bind`` is true.
    """

    @property
    def authenticates_by_bind(self) -> bool: ...

    async def authenticate_bind(self, login: str, password: str, *, by_email: bool = True) -> Principal | None: ...
