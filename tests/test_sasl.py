"""The sans-IO SASL mechanisms against their RFCs' examples: PLAIN (RFC 4616), LOGIN, CRAM-MD5 (RFC 2195),
SCRAM-SHA-1 (RFC 5802 §5) and SCRAM-SHA-256 (RFC 7677 §3)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from mailroster.backends.outcome import ScramCredentials
from mailroster.protocols import sasl
from mailroster.protocols.sasl import (
    Challenge,
    CheckCramMD5,
    CheckPassword,
    CramMD5,
    Failed,
    Login,
    LookupScram,
    Plain,
    Scram,
    Verified,
)


def scram_keys(password: str, salt: bytes, iterations: int, hash_name: str) -> ScramCredentials:
    """What a directory stores for SCRAM (RFC 5802 §3), computed from the password."""
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    return ScramCredentials(salt, iterations, hashlib.new(hash_name, client_key).digest(), server_key)


def scram_client_final(
    password: str, server_first: str, client_first_bare: str, hash_name: str, gs2: str = "n,,"
) -> tuple[str, str]:
    """A SCRAM client's final message and the server signature it expects back."""
    attrs = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(hashlib.new(hash_name, client_key).digest(), auth_message, hash_name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    server_signature = hmac.new(server_key, auth_message, hash_name).digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", f"v={base64.b64encode(server_signature).decode()}"


# PLAIN.


@pytest.mark.parametrize(
    ("data", "step"),
    [
        (b"\0alice@example.com\0secret", CheckPassword("alice@example.com", "secret")),
        (b"alice\0alice\0secret", CheckPassword("alice", "secret")),
        (b"bob@example.com\0admin\0adminpw", CheckPassword("admin", "adminpw", authzid="bob@example.com")),
        (b"\0alice\0", CheckPassword("alice", "")),
        (b"\0j\xc3\xbcrgen\0p\xc3\xa4ss word", CheckPassword("j\u00fcrgen", "p\u00e4ss word")),
        (b"\0alice\0secret\0", Failed("invalid input")),
        (b"alice\0secret", Failed("invalid input")),
        (b"", Failed("invalid input")),
        (b"\0\0secret", Failed("empty username")),
        (b"\0al\xffice\0secret", Failed("username is not UTF-8")),
        (b"\0alice\0\xff", Failed("password is not UTF-8")),
    ],
)
def test_plain(data: bytes, step: sasl.Step) -> None:
    assert Plain().start(data) == step


def test_plain_without_initial_response_asks_with_an_empty_challenge() -> None:
    mech = Plain()
    assert mech.start(None) == Challenge(b"")
    assert mech.step(b"\0alice\0secret") == CheckPassword("alice", "secret")
    assert isinstance(mech.step(b"\0alice\0secret"), Failed)  # no second try within one exchange


def test_plain_empty_initial_response_is_a_response() -> None:
    assert isinstance(Plain().start(b""), Failed)


# LOGIN.


@pytest.mark.parametrize("initial", [None, b""])
def test_login_asks_username_then_password(initial: bytes | None) -> None:
    mech = Login()
    assert mech.start(initial) == Challenge(b"Username:")
    assert mech.step(b"alice@example.com") == Challenge(b"Password:")
    assert mech.step(b"secret") == CheckPassword("alice@example.com", "secret")
    assert isinstance(mech.step(b"again"), Failed)


def test_login_initial_response_is_the_username() -> None:
    mech = Login()
    assert mech.start(b"alice@example.com") == Challenge(b"Password:")
    assert mech.step(b"") == CheckPassword("alice@example.com", "")


@pytest.mark.parametrize("username", [b"", b"a\0b", b"\xff"])
def test_login_refuses_bad_usernames(username: bytes) -> None:
    mech = Login()
    mech.start(None)
    assert isinstance(mech.step(username), Failed)


# CRAM-MD5 (RFC 2195 §2).

RFC2195_CHALLENGE = b"<1896.697170952@postoffice.reston.mci.net>"
RFC2195_DIGEST = "b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_rfc2195_example() -> None:
    mech = CramMD5(challenge=RFC2195_CHALLENGE)
    assert mech.start(None) == Challenge(RFC2195_CHALLENGE)
    step = mech.step(b"tim " + RFC2195_DIGEST.encode())
    assert step == CheckCramMD5("tim", RFC2195_CHALLENGE, bytes.fromhex(RFC2195_DIGEST))
    # What the directory then computes from the stored password:
    assert hmac.new(b"tanstaaftanstaaf", RFC2195_CHALLENGE, "md5").hexdigest() == RFC2195_DIGEST


def test_cram_md5_username_may_contain_spaces() -> None:
    mech = CramMD5(challenge=RFC2195_CHALLENGE)
    mech.start(None)
    step = mech.step(b"tim the enchanter " + RFC2195_DIGEST.upper().encode())
    assert isinstance(step, CheckCramMD5)
    assert step.login == "tim the enchanter"
    assert step.digest == bytes.fromhex(RFC2195_DIGEST)


@pytest.mark.parametrize(
    "response",
    [b"tim", b" " + RFC2195_DIGEST.encode(), b"tim " + RFC2195_DIGEST[:-2].encode(), b"tim " + b"zz" * 16, b"t\0m 00"],
)
def test_cram_md5_refuses_bad_responses(response: bytes) -> None:
    mech = CramMD5(challenge=RFC2195_CHALLENGE)
    mech.start(None)
    assert isinstance(mech.step(response), Failed)


def test_cram_md5_challenge_format() -> None:
    first, second = CramMD5(hostname="mx.example.org"), CramMD5(hostname="mx.example.org")
    assert re.fullmatch(rb"<\d{16}\.\d{10,}@mx\.example\.org>", first.challenge)
    assert first.challenge != second.challenge
    assert first.start(b"ignored") == Challenge(first.challenge)


# SCRAM (RFC 5802 §5, RFC 7677 §3).

RFC_VECTORS = {
    "SCRAM-SHA-1": {
        "hash": "sha1",
        "salt": "QSXCR+Q6sek8bf92",
        "client_first": "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        "snonce": "3rfcNHYJY1ZVvWVs7j",
        "server_first": "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        "client_final": "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        "server_final": "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    },
    "SCRAM-SHA-256": {
        "hash": "sha256",
        "salt": "W22ZaJ0SNY7soEsUEjb6gQ==",
        "client_first": "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        "snonce": "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        "server_first": "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        "client_final": "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        "server_final": "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    },
}


def rfc_keys(name: str, password: str = "pencil") -> ScramCredentials:
    vector = RFC_VECTORS[name]
    return scram_keys(password, base64.b64decode(vector["salt"]), 4096, vector["hash"])


@pytest.mark.parametrize("name", sorted(RFC_VECTORS))
def test_scram_rfc_example(name: str) -> None:
    vector = RFC_VECTORS[name]
    mech = Scram(name, server_nonce=vector["snonce"])
    assert mech.start(vector["client_first"].encode()) == LookupScram("user", name.removeprefix("SCRAM-"))
    assert mech.credentials(rfc_keys(name)) == Challenge(vector["server_first"].encode())
    assert mech.step(vector["client_final"].encode()) == Verified(vector["server_final"].encode())
    assert isinstance(mech.step(b""), Failed)


@pytest.mark.parametrize("name", sorted(RFC_VECTORS))
def test_scram_rfc_example_with_wrong_stored_password(name: str) -> None:
    vector = RFC_VECTORS[name]
    mech = Scram(name, server_nonce=vector["snonce"])
    mech.start(vector["client_first"].encode())
    assert mech.credentials(rfc_keys(name, "crayon")) == Challenge(vector["server_first"].encode())
    assert mech.step(vector["client_final"].encode()) == Failed("password mismatch")


def test_scram_client_first_may_come_in_a_continuation() -> None:
    vector = RFC_VECTORS["SCRAM-SHA-1"]
    mech = Scram("SCRAM-SHA-1", server_nonce=vector["snonce"])
    assert mech.start(None) == Challenge(b"")
    assert mech.step(vector["client_first"].encode()) == LookupScram("user", "SHA-1")


@pytest.mark.parametrize("name", sorted(RFC_VECTORS))
def test_scram_unknown_user_runs_the_exchange_and_fails_at_the_proof(name: str) -> None:
    vector = RFC_VECTORS[name]
    mech = Scram(name, server_nonce=vector["snonce"])
    mech.start(vector["client_first"].encode())
    challenge = mech.credentials(None)
    assert isinstance(challenge, Challenge)
    match = re.fullmatch(r"r=(\S+),s=(\S+),i=4096", challenge.data.decode())
    assert match is not None
    assert match.group(1) == vector["client_first"].rpartition("r=")[2] + vector["snonce"]
    assert len(base64.b64decode(match.group(2))) == 16
    cnonce = vector["client_first"].rpartition("r=")[2]
    final, _ = scram_client_final("pencil", challenge.data.decode(), f"n=user,r={cnonce}", vector["hash"])
    assert mech.step(final.encode()) == Failed("unknown user")


def test_scram_made_up_salt_is_stable_per_user() -> None:
    def salt(user: str) -> str:
        mech = Scram("SCRAM-SHA-256", server_nonce="s")
        mech.start(f"n,,n={user},r=c".encode())
        challenge = mech.credentials(None)
        assert isinstance(challenge, Challenge)
        return challenge.data.decode().split(",")[1]

    assert salt("ghost") == salt("ghost")
    assert salt("ghost") != salt("phantom")


def exchange(name: str, client_first: str, *, password: str = "pencil", gs2: str = "n,,") -> sasl.Step:
    """Run a whole exchange with a correct client; the result of the final step."""
    hash_name = RFC_VECTORS[name]["hash"]
    mech = Scram(name)
    lookup = mech.start(client_first.encode())
    assert isinstance(lookup, LookupScram)
    challenge = mech.credentials(scram_keys("pencil", b"salty", 4096, hash_name))
    assert isinstance(challenge, Challenge)
    bare = client_first[len(gs2) :]
    final, expected = scram_client_final(password, challenge.data.decode(), bare, hash_name, gs2)
    step = mech.step(final.encode())
    if isinstance(step, Verified):
        assert step.final == expected.encode()
    return step


@pytest.mark.parametrize("name", sorted(RFC_VECTORS))
def test_scram_full_exchange_with_random_nonce(name: str) -> None:
    assert isinstance(exchange(name, "n,,n=user,r=abcdef"), Verified)
    assert isinstance(exchange(name, "n,,n=user,r=abcdef", password="crayon"), Failed)


def test_scram_accepts_y_flag_and_binds_the_header() -> None:
    assert isinstance(exchange("SCRAM-SHA-256", "y,,n=user,r=abcdef", gs2="y,,"), Verified)


def test_scram_authzid_equal_to_the_user_is_accepted() -> None:
    assert isinstance(exchange("SCRAM-SHA-256", "n,a=user,n=user,r=abc", gs2="n,a=user,"), Verified)


def test_scram_username_escapes() -> None:
    mech = Scram("SCRAM-SHA-1")
    assert mech.start(b"n,,n=a=2Cb=3Dc,r=x") == LookupScram("a,b=c", "SHA-1")


@pytest.mark.parametrize(
    ("client_first", "code", "public"),
    [
        ("p=tls-unique,,n=user,r=abc", "", "Channel binding not supported"),
        ("n,a=admin,n=user,r=abc", "authz_fail", "Authorization identity not supported with SCRAM"),
        ("x,,n=user,r=abc", "", ""),
        ("n,user,n=user,r=abc", "", ""),
        ("n,a=ad=4Dmin,n=user,r=abc", "", ""),
        ("n,,m=ext,n=user,r=abc", "", ""),
        ("n,,n=us=41er,r=abc", "", ""),
        ("n,,n=,r=abc", "", ""),
        ("n,,u=user,r=abc", "", ""),
        ("n,,n=user", "", ""),
        ("n,,n=user,r=", "", ""),
        ("n,,n=user,nonce", "", ""),
        ("n,", "", ""),
        ("", "", ""),
    ],
)
def test_scram_refuses_bad_client_first(client_first: str, code: str, public: str) -> None:
    step = Scram("SCRAM-SHA-256").start(client_first.encode())
    assert isinstance(step, Failed)
    assert (step.code, step.public) == (code, public)


def test_scram_refuses_non_utf8() -> None:
    assert isinstance(Scram("SCRAM-SHA-256").start(b"n,,n=\xff,r=abc"), Failed)


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda final: final.replace("c=biws", "c=eSws"), "invalid channel binding data"),
        (lambda final: final.replace(",r=fyko", ",r=fyKo"), "wrong nonce"),
        (lambda final: final.replace(",p=", ",x="), "invalid ClientProof"),
        (lambda final: final.rpartition(",")[0] + ",p=AAAA", "invalid ClientProof length"),
        (lambda final: final.rpartition(",")[0] + ",p=!!!", "invalid base64 in ClientProof"),
        (lambda final: "c=biws,p=x", "invalid client-final-message"),
    ],
)
def test_scram_refuses_bad_client_final(mangle: object, reason: str) -> None:
    vector = RFC_VECTORS["SCRAM-SHA-1"]
    mech = Scram("SCRAM-SHA-1", server_nonce=vector["snonce"])
    mech.start(vector["client_first"].encode())
    mech.credentials(rfc_keys("SCRAM-SHA-1"))
    assert callable(mangle)
    assert mech.step(mangle(vector["client_final"]).encode()) == Failed(reason)


