"""Stored password secrets: recognise, verify and make every scheme Dovecot 2.3 and Stalwart accept.

A stored secret is one of:

- ``{SCHEME}payload``: Dovecot's tag, case-insensitive. As in Dovecot (``password_scheme_lookup``), the tag may carry
  an encoding suffix, ``{SCHEME.b64}`` (or ``.base64``) or ``{SCHEME.hex}``, on any scheme: the payload is then that
  encoding of the scheme's usual value (``{PLAIN.b64}cGVuY2ls``, ``{SHA256.hex}1380...``). Without a suffix the
  digest schemes of a fixed length (SHA, SHA1, SHA256, SHA512, PLAIN-MD5, LDAP-MD5, CRAM-MD5, HMAC-MD5) take hex
  when the payload is exactly twice the digest length, base64 otherwise, as Dovecot guesses.
- untagged, recognised by its own prefix (Stalwart's rule, ``crates/directory/src/core/secret.rs``): PHC/crypt
  strings ``$argon2id$`` ``$argon2i$`` ``$argon2d$`` ``$2a$`` ``$2b$`` ``$2y$`` ``$6$`` ``$5$`` ``$1$`` ``$y$``
  ``$gy$`` ``$7$`` ``$sha1$`` ``$md5`` ``$pbkdf2[-sha256|-sha512]$`` ``$scrypt$`` and BSDi ``_`` + 19 characters;
  a Stalwart app password ``$app$<name>$<secret>`` (the inner secret is any of these, its whole given password is
  checked against it); a TOTP ``otpauth://`` URL, which never verifies as a password; any other ``$id$...`` is an
  unknown hash (never plaintext: that would let the hash itself log in); anything else is plaintext.
- empty, or with an empty payload: never verifies. An empty password never verifies either, nor one that holds a
  NUL character (C strings cannot carry it).

Scheme notes, each checked against Dovecot 2.3.19 (``doveadm pw``) and its source (``src/auth/password-scheme*.c``):

- ``{MD5}`` is MD5-CRYPT (``$1$``) in Dovecot, and when the payload is not ``$1$`` it is a PLAIN-MD5 digest in hex
  or base64 (Stalwart writes base64): both are accepted. ``{PLAIN-MD5}`` is a hex MD5 digest, ``{LDAP-MD5}`` base64.
- ``{CRYPT}`` (and every ``*-CRYPT`` tag) holds any crypt(3) string: DES, ``$1$``, ``$5$``, ``$6$``, ``$y$``, ...
  run through libxcrypt (:mod:`.crypt`); ``$2?$`` and PHC strings go to bcrypt, argon2-cffi, hashlib.
- ``{PBKDF2}`` is Dovecot's ``$1$<salt>$<rounds>$<hex PBKDF2-SHA1>`` (the salt string used as is), or after the tag
  (Stalwart) or untagged a PHC string: passlib's ``$pbkdf2-sha256$<rounds>$<ab64 salt>$<ab64 hash>`` or RustCrypto's
  ``$pbkdf2-sha256$i=<rounds>,l=<len>$<b64 salt>$<b64 hash>``; sha1 (``$pbkdf2$``), sha256 and sha512.
- ``SCRYPT``: PHC ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<b64 salt>$<b64 hash>`` (passlib, RustCrypto); no Dovecot tag.
- ``{ARGON2}`` (Stalwart, OpenLDAP), ``{ARGON2I}``, ``{ARGON2ID}``: a PHC string of any Argon2 variant.
- ``{SSHA*}``/``{SMD5}``: base64 of digest + salt (any salt length); ``{SHA*}``: the digest in base64 or hex.
- ``{CRAM-MD5}``/``{HMAC-MD5}``: the 32-byte HMAC-MD5 context (outer then inner MD5 state), hex.
- ``{SCRAM-SHA-1}``/``{SCRAM-SHA-256}``: ``<iterations>,<b64 salt>,<b64 StoredKey>,<b64 ServerKey>``; like Dovecot,
  the password is used without SASLprep.
- ``{PLAIN-TRUNC}``: ``<length>-<password>`` (Dovecot); ``{PLAIN}``, ``{CLEAR}``, ``{CLEARTEXT}``: plaintext.
- Not supported (Dovecot-only, obsolete): DIGEST-MD5 (needs the user name), PLAIN-MD4, LANMAN, NTLM, OTP, SKEY, RPA.

Slow schemes (Argon2, bcrypt, the crypt(3) family, PBKDF2, scrypt, SCRAM) run, under :func:`verify`, in a bounded
thread pool: argon2-cffi, bcrypt, hashlib's KDFs and ctypes calls release the GIL, so they use every CPU and never
block the event loop. Measured on a 2-CPU machine, one verify: SHA512-CRYPT (5000 rounds) 1.4 ms, ARGON2ID at
Dovecot's defaults (m=64 MiB, t=3, p=1) 135 ms, ARGON2I (m=32 MiB, t=4) 80 ms, BLF-CRYPT cost 10 50 ms, yescrypt 15 ms,
SCRYPT ln=16 140 ms, PBKDF2 (5000) and SCRAM (4096) under 1 ms, digests a few microseconds; two threads verify 1.8-1.9
times as many hashes per second as one.

Secrets and passwords never appear in exceptions, reprs or log records: a malformed secret is logged with its scheme
name and a fixed reason only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import argon2

from . import crypt
from .crypt import MalformedSecret
from .outcome import ScramCredentials

log = logging.getLogger(__name__)

__all__ = [
    "HASH_SCHEMES",
    "SCHEMES",
    "UnsupportedScheme",
    "app_password_name",
    "cram_md5_digest",
    "dovecot_form",
    "hash_password",
    "identify",
    "plaintext_of",
    "scram_credentials",
    "scram_keys",
    "verify",
    "verify_sync",
]


class UnsupportedScheme(ValueError):
    """A secret's ``{TAG}``, encoding suffix or ``$id$`` names no scheme this module knows.

    The message names the scheme only when it is a known but unsupported Dovecot scheme: an unknown tag may be part
    of a plaintext password, so it is never repeated.
    """


# Dovecot schemes that exist but are deliberately not implemented: named in errors since they are not secret.
_KNOWN_UNSUPPORTED = frozenset({"DIGEST-MD5", "PLAIN-MD4", "LANMAN", "NTLM", "OTP", "SKEY", "RPA"})
_ENCODINGS = {"b64": "base64", "base64": "base64", "hex": "hex"}

# What hash_password makes by default.
ARGON2ID_COST = {"time_cost": 3, "memory_cost": 65536, "parallelism": 1}  # doveadm pw 2.3.19 (libsodium)
ARGON2I_COST = {"time_cost": 4, "memory_cost": 32768, "parallelism": 1}  # doveadm pw 2.3.19 (libsodium)
BCRYPT_COST = 10  # Dovecot's default is 5 (~1.5 ms a verify), bcrypt's and Stalwart's 12 (~200 ms)
PBKDF2_ROUNDS = 5000  # Dovecot's PBKDF2_ROUNDS_DEFAULT
SCRAM_ITERATIONS = crypt.SCRAM_MIN_ITERATIONS  # Dovecot's default, 4096
SCRYPT_LOG_N = 16  # passlib's default: N = 65536, r = 8, p = 1 (64 MiB)
SALTED_DIGEST_SALT = 8  # bytes, for SSHA*/SMD5; Dovecot writes 4, any length verifies


@dataclass(frozen=True, slots=True)
class _Parsed:
    scheme: str  # canonical upper-case name
    payload: str  # the text after the tag (the whole secret when untagged)
    encoding: str | None = None  # "base64" | "hex" from a tag suffix


_TAG = re.compile(r"\{([^{}]*)\}", re.ASCII)
_APP = re.compile(r"\$app\$([^$]*)\$", re.ASCII)
_MCF_ID = re.compile(r"\$[A-Za-z0-9][A-Za-z0-9_.,=-]*\$", re.ASCII)
_BSDI = re.compile(r"_[./0-9A-Za-z]{19}", re.ASCII)

# Untagged secrets by prefix, first match wins.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("$argon2id$", "ARGON2ID"),
    ("$argon2i$", "ARGON2I"),
    ("$argon2d$", "ARGON2"),
    ("$2a$", "BLF-CRYPT"),
    ("$2b$", "BLF-CRYPT"),
    ("$2y$", "BLF-CRYPT"),
    ("$6$", "SHA512-CRYPT"),
    ("$5$", "SHA256-CRYPT"),
    ("$1$", "MD5-CRYPT"),
    ("$y$", "CRYPT"),
    ("$gy$", "CRYPT"),
    ("$7$", "CRYPT"),
    ("$sha1$", "CRYPT"),
    ("$md5$", "CRYPT"),
    ("$md5,", "CRYPT"),
    ("$pbkdf2$", "PBKDF2"),
    ("$pbkdf2-", "PBKDF2"),
    ("$scrypt$", "SCRYPT"),
)


def _parse(secret: str, *, inner: bool = False) -> _Parsed:
    match = _TAG.match(secret)
    if match is not None:
        name, _, suffix = match.group(1).partition(".")
        scheme = name.upper()
        if scheme not in _SCHEMES:
            raise UnsupportedScheme(_unsupported_message(scheme))
        encoding = None
        if suffix:
            encoding = _ENCODINGS.get(suffix.lower())
            if encoding is None:
                raise UnsupportedScheme(f"unknown encoding suffix on a {scheme} secret")
        return _Parsed(scheme, secret[match.end() :], encoding)
    app = _APP.match(secret)
    if app is not None and not inner:
        return _parse(secret[app.end() :], inner=True)
    if secret.startswith("otpauth://"):
        return _Parsed("TOTP", secret)
    for prefix, scheme in _PREFIXES:
        if secret.startswith(prefix):
            return _Parsed(scheme, secret)
    if _BSDI.fullmatch(secret):
        return _Parsed("CRYPT", secret)
    if _MCF_ID.match(secret):
        raise UnsupportedScheme("unknown $id$ hash")
    return _Parsed("PLAIN", secret)


def _unsupported_message(scheme: str) -> str:
    if scheme in _KNOWN_UNSUPPORTED:
        return f"unsupported password scheme {scheme}"
    return "unknown password scheme tag"


def identify(secret: str) -> str:
    """The scheme of a stored secret: its tag's name upper-cased, without encoding suffix (``"SHA512-CRYPT"``,
    ``"SHA1"``, ``"CLEARTEXT"``), or for an untagged secret the scheme its prefix names (``$y$`` and other crypt(3)
    methods without a Dovecot name are ``"CRYPT"``, ``$argon2d$`` is ``"ARGON2"``), ``"TOTP"`` for an ``otpauth://``
    URL, else ``"PLAIN"``. An app password reports its inner secret's scheme (see :func:`app_password_name`).

    Raises :class:`UnsupportedScheme` for an unknown ``{TAG}``, encoding suffix or ``$id$``.
    """
    return _parse(secret).scheme


def app_password_name(secret: str) -> str | None:
    """The name of a Stalwart app password ``$app$<name>$<secret>``, else None."""
    match = _APP.match(secret)
    return match.group(1) if match is not None else None


def _raw(parsed: _Parsed) -> bytes:
    """The scheme's value as bytes, decoded as Dovecot's ``password_decode`` does."""
    scheme = _SCHEMES[parsed.scheme]
    payload, encoding, guessed = parsed.payload, parsed.encoding, False
    if encoding is None:
        encoding = scheme.encoding
        if encoding != "none" and scheme.raw_len:
            encoding = "hex" if len(payload) == scheme.raw_len * 2 else "base64"
            guessed = True
    if encoding == "none":
        try:
            raw = payload.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a lone surrogate that no byte decoded into
            raise MalformedSecret("not encodable") from None
    elif encoding == "hex":
        try:
            raw = crypt.hexdecode(payload)
        except MalformedSecret:
            if not guessed:
                raise
            raw = crypt.b64decode(payload)  # some lengths are valid both ways: Dovecot falls back the same
    else:
        raw = crypt.b64decode(payload)
    if scheme.raw_len and len(raw) != scheme.raw_len:
        raise MalformedSecret("wrong digest length")
    return raw


# Verifiers take (stored value, password) as bytes; makers (password, rounds or None) and return the stored value,
# before the tag's encoding.
Verifier = Callable[[bytes, bytes], bool]
Maker = Callable[[bytes, int | None], bytes]


@dataclass(frozen=True, slots=True)
class _Scheme:
    verify: Verifier
    make: Maker | None = None
    encoding: str = "none"  # of the payload by default: "none" | "base64" | "hex"
    raw_len: int = 0  # a fixed decoded length (digests), which lets Dovecot guess hex or base64
    slow: bool = False  # run off the event loop


def _plain(raw: bytes, password: bytes) -> bool:
    return hmac.compare_digest(raw, password)


def _plain_trunc(raw: bytes, password: bytes) -> bool:
    # Dovecot's PLAIN-TRUNC: <length>-<password>, where the stored password may have been cut to <length>.
    length, dash, stored = raw.partition(b"-")
    if not dash or not length.isdigit():
        raise MalformedSecret("PLAIN-TRUNC without a length prefix")
    limit = int(length)
    if len(stored) == limit and len(password) >= limit:
        return hmac.compare_digest(stored, password[:limit])
    return hmac.compare_digest(stored, password)


def _digest(algorithm: str) -> tuple[Verifier, Maker]:
    def verify(raw: bytes, password: bytes) -> bool:
        return hmac.compare_digest(hashlib.new(algorithm, password).digest(), raw)

    def make(password: bytes, rounds: int | None) -> bytes:
        return hashlib.new(algorithm, password).digest()

    return verify, make


def _salted(algorithm: str) -> tuple[Verifier, Maker]:
    size = hashlib.new(algorithm).digest_size

    def verify(raw: bytes, password: bytes) -> bool:  # base64(digest(password + salt) + salt)
        if len(raw) <= size:
            raise MalformedSecret("salted digest too short")
        return hmac.compare_digest(hashlib.new(algorithm, password + raw[size:]).digest(), raw[:size])

    def make(password: bytes, rounds: int | None) -> bytes:
        salt = os.urandom(SALTED_DIGEST_SALT)
        return hashlib.new(algorithm, password + salt).digest() + salt

    return verify, make


def _dovecot_md5(raw: bytes, password: bytes) -> bool:
    # Dovecot's md5_verify: MD5-CRYPT when it looks like one, else a PLAIN-MD5 digest in hex or base64.
    if raw.startswith(b"$1$"):
        return crypt.verify_mcf(raw, password)
    digest = _raw(_Parsed("PLAIN-MD5", crypt.ascii_text(raw)))
    return hmac.compare_digest(hashlib.md5(password).digest(), digest)  # noqa: S324 - the scheme is MD5


def _cram(raw: bytes, password: bytes) -> bool:
    return hmac.compare_digest(crypt.cram_context(password), raw)


def _make_cram(password: bytes, rounds: int | None) -> bytes:
    try:
        return crypt.cram_context(password)
    except MalformedSecret as exc:
        raise ValueError(exc.reason) from None


def _scram(scheme: str) -> tuple[Verifier, Maker]:
    def verify(raw: bytes, password: bytes) -> bool:
        return crypt.verify_scram(scheme, raw, password)

    def make(password: bytes, rounds: int | None) -> bytes:
        return crypt.make_scram(scheme, password, max(rounds or SCRAM_ITERATIONS, SCRAM_ITERATIONS))

    return verify, make


def _argon2(kind: argon2.Type, cost: dict[str, int]) -> Maker:
    def make(password: bytes, rounds: int | None) -> bytes:
        return crypt.make_argon2(
            password,
            kind,
            time_cost=rounds or cost["time_cost"],
            memory_cost=cost["memory_cost"],
            parallelism=cost["parallelism"],
        )

    return make


def _crypt(prefix: bytes | None, *, takes_rounds: bool = True) -> Maker:
    def make(password: bytes, rounds: int | None) -> bytes:
        if rounds is not None and not takes_rounds:
            raise ValueError("this scheme takes no rounds")
        return crypt.make_crypt(password, prefix, rounds or 0)

    return make


def _plaintext(password: bytes, rounds: int | None) -> bytes:
    return password


def _schemes() -> dict[str, _Scheme]:
    mcf = crypt.verify_mcf
    argon2id = _argon2(argon2.Type.ID, ARGON2ID_COST)
    md5_crypt = _crypt(b"$1$", takes_rounds=False)
    sha1, sha256, sha512, md5 = (_digest(name) for name in ("sha1", "sha256", "sha512", "md5"))
    scram_sha1, scram_sha256 = _scram("SCRAM-SHA-1"), _scram("SCRAM-SHA-256")
    return {
        "ARGON2I": _Scheme(mcf, _argon2(argon2.Type.I, ARGON2I_COST), slow=True),
        "ARGON2ID": _Scheme(mcf, argon2id, slow=True),
        "ARGON2": _Scheme(mcf, argon2id, slow=True),  # Stalwart's and OpenLDAP's tag, any variant
        "BLF-CRYPT": _Scheme(mcf, lambda pw, rounds: crypt.make_bcrypt(pw, rounds or BCRYPT_COST), slow=True),
        "SHA512-CRYPT": _Scheme(mcf, _crypt(b"$6$"), slow=True),
        "SHA256-CRYPT": _Scheme(mcf, _crypt(b"$5$"), slow=True),
        "MD5-CRYPT": _Scheme(mcf, md5_crypt, slow=True),
        "CRYPT": _Scheme(mcf, _crypt(None), slow=True),  # makes libxcrypt's preferred method: yescrypt on Debian
        "DES-CRYPT": _Scheme(mcf, _crypt(b"", takes_rounds=False), slow=True),
        "PBKDF2": _Scheme(
            crypt.verify_pbkdf2, lambda pw, rounds: crypt.make_pbkdf2_dovecot(pw, rounds or PBKDF2_ROUNDS), slow=True
        ),
        "SCRYPT": _Scheme(mcf, lambda pw, rounds: crypt.make_scrypt(pw, rounds or SCRYPT_LOG_N), slow=True),
        "SSHA": _Scheme(*_salted("sha1"), encoding="base64"),
        "SSHA256": _Scheme(*_salted("sha256"), encoding="base64"),
        "SSHA512": _Scheme(*_salted("sha512"), encoding="base64"),
        "SMD5": _Scheme(*_salted("md5"), encoding="base64"),
        "SHA": _Scheme(*sha1, encoding="base64", raw_len=20),
        "SHA1": _Scheme(*sha1, encoding="base64", raw_len=20),
        "SHA256": _Scheme(*sha256, encoding="base64", raw_len=32),
        "SHA512": _Scheme(*sha512, encoding="base64", raw_len=64),
        "MD5": _Scheme(_dovecot_md5, md5_crypt),  # Dovecot: makes MD5-CRYPT, also verifies a PLAIN-MD5 digest
        "PLAIN-MD5": _Scheme(*md5, encoding="hex", raw_len=16),
        "LDAP-MD5": _Scheme(*md5, encoding="base64", raw_len=16),
        "PLAIN": _Scheme(_plain, _plaintext),
        "CLEAR": _Scheme(_plain, _plaintext),
        "CLEARTEXT": _Scheme(_plain, _plaintext),
        "PLAIN-TRUNC": _Scheme(_plain_trunc),
        "CRAM-MD5": _Scheme(_cram, _make_cram, encoding="hex", raw_len=32),
        "HMAC-MD5": _Scheme(_cram, _make_cram, encoding="hex", raw_len=32),
        "SCRAM-SHA-1": _Scheme(*scram_sha1, slow=True),
        "SCRAM-SHA-256": _Scheme(*scram_sha256, slow=True),
    }


_SCHEMES = _schemes()
_PLAINTEXT = frozenset({"PLAIN", "CLEAR", "CLEARTEXT"})

#: The scheme names (upper-case ``{TAG}`` names) this module verifies.
SCHEMES: tuple[str, ...] = tuple(_SCHEMES)
#: The schemes :func:`hash_password` makes (the crypt(3) family needs libxcrypt, CRAM-MD5 OpenSSL's MD5 functions).
HASH_SCHEMES: tuple[str, ...] = tuple(name for name, scheme in _SCHEMES.items() if scheme.make is not None)


def _password_bytes(password: str) -> bytes | None:
    try:
        data = password.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return data if data and b"\0" not in data else None


def verify_sync(secret: str, password: str) -> bool:
    """Whether ``password`` matches the stored ``secret``, in the calling thread (slow schemes block it: from a
    coroutine use :func:`verify`). Never raises: an unknown scheme or a malformed secret is False, logged at warning
    with the scheme name and a fixed reason only. Comparisons are constant-time."""
    scheme = "untagged"
    try:
        parsed = _parse(secret)
        scheme = parsed.scheme
        given = _password_bytes(password)
        if given is None or scheme == "TOTP":  # a TOTP secret sits among passwords: quietly never one of them
            return False
        raw = _raw(parsed)
        return bool(raw) and _SCHEMES[scheme].verify(raw, given)
    except UnsupportedScheme as exc:
        log.warning("stored secret not verifiable: %s", exc)
    except MalformedSecret as exc:
        log.warning("stored %s secret not verifiable: %s", scheme, exc.reason)
    except Exception as exc:  # noqa: BLE001 - a bad record must fail the login, not the service
        # The class name only: a library's message may quote its input.
        log.warning("stored %s secret not verifiable: unexpected %s", scheme, type(exc).__name__)
    return False


def _needs_thread(secret: str) -> bool:
    try:
        parsed = _parse(secret)
    except UnsupportedScheme:
        return False
    if parsed.scheme == "MD5":  # MD5-CRYPT, or a plain digest
        return parsed.payload.startswith("$1$") or parsed.encoding is not None
    return parsed.scheme != "TOTP" and _SCHEMES[parsed.scheme].slow


# Slow hashes run in one pool sized to the CPUs. At most _MAX_PENDING of them run or wait in it per event loop, so
# that a burst of logins waits on a semaphore, cheaply, instead of piling work up in the pool's queue.
_MAX_PENDING = 64
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_pending: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


#: Niceness of the hashing threads. The event loop answers lookups in microseconds; a burst of slow hashes (100 ms
#: ARGON2ID each) must not take its core away: at nice 10 a hash thread gets about a tenth of a core the loop
#: wants, and every idle cycle otherwise.
HASH_THREAD_NICE = 10


def _lower_priority() -> None:
    # On Linux, setpriority on a thread id sets that thread's niceness alone.
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)


def _get_executor() -> ThreadPoolExecutor:
    global _executor  # noqa: PLW0603 - one pool per process, made on first use
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix="mailroster-hash", initializer=_lower_priority
            )
        return _executor


async def verify(secret: str, password: str) -> bool:
    """:func:`verify_sync` without blocking the event loop: cheap schemes (plaintext, digests, salted digests,
    CRAM-MD5) run inline, slow ones (Argon2, bcrypt, crypt(3), PBKDF2, scrypt, SCRAM) in a pool of
    ``os.cpu_count()`` threads, at most 64 running or queued per event loop. A cancelled caller's slot is freed when
    its hash, already running, finishes."""
    if not _needs_thread(secret):
        return verify_sync(secret, password)
    loop = asyncio.get_running_loop()
    pending = _pending.get(loop)
    if pending is None:
        pending = _pending[loop] = asyncio.Semaphore(_MAX_PENDING)
    await pending.acquire()
    try:
        job = _get_executor().submit(verify_sync, secret, password)
    except BaseException:
        pending.release()
        raise

    def release(_: Future[bool]) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing waits on its semaphore any more
            loop.call_soon_threadsafe(pending.release)

    job.add_done_callback(release)
    return await asyncio.wrap_future(job)


def plaintext_of(secret: str) -> str | None:
    """The password itself when ``secret`` stores it in the clear (``{PLAIN}``, ``{CLEAR}``, ``{CLEARTEXT}`` with
    any encoding suffix, untagged plaintext, or an app password holding one), else None. Never empty."""
    try:
        parsed = _parse(secret)
        if parsed.scheme not in _PLAINTEXT:
            return None
        raw = _raw(parsed)
    except (UnsupportedScheme, MalformedSecret):
        return None
    return raw.decode("utf-8", "surrogateescape") or None


def _scram_scheme(algorithm: str) -> str:
    name = algorithm.upper().removeprefix("SCRAM-")
    scheme = {"SHA-1": "SCRAM-SHA-1", "SHA1": "SCRAM-SHA-1", "SHA-256": "SCRAM-SHA-256", "SHA256": "SCRAM-SHA-256"}
    if name not in scheme:
        raise ValueError("SCRAM algorithm must be SHA-1 or SHA-256")
    return scheme[name]


def scram_keys(password: str, algorithm: str, salt: bytes, iterations: int) -> ScramCredentials:
    """RFC 5802's StoredKey and ServerKey of ``password`` for ``salt`` and ``iterations``; ``algorithm`` is
    ``"SHA-1"`` or ``"SHA-256"`` (``"SCRAM-SHA-256"`` also accepted). Like Dovecot, no SASLprep."""
    digest = crypt.SCRAM_DIGESTS[_scram_scheme(algorithm)]
    return crypt.scram_derive(digest, password.encode("utf-8", "surrogateescape"), salt, iterations)


# The salt of a SCRAM exchange from a plaintext secret: an HMAC of the password under a key drawn at start-up, so
# that one process offers the same salt every time (clients may cache their SaltedPassword) without the salt being a
# public function of the password, which would make every unauthenticated server-first message an offline guessing
# oracle. The login name, given as ``user``, keeps two accounts with one password from showing the same salt.
_SCRAM_SALT_KEY = os.urandom(32)


def scram_credentials(secret: str, algorithm: str, *, user: str = "") -> ScramCredentials | None:
    """What a SCRAM exchange with ``algorithm`` (``"SHA-1"`` or ``"SHA-256"``) needs of ``secret``: a stored
    ``{SCRAM-SHA-*}`` secret of the same algorithm as stored, or keys derived from a plaintext secret with 4096
    iterations and a salt that is stable for this process and ``user`` (an HMAC of the password under a key drawn at
    start-up). None when the secret can do neither (a one-way hash, the other SCRAM algorithm, a malformed record:
    logged). Raises ValueError for an unknown ``algorithm``."""
    scheme = _scram_scheme(algorithm)
    try:
        parsed = _parse(secret)
        if parsed.scheme == scheme:
            return crypt.scram_parse(scheme, _raw(parsed))
    except UnsupportedScheme:
        return None
    except MalformedSecret as exc:
        log.warning("stored %s secret not usable for SCRAM: %s", scheme, exc.reason)
        return None
    password = plaintext_of(secret)
    if password is None:
        return None
    encoded = password.encode("utf-8", "surrogateescape")
    label = f"mailroster scram salt\0{scheme}\0{user.lower()}\0".encode("utf-8", "surrogateescape")
    salt = hmac.new(_SCRAM_SALT_KEY, label + encoded, hashlib.sha256).digest()[:16]
    return crypt.scram_derive(crypt.SCRAM_DIGESTS[scheme], encoded, salt, SCRAM_ITERATIONS)


def cram_md5_digest(secret: str, challenge: bytes) -> bytes | None:
    """The HMAC-MD5 of ``challenge`` (16 raw bytes) that a CRAM-MD5 client with the right password sends, from a
    plaintext secret or a stored ``{CRAM-MD5}``/``{HMAC-MD5}`` context; None for any other secret (or a malformed
    one: logged)."""
    password = plaintext_of(secret)
    if password is not None:
        return hmac.new(password.encode("utf-8", "surrogateescape"), challenge, hashlib.md5).digest()
    try:
        parsed = _parse(secret)
        if parsed.scheme not in ("CRAM-MD5", "HMAC-MD5"):
            return None
        return crypt.cram_digest(_raw(parsed), challenge)
    except UnsupportedScheme:
        return None
    except MalformedSecret as exc:
        log.warning("stored CRAM-MD5 secret not usable: %s", exc.reason)
        return None


def hash_password(password: str, scheme: str = "ARGON2ID", *, rounds: int | None = None) -> str:
    """A new stored secret for ``password`` in Dovecot's tagged form: ``{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...``,
    ``{SHA512-CRYPT}$6$...``, ``{BLF-CRYPT}$2y$10$...``, ``{SSHA512}...``, ``{PLAIN}...``, ``{SCRAM-SHA-256}...``,
    ``{CRAM-MD5}...``. ``scheme`` is case-insensitive and may carry ``.b64``/``.hex`` as in ``doveadm pw -s``.
    SCRYPT, which has no Dovecot tag, comes as its bare PHC string (which Stalwart recognises).

    Costs follow ``doveadm pw`` 2.3.19: ARGON2ID m=64 MiB t=3 p=1, ARGON2I m=32 MiB t=4 p=1 (32-byte hash, 16-byte
    salt), SHA*-CRYPT 5000 rounds, PBKDF2 5000 rounds (PBKDF2-SHA1, Dovecot's format), SCRAM 4096 iterations;
    except BLF-CRYPT, cost 10 (Dovecot: 5), SSHA*/SMD5, an 8-byte salt (Dovecot: 4), and SCRYPT, ln=16 r=8 p=1.
    ``rounds`` sets the cost as ``doveadm pw -r`` does (Argon2: t; BLF-CRYPT: cost; SHA*-CRYPT, PBKDF2: rounds;
    SCRAM: iterations, at least 4096; SCRYPT: log2 N; CRYPT: libxcrypt's count).

    Raises :class:`UnsupportedScheme` (a ValueError) for an unknown scheme; ValueError for one that cannot be made
    (PLAIN-TRUNC, a crypt(3) method the system lacks, BLF-CRYPT of a password over 72 bytes), for an empty password
    and for one holding NUL.
    """
    name, _, suffix = scheme.partition(".")
    name = name.upper()
    entry = _SCHEMES.get(name)
    if entry is None:
        raise UnsupportedScheme(_unsupported_message(name))
    encoding = _ENCODINGS.get(suffix.lower()) if suffix else None
    if suffix and encoding is None:
        raise UnsupportedScheme("unknown encoding suffix")
    if entry.make is None:
        raise ValueError(f"cannot make {name} secrets")
    data = _password_bytes(password)
    if data is None:
        raise ValueError("refusing to hash an empty password or one holding NUL")
    if rounds is not None and rounds < 1:
        raise ValueError("rounds must be positive")
    raw = entry.make(data, rounds)
    if name == "SCRYPT" and encoding is None:
        return raw.decode("ascii")
    encoding = encoding or entry.encoding
    if encoding == "base64":
        payload = crypt.b64encode(raw)
    elif encoding == "hex":
        payload = raw.hex()
    else:
        payload = raw.decode("utf-8", "surrogateescape")
    tag = f"{name}.{suffix.upper()}" if suffix else name
    return f"{{{tag}}}{payload}"


def dovecot_form(secret: str) -> str | None:
    """``secret`` as a Dovecot 2.3 passdb ``password`` field: tagged secrets as they are (Stalwart's ``{ARGON2}``
    re-tagged ``{ARGON2ID}``/``{ARGON2I}``), untagged ones given their tag (``$6$...`` -> ``{SHA512-CRYPT}$6$...``,
    ``$y$...`` -> ``{CRYPT}$y$...``, plaintext -> ``{PLAIN}...``), an app password as its inner secret. None when
    Dovecot could not use it: an unknown scheme, a TOTP URL, an empty secret, Argon2d, PHC PBKDF2 or scrypt."""
    try:
        parsed = _parse(secret)
    except UnsupportedScheme:
        return None
    scheme, payload = parsed.scheme, parsed.payload
    if not payload or scheme in ("TOTP", "SCRYPT"):
        return None
    if scheme == "ARGON2" or (scheme in ("ARGON2I", "ARGON2ID") and parsed.encoding is None):
        # Dovecot's own verifier takes either variant under either tag, but not the ARGON2 tag nor Argon2d.
        if payload.startswith("$argon2id$"):
            scheme = "ARGON2ID"
        elif payload.startswith("$argon2i$"):
            scheme = "ARGON2I"
        else:
            return None
    if scheme == "PBKDF2" and not payload.startswith("$1$") and parsed.encoding is None:
        return None
    tag = scheme if parsed.encoding is None else f"{scheme}.{'B64' if parsed.encoding == 'base64' else 'HEX'}"
    return f"{{{tag}}}{payload}"
