"""The algorithms behind the password schemes, each from a maintained implementation.

:mod:`.secrets` parses a stored secret and picks a scheme; the functions here check or make the scheme's value.
Verifiers take the stored value and the password as bytes and raise :class:`MalformedSecret` (a fixed reason, never
secret data) when the value does not parse; makers return the new value.

- crypt(3): libxcrypt's ``crypt_rn``/``crypt_gensalt_rn`` (``libcrypt.so.1``) through ctypes, the thread-safe crypt
  Dovecot itself calls: MD5-CRYPT ``$1$``, SHA256-CRYPT ``$5$``, SHA512-CRYPT ``$6$``, yescrypt ``$y$`` (Debian's
  default), traditional DES and whatever else the system's libxcrypt was built with. The stdlib ``crypt`` module is
  deprecated (removed in Python 3.13) and holds the GIL; ctypes releases the GIL for the call, so threads run hashes
  in parallel. Measured here: a SHA512-CRYPT verify (5000 rounds) takes 1.4 ms.
- bcrypt (``$2a$``/``$2b$``/``$2y$``): the ``bcrypt`` package; Argon2: ``argon2-cffi``; PBKDF2, scrypt, SCRAM's Hi():
  hashlib. All release the GIL.
- CRAM-MD5: Dovecot stores the MD5 chaining state of HMAC-MD5's outer and inner pads after their first 64-byte
  block. Checking such a secret needs MD5 resumed from a given state, and making one needs the state read out.
  hashlib exposes neither and no maintained PyPI package does (``dovecot-cram-md5`` is a one-release 2018 package,
  ``rehashes`` serialises an undocumented Rust state, length-extension tools are unmaintained), so OpenSSL's own
  ``MD5_Init``/``MD5_Update``/``MD5_Final`` are called through ctypes and the state is set and read in the public
  ``MD5_CTX`` struct of openssl/md5.h; the algorithm stays OpenSSL's. These functions are deprecated in OpenSSL 3
  but still exported; without them only stored CRAM-MD5 secrets are unavailable.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import hmac
import logging
import os
import secrets
import threading

import argon2
import bcrypt

from .outcome import ScramCredentials

log = logging.getLogger(__name__)


class MalformedSecret(Exception):
    """A stored value that does not parse as its scheme. ``reason`` is a fixed text, never secret data."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# sizeof(struct crypt_data) in libxcrypt's <crypt.h>: output 384 + setting 384 + input 512 + reserved 767
# + initialized 1 + internal 30720.
_CRYPT_DATA_SIZE = 32768
# Without crypt_rn (a libcrypt older than libxcrypt), crypt_r takes glibc's larger struct crypt_data (~128 KiB):
# over-allocating is harmless.
_LEGACY_CRYPT_DATA_SIZE = 262144
_GENSALT_OUTPUT_SIZE = 192  # CRYPT_GENSALT_OUTPUT_SIZE
_MD5_BLOCK = 64

# Limits on the costs read from a stored secret: one record asking for gigabytes must not take the daemon down.
MAX_MEMORY_KIB = 1024 * 1024  # Argon2 and scrypt: 1 GiB
MAX_ITERATIONS = 100_000_000  # PBKDF2, SCRAM

BCRYPT_MAX_PASSWORD = 72  # bcrypt reads the first 72 bytes; libxcrypt (Dovecot) silently truncates longer ones
_SALT_CHARS = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # Dovecot's salt alphabet
SCRAM_MIN_ITERATIONS = 4096  # Dovecot's SCRAM_MIN_ITERATE_COUNT, RFC 5802's "at least"
SCRAM_DIGESTS = {"SCRAM-SHA-1": "sha1", "SCRAM-SHA-256": "sha256"}


# Encodings.


