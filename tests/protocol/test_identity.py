"""Unit tests of medrelay_protocol.identity: device certificates, bundles, connect proofs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    device_id_for,
    sign_with_label,
    verify_with_label,
)
from medrelay_protocol.errors import BadSignature, KeyExpired, MalformedFrame
from medrelay_protocol.identity import (
    BUNDLE_LABEL,
    CERT_LABEL,
    DEVICE_KINDS,
    MAX_USER_ID,
    PROOF_LABEL,
    DeviceBundle,
    DeviceCertificate,
    sign_connect_proof,
    verify_connect_proof,
)

IDENTITY = SigningKey(bytes(range(32)))
DEVICE = SigningKey(bytes(range(32, 64)))
OTHER_DEVICE = SigningKey(bytes(range(64, 96)))
RECEIVING = ReceivingKey(bytes(range(96, 128)))
USER = "dr.okafor@st-mary"
ISSUED_AT = 1_760_000_000
EXPIRES_AT = ISSUED_AT + 7 * 86400


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _cert() -> DeviceCertificate:
    return DeviceCertificate.issue(IDENTITY, USER, DEVICE.public, "person", ISSUED_AT)


def _signed(key: SigningKey, label: str, body_fields: list[object]) -> bytes:
    """A well-signed object with arbitrary body: what a buggy or malicious signer could make."""
    body = pack_body(body_fields)
    return body + sign_with_label(key, label, body)


# ---------------------------------------------------------------------------------------
# Device certificates


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_certificate_issue_and_verify(kind: str) -> None:
    cert = DeviceCertificate.issue(IDENTITY, USER, DEVICE.public, kind, ISSUED_AT)
    assert cert.device_id == device_id_for(DEVICE.public)
    assert (cert.user_id, cert.device_key, cert.kind, cert.issued_at) == (
        USER,
        DEVICE.public,
        kind,
        ISSUED_AT,
    )
    body = pack_body([1, USER, cert.device_id, DEVICE.public, kind, ISSUED_AT])
    assert cert.raw[:-64] == body
    verify_with_label(IDENTITY.public, CERT_LABEL, cert.raw[-64:], body)
    assert DeviceCertificate.verify(cert.raw, IDENTITY.public) == cert
    assert DeviceCertificate.parse_unverified(cert.raw) == cert


def test_certificate_is_deterministic() -> None:
    assert _cert().raw == _cert().raw


def test_certificate_wrong_identity_key() -> None:
    raw = _cert().raw
    for key in (DEVICE.public, OTHER_DEVICE.public, bytes(32), IDENTITY.public[:31]):
        with pytest.raises(BadSignature):
            DeviceCertificate.verify(raw, key)


def test_certificate_signed_by_the_device_itself_is_refused() -> None:
    forged = DeviceCertificate.issue(DEVICE, USER, DEVICE.public, "person", ISSUED_AT)
    with pytest.raises(BadSignature):
        DeviceCertificate.verify(forged.raw, IDENTITY.public)


def test_certificate_every_byte_is_covered() -> None:
    raw = _cert().raw
    for i in range(len(raw)):
        with pytest.raises(BadSignature):
            DeviceCertificate.verify(_flip(raw, i), IDENTITY.public)
    for blob in (raw[:-1], raw + b"\x00", raw[1:]):
        with pytest.raises((BadSignature, MalformedFrame)):
            DeviceCertificate.verify(blob, IDENTITY.public)


@pytest.mark.parametrize("size", [0, 1, 64])
def test_certificate_too_short_is_malformed(size: int) -> None:
    with pytest.raises(MalformedFrame):
        DeviceCertificate.verify(bytes(size), IDENTITY.public)
    with pytest.raises(MalformedFrame):
        DeviceCertificate.parse_unverified(bytes(size))


def test_certificate_device_id_mismatch_is_refused() -> None:
    # Correctly signed by the identity key, but the device id belongs to another key.
    raw = _signed(
        IDENTITY,
        CERT_LABEL,
        [1, USER, device_id_for(OTHER_DEVICE.public), DEVICE.public, "person", ISSUED_AT],
    )
    with pytest.raises(BadSignature):
        DeviceCertificate.verify(raw, IDENTITY.public)


@pytest.mark.parametrize(
    "fields",
    [
        [2, USER, "DEV", "KEY", "person", ISSUED_AT],  # unknown version
        [1, USER, "DEV", "KEY", "person"],  # too short
        [1, USER, "DEV", "KEY", "person", ISSUED_AT, 0],  # too long
        [1, USER.encode(), "DEV", "KEY", "person", ISSUED_AT],  # user id as bytes
        [1, USER, "DEV", "KEY", "robot", ISSUED_AT],  # unknown kind
        [1, USER, "DEV", "KEY", "person", "yesterday"],  # issued_at not an int
        [1, USER, "DEV", "KEY", "person", True],  # bool is not an int here
        [1, USER, "DEV", "SHORTKEY", "person", ISSUED_AT],  # key of the wrong length
        [1, "u" * (MAX_USER_ID + 1), "DEV", "KEY", "person", ISSUED_AT],  # user id too long
        {"v": 1},  # not a list
    ],
)
def test_certificate_bad_shapes_are_malformed(fields: object) -> None:
    def sub(v: object) -> object:
        if v == "DEV":
            return device_id_for(DEVICE.public)
        if v == "KEY":
            return DEVICE.public
        if v == "SHORTKEY":
            return DEVICE.public[:31]
        return v

    body = [sub(v) for v in fields] if isinstance(fields, list) else fields
    raw = _signed(IDENTITY, CERT_LABEL, body)  # type: ignore[arg-type]
    with pytest.raises(MalformedFrame):
        DeviceCertificate.verify(raw, IDENTITY.public)


@pytest.mark.parametrize(
    ("kind", "key"),
    [("robot", DEVICE.public), ("person", DEVICE.public[:31]), ("tablet", b"")],
)
def test_certificate_issue_refuses_bad_fields(kind: str, key: bytes) -> None:
    with pytest.raises(ValueError):
        DeviceCertificate.issue(IDENTITY, USER, key, kind, ISSUED_AT)


def test_bundle_signature_does_not_pass_as_certificate() -> None:
    # Different labels: a device-key signature over a bundle is not a certificate even when
    # checked against the device key.
    bundle = DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT)
    body, sig = bundle.raw[:-64], bundle.raw[-64:]
    with pytest.raises(BadSignature):
        verify_with_label(DEVICE.public, CERT_LABEL, sig, body)
    with pytest.raises(BadSignature):
        DeviceCertificate.verify(bundle.raw, DEVICE.public)


# ---------------------------------------------------------------------------------------
# Device bundles


def test_bundle_issue_and_verify() -> None:
    bundle = DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT)
    assert bundle.device_id == device_id_for(DEVICE.public)
    assert bundle.receiving_key == RECEIVING.public
    assert bundle.expires_at == EXPIRES_AT
    body = pack_body([1, bundle.device_id, RECEIVING.public, EXPIRES_AT])
    assert bundle.raw[:-64] == body
    verify_with_label(DEVICE.public, BUNDLE_LABEL, bundle.raw[-64:], body)
    assert DeviceBundle.verify(bundle.raw, DEVICE.public) == bundle
    assert DeviceBundle.verify(bundle.raw, DEVICE.public, now=EXPIRES_AT - 1) == bundle
    assert DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT).raw == bundle.raw


@pytest.mark.parametrize("now", [EXPIRES_AT, EXPIRES_AT + 1, 2**40])
def test_bundle_expiry(now: int) -> None:
    raw = DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT).raw
    with pytest.raises(KeyExpired):
        DeviceBundle.verify(raw, DEVICE.public, now=now)


def test_bundle_wrong_key_and_tamper() -> None:
    raw = DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT).raw
    for key in (OTHER_DEVICE.public, IDENTITY.public, bytes(32), b""):
        with pytest.raises(BadSignature):
            DeviceBundle.verify(raw, key)
    for i in range(len(raw)):
        with pytest.raises(BadSignature):
            DeviceBundle.verify(_flip(raw, i), DEVICE.public)
    with pytest.raises(MalformedFrame):
        DeviceBundle.verify(raw[-64:], DEVICE.public)


def test_bundle_naming_another_device_is_refused() -> None:
    # Signed by DEVICE but claims to be OTHER_DEVICE's bundle.
    raw = _signed(
        DEVICE,
        BUNDLE_LABEL,
        [1, device_id_for(OTHER_DEVICE.public), RECEIVING.public, EXPIRES_AT],
    )
    with pytest.raises(BadSignature):
        DeviceBundle.verify(raw, DEVICE.public)


@pytest.mark.parametrize(
    "fields",
    [
        [2, "DEV", "RK", EXPIRES_AT],
        [1, "DEV", "RK"],
        [1, "DEV", "RK", EXPIRES_AT, 0],
        [1, "DEV", "receiving-key-as-text", EXPIRES_AT],
        [1, "DEV", "SHORT", EXPIRES_AT],
        [1, "DEV", "RK", "never"],
        [1, "DEV", "RK", False],
        [1, b"device-id-as-bytes", "RK", EXPIRES_AT],
    ],
)
def test_bundle_bad_shapes_are_malformed(fields: list[object]) -> None:
    table = {
        "DEV": device_id_for(DEVICE.public),
        "RK": RECEIVING.public,
        "SHORT": RECEIVING.public[:16],
    }
    body = [table.get(v, v) if isinstance(v, str) else v for v in fields]
    raw = _signed(DEVICE, BUNDLE_LABEL, body)
    with pytest.raises(MalformedFrame):
        DeviceBundle.verify(raw, DEVICE.public)


def test_certificate_signature_does_not_pass_as_bundle() -> None:
    cert = DeviceCertificate.issue(DEVICE, USER, DEVICE.public, "person", ISSUED_AT)
    with pytest.raises(BadSignature):
        DeviceBundle.verify(cert.raw, DEVICE.public)


# ---------------------------------------------------------------------------------------
# Connect proofs

NONCE = bytes(range(32))


def test_connect_proof_round_trip() -> None:
    proof = sign_connect_proof(DEVICE, NONCE, USER)
    assert proof == sign_with_label(DEVICE, PROOF_LABEL, NONCE, USER, device_id_for(DEVICE.public))
    verify_connect_proof(DEVICE.public, NONCE, USER, proof)


def test_connect_proof_failures() -> None:
    proof = sign_connect_proof(DEVICE, NONCE, USER)
    bad = [
        (OTHER_DEVICE.public, NONCE, USER, proof),
        (DEVICE.public, _flip(NONCE, 0), USER, proof),
        (DEVICE.public, NONCE, USER + "x", proof),
        (DEVICE.public, NONCE, USER, _flip(proof, 10)),
        (DEVICE.public, NONCE, USER, proof[:-1]),
        # A proof for another user's session is not reusable.
        (DEVICE.public, NONCE, "dr.other@st-mary", proof),
    ]
    for args in bad:
        with pytest.raises(BadSignature):
            verify_connect_proof(*args)
    # The identity key's signature over the same fields is not a device proof.
    with pytest.raises(BadSignature):
        verify_connect_proof(DEVICE.public, NONCE, USER, sign_connect_proof(IDENTITY, NONCE, USER))


@settings(max_examples=30)
@given(st.binary(min_size=1, max_size=64), st.text(min_size=1, max_size=40))
def test_connect_proof_binds_nonce_and_user(nonce: bytes, user: str) -> None:
    proof = sign_connect_proof(DEVICE, nonce, user)
    verify_connect_proof(DEVICE.public, nonce, user, proof)
    with pytest.raises(BadSignature):
        verify_connect_proof(DEVICE.public, nonce + b"\x00", user, proof)
