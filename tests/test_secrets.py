"""Password secrets against the real Dovecot (``doveadm pw``) and against published vectors.

Hashes made by ``doveadm pw -s SCHEME`` at test time must verify, and what :func:`hash_password` makes must pass
``doveadm pw -t``; doveadm is skipped without it, and fails the run under CI=true. The fixed vectors in
``tests/data/secrets/`` (RFCs, passlib, Drepper's SHA-crypt, the Argon2 reference, Stalwart's documentation, and
hashes doveadm made once) run everywhere.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mailroster.backends import secrets
from mailroster.backends.secrets import UnsupportedScheme

from conftest import require_tool

DATA = Path(__file__).parent / "data" / "secrets"
VECTORS = json.loads((DATA / "vectors.json").read_text(encoding="utf-8"))
DOVEADM_MADE = json.loads((DATA / "doveadm.json").read_text(encoding="utf-8"))

PASSWORD = "Dovecot ünïcödé pencil 9"
WRONG = "dovecot ünïcödé pencil 9"  # differs in the first 8 bytes: DES reads only those

# Every scheme doveadm pw makes that mailroster verifies, with encoding suffixes where Dovecot allows them.
DOVEADM_SCHEMES = (
    *(s for s in secrets.SCHEMES if s not in ("ARGON2", "SCRYPT", "PLAIN-TRUNC")),
    "SHA256.HEX",
    "SHA512.B64",
    "PLAIN.B64",
    "PLAIN.HEX",
    "SSHA.HEX",
    "SHA512-CRYPT.B64",
)
# Schemes hash_password makes that Dovecot 2.3 has no name for.
NOT_DOVECOT = frozenset({"ARGON2", "SCRYPT"})
# Cheap costs where the scheme takes one, to keep the suite fast.
CHEAP_ROUNDS = {"BLF-CRYPT": 4, "SCRYPT": 10, "SHA512-CRYPT": 1000, "SHA256-CRYPT": 1000}


def doveadm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("doveadm"), "-c", "/dev/null", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="session")
def doveadm_hashes() -> dict[str, str]:
    """One hash per scheme, made now by the installed doveadm pw."""
    require_tool("doveadm")

    def make(scheme: str) -> str:
        result = doveadm("pw", "-s", scheme, "-p", PASSWORD)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(DOVEADM_SCHEMES, pool.map(make, DOVEADM_SCHEMES), strict=True))


# Hashes made by doveadm at test time and once, stored.


@pytest.mark.parametrize("scheme", DOVEADM_SCHEMES)
def test_doveadm_hash_verifies(doveadm_hashes: dict[str, str], scheme: str) -> None:
    stored = doveadm_hashes[scheme]
    assert secrets.identify(stored) == scheme.partition(".")[0]
    assert secrets.verify_sync(stored, PASSWORD)
    assert not secrets.verify_sync(stored, WRONG)
    if scheme != "DES-CRYPT":  # DES reads only the first 8 bytes
        assert not secrets.verify_sync(stored, PASSWORD + "x")


@pytest.mark.parametrize("scheme", sorted(DOVEADM_MADE["hashes"]))
def test_stored_doveadm_hash_verifies(scheme: str) -> None:
    stored, password = DOVEADM_MADE["hashes"][scheme], DOVEADM_MADE["password"]
    assert secrets.identify(stored) == scheme.partition(".")[0].partition(" ")[0]
    assert secrets.verify_sync(stored, password)
    assert not secrets.verify_sync(stored, "d" + password[1:])


# Published vectors.


@pytest.mark.parametrize("vector", VECTORS["known"], ids=lambda v: f"{v['scheme']}:{v['source']}")
def test_known_vector(vector: dict[str, str]) -> None:
    assert secrets.identify(vector["secret"]) == vector["scheme"]
    assert secrets.verify_sync(vector["secret"], vector["password"])
    assert not secrets.verify_sync(vector["secret"], vector.get("wrong", vector["password"] + "x"))
    assert not secrets.verify_sync(vector["secret"], "")


@pytest.mark.parametrize("vector", VECTORS["scram"], ids=lambda v: v["source"])
def test_scram_rfc_exchange(vector: dict[str, Any]) -> None:
    """The keys derived from "pencil" with the RFC's salt and iterations check the RFC's client proof and make its
    server signature; stored in Dovecot's format, the same keys come back and verify the password."""
    salt = base64.b64decode(vector["salt"])
    keys = secrets.scram_keys(vector["password"], vector["algorithm"], salt, vector["iterations"])
    digest = "sha1" if vector["algorithm"] == "SHA-1" else "sha256"
    auth_message = ",".join(
        (vector["client_first_bare"], vector["server_first"], vector["client_final_without_proof"])
    ).encode()
    client_signature = hmac.new(keys.stored_key, auth_message, digest).digest()
    proof = base64.b64decode(vector["client_proof"])
    client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
    assert hashlib.new(digest, client_key).digest() == keys.stored_key
    server_signature = hmac.new(keys.server_key, auth_message, digest).digest()
    assert base64.b64encode(server_signature).decode() == vector["server_signature"]

    scheme = f"SCRAM-{vector['algorithm']}"
    fields = (vector["salt"], base64.b64encode(keys.stored_key).decode(), base64.b64encode(keys.server_key).decode())
    stored = f"{{{scheme}}}{vector['iterations']},{','.join(fields)}"
    assert secrets.scram_credentials(stored, vector["algorithm"]) == keys
    assert secrets.verify_sync(stored, vector["password"])
    assert not secrets.verify_sync(stored, "pencil2")
    other = "SHA-256" if vector["algorithm"] == "SHA-1" else "SHA-1"
    assert secrets.scram_credentials(stored, other) is None


