"""Sans-IO SASL mechanisms, server side: PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195) and SCRAM-SHA-1 /
SCRAM-SHA-256 (RFC 5802, RFC 7677), as Dovecot 2.3's ``src/auth/mech-*.c`` run them.

A mechanism never does I/O. :meth:`Mechanism.start` (with the initial response, or ``None`` when the client sent
none) and :meth:`Mechanism.step` (with each client response) return the next :data:`Step`:

- :class:`Challenge`: send these bytes to the client and call ``step`` with its answer;
- :class:`CheckPassword` / :class:`CheckCramMD5`: ask the directory; its answer ends the exchange;
- :class:`LookupScram`: fetch the stored SCRAM keys and pass them (or ``None``) to :meth:`Mechanism.credentials`;
- :class:`Verified`: the SCRAM proof checked out; ``final`` is the server-final message;
- :class:`Failed`: the exchange failed (malformed input, wrong proof).

Secrets never appear in a ``repr`` or a failure reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import ClassVar

from mailroster.backends.outcome import ScramCredentials

log = logging.getLogger(__name__)

#: What this module implements, in the order a server usually offers them.
MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")

#: The iteration count given for users who have no SCRAM keys (Dovecot's default for new SCRAM hashes).
FAKE_SCRAM_ITERATIONS = 4096

# Keys the made-up salts of unknown users: the same user gets the same salt for the life of the process, as a
# real user would, without the salt revealing anything.
_FAKE_SALT_KEY = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send ``data`` to the client (base64 on the wire) and wait for its response."""

    data: bytes


@dataclass(frozen=True, slots=True)
class CheckPassword:
    """Check a plaintext password. A non-empty ``authzid`` is a master-user login: log ``login`` in as it."""

    login: str
    password: str = field(repr=False)
    authzid: str = ""


@dataclass(frozen=True, slots=True)
class CheckCramMD5:
    """Check a CRAM-MD5 response: ``digest`` is the client's raw HMAC-MD5 of ``challenge``."""

    login: str
    challenge: bytes
    digest: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class LookupScram:
    """Fetch ``login``'s SCRAM keys for ``algorithm`` (``"SHA-1"``, ``"SHA-256"``)."""

    login: str
    algorithm: str


@dataclass(frozen=True, slots=True)
class Verified:
    """The client proved it knows the password; ``final`` is the server-final message for the client."""

    final: bytes


@dataclass(frozen=True, slots=True)
class Failed:
    """The exchange failed. ``reason`` is for the log only; ``code`` and ``public`` (shown to the client) are set
    only where telling the client cannot help anyone guess a password."""

    reason: str
    code: str = ""
    public: str = ""


Step = Challenge | CheckPassword | CheckCramMD5 | LookupScram | Verified | Failed


def _login(data: bytes) -> str | Failed:
    """A login name from the client, or why it is not one (Dovecot ``auth_request_set_username``)."""
    if not data:
        return Failed("empty username")
    if b"\x00" in data:
        return Failed("NUL in username")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Failed("username is not UTF-8")


def _password(data: bytes) -> str | Failed:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Failed("password is not UTF-8")


class Mechanism:
    """One SASL exchange, server side."""

    name = ""

    def start(self, initial_response: bytes | None) -> Step:
        """Begin; ``initial_response`` is ``None`` when the client sent none (as opposed to an empty one)."""
        raise NotImplementedError

    def step(self, data: bytes) -> Step:
        """The client's response to the last :class:`Challenge`."""
        return Failed("unexpected client response")

    def credentials(self, credentials: ScramCredentials | None) -> Step:
        """The answer to :class:`LookupScram`: the stored keys, or ``None`` when the user has none."""
        return Failed("unexpected credentials")


def parse_plain(data: bytes) -> Step:
    """A PLAIN message, ``authzid NUL authcid NUL passwd``: a :class:`CheckPassword` or why it is none.

    A function of its own so that the auth session can check a cached PLAIN login without creating a mechanism.
    """
    parts = data.split(b"\x00")
    if len(parts) != 3:
        return Failed("invalid input")
    authzid, authcid, secret = parts
    login = _login(authcid)
    if isinstance(login, Failed):
        return login
    password = _password(secret)
    if isinstance(password, Failed):
        return password
    if authzid in (b"", authcid):  # an authzid equal to the login asks for nothing
        return CheckPassword(login, password)
    target = _login(authzid)
    if isinstance(target, Failed):
        return Failed(f"authzid: {target.reason}")
    return CheckPassword(login, password, authzid=target)


class Plain(Mechanism):
    """PLAIN: ``authzid NUL authcid NUL passwd``, exactly two NULs (``mech-plain.c``)."""

    name = "PLAIN"

    def __init__(self) -> None:
        self._waiting = False

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is None:
            self._waiting = True
            return Challenge(b"")
        return parse_plain(initial_response)

    def step(self, data: bytes) -> Step:
        if not self._waiting:
            return super().step(data)
        self._waiting = False
        return parse_plain(data)