def b64decode(text: str) -> bytes:
    """Standard or "adapted" (passlib: ``.`` for ``+``) base64, padding optional."""
    text = text.replace(".", "+")
    if len(text) % 4 == 1:
        raise MalformedSecret("bad base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedSecret("bad base64") from None


def b64encode(data: bytes, *, padding: bool = True) -> str:
    text = base64.b64encode(data).decode("ascii")
    return text if padding else text.rstrip("=")  # PHC's B64 has no padding


def hexdecode(text: str) -> bytes:
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        raise MalformedSecret("bad hex") from None


def ascii_text(raw: bytes) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedSecret("not ASCII") from None


def _number(text: str, low: int = 1, high: int = MAX_ITERATIONS) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        raise MalformedSecret("bad number")
    value = int(text)
    if not low <= value <= high:
        raise MalformedSecret("number out of range")
    return value


def _phc_params(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        if not equals or key in values:
            raise MalformedSecret("bad PHC parameters")
        values[key] = value
    return values


# Modular crypt format: crypt(3) strings and PHC strings.


def verify_mcf(raw: bytes, password: bytes) -> bool:
    """Any crypt(3) or PHC string, dispatched on its own prefix: Argon2, bcrypt, PBKDF2 and scrypt PHC strings to
    their libraries, everything else (DES, ``$1$``, ``$5$``, ``$6$``, ``$y$``...) to libxcrypt."""
    text = ascii_text(raw)
    if text.startswith("$argon2"):
        return verify_argon2(text, password)
    if text[:4] in ("$2a$", "$2b$", "$2y$"):
        try:
            return bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], raw)
        except ValueError:
            raise MalformedSecret("bad bcrypt hash") from None
    if text.startswith("$pbkdf2"):
        return verify_pbkdf2_phc(text, password)
    if text.startswith("$scrypt$"):
        return verify_scrypt(text, password)
    if not crypt_available():
        raise MalformedSecret("crypt(3) is unavailable (no libxcrypt)")
    computed = crypt(password, raw)
    if computed is None:
        raise MalformedSecret("crypt(3) rejected the hash")
    return hmac.compare_digest(computed, raw)


def verify_argon2(text: str, password: bytes) -> bool:
    try:
        parameters = argon2.extract_parameters(text)
    except argon2.exceptions.InvalidHashError:
        raise MalformedSecret("bad Argon2 hash") from None
    if parameters.memory_cost > MAX_MEMORY_KIB:
        raise MalformedSecret("Argon2 memory cost over the limit")
    try:
        return argon2.PasswordHasher().verify(text, password)
    except argon2.exceptions.VerifyMismatchError:
        return False
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        raise MalformedSecret("bad Argon2 hash") from None


def make_argon2(password: bytes, kind: argon2.Type, *, time_cost: int, memory_cost: int, parallelism: int) -> bytes:
    hasher = argon2.PasswordHasher(
        time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism, hash_len=32, salt_len=16, type=kind
    )
    return hasher.hash(password).encode("ascii")


def make_bcrypt(password: bytes, cost: int) -> bytes:
    if len(password) > BCRYPT_MAX_PASSWORD:
        raise ValueError("BLF-CRYPT uses only the first 72 bytes of a password: choose another scheme")
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost, prefix=b"2b"))
    # $2y$ (crypt_blowfish's name, what Dovecot writes) and $2b$ (OpenBSD's) are the same corrected algorithm.
    return b"$2y$" + hashed[4:]


def make_crypt(password: bytes, prefix: bytes | None, count: int = 0) -> bytes:
    """crypt(3) with a new salt for ``prefix`` (None: libxcrypt's preferred method; ``b""``: DES)."""
    setting = gensalt(prefix, count)
    hashed = crypt(password, setting) if setting is not None else None
    if hashed is None:
        raise ValueError("crypt(3) cannot make this scheme here (libxcrypt missing or method disabled)")
    return hashed


# PBKDF2 and scrypt.


def verify_pbkdf2(raw: bytes, password: bytes) -> bool:
    """Dovecot's ``$1$<salt>$<rounds>$<hex>`` or a PHC string."""
    text = ascii_text(raw)
    if text.startswith("$1$"):
        # password-scheme-pbkdf2.c: PBKDF2-HMAC-SHA1, 20 bytes in hex; the salt string itself (not decoded) is the
        # salt.
        fields = text[3:].split("$")
        if len(fields) != 3 or len(fields[2]) != 40:
            raise MalformedSecret("bad Dovecot PBKDF2 format")
        salt, rounds, expected = fields[0].encode("ascii"), _number(fields[1]), hexdecode(fields[2])
        return hmac.compare_digest(hashlib.pbkdf2_hmac("sha1", password, salt, rounds, len(expected)), expected)
    if text.startswith("$pbkdf2"):
        return verify_pbkdf2_phc(text, password)
    raise MalformedSecret("unknown PBKDF2 format")


_PBKDF2_DIGESTS = {"pbkdf2": "sha1", "pbkdf2-sha1": "sha1", "pbkdf2-sha256": "sha256", "pbkdf2-sha512": "sha512"}