def test_scram_from_plaintext_is_stable_per_user_and_matches_password() -> None:
    first = secrets.scram_credentials("{PLAIN}pencil", "SHA-256", user="jane")
    again = secrets.scram_credentials("pencil", "SCRAM-SHA-256", user="Jane")
    other_user = secrets.scram_credentials("{PLAIN}pencil", "SHA-256", user="john")
    assert first is not None and again is not None and other_user is not None
    assert first == again
    assert first.iterations == 4096 and len(first.salt) == 16
    assert other_user.salt != first.salt
    assert secrets.scram_keys("pencil", "SHA-256", first.salt, first.iterations) == first
    assert secrets.scram_credentials("{SHA512-CRYPT}$6$saltstring$x", "SHA-1") is None
    with pytest.raises(ValueError):
        secrets.scram_credentials("{PLAIN}pencil", "SHA-512")


@pytest.mark.parametrize("vector", VECTORS["cram_md5"], ids=lambda v: v["source"])
def test_cram_md5_rfc2195(vector: dict[str, str]) -> None:
    challenge = vector["challenge"].encode()
    context = secrets.hash_password(vector["password"], "CRAM-MD5")
    for secret in (vector["password"], f"{{PLAIN}}{vector['password']}", context, f"$app$mua${context}"):
        digest = secrets.cram_md5_digest(secret, challenge)
        assert digest is not None and digest.hex() == vector["digest"]
    doveadm_made = next(v["secret"] for v in VECTORS["known"] if v["scheme"] == "CRAM-MD5")
    digest = secrets.cram_md5_digest(doveadm_made, challenge)
    assert digest is not None and digest.hex() == vector["digest"]
    assert secrets.cram_md5_digest("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", challenge) is None


def test_cram_md5_digest_from_doveadm_context(doveadm_hashes: dict[str, str]) -> None:
    challenge = b"<12345.6789@mail.example.org>"
    expected = hmac.new(PASSWORD.encode(), challenge, "md5").digest()
    assert secrets.cram_md5_digest(doveadm_hashes["CRAM-MD5"], challenge) == expected
    assert secrets.cram_md5_digest(doveadm_hashes["HMAC-MD5"], challenge) == expected


# hash_password.

PRODUCED = (*secrets.HASH_SCHEMES, "SHA256.HEX", "PLAIN.B64", "SSHA512.hex", "SHA512-CRYPT.b64")


@pytest.mark.parametrize("scheme", PRODUCED)
def test_hash_password_round_trip(scheme: str) -> None:
    name = scheme.partition(".")[0].upper()
    stored = secrets.hash_password(PASSWORD, scheme, rounds=CHEAP_ROUNDS.get(name))
    if name == "SCRYPT":
        assert stored.startswith("$scrypt$ln=10,r=8,p=1$")
    else:
        assert stored.startswith("{" + scheme.upper() + "}")
    assert secrets.identify(stored) == name
    assert secrets.verify_sync(stored, PASSWORD)
    assert not secrets.verify_sync(stored, WRONG)