def test_scram_extensions_before_the_proof_are_part_of_the_signed_message() -> None:
    name, hash_name = "SCRAM-SHA-256", "sha256"
    mech = Scram(name)
    mech.start(b"n,,n=user,r=abc")
    challenge = mech.credentials(scram_keys("pencil", b"salt", 4096, hash_name))
    assert isinstance(challenge, Challenge)
    final, _ = scram_client_final("pencil", challenge.data.decode(), "n=user,r=abc", hash_name)
    without_proof, _, proof = final.rpartition(",")
    # The proof was computed without the extension: adding one must invalidate it.
    assert isinstance(mech.step(f"{without_proof},x=ext,{proof}".encode()), Failed)


def test_scram_keys_of_the_wrong_size_count_as_none() -> None:
    mech = Scram("SCRAM-SHA-256", server_nonce="s")
    mech.start(b"n,,n=user,r=c")
    sha1_keys = rfc_keys("SCRAM-SHA-1")
    assert isinstance(mech.credentials(sha1_keys), Challenge)
    final, _ = scram_client_final("pencil", "r=cs,s=QSXCR+Q6sek8bf92,i=4096", "n=user,r=c", "sha256")
    assert isinstance(mech.step(final.encode()), Failed)


def test_steps_out_of_order_fail() -> None:
    assert isinstance(Scram("SCRAM-SHA-1").credentials(None), Failed)
    assert isinstance(CramMD5(challenge=b"<1.2@h>").step(b"tim 00"), Failed)
    assert isinstance(Plain().step(b"\0a\0b"), Failed)


def test_secrets_stay_out_of_repr() -> None:
    assert "hunter2" not in repr(CheckPassword("alice", "hunter2"))
    assert "deadbeef" not in repr(CheckCramMD5("alice", b"<c>", bytes.fromhex("deadbeef")))


@pytest.mark.parametrize(
    ("name", "kind"),
    [("PLAIN", Plain), ("LOGIN", Login), ("CRAM-MD5", CramMD5), ("SCRAM-SHA-1", Scram), ("SCRAM-SHA-256", Scram)],
)
def test_create(name: str, kind: type[sasl.Mechanism]) -> None:
    mech = sasl.create(name, hostname="h")
    assert isinstance(mech, kind)
    assert mech.name == name


@pytest.mark.parametrize("name", ["plain", "XOAUTH2", "OAUTHBEARER", "ANONYMOUS", "GSSAPI", ""])
def test_create_unknown(name: str) -> None:
    assert sasl.create(name) is None
