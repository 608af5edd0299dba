"""Unit tests of medrelay_protocol.verified: outcomes of certificate and bundle checks kept
under the exact bytes and key, expiry checked at every use, bounded."""

from __future__ import annotations

import pytest
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.errors import BadSignature, KeyExpired, MedrelayError
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate
from medrelay_protocol.verified import VerifiedDevices

from .test_identity import DEVICE, EXPIRES_AT, IDENTITY, ISSUED_AT, RECEIVING, USER

OTHER_IDENTITY = SigningKey(bytes(range(128, 160)))


def _cert() -> DeviceCertificate:
    return DeviceCertificate.issue(IDENTITY, USER, DEVICE.public, "person", ISSUED_AT)


def _bundle() -> DeviceBundle:
    return DeviceBundle.issue(DEVICE, RECEIVING.public, EXPIRES_AT)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def test_a_certificate_is_checked_once_and_gives_what_verify_gives() -> None:
    kept = VerifiedDevices()
    raw = _cert().raw
    first = kept.certificate(raw, IDENTITY.public)
    again = kept.certificate(bytes(raw), IDENTITY.public)
    assert first == again == DeviceCertificate.verify(raw, IDENTITY.public)
    assert kept.checks == 1 and len(kept) == 1


def test_other_bytes_or_another_key_are_checked_afresh_and_refused() -> None:
    kept = VerifiedDevices()
    raw = _cert().raw
    kept.certificate(raw, IDENTITY.public)
    with pytest.raises(BadSignature):
        kept.certificate(_flip(raw, len(raw) - 1), IDENTITY.public)  # the signature
    with pytest.raises(MedrelayError):
        kept.certificate(_flip(raw, 3), IDENTITY.public)  # the body
    with pytest.raises(BadSignature):
        kept.certificate(raw, OTHER_IDENTITY.public)
    assert kept.checks == 4


def test_a_refusal_is_kept_and_given_again_as_the_same_error() -> None:
    kept = VerifiedDevices()
    raw = _cert().raw
    for _ in range(3):
        with pytest.raises(BadSignature) as caught:
            kept.certificate(raw, OTHER_IDENTITY.public)
        assert caught.value.message == "bad signature"
    assert kept.checks == 1
    assert kept.certificate(raw, IDENTITY.public).user_id == USER  # the good key still works


def test_a_kept_bundle_is_refused_once_it_expires() -> None:
    kept = VerifiedDevices()
    raw = _bundle().raw
    assert kept.bundle(raw, DEVICE.public, now=ISSUED_AT).receiving_key == RECEIVING.public
    with pytest.raises(KeyExpired):
        kept.bundle(raw, DEVICE.public, now=EXPIRES_AT)
    assert kept.bundle(raw, DEVICE.public, now=EXPIRES_AT - 1).expires_at == EXPIRES_AT
    assert kept.checks == 1


def test_a_bundle_and_a_certificate_of_the_same_bytes_are_separate_outcomes() -> None:
    kept = VerifiedDevices()
    raw = _bundle().raw
    kept.bundle(raw, DEVICE.public, now=ISSUED_AT)
    with pytest.raises(MedrelayError):  # a bundle is not a certificate under that key
        kept.certificate(raw, DEVICE.public)
    assert kept.checks == 2 and len(kept) == 2


def test_outcomes_are_bounded_least_recently_used_out() -> None:
    kept = VerifiedDevices(limit=3)
    devices = [SigningKey.generate() for _ in range(5)]
    certs = [
        DeviceCertificate.issue(IDENTITY, USER, d.public, "person", ISSUED_AT).raw for d in devices
    ]
    for raw in certs[:3]:
        kept.certificate(raw, IDENTITY.public)
    kept.certificate(certs[0], IDENTITY.public)  # used again: now the most recent
    for raw in certs[3:]:
        kept.certificate(raw, IDENTITY.public)
    assert len(kept) == 3 and kept.checks == 5
    kept.certificate(certs[0], IDENTITY.public)  # kept
    assert kept.checks == 5
    kept.certificate(certs[1], IDENTITY.public)  # went first
    assert kept.checks == 6
    with pytest.raises(ValueError):
        VerifiedDevices(limit=0)


def test_its_repr_holds_no_key_or_certificate_bytes() -> None:
    kept = VerifiedDevices()
    raw = _cert().raw
    kept.certificate(raw, IDENTITY.public)
    text = repr(kept)
    assert IDENTITY.public.hex() not in text and raw.hex()[:16] not in text
    assert "1 of 20000" in text