@pytest.mark.parametrize("scheme", [s for s in PRODUCED if s.partition(".")[0].upper() not in NOT_DOVECOT])
def test_doveadm_accepts_hash_password(scheme: str) -> None:
    name = scheme.partition(".")[0].upper()
    stored = secrets.hash_password(PASSWORD, scheme, rounds=CHEAP_ROUNDS.get(name))
    accepted = doveadm("pw", "-t", stored, "-p", PASSWORD)
    assert accepted.returncode == 0, accepted.stderr
    assert "(verified)" in accepted.stdout
    rejected = doveadm("pw", "-t", stored, "-p", WRONG)
    assert rejected.returncode != 0


def test_hash_password_defaults() -> None:
    assert secrets.hash_password(PASSWORD).startswith("{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$")
    assert secrets.hash_password(PASSWORD, "argon2i").startswith("{ARGON2I}$argon2i$v=19$m=32768,t=4,p=1$")
    assert secrets.hash_password(PASSWORD, "SHA512-CRYPT").startswith("{SHA512-CRYPT}$6$")
    assert "rounds=" not in secrets.hash_password(PASSWORD, "SHA512-CRYPT")  # 5000, like doveadm
    assert secrets.hash_password(PASSWORD, "SHA512-CRYPT", rounds=6000).startswith("{SHA512-CRYPT}$6$rounds=6000$")
    assert secrets.hash_password(PASSWORD, "BLF-CRYPT").startswith("{BLF-CRYPT}$2y$10$")
    assert secrets.hash_password(PASSWORD, "MD5").startswith("{MD5}$1$")  # Dovecot's MD5 is MD5-CRYPT
    assert secrets.hash_password(PASSWORD, "PBKDF2").split("$")[3] == "5000"
    assert secrets.hash_password(PASSWORD, "SCRAM-SHA-256").startswith("{SCRAM-SHA-256}4096,")
    assert secrets.hash_password("pencil", "PLAIN") == "{PLAIN}pencil"
    assert secrets.hash_password("pencil", "plain-md5") == "{PLAIN-MD5}" + hashlib.md5(b"pencil").hexdigest()


def test_hash_password_refusals() -> None:
    with pytest.raises(UnsupportedScheme):
        secrets.hash_password(PASSWORD, "NO-SUCH-SCHEME")
    with pytest.raises(UnsupportedScheme, match="NTLM"):
        secrets.hash_password(PASSWORD, "NTLM")
    with pytest.raises(UnsupportedScheme):
        secrets.hash_password(PASSWORD, "SHA256.zip")
    with pytest.raises(ValueError):
        secrets.hash_password(PASSWORD, "PLAIN-TRUNC")
    with pytest.raises(ValueError):
        secrets.hash_password("", "SHA512-CRYPT")
    with pytest.raises(ValueError):
        secrets.hash_password("nul\0inside", "SSHA512")
    with pytest.raises(ValueError):
        secrets.hash_password("x" * 73, "BLF-CRYPT")
    with pytest.raises(ValueError):
        secrets.hash_password(PASSWORD, "MD5-CRYPT", rounds=1000)


# identify, plaintext, app passwords, Dovecot's form.


@pytest.mark.parametrize(
    ("secret", "scheme"),
    [
        ("{ssha512}AAAA", "SSHA512"),
        ("{Sha256.Hex}00", "SHA256"),
        ("{SCRAM-SHA-256}4096,a,b,c", "SCRAM-SHA-256"),
        ("$argon2id$v=19$...", "ARGON2ID"),
        ("$argon2i$v=19$...", "ARGON2I"),
        ("$argon2d$v=19$...", "ARGON2"),
        ("$2b$10$...", "BLF-CRYPT"),
        ("$2a$10$...", "BLF-CRYPT"),
        ("$6$salt$hash", "SHA512-CRYPT"),
        ("$5$salt$hash", "SHA256-CRYPT"),
        ("$1$salt$hash", "MD5-CRYPT"),
        ("$y$j9T$salt$hash", "CRYPT"),
        ("_J9..wxaNf4u1EqKJLig", "CRYPT"),
        ("$pbkdf2-sha256$29000$salt$hash", "PBKDF2"),
        ("$scrypt$ln=16,r=8,p=1$salt$hash", "SCRYPT"),
        ("$app$phone$$6$salt$hash", "SHA512-CRYPT"),
        ("$app$phone${SSHA}AAAA", "SSHA"),
        ("$app$phone$plain words", "PLAIN"),
        ("otpauth://totp/jane?secret=JBSWY3DPEHPK3PXP", "TOTP"),
        ("just a password", "PLAIN"),
        ("$money", "PLAIN"),
        ("{unclosed", "PLAIN"),
        ("_short", "PLAIN"),
        ("", "PLAIN"),
    ],
)
def test_identify(secret: str, scheme: str) -> None:
    assert secrets.identify(secret) == scheme


