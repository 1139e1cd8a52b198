"""Address and domain normalisation: case folding, IDNA, ``+detail`` stripping, lookup candidates."""

from __future__ import annotations

import pytest

from mailroster.backends.address import candidates, normalize_address, normalize_domain, split_address, strip_detail

# normalize_domain


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("example.org", "example.org"),
        ("Example.ORG", "example.org"),
        ("EXAMPLE.ORG.", "example.org"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("Bücher.Example.", "xn--bcher-kva.example"),
        ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),  # an A-label is only case-folded
        ("straße.example", "xn--strae-oqa.example"),  # UTS#46 non-transitional: ß is kept, not mapped to "ss"
    ],
)
def test_normalize_domain(raw: str, expected: str) -> None:
    assert normalize_domain(raw) == expected


def test_normalize_domain_is_idempotent() -> None:
    once = normalize_domain("BÜCHER.Example.")
    assert normalize_domain(once) == once


@pytest.mark.parametrize(
    "raw",
    [
        "ü..example",  # empty label
        "-ü.example",  # leading hyphen
        "ü" * 64 + ".example",  # label longer than 63 octets
        "exa mplü.example",  # a space is not allowed
    ],
)
def test_normalize_domain_rejects_invalid_idn(raw: str) -> None:
    with pytest.raises(ValueError, match="invalid domain"):
        normalize_domain(raw)


@pytest.mark.parametrize("raw", ["A..example", "-a.Example", "exa mple.example"])
def test_normalize_domain_only_folds_malformed_ascii_domains(raw: str) -> None:
    """Documented: the ASCII fast path does not validate; a malformed domain matches nothing downstream."""
    assert normalize_domain(raw) == raw.lower()


# normalize_address


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("jane@example.org", "jane@example.org"),
        ("Jane.Doe@Example.ORG", "jane.doe@example.org"),
        ("JANE+Tag@EXAMPLE.org", "jane+tag@example.org"),  # detail is kept: stripping is strip_detail's job
        ("Jane@BÜCHER.example", "jane@xn--bcher-kva.example"),
        ("Jöhn@Example.ORG", "jöhn@example.org"),  # a UTF-8 local part is lower-cased, not encoded
        ("jane@Bücher.example.", "jane@xn--bcher-kva.example"),
        ("@Example.COM", "@example.com"),  # catch-all keeps its empty local part
        ("@BÜCHER.example", "@xn--bcher-kva.example"),
        ('"a@b"@Example.org', '"a@b"@example.org'),  # split at the last "@"
    ],
)
def test_normalize_address(raw: str, expected: str) -> None:
    assert normalize_address(raw) == expected


def test_normalize_address_strips_trailing_dot_of_ascii_domain() -> None:
    assert normalize_address("Jane@Example.ORG.") == "jane@example.org"


@pytest.mark.parametrize("raw", ["no-at-sign", "", "jane@", "@", "jane@ü..example", "ü@-ü.example"])
def test_normalize_address_rejects(raw: str) -> None:
    with pytest.raises(ValueError):
        normalize_address(raw)


def test_split_address() -> None:
    assert split_address("jane+tag@example.org") == ("jane+tag", "example.org")
    assert split_address("@example.org") == ("", "example.org")
    assert split_address('"a@b"@example.org') == ('"a@b"', "example.org")


# strip_detail


@pytest.mark.parametrize(
    ("address", "separator", "expected"),
    [
        ("jane+tag@example.org", "+", "jane@example.org"),
        ("jane+tag+more@example.org", "+", "jane@example.org"),  # split at the first separator
        ("jane+@example.org", "+", "jane@example.org"),  # empty detail
        ("jane-tag@example.org", "+-", "jane@example.org"),
        ("jane+tag@example.org", "+-", "jane@example.org"),
        ("jane+a-b@example.org", "+-", "jane@example.org"),
        ("jane-a+b@example.org", "+-", "jane@example.org"),  # whichever separator comes first
        ("jane.doe-x+y@example.org", "+-", "jane.doe@example.org"),
        ("jane-tag@example.org", "+", None),  # "-" is not a separator here
        ("jane@example.org", "+", None),  # no detail
        ("jane@example.org", "+-", None),
        ("+foo@example.org", "+", None),  # a leading separator is the local part, not a detail
        ("-foo@example.org", "+-", None),
        ("jane+tag@example.org", "", None),  # empty separator disables stripping
        ("@example.org", "+", None),  # a catch-all has nothing to strip
    ],
)
def test_strip_detail(address: str, separator: str, expected: str | None) -> None:
    assert strip_detail(address, separator) == expected


def test_strip_detail_leaves_the_domain_alone() -> None:
    assert strip_detail("jane+tag@sub+domain.example", "+") == "jane@sub+domain.example"


# candidates


@pytest.mark.parametrize(
    ("address", "separator", "catch_all", "expected"),
    [
        ("jane+tag@example.org", "+", True, ["jane+tag@example.org", "jane@example.org", "@example.org"]),
        ("jane+tag@example.org", "+", False, ["jane+tag@example.org", "jane@example.org"]),
        ("jane@example.org", "+", True, ["jane@example.org", "@example.org"]),
        ("jane@example.org", "+", False, ["jane@example.org"]),
        ("jane+tag@example.org", "", True, ["jane+tag@example.org", "@example.org"]),
        ("jane-tag@example.org", "+-", True, ["jane-tag@example.org", "jane@example.org", "@example.org"]),
        ("+foo@example.org", "+", True, ["+foo@example.org", "@example.org"]),
        ("@example.org", "+", True, ["@example.org"]),  # the catch-all key yields only itself
        ("@example.org", "+", False, ["@example.org"]),
    ],
)
def test_candidates(address: str, separator: str, catch_all: bool, expected: list[str]) -> None:
    assert list(candidates(address, separator, catch_all)) == expected
