"""Wycheproof vectors run through medrelay's own wrappers (not PyNaCl directly).

Files are copied into ``tests/vectors/wycheproof/`` (Apache-2.0, see the README there) so the
suite runs on a fresh clone. Every vector asserts something: none is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from medrelay_protocol.crypto import aead_open, aead_seal, verify_raw, x25519
from medrelay_protocol.errors import BadSignature, DecryptionFailed, LowOrderPoint

WYCHEPROOF = Path(__file__).resolve().parent.parent / "vectors" / "wycheproof"


def _load(name: str) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    data = json.loads((WYCHEPROOF / name).read_text(encoding="utf-8"))
    cases = [(group, test) for group in data["testGroups"] for test in group["tests"]]
    return data, cases


def _params(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[Any]:
    return [pytest.param(group, test, id=f"tc{test['tcId']}") for group, test in cases]


X25519_FILE, X25519_CASES = _load("x25519_test.json")
AEAD_FILE, AEAD_CASES = _load("xchacha20_poly1305_test.json")
ED25519_FILE, ED25519_CASES = _load("ed25519_test.json")


@pytest.mark.parametrize(
    ("data", "cases", "schema"),
    [
        (X25519_FILE, X25519_CASES, "xdh_comp_schema_v1.json"),
        (AEAD_FILE, AEAD_CASES, "aead_test_schema_v1.json"),
        (ED25519_FILE, ED25519_CASES, "eddsa_verify_schema_v1.json"),
    ],
    ids=["x25519", "xchacha20poly1305", "ed25519"],
)
def test_every_vector_in_the_file_is_collected(
    data: dict[str, Any], cases: list[Any], schema: str
) -> None:
    assert data["schema"] == schema
    assert len(cases) > 0
    assert len(cases) == data["numberOfTests"]
    ids = [test["tcId"] for _, test in cases]
    assert len(set(ids)) == len(ids)


# ---------------------------------------------------------------------------------------
# X25519 (xdh_comp_schema_v1)
#
# Results in this file are "valid" or "acceptable" (no "invalid" vector in this version).
# Our policy, which the test encodes:
#
# * an expected shared secret of all zeros means a low-order public key (flags LowOrderPublic /
#   ZeroSharedSecret, sometimes SmallPublicKey or a non-canonical encoding of a low-order
#   point): RFC 7748 §6.1 allows refusing it and a wrap to such a key would be readable by
#   anyone, so our wrapper MUST raise LowOrderPoint (libsodium refuses, plus our own check);
# * every other "acceptable" vector (Twist, NonCanonicalPublic, SpecialPublicKey,
#   EdgeCaseMultiplication, EdgeCaseShared) has a non-zero result that RFC 7748 defines
#   (§5: mask the top bit, reduce mod p; twist points are computed, not refused). Accepting
#   them is safe only if the result is exactly right, so we REQUIRE the expected secret: a
#   refusal would be a behaviour change we want to notice, a wrong value would be a bug;
# * "valid" vectors must give the expected secret;
# * an "invalid" vector (none today) must raise.

ZERO32 = "00" * 32


@pytest.mark.parametrize(("group", "test"), _params(X25519_CASES))
def test_x25519(group: dict[str, Any], test: dict[str, Any]) -> None:
    assert group["curve"] == "curve25519"
    private = bytes.fromhex(test["private"])
    public = bytes.fromhex(test["public"])
    flags = set(test["flags"])
    # The file's own consistency: zero shared secret <=> flagged as such.
    assert (test["shared"] == ZERO32) == ("ZeroSharedSecret" in flags)

    if test["shared"] == ZERO32 or test["result"] == "invalid":
        with pytest.raises(LowOrderPoint):
            x25519(private, public)
        return
    assert test["result"] in ("valid", "acceptable")
    assert x25519(private, public).hex() == test["shared"]


def test_x25519_low_order_vectors_are_all_refused() -> None:
    zero = [t for _, t in X25519_CASES if t["shared"] == ZERO32]
    assert len(zero) == 31  # the README of the copied set records the same number
    assert all(t["result"] == "acceptable" for t in zero)


# ---------------------------------------------------------------------------------------
# XChaCha20-Poly1305 (aead_test_schema_v1)
#
# * valid: aead_open(key, iv, ct || tag, aad) == msg and aead_seal(...) == ct || tag;
# * invalid with a nonce or key size our wrapper does not support (only 24-byte nonces and
#   32-byte keys): aead_open must raise DecryptionFailed and aead_seal must refuse (PyNaCl's
#   size check raises TypeError) -- counted as refused, never skipped;
# * invalid with supported sizes (ModifiedTag): aead_open must raise DecryptionFailed, and
#   sealing the same msg must reproduce ct with a different tag (the tag is what was changed).


@pytest.mark.parametrize(("group", "test"), _params(AEAD_CASES))
def test_xchacha20_poly1305(group: dict[str, Any], test: dict[str, Any]) -> None:
    key, iv, aad, msg, ct, tag = (
        bytes.fromhex(test[name]) for name in ("key", "iv", "aad", "msg", "ct", "tag")
    )
    assert len(iv) * 8 == group["ivSize"] and len(key) * 8 == group["keySize"]
    assert group["tagSize"] == 128
    supported = len(iv) == 24 and len(key) == 32

    if test["result"] == "valid":
        assert supported and len(tag) == 16
        assert aead_open(key, iv, ct + tag, aad) == msg
        assert aead_seal(key, iv, msg, aad) == ct + tag
        return

    assert test["result"] == "invalid"
    with pytest.raises(DecryptionFailed):
        aead_open(key, iv, ct + tag, aad)
    if not supported:
        # These vectors carry an empty ct and tag; also offer a full-length (zero) tag so the
        # refusal is our size check on the nonce, not merely the too-short ciphertext.
        assert "InvalidNonceSize" in test["flags"]
        with pytest.raises(DecryptionFailed):
            aead_open(key, iv, ct + tag + bytes(16), aad)
        with pytest.raises((TypeError, ValueError)):
            aead_seal(key, iv, msg, aad)
    else:
        assert len(tag) == 16
        sealed = aead_seal(key, iv, msg, aad)
        assert sealed[:-16] == ct
        assert sealed[-16:] != tag


def test_xchacha20_poly1305_invalid_sizes_are_counted() -> None:
    refused = [t for g, t in AEAD_CASES if g["ivSize"] != 192 or g["keySize"] != 256]
    assert len(refused) == 9
    assert all(t["result"] == "invalid" for t in refused)


# ---------------------------------------------------------------------------------------
# Ed25519 (eddsa_verify_schema_v1). libsodium is strict (canonical S, no small-order R or A,
# no non-canonical encodings), so: valid must verify, every invalid must raise BadSignature.


@pytest.mark.parametrize(("group", "test"), _params(ED25519_CASES))
def test_ed25519(group: dict[str, Any], test: dict[str, Any]) -> None:
    assert group["publicKey"]["curve"] == "edwards25519"
    public = bytes.fromhex(group["publicKey"]["pk"])
    msg = bytes.fromhex(test["msg"])
    sig = bytes.fromhex(test["sig"])
    if test["result"] == "valid":
        verify_raw(public, msg, sig)  # returns without raising
        with pytest.raises(BadSignature):
            verify_raw(public, msg + b"\x00", sig)
    else:
        assert test["result"] == "invalid"
        with pytest.raises(BadSignature):
            verify_raw(public, msg, sig)