class Login(Mechanism):
    """LOGIN: ``Username:`` and ``Password:`` challenges; a non-empty initial response is the username."""

    name = "LOGIN"

    def __init__(self) -> None:
        self._login: str | None = None
        self._done = False

    def start(self, initial_response: bytes | None) -> Step:
        if not initial_response:
            return Challenge(b"Username:")
        return self.step(initial_response)

    def step(self, data: bytes) -> Step:
        if self._done:
            return super().step(data)
        if self._login is None:
            login = _login(data)
            if isinstance(login, Failed):
                self._done = True
                return login
            self._login = login
            return Challenge(b"Password:")
        self._done = True
        password = _password(data)
        if isinstance(password, Failed):
            return password
        return CheckPassword(self._login, password)


class CramMD5(Mechanism):
    """CRAM-MD5 (RFC 2195): challenge ``<random digits.unixtime@hostname>``, response ``user SP hex digest``.

    The digest is checked by the directory, which holds the password or its CRAM-MD5 context; this only parses.
    """

    name = "CRAM-MD5"

    def __init__(self, *, hostname: str | None = None, challenge: bytes | None = None) -> None:
        if challenge is None:
            digits = "".join(secrets.choice("0123456789") for _ in range(16))
            challenge = f"<{digits}.{int(time.time())}@{hostname or socket.gethostname()}>".encode()
        self.challenge = challenge
        self._waiting = False

    def start(self, initial_response: bytes | None) -> Step:
        # The client speaks second: an initial response means nothing here (Dovecot ignores it too).
        self._waiting = True
        return Challenge(self.challenge)

    def step(self, data: bytes) -> Step:
        if not self._waiting:
            return super().step(data)
        self._waiting = False
        # The username may contain spaces: the last space separates the digest (mech-cram-md5.c).
        name, space, hexdigest = data.rpartition(b" ")
        if not space:
            return Failed("missing digest")
        login = _login(name)
        if isinstance(login, Failed):
            return login
        try:
            digest = binascii.unhexlify(hexdigest)
        except (binascii.Error, ValueError):
            digest = b""
        if len(digest) != 16:  # an HMAC-MD5
            return Failed("digest is not 32 hex digits")
        return CheckCramMD5(login, self.challenge, digest)


def _scram_unescape(name: str) -> str | None:
    """RFC 5802 saslname: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is an error (``None``)."""
    if "=" not in name:
        return name
    out: list[str] = []
    i = 0
    while i < len(name):
        if name[i] == "=":
            code = name[i + 1 : i + 3]
            if code not in ("2C", "3D"):
                return None
            out.append("," if code == "2C" else "=")
            i += 3
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