def verify_pbkdf2_phc(text: str, password: bytes) -> bool:
    """passlib's ``$pbkdf2-sha256$<rounds>$<ab64 salt>$<ab64 hash>`` or RustCrypto's (Stalwart's)
    ``$pbkdf2-sha256$i=<rounds>[,l=<length>]$<b64 salt>$<b64 hash>``; the salt is the decoded bytes in both."""
    fields = text.split("$")
    if len(fields) != 5 or fields[0] or fields[1] not in _PBKDF2_DIGESTS:
        raise MalformedSecret("bad PBKDF2 PHC format")
    params = fields[2]
    salt, expected = b64decode(fields[3]), b64decode(fields[4])
    if params.isdigit():
        rounds = _number(params)
    else:
        values = _phc_params(params)
        rounds = _number(values.get("i", ""))
        if "l" in values and _number(values["l"]) != len(expected):
            raise MalformedSecret("PBKDF2 length mismatch")
    if not expected:
        raise MalformedSecret("empty PBKDF2 hash")
    computed = hashlib.pbkdf2_hmac(_PBKDF2_DIGESTS[fields[1]], password, salt, rounds, len(expected))
    return hmac.compare_digest(computed, expected)


def make_pbkdf2_dovecot(password: bytes, rounds: int) -> bytes:
    salt = "".join(secrets.choice(_SALT_CHARS) for _ in range(16))
    key = hashlib.pbkdf2_hmac("sha1", password, salt.encode("ascii"), rounds, 20)
    return f"$1${salt}${rounds}${key.hex()}".encode("ascii")


def _scrypt(password: bytes, salt: bytes, *, log_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log_n
    memory = 128 * r * (n + 2) + 128 * r * p  # OpenSSL's EVP_PBE_scrypt accounting
    if memory > MAX_MEMORY_KIB * 1024:
        raise MalformedSecret("scrypt memory cost over the limit")
    try:
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=memory + 1024 * 1024, dklen=length)
    except ValueError:
        raise MalformedSecret("scrypt rejected the parameters") from None


def verify_scrypt(text: str, password: bytes) -> bool:
    """PHC ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<b64 salt>$<b64 hash>`` (passlib, RustCrypto)."""
    fields = text.split("$")
    if len(fields) != 5 or fields[0] or fields[1] != "scrypt":
        raise MalformedSecret("bad scrypt PHC format")
    values = _phc_params(fields[2])
    if set(values) != {"ln", "r", "p"}:
        raise MalformedSecret("bad scrypt parameters")
    log_n, r, p = _number(values["ln"], high=31), _number(values["r"]), _number(values["p"])
    salt, expected = b64decode(fields[3]), b64decode(fields[4])
    if not expected:
        raise MalformedSecret("empty scrypt hash")
    return hmac.compare_digest(_scrypt(password, salt, log_n=log_n, r=r, p=p, length=len(expected)), expected)


def make_scrypt(password: bytes, log_n: int) -> bytes:
    r, p, salt = 8, 1, os.urandom(16)
    try:
        key = _scrypt(password, salt, log_n=log_n, r=r, p=p, length=32)
    except MalformedSecret as exc:
        raise ValueError(exc.reason) from None
    return f"$scrypt$ln={log_n},r={r},p={p}${b64encode(salt, padding=False)}${b64encode(key, padding=False)}".encode(
        "ascii"
    )


# SCRAM (RFC 5802, RFC 7677) and CRAM-MD5 (RFC 2195).