@pytest.mark.parametrize("secret", ["{FOO}bar", "{}x", "{SHA.zip}x", "$7x$abc$def", "$nthash$x", "{NTLM}00"])
def test_identify_unknown(secret: str) -> None:
    with pytest.raises(UnsupportedScheme):
        secrets.identify(secret)


def test_unknown_tag_is_not_repeated() -> None:
    with pytest.raises(UnsupportedScheme) as raised:
        secrets.identify("{my-secret-word}rest")
    assert "my-secret-word" not in str(raised.value)
    assert "my-secret-word" not in repr(raised.value)


def test_plaintext_of() -> None:
    assert secrets.plaintext_of("{PLAIN}pencil") == "pencil"
    assert secrets.plaintext_of("{clear}pencil") == "pencil"
    assert secrets.plaintext_of("{CLEARTEXT}pencil") == "pencil"
    assert secrets.plaintext_of("{PLAIN.b64}cGVuY2ls") == "pencil"
    assert secrets.plaintext_of("{PLAIN.HEX}70656e63696c") == "pencil"
    assert secrets.plaintext_of("pencil") == "pencil"
    assert secrets.plaintext_of("$app$phone$pencil") == "pencil"
    for secret in ("", "{PLAIN}", "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "$6$salt$hash", "{FOO}x", "{PLAIN-TRUNC}3-abc"):
        assert secrets.plaintext_of(secret) is None


def test_app_password_name() -> None:
    assert secrets.app_password_name("$app$phone$$6$salt$hash") == "phone"
    assert secrets.app_password_name("$6$salt$hash") is None


@pytest.mark.parametrize(
    ("secret", "form"),
    [
        ("{SHA512-CRYPT}$6$x$y", "{SHA512-CRYPT}$6$x$y"),
        ("$6$x$y", "{SHA512-CRYPT}$6$x$y"),
        ("$y$j9T$x$y", "{CRYPT}$y$j9T$x$y"),
        ("$2y$05$abc", "{BLF-CRYPT}$2y$05$abc"),
        ("{ARGON2}$argon2id$v=19$m=1,t=1,p=1$a$b", "{ARGON2ID}$argon2id$v=19$m=1,t=1,p=1$a$b"),
        ("$argon2i$v=19$m=1,t=1,p=1$a$b", "{ARGON2I}$argon2i$v=19$m=1,t=1,p=1$a$b"),
        ("{sha256.hex}00", "{SHA256.HEX}00"),
        ("pencil", "{PLAIN}pencil"),
        ("$app$phone$pencil", "{PLAIN}pencil"),
        ("{PBKDF2}$1$salt$4096$00", "{PBKDF2}$1$salt$4096$00"),
        ("$pbkdf2-sha256$1212$a$b", None),
        ("$scrypt$ln=16,r=8,p=1$a$b", None),
        ("$argon2d$v=19$m=1,t=1,p=1$a$b", None),
        ("otpauth://totp/jane?secret=JBSWY3DPEHPK3PXP", None),
        ("{FOO}bar", None),
        ("", None),
    ],
)
def test_dovecot_form(secret: str, form: str | None) -> None:
    assert secrets.dovecot_form(secret) == form


# Secrets that never verify.


@pytest.mark.parametrize("secret", VECTORS["malformed"])
def test_malformed_secret_is_false_without_raising(secret: str) -> None:
    assert secrets.verify_sync(secret, "password") is False
    assert secrets.verify_sync(secret, secret) is False
    assert asyncio.run(secrets.verify(secret, "password")) is False


def test_empty_secret_or_password_never_verifies() -> None:
    for secret, password in [("", ""), ("", "x"), ("{PLAIN}", ""), ("{PLAIN}", "x"), ("$app$x$", ""), ("x", "")]:
        assert not secrets.verify_sync(secret, password)
    assert not secrets.verify_sync("{PLAIN}a\0b", "a\0b")


def test_log_of_malformed_secrets_holds_no_secret(caplog: pytest.LogCaptureFixture) -> None:
    password = "Pa55-Marker-q9Zx"
    caplog.set_level(logging.DEBUG)
    for secret in VECTORS["malformed"]:
        secrets.verify_sync(secret, password)
        secrets.scram_credentials(secret, "SHA-256")
        secrets.cram_md5_digest(secret, b"<1@x>")
    assert any(record.levelno == logging.WARNING for record in caplog.records)
    logged = caplog.text + "".join(repr(record.args) for record in caplog.records)
    assert password not in logged
    for secret in VECTORS["malformed"]:
        payload = secret.partition("}")[2] if secret.startswith("{") else secret
        for part in (secret, payload):
            if len(part) >= 6:
                assert part not in logged


def test_credentials_repr_holds_no_key() -> None:
    credentials = secrets.scram_keys("pencil", "SHA-256", b"salt-salt", 4096)
    text = repr(credentials)
    assert base64.b64encode(credentials.stored_key).decode() not in text
    assert repr(credentials.stored_key) not in text and repr(credentials.server_key) not in text


# verify: slow hashes off the event loop.


def test_verify_runs_slow_hashes_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = secrets.hash_password(PASSWORD, "ARGON2ID")
    started = time.perf_counter()
    assert secrets.verify_sync(stored, PASSWORD)
    one_verify = time.perf_counter() - started

    threads: set[str] = set()
    real_verify_sync = secrets.verify_sync

    def recording(secret: str, password: str) -> bool:
        threads.add(threading.current_thread().name)
        return real_verify_sync(secret, password)

    monkeypatch.setattr(secrets, "verify_sync", recording)

    async def main() -> tuple[list[bool], int, float]:
        done = asyncio.Event()
        ticks, longest = 0, 0.0

        async def ticker() -> None:
            nonlocal ticks, longest
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                ticks, longest = ticks + 1, max(longest, now - last)
                last = now

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        results = await asyncio.gather(*(secrets.verify(stored, PASSWORD if i % 2 else WRONG) for i in range(20)))
        done.set()
        await task
        return results, ticks, longest

    results, ticks, longest = asyncio.run(main())
    assert results == [bool(i % 2) for i in range(20)]
    assert threads and all(name.startswith("mailroster-hash") for name in threads)
    # On the loop, each verification would have stopped the ticker for a whole verification.
    assert ticks > 100
    assert longest < one_verify * 0.75, (longest, one_verify)


def test_verify_bounds_work_in_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    stored = secrets.hash_password(PASSWORD, "SHA512-CRYPT", rounds=20000)
    real_pool = secrets._get_executor()
    in_pool, most = 0, 0
    lock = threading.Lock()

    class CountingPool:
        def submit(self, fn: Callable[..., bool], /, *args: Any) -> Future[bool]:
            nonlocal in_pool, most
            with lock:
                in_pool += 1
                most = max(most, in_pool)
            job = real_pool.submit(fn, *args)
            job.add_done_callback(finished)
            return job

    def finished(_: Future[bool]) -> None:
        nonlocal in_pool
        with lock:
            in_pool -= 1

    monkeypatch.setattr(secrets, "_MAX_PENDING", 3)
    monkeypatch.setattr(secrets, "_get_executor", CountingPool)

    async def main() -> list[bool]:
        return await asyncio.gather(*(secrets.verify(stored, PASSWORD) for _ in range(12)))

    assert asyncio.run(main()) == [True] * 12
    assert most == 3


def test_verify_cheap_schemes_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pool() -> None:
        raise AssertionError("a cheap scheme went to the thread pool")

    monkeypatch.setattr(secrets, "_get_executor", no_pool)
    for secret in ("{PLAIN}pencil", "pencil", "{SHA}" + base64.b64encode(hashlib.sha1(b"pencil").digest()).decode()):
        assert asyncio.run(secrets.verify(secret, "pencil"))