class Scram(Mechanism):
    """SCRAM-SHA-1 / SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.

    A user with no SCRAM keys (unknown, or keys of another kind) gets the whole exchange with made-up keys and
    fails only at the proof, so that the exchange does not tell whether the user exists.
    """

    _HASHES: ClassVar[dict[str, str]] = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}

    def __init__(
        self,
        name: str = "SCRAM-SHA-256",
        *,
        server_nonce: str | None = None,
        fake_iterations: int = FAKE_SCRAM_ITERATIONS,
    ) -> None:
        if name not in self._HASHES:
            raise ValueError(f"not a SCRAM mechanism: {name}")
        self.name = name  # one class serves both names
        self._hash = self._HASHES[name]
        self._digest_size = hashlib.new(self._hash).digest_size
        # 48 random bytes give 64 URL-safe base64 characters: printable, and never ","; Dovecot sends 64 too.
        self._snonce = server_nonce if server_nonce is not None else secrets.token_urlsafe(48)
        self._fake_iterations = fake_iterations
        self._state = "first"
        self._login = ""
        self._gs2_header = ""
        self._cnonce = ""
        self._client_first_bare = ""
        self._server_first = ""
        self._stored_key = b""
        self._server_key = b""
        self._fake = False

    @property
    def algorithm(self) -> str:
        return self.name.removeprefix("SCRAM-")

    def _hmac(self, key: bytes, message: str) -> bytes:
        return hmac.new(key, message.encode(), self._hash).digest()

    def start(self, initial_response: bytes | None) -> Step:
        if initial_response is None:
            return Challenge(b"")  # the client-first message comes in the next response
        return self.step(initial_response)

    def step(self, data: bytes) -> Step:
        state, self._state = self._state, "done"
        if state == "first":
            return self._client_first(data)
        if state == "final":
            return self._client_final(data)
        return super().step(data)

    def _client_first(self, data: bytes) -> Step:
        try:
            message = data.decode("utf-8")
        except UnicodeDecodeError:
            return Failed("client-first-message is not UTF-8")
        # client-first-message = gs2-header client-first-message-bare; gs2-header = cbind-flag "," [authzid] ","
        cbind, sep1, rest = message.partition(",")
        authzid_field, sep2, bare = rest.partition(",")
        if not sep1 or not sep2:
            return Failed("invalid GS2 header")
        if cbind.startswith("p="):
            return Failed("channel binding not supported", code="", public="Channel binding not supported")
        if cbind not in ("n", "y"):
            # "y": the client could bind but believes we cannot; right, we offer no -PLUS mechanism.
            return Failed("invalid GS2 header")
        authzid = ""
        if authzid_field:
            if not authzid_field.startswith("a="):
                return Failed("invalid authzid field")
            unescaped = _scram_unescape(authzid_field[2:])
            if unescaped is None:
                return Failed("authzid escaping is invalid")
            authzid = unescaped
        fields = bare.split(",")
        if len(fields) < 2:
            return Failed("missing nonce")
        if fields[0].startswith("m="):
            return Failed("mandatory extension not supported")
        if not fields[0].startswith("n="):
            return Failed("invalid username field")
        name = _scram_unescape(fields[0][2:])
        if name is None:
            return Failed("username escaping is invalid")
        login = _login(name.encode())
        if isinstance(login, Failed):
            return login
        if authzid and authzid != login:
            # AuthService.scram_credentials has no authzid: a master-user login over SCRAM cannot be checked.
            return Failed(
                "SCRAM authzid (master user login) not supported",
                code="authz_fail",
                public="Authorization identity not supported with SCRAM",
            )
        if not fields[1].startswith("r=") or len(fields[1]) == 2:
            return Failed("invalid client nonce")
        self._login = login
        self._gs2_header = f"{cbind},{authzid_field},"
        self._cnonce = fields[1][2:]
        self._client_first_bare = bare
        self._state = "credentials"
        return LookupScram(login, self.algorithm)

    def credentials(self, credentials: ScramCredentials | None) -> Step:
        if self._state != "credentials":
            return super().credentials(credentials)
        if credentials is not None and (
            len(credentials.stored_key) != self._digest_size or len(credentials.server_key) != self._digest_size
        ):
            log.warning("%s keys of %r have the wrong length: treating them as absent", self.name, self._login)
            credentials = None
        if credentials is None:
            self._fake = True
            salt = hmac.new(_FAKE_SALT_KEY, f"{self.name}\0{self._login}".encode(), "sha256").digest()[:16]
            iterations = self._fake_iterations
            self._stored_key = secrets.token_bytes(self._digest_size)
            self._server_key = secrets.token_bytes(self._digest_size)
        else:
            salt, iterations = credentials.salt, credentials.iterations
            self._stored_key, self._server_key = credentials.stored_key, credentials.server_key
        self._server_first = f"r={self._cnonce}{self._snonce},s={base64.b64encode(salt).decode()},i={iterations}"
        self._state = "final"
        return Challenge(self._server_first.encode())

    def _client_final(self, data: bytes) -> Step:
        try:
            message = data.decode("utf-8")
        except UnicodeDecodeError:
            return Failed("client-final-message is not UTF-8")
        # client-final-message = channel-binding "," nonce ["," extensions] "," proof
        fields = message.split(",")
        if len(fields) < 3:
            return Failed("invalid client-final-message")
        if fields[0] != "c=" + base64.b64encode(self._gs2_header.encode()).decode():
            return Failed("invalid channel binding data")
        if fields[1] != f"r={self._cnonce}{self._snonce}":
            return Failed("wrong nonce")
        if not fields[-1].startswith("p="):
            return Failed("invalid ClientProof")
        try:
            proof = base64.b64decode(fields[-1][2:], validate=True)
        except binascii.Error:
            return Failed("invalid base64 in ClientProof")
        if len(proof) != self._digest_size:
            return Failed("invalid ClientProof length")
        without_proof = ",".join(fields[:-1])
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}"
        # ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); the proof is good if H(ClientKey) = StoredKey.
        signature = self._hmac(self._stored_key, auth_message)
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        matches = hmac.compare_digest(hashlib.new(self._hash, client_key).digest(), self._stored_key)
        if self._fake or not matches:
            return Failed("unknown user" if self._fake else "password mismatch")
        server_signature = self._hmac(self._server_key, auth_message)
        return Verified(b"v=" + base64.b64encode(server_signature))


def create(name: str, *, hostname: str | None = None) -> Mechanism | None:
    """A new exchange for mechanism ``name`` (upper-case), or ``None`` if it is not implemented here."""
    match name:
        case "PLAIN":
            return Plain()
        case "LOGIN":
            return Login()
        case "CRAM-MD5":
            return CramMD5(hostname=hostname)
        case "SCRAM-SHA-1" | "SCRAM-SHA-256":
            return Scram(name)
        case _:
            return None
