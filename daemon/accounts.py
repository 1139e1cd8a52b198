"""Accounts for Dovecot: authentication (auth-client), userdb and passdb records (auth-master, dict proxy).

:class:`AccountService` implements the protocols' ``AuthService``, ``UserService`` and ``DictService`` over one
directory. Outcomes, not exceptions, leave it: a backend fault is TEMPFAIL, never "wrong password" or "unknown
user"; an unknown user and a wrong password are the same FAILED.

Successful password checks are cached, when the directory has a cache, under a keyed BLAKE2b of (login, password)
(a MAC, as HMAC-SHA256 would be, at a third of the cost), keyed by a secret drawn at start-up, for the cache's
positive TTL: a slow hash (ARGON2ID, SHA512-CRYPT) then runs once per TTL per user, and neither the password nor a
reusable hash of it is kept. Failures are never cached.

A cached login and a cached userdb lookup are also answered synchronously (:meth:`AccountService.cached_login`,
:meth:`AccountService.cached_userdb`), so that the sessions need no coroutine or task for them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mailroster.backends import secrets
from mailroster.backends.address import normalize_address, split_address
from mailroster.backends.cache import MISS, CachedDirectory
from mailroster.backends.directory import Directory
from mailroster.backends.errors import DirectoryError, PermanentFailure, TemporaryFailure
from mailroster.backends.model import Principal, PrincipalType
from mailroster.backends.outcome import (
    NOT_FOUND,
    AuthOutcome,
    AuthStatus,
    Outcome,
    ScramCredentials,
    TempFail,
    UserFields,
    UserOutcome,
)

from .config import AuthConfig, UserdbConfig
from .lookups import LookupService

log = logging.getLogger(__name__)

FAILED = AuthOutcome(AuthStatus.FAILED)
_AUTH_CACHE = "auth"
_PRINCIPAL_CACHE = "principal"  # CachedDirectory's namespace for principal()
#: Rendered userdb fields remembered per login (see :meth:`AccountService._userdb_outcome`).
_USERDB_MEMO_SIZE = 10000


def _tempfail(exc: DirectoryError) -> AuthOutcome:
    if isinstance(exc, PermanentFailure):
        log.error("directory misconfigured: %s", exc)
    return AuthOutcome(AuthStatus.TEMPFAIL, reason=str(exc) or "directory unavailable")


class AccountService:
    """Authentication and user records from one directory (usually a :class:`CachedDirectory`)."""

    def __init__(self, directory: Directory, lookups: LookupService, auth: AuthConfig, userdb: UserdbConfig) -> None:
        self.lookups = lookups
        self._auth_mac_state = hashlib.blake2b(key=os.urandom(32), digest_size=16)
        self.rebind(directory, auth, userdb)

    def rebind(self, directory: Directory, auth: AuthConfig, userdb: UserdbConfig) -> None:
        """Serve from ``directory`` with these settings from now on (a reload): sessions keep this object. Logins
        cached before are forgotten with the old directory's cache."""
        self.directory = directory
        self._auth = auth
        self._userdb = userdb
        self._cache = directory if isinstance(directory, CachedDirectory) else None
        separator = auth.master_separator
        self._master_separator = separator.encode() if auth.master is not None and separator else None
        # login -> (principal, its userdb reply): rendering the templates is most of a cached USER lookup's cost.
        # An entry is used only for the very principal object it was rendered from, so it is never staler than
        # the directory cache's answer, and a flush or reload (a new object) renders afresh.
        self._userdb_memo: dict[str, tuple[Principal, UserFields]] = {}

    # MapService, for dict keys shared/<map>/<key>.

    def cached(self, map_name: str, key: str) -> Outcome | None:
        return self.lookups.cached(map_name, key)

    async def lookup(self, map_name: str, key: str) -> Outcome:
        return await self.lookups.lookup(map_name, key)

    # AuthService.

    def mechanisms(self) -> Sequence[str]:
        return tuple(self._auth.mechanisms)

    async def authenticate(self, login: str, password: str, *, service: str, authzid: str = "") -> AuthOutcome:
        try:
            if authzid and authzid.lower() != login.lower():
                return await self._master_login(authzid, login, password)
            separator = self._auth.master_separator
            if self._auth.master is not None and separator and separator in login:
                target, _, master = login.rpartition(separator)
                return await self._master_login(target, master, password)
            return await self._password_login(login, password)
        except (TemporaryFailure, PermanentFailure) as exc:
            return _tempfail(exc)

    def _auth_key(self, login: str, password: str) -> bytes | None:
        """The auth cache key of (login, password): keyed, so that the cache holds nothing password-equivalent.

        ``None`` for credentials that are not text (undecodable bytes from a terminal, kept as surrogates): they
        are checked as any others, but never cached, as no client of the protocols can send them.
        """
        try:
            credentials = login.lower().encode() + b"\0" + password.encode()
        except UnicodeEncodeError:
            return None
        return self._auth_mac(credentials)

    def _auth_mac(self, credentials: bytes) -> bytes:
        mac = self._auth_mac_state.copy()  # the key block is hashed once, at start-up
        mac.update(credentials)
        return mac.digest()

    def cached_login(self, login: bytes, password: bytes) -> str | None:
        """The canonical name when the auth cache holds a successful check of these credentials, else ``None``.

        ``login`` and ``password`` are the UTF-8 bytes of a PLAIN message with no authorization identity, as the
        client sent them: a cached login is answered without decoding them. Synchronous, so that it costs the
        session no coroutine or task (as ``LookupService.cached`` does for socketmap). Master-user logins are never
        cached: they take the full path.
        """
        cache = self._cache
        if cache is None or (self._master_separator is not None and self._master_separator in login):
            return None
        if login.isascii():
            folded = login.lower()  # the same bytes as str.lower() gives for ASCII
        else:
            try:
                folded = login.decode().lower().encode()
            except UnicodeDecodeError:
                return None
        # A password that is not UTF-8 cannot match: every key was made from a decoded (valid) one.
        mac = self._auth_mac_state.copy()  # _auth_mac, inline: this is the hot path of a cached login
        mac.update(folded + b"\0" + password)
        name = cache.peek(_AUTH_CACHE, mac.digest())
        return None if name is MISS else name

    async def _password_login(self, login: str, password: str) -> AuthOutcome:
        key = self._auth_key(login, password)
        if self._cache is not None and key is not None:
            name = self._cache.peek(_AUTH_CACHE, key)
            if name is not MISS:
                return AuthOutcome(AuthStatus.OK, user=name)
        backend = self._cache.inner if self._cache is not None else self.directory
        if backend.verifies_passwords:
            # The server checks the password (an LDAP bind): its hashes may not even be readable.
            principal = await backend.verify_password(login, password, by_email=self._auth.login_by_email)
            if principal is None:
                return FAILED
        else:
            principal = await self.find(login)
            if principal is None or not principal.secrets:
                return FAILED
            for secret in principal.secrets:
                if await secrets.verify(secret, password):
                    break
            else:
                return FAILED
        if not principal.enabled:
            return AuthOutcome(AuthStatus.DISABLED, user=principal.name)
        if self._cache is not None and key is not None:
            self._cache.store(_AUTH_CACHE, key, principal.name, found=True)
        return AuthOutcome(AuthStatus.OK, user=principal.name)

    async def _master_login(self, target: str, master_user: str, password: str) -> AuthOutcome:
        master = self._auth.master
        if master is None or master_user.lower() != master.user.lower():
            return FAILED
        if not await secrets.verify(master.secret.value, password):
            return FAILED
        principal = await self.find(target)
        if principal is None:
            return FAILED
        if not principal.enabled:
            return AuthOutcome(AuthStatus.DISABLED, user=principal.name)
        log.info("master login master=%s user=%s", master.user, principal.name)
        return AuthOutcome(AuthStatus.OK, user=principal.name)

    async def cram_md5(self, login: str, challenge: bytes, digest: bytes, *, service: str) -> AuthOutcome:
        try:
            principal = await self.find(login)
        except (TemporaryFailure, PermanentFailure) as exc:
            return _tempfail(exc)
        if principal is None:
            return FAILED
        for secret in principal.secrets:
            expected = secrets.cram_md5_digest(secret, challenge)
            if expected is not None and hmac.compare_digest(expected, digest):
                if not principal.enabled:
                    return AuthOutcome(AuthStatus.DISABLED, user=principal.name)
                return AuthOutcome(AuthStatus.OK, user=principal.name)
        return FAILED

    async def scram_credentials(
        self, login: str, algorithm: str, *, service: str
    ) -> tuple[AuthOutcome, ScramCredentials | None]:
        try:
            principal = await self.find(login)
        except (TemporaryFailure, PermanentFailure) as exc:
            return _tempfail(exc), None
        if principal is not None:
            for secret in principal.secrets:
                credentials = secrets.scram_credentials(secret, algorithm, user=principal.name)
                if credentials is not None:
                    status = AuthStatus.OK if principal.enabled else AuthStatus.DISABLED
                    return AuthOutcome(status, user=principal.name), credentials
        return FAILED, None

    # UserService.

    async def find(self, login: str) -> Principal | None:
        """The individual ``login`` names: by name (case-insensitively), else, when ``auth.login-by-email`` is on, by
        one of its addresses. Groups and lists cannot log in. Raises TemporaryFailure."""
        name = login.lower()
        principal = await self.directory.principal(name)
        if principal is None and self._auth.login_by_email and "@" in name:
            try:
                address = normalize_address(name)
            except ValueError:
                return None
            names = await self.directory.email_to_names(address)
            if len(names) == 1:  # an address shared by several principals names no single login
                principal = await self.directory.principal(names[0])
        if principal is None or principal.type is not PrincipalType.INDIVIDUAL:
            return None
        return principal

    def userdb_fields(self, principal: Principal, login: str) -> tuple[tuple[str, str], ...]:
        """The ``[userdb]`` templates filled in for ``principal``; empty results are left out."""
        primary = principal.primary_email
        local, domain = split_address(primary) if primary else (principal.name, "")
        values = {"name": principal.name, "local": local, "domain": domain, "user": login}
        config = self._userdb
        fields: list[tuple[str, str]] = []
        for key in ("uid", "gid", "home", "mail"):
            template: str = getattr(config, key)
            if template:
                fields.append((key, template.format(**values)))
        if config.quota_rule:
            fields.append(("quota_rule", config.quota_rule.format(**values)))
        elif principal.quota:
            fields.append(("quota_rule", f"*:bytes={principal.quota}"))
        fields.extend((key, template.format(**values)) for key, template in config.extra.items())
        return tuple((k, v) for k, v in fields if v)

    def _userdb_outcome(self, principal: Principal | None, login: str) -> UserOutcome:
        if principal is None or not principal.enabled:
            return NOT_FOUND
        memo = self._userdb_memo.get(login)
        if memo is not None and memo[0] is principal:
            return memo[1]
        outcome = UserFields(principal.name, self.userdb_fields(principal, login))
        if len(self._userdb_memo) >= _USERDB_MEMO_SIZE:
            self._userdb_memo.clear()  # crude but bounded; refilling costs one rendering per user
        self._userdb_memo[login] = (principal, outcome)
        return outcome

    def cached_userdb(self, login: str) -> UserOutcome | None:
        """The outcome of :meth:`userdb` when the directory cache answers it by name, else ``None``.

        Synchronous, for the same reason as :meth:`cached_login`. Anything :meth:`find` would do more than
        one cache hit for (a login by e-mail, a miss) takes the full path.
        """
        cache = self._cache
        if cache is None:
            return None
        principal: Any = cache.peek(_PRINCIPAL_CACHE, login.lower())
        if principal is MISS or principal is None:
            return None
        if principal.type is not PrincipalType.INDIVIDUAL:
            return NOT_FOUND
        return self._userdb_outcome(principal, login)

    async def userdb(self, login: str, *, service: str = "") -> UserOutcome:
        try:
            principal = await self.find(login)
        except (TemporaryFailure, PermanentFailure) as exc:
            return TempFail(_tempfail(exc).reason)
        return self._userdb_outcome(principal, login)

    async def passdb(self, login: str, *, with_password: bool, service: str = "") -> UserOutcome:
        try:
            principal = await self.find(login)
        except (TemporaryFailure, PermanentFailure) as exc:
            return TempFail(_tempfail(exc).reason)
        # A disabled account is unknown to Dovecot: never hand out its hash, never a "nopassword".
        if principal is None or not principal.enabled:
            return NOT_FOUND
        fields: list[tuple[str, str]] = []
        if with_password:
            # Dovecot verifies the hash itself: hand it the first password it can read (app passwords are ours).
            usable = (secrets.dovecot_form(s) for s in principal.secrets if not s.startswith("$app$"))
            password = next((p for p in usable if p is not None), None)
            if password is None:
                return NOT_FOUND
            fields.append(("password", password))
        return UserFields(principal.name, tuple(fields))

    def users(self) -> AsyncIterator[str]:
        return self.directory.individuals()