def scram_derive(digest: str, password: bytes, salt: bytes, iterations: int) -> ScramCredentials:
    """StoredKey and ServerKey: SaltedPassword = Hi(password, salt, i) is PBKDF2 with the HMAC of ``digest``."""
    salted = hashlib.pbkdf2_hmac(digest, password, salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    server_key = hmac.new(salted, b"Server Key", digest).digest()
    stored_key = hashlib.new(digest, client_key).digest()
    return ScramCredentials(salt=salt, iterations=iterations, stored_key=stored_key, server_key=server_key)


def scram_parse(scheme: str, raw: bytes) -> ScramCredentials:
    """Dovecot's ``<iterations>,<b64 salt>,<b64 StoredKey>,<b64 ServerKey>`` (password-scheme-scram.c)."""
    size = hashlib.new(SCRAM_DIGESTS[scheme]).digest_size
    fields = ascii_text(raw).split(",")
    if len(fields) != 4:
        raise MalformedSecret("bad SCRAM format")
    iterations = _number(fields[0], low=SCRAM_MIN_ITERATIONS)
    salt, stored_key, server_key = (b64decode(field) for field in fields[1:])
    if len(stored_key) != size or len(server_key) != size:
        raise MalformedSecret("bad SCRAM key length")
    return ScramCredentials(salt=salt, iterations=iterations, stored_key=stored_key, server_key=server_key)


def verify_scram(scheme: str, raw: bytes, password: bytes) -> bool:
    stored = scram_parse(scheme, raw)
    computed = scram_derive(SCRAM_DIGESTS[scheme], password, stored.salt, stored.iterations)
    return hmac.compare_digest(computed.stored_key, stored.stored_key)


def make_scram(scheme: str, password: bytes, iterations: int) -> bytes:
    keys = scram_derive(SCRAM_DIGESTS[scheme], password, os.urandom(16), iterations)
    fields = (b64encode(keys.salt), b64encode(keys.stored_key), b64encode(keys.server_key))
    return f"{iterations},{','.join(fields)}".encode("ascii")


def cram_context(password: bytes) -> bytes:
    """Dovecot's CRAM-MD5 secret (hmac-cram-md5.c): the MD5 states of HMAC-MD5's outer then inner pad."""
    key = hashlib.md5(password).digest() if len(password) > 64 else password  # noqa: S324 - HMAC-MD5's key rule
    key = key.ljust(64, b"\0")
    outer = md5_block_state(bytes(b ^ 0x5C for b in key))
    inner = md5_block_state(bytes(b ^ 0x36 for b in key))
    if outer is None or inner is None:
        raise MalformedSecret("MD5 state is unavailable (no OpenSSL MD5 functions)")
    return outer + inner


def cram_digest(context: bytes, challenge: bytes) -> bytes:
    """HMAC-MD5(key, challenge) = MD5(opad block || MD5(ipad block || challenge)), each MD5 resumed from the state
    of its block stored in ``context``."""
    inner = md5_resume(context[16:], challenge)
    digest = md5_resume(context[:16], inner) if inner is not None else None
    if digest is None:
        raise MalformedSecret("MD5 state is unavailable (no OpenSSL MD5 functions)")
    return digest


# The C libraries.


class _Libraries:
    """The C libraries, loaded once on first use (importing this module loads nothing)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded = False
        self.crypt_rn: ctypes._NamedFuncPointer | None = None
        self.crypt_r: ctypes._NamedFuncPointer | None = None
        self.crypt_gensalt_rn: ctypes._NamedFuncPointer | None = None
        self.md5_init: ctypes._NamedFuncPointer | None = None
        self.md5_update: ctypes._NamedFuncPointer | None = None
        self.md5_final: ctypes._NamedFuncPointer | None = None

    def load(self) -> _Libraries:
        if self._loaded:
            return self
        with self._lock:
            if not self._loaded:
                self._load_libcrypt()
                self._load_libcrypto()
                self._loaded = True
        return self

    def _load_libcrypt(self) -> None:
        lib = _open("libcrypt.so.1", "crypt")
        if lib is None:
            log.warning("libcrypt (libxcrypt) not found: crypt(3) password schemes are unavailable")
            return
        if hasattr(lib, "crypt_rn"):
            self.crypt_rn = lib.crypt_rn
            self.crypt_rn.restype = ctypes.c_char_p
            self.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
        elif hasattr(lib, "crypt_r"):
            self.crypt_r = lib.crypt_r
            self.crypt_r.restype = ctypes.c_char_p
            self.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
        if hasattr(lib, "crypt_gensalt_rn"):
            self.crypt_gensalt_rn = lib.crypt_gensalt_rn
            self.crypt_gensalt_rn.restype = ctypes.c_char_p
            self.crypt_gensalt_rn.argtypes = [
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_int,
            ]

    def _load_libcrypto(self) -> None:
        lib = _open("libcrypto.so.3", "crypto")
        if lib is None or not all(hasattr(lib, name) for name in ("MD5_Init", "MD5_Update", "MD5_Final")):
            log.warning("OpenSSL's MD5 functions not found: stored CRAM-MD5 secrets are unavailable")
            return
        self.md5_init, self.md5_update, self.md5_final = lib.MD5_Init, lib.MD5_Update, lib.MD5_Final
        self.md5_init.argtypes = [ctypes.POINTER(_MD5Ctx)]
        self.md5_update.argtypes = [ctypes.POINTER(_MD5Ctx), ctypes.c_void_p, ctypes.c_size_t]
        self.md5_final.argtypes = [ctypes.c_char_p, ctypes.POINTER(_MD5Ctx)]
        for function in (self.md5_init, self.md5_update, self.md5_final):
            function.restype = ctypes.c_int


def _open(soname: str, short: str) -> ctypes.CDLL | None:
    for name in (soname, ctypes.util.find_library(short)):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    return None


class _MD5Ctx(ctypes.Structure):
    """``MD5_CTX`` from openssl/md5.h: the chaining state A-D, the bit count Nl/Nh, the pending block."""

    _fields_ = (
        ("A", ctypes.c_uint),
        ("B", ctypes.c_uint),
        ("C", ctypes.c_uint),
        ("D", ctypes.c_uint),
        ("Nl", ctypes.c_uint),
        ("Nh", ctypes.c_uint),
        ("data", ctypes.c_uint * 16),
        ("num", ctypes.c_uint),
    )


_LIBS = _Libraries()


def crypt_available() -> bool:
    """Whether crypt(3) can be called at all."""
    libs = _LIBS.load()
    return libs.crypt_rn is not None or libs.crypt_r is not None


def crypt(phrase: bytes, setting: bytes) -> bytes | None:
    """crypt(3) of ``phrase`` with ``setting`` (a salt or a whole stored hash), or None when the library is missing
    or rejects the setting (unknown method, malformed salt). Runs without the GIL; thread-safe."""
    libs = _LIBS.load()
    if b"\0" in phrase or b"\0" in setting:
        return None
    if libs.crypt_rn is not None:
        data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
        try:
            result: bytes | None = libs.crypt_rn(phrase, setting, data, _CRYPT_DATA_SIZE)
        finally:
            ctypes.memset(data, 0, _CRYPT_DATA_SIZE)  # the buffer holds a copy of the phrase
    elif libs.crypt_r is not None:
        data = ctypes.create_string_buffer(_LEGACY_CRYPT_DATA_SIZE)
        try:
            result = libs.crypt_r(phrase, setting, data)
        finally:
            ctypes.memset(data, 0, _LEGACY_CRYPT_DATA_SIZE)
    else:
        return None
    # A failed crypt_r may return a "*0"/"*1" token instead of NULL: never a valid hash.
    if not result or result.startswith(b"*"):
        return None
    return result


def gensalt(prefix: bytes | None, count: int = 0) -> bytes | None:
    """A new setting for ``prefix`` (``b"$6$"``; None is libxcrypt's preferred method, ``b""`` traditional DES)
    with cost ``count`` (0: the method's default) and a salt from the OS's random source, or None if refused."""
    libs = _LIBS.load()
    if libs.crypt_gensalt_rn is None:
        return None
    output = ctypes.create_string_buffer(_GENSALT_OUTPUT_SIZE)
    result: bytes | None = libs.crypt_gensalt_rn(prefix, count, None, 0, output, _GENSALT_OUTPUT_SIZE)
    if not result or result.startswith(b"*"):
        return None
    return result


def md5_available() -> bool:
    """Whether MD5 states can be read and resumed (stored CRAM-MD5 secrets)."""
    return _LIBS.load().md5_init is not None


def md5_block_state(block: bytes) -> bytes | None:
    """MD5's chaining state after exactly one 64-byte ``block``, as 16 bytes: A, B, C, D little-endian (the byte
    order of an MD5 digest and of Dovecot's CRAM-MD5 context)."""
    libs = _LIBS.load()
    if libs.md5_init is None or libs.md5_update is None or len(block) != _MD5_BLOCK:
        return None
    ctx = _MD5Ctx()
    try:
        libs.md5_init(ctypes.byref(ctx))
        libs.md5_update(ctypes.byref(ctx), block, len(block))
        return b"".join(int(word).to_bytes(4, "little") for word in (ctx.A, ctx.B, ctx.C, ctx.D))
    finally:
        ctypes.memset(ctypes.byref(ctx), 0, ctypes.sizeof(ctx))


def md5_resume(state: bytes, data: bytes) -> bytes | None:
    """The MD5 digest of (the 64-byte block whose chaining state is ``state``) followed by ``data``."""
    libs = _LIBS.load()
    if libs.md5_init is None or libs.md5_update is None or libs.md5_final is None or len(state) != 16:
        return None
    ctx = _MD5Ctx()
    digest = ctypes.create_string_buffer(16)
    try:
        libs.md5_init(ctypes.byref(ctx))
        ctx.A, ctx.B, ctx.C, ctx.D = (int.from_bytes(state[i : i + 4], "little") for i in range(0, 16, 4))
        ctx.Nl, ctx.Nh = _MD5_BLOCK * 8, 0  # one block (512 bits) already hashed
        libs.md5_update(ctypes.byref(ctx), data, len(data))
        libs.md5_final(digest, ctypes.byref(ctx))
        return digest.raw
    finally:
        ctypes.memset(ctypes.byref(ctx), 0, ctypes.sizeof(ctx))
