"""User identity keys, device certificates and device bundles.

A *device certificate* is signed by the user's identity key and binds a device id to the
device's Ed25519 signing key. A *device bundle* is signed by the device key and publishes an
expiring X25519 receiving key. The server stores and serves both but cannot make either:
clients check them against the identity key pinned in the room roster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .canonical import pack_body, unpack_body
from .crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    SigningKey,
    check_not_expired,
    device_id_for,
    sign_with_label,
    verify_with_label,
)
from .errors import BadSignature, MalformedFrame

CERT_LABEL = "device-cert"
BUNDLE_LABEL = "device-bundle"
PROOF_LABEL = "device-proof"
MAX_USER_ID = 128
DEVICE_KIND_PERSON = "person"
DEVICE_KIND_TABLET = "tablet"
DEVICE_KINDS = (DEVICE_KIND_PERSON, DEVICE_KIND_TABLET)


def _expect(value: Any, kind: type, what: str, size: int | None = None) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MalformedFrame(f"{what}: wrong type")
    if size is not None and len(value) != size:  # type: ignore[arg-type]
        raise MalformedFrame(f"{what}: wrong length")
    return value


def _split_signed(blob: bytes) -> tuple[bytes, bytes]:
    if len(blob) <= SIGNATURE_SIZE:
        raise MalformedFrame("signed object too short")
    return blob[:-SIGNATURE_SIZE], blob[-SIGNATURE_SIZE:]


@dataclass(frozen=True, slots=True)
class DeviceCertificate:
    """``body || signature``.

    body = msgpack ``[1, user_id, device_id, device_key, kind, issued_at]``, signed by the
    user identity key.
    """

    user_id: str
    device_id: str
    device_key: bytes
    kind: str
    issued_at: int
    raw: bytes

    @classmethod
    def issue(
        cls, identity: SigningKey, user_id: str, device_key: bytes, kind: str, issued_at: int
    ) -> DeviceCertificate:
        if kind not in DEVICE_KINDS or len(device_key) != KEY_SIZE:
            raise ValueError("bad device certificate fields")
        device_id = device_id_for(device_key)
        body = pack_body([1, user_id, device_id, device_key, kind, issued_at])
        raw = body + sign_with_label(identity, CERT_LABEL, body)
        return cls(user_id, device_id, device_key, kind, issued_at, raw)

    @classmethod
    def verify(cls, raw: bytes, identity_public: bytes) -> DeviceCertificate:
        """Check the identity signature over the exact bytes, then decode strictly."""
        body, sig = _split_signed(raw)
        verify_with_label(identity_public, CERT_LABEL, sig, body)
        return cls._decode(body, raw)

    @classmethod
    def parse_unverified(cls, raw: bytes) -> DeviceCertificate:
        """Decode without checking the signature (to learn which identity key to check with)."""
        body, _ = _split_signed(raw)
        return cls._decode(body, raw)

    @classmethod
    def _decode(cls, body: bytes, raw: bytes) -> DeviceCertificate:
        fields = unpack_body(body)
        if not isinstance(fields, list) or len(fields) != 6 or fields[0] != 1:
            raise MalformedFrame("device certificate: bad shape")
        _, user_id, device_id, device_key, kind, issued_at = fields
        _expect(user_id, str, "user_id")
        _expect(device_id, str, "device_id")
        _expect(device_key, bytes, "device_key", KEY_SIZE)
        _expect(kind, str, "kind")
        _expect(issued_at, int, "issued_at")
        if kind not in DEVICE_KINDS or len(user_id) > MAX_USER_ID:
            raise MalformedFrame("device certificate: bad field")
        if device_id != device_id_for(device_key):
            raise BadSignature("device id does not match its key")
        return cls(user_id, device_id, device_key, kind, issued_at, raw)


@dataclass(frozen=True, slots=True)
class DeviceBundle:
    """``body || signature``; body = msgpack ``[1, device_id, receiving_key, expires_at]``,
    signed by the device signing key."""

    device_id: str
    receiving_key: bytes
    expires_at: int
    raw: bytes

    @classmethod
    def issue(cls, device: SigningKey, receiving_public: bytes, expires_at: int) -> DeviceBundle:
        device_id = device_id_for(device.public)
        body = pack_body([1, device_id, receiving_public, expires_at])
        raw = body + sign_with_label(device, BUNDLE_LABEL, body)
        return cls(device_id, receiving_public, expires_at, raw)

    @classmethod
    def verify(cls, raw: bytes, device_key: bytes, *, now: int | None = None) -> DeviceBundle:
        """Verify against the device key; with ``now``, also refuse an expired bundle."""
        body, sig = _split_signed(raw)
        verify_with_label(device_key, BUNDLE_LABEL, sig, body)
        fields = unpack_body(body)
        if not isinstance(fields, list) or len(fields) != 4 or fields[0] != 1:
            raise MalformedFrame("device bundle: bad shape")
        _, device_id, receiving_key, expires_at = fields
        _expect(device_id, str, "device_id")
        _expect(receiving_key, bytes, "receiving_key", KEY_SIZE)
        _expect(expires_at, int, "expires_at")
        if device_id != device_id_for(device_key):
            raise BadSignature("bundle names another device")
        if now is not None:
            check_not_expired(expires_at, now)
        return cls(device_id, receiving_key, expires_at, raw)


def sign_connect_proof(device: SigningKey, nonce: bytes, user_id: str) -> bytes:
    """The device's answer to the server's connect challenge."""
    return sign_with_label(device, PROOF_LABEL, nonce, user_id, device_id_for(device.public))


def verify_connect_proof(device_key: bytes, nonce: bytes, user_id: str, proof: bytes) -> None:
    verify_with_label(device_key, PROOF_LABEL, proof, nonce, user_id, device_id_for(device_key))
