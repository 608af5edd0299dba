"""Enrolling a user's devices: the institution's identity attestation, the comparison code
that approves a new device from an existing one, and the encrypted key backup shared among
the user's own devices (``docs/identity.md`` section 9, ``docs/protocol.md`` 5.19-5.21).

* **Identity attestation** (label ``"identity-attest"``): the user's institution signs, at
  sign-in, ``[1, user_id, identity_key, institution, issued_at]`` with its external sender
  key. The server pins a user's first identity key only with a valid attestation; clients
  check it against the institution key they pinned at enrolment.
* **Approval code**: a new device B shows ``approval_code(user, B's device key)``; the
  approving device A computes the same from the key the server delivered and compares it
  with what the user typed (or scanned: :func:`approval_qr` carries the full 256-bit
  digest). A server that substitutes its own device key produces another code.
* **Key backup**: the identity seed, sealed under a random 32-byte *backup key*
  (XChaCha20-Poly1305, associated data binds the user and the backup version); the backup
  key is wrapped to each approved device's receiving key with the rekey wrap construction
  (5.7) and a ``"mr-backup-wrap"`` context.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from .canonical import pack_body, unpack_body
from .codes import ErrorCode
from .crypto import (
    DOMAIN,
    KEY_SIZE,
    NONCE_SIZE,
    SIGNATURE_SIZE,
    TAG_SIZE,
    ReceivingKey,
    SigningKey,
    aead_open,
    aead_seal,
    blake2b_256,
    encode_field,
    random_nonce,
    sign_with_label,
    unwrap_secret,
    verify_with_label,
    wrap_secret,
)
from .errors import CryptoError, DecryptionFailed, MalformedFrame

ATTESTATION_LABEL = "identity-attest"
APPROVAL_CODE_PERSON = b"mr-approval-code"
BACKUP_WRAP_PERSON = b"mr-backup-wrap"
BACKUP_AAD_LABEL = b"key-backup"
CODE_DIGITS = 12
QR_PREFIX = "MRAPPROVE1:"
MAX_BACKUP = 16 * 1024
"""Largest backup blob the server stores (bytes); larger puts are ``QUOTA_EXCEEDED``."""
BACKUP_SHARE_SIZE = KEY_SIZE + NONCE_SIZE + KEY_SIZE + TAG_SIZE
"""``ephemeral_public || nonce || ciphertext`` of a wrapped backup key: 104 bytes."""
MAX_USER_ID = 128
MAX_INSTITUTION = 64


class CodeMismatch(CryptoError):
    """The comparison code the user typed is not the one of the device key received."""

    code = ErrorCode.CODE_MISMATCH


# ---------------------------------------------------------------------------------------
# Identity attestation


@dataclass(frozen=True, slots=True)
class IdentityAttestation:
    """``body || signature``; body = msgpack ``[1, user_id, identity_key, institution,
    issued_at]``, signed by the institution's key with label ``"identity-attest"``."""

    user_id: str
    identity_key: bytes
    institution: str
    issued_at: int
    raw: bytes

    @classmethod
    def issue(
        cls,
        institution_key: SigningKey,
        *,
        user_id: str,
        identity_key: bytes,
        institution: str,
        issued_at: int,
    ) -> IdentityAttestation:
        if len(identity_key) != KEY_SIZE or not 0 < len(user_id) <= MAX_USER_ID:
            raise ValueError("bad attestation fields")
        body = pack_body([1, user_id, identity_key, institution, issued_at])
        raw = body + sign_with_label(institution_key, ATTESTATION_LABEL, body)
        return cls(user_id, identity_key, institution, issued_at, raw)

    @classmethod
    def verify(cls, raw: bytes, institution_public: bytes) -> IdentityAttestation:
        """Check the institution's signature over the exact bytes, then decode strictly."""
        body, sig = _split(raw)
        verify_with_label(institution_public, ATTESTATION_LABEL, sig, body)
        return cls._decode(body, raw)

    @classmethod
    def parse_unverified(cls, raw: bytes) -> IdentityAttestation:
        body, _ = _split(raw)
        return cls._decode(body, raw)

    @classmethod
    def _decode(cls, body: bytes, raw: bytes) -> IdentityAttestation:
        f = unpack_body(body)
        if not isinstance(f, list) or len(f) != 5 or f[0] != 1:
            raise MalformedFrame("attestation: bad shape")
        _, user_id, identity_key, institution, issued_at = f
        if not (
            isinstance(user_id, str)
            and 0 < len(user_id) <= MAX_USER_ID
            and isinstance(identity_key, bytes)
            and len(identity_key) == KEY_SIZE
            and isinstance(institution, str)
            and 0 < len(institution) <= MAX_INSTITUTION
            and isinstance(issued_at, int)
            and not isinstance(issued_at, bool)
            and 0 <= issued_at < 2**63
        ):
            raise MalformedFrame("attestation: bad field")
        return cls(user_id, identity_key, institution, issued_at, raw)


def _split(raw: bytes) -> tuple[bytes, bytes]:
    if len(raw) <= SIGNATURE_SIZE:
        raise MalformedFrame("signed object too short")
    return raw[:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]


# ---------------------------------------------------------------------------------------
# Approval code


def _approval_digest(user_id: str, device_key: bytes) -> bytes:
    if len(device_key) != KEY_SIZE:
        raise ValueError("a device key is 32 bytes")
    return blake2b_256(user_id, device_key, person=APPROVAL_CODE_PERSON)


def approval_code(user_id: str, device_key: bytes) -> str:
    """Twelve digits in three groups of four: ``u64be(digest[0:8]) mod 10^12``."""
    n = int.from_bytes(_approval_digest(user_id, device_key)[:8], "big") % 10**CODE_DIGITS
    digits = f"{n:0{CODE_DIGITS}d}"
    return " ".join(digits[i : i + 4] for i in range(0, CODE_DIGITS, 4))


def approval_qr(user_id: str, device_key: bytes) -> str:
    """The QR payload a new device shows: the whole 32-byte digest, so nothing can be ground."""
    return QR_PREFIX + _approval_digest(user_id, device_key).hex()


def check_approval_code(entered: str, user_id: str, device_key: bytes) -> None:
    """Compare what the user typed (digits; spaces and dashes ignored) or scanned (the QR
    payload) with the code of ``device_key``, in constant time; raise :class:`CodeMismatch`."""
    text = entered.strip()
    if text.startswith(QR_PREFIX):
        expected = approval_qr(user_id, device_key)
    else:
        text = "".join(ch for ch in text if ch not in " -")
        expected = approval_code(user_id, device_key).replace(" ", "")
    if not hmac.compare_digest(text.encode("utf-8"), expected.encode("ascii")):
        raise CodeMismatch("the code does not match the requesting device")


# ---------------------------------------------------------------------------------------
# Key backup


@dataclass(frozen=True, slots=True, repr=False)
class BackupContents:
    """What a new device needs to act for the user: the identity key's seed."""

    identity_seed: bytes

    def __repr__(self) -> str:
        return "BackupContents(<redacted>)"


def new_backup_key() -> bytes:
    return os.urandom(KEY_SIZE)


def _backup_aad(user_id: str, version: int) -> bytes:
    return encode_field(DOMAIN + BACKUP_AAD_LABEL) + encode_field(user_id) + encode_field(version)


def seal_backup(
    backup_key: bytes,
    *,
    user_id: str,
    version: int,
    contents: BackupContents,
    nonce: bytes | None = None,
) -> bytes:
    """``nonce || XChaCha20-Poly1305(backup_key, nonce, msgpack {"v": 1, "identity":
    seed}, aad = encode_field("medrelay/1 key-backup") || encode_field(user_id) ||
    encode_field(version))``."""
    if len(backup_key) != KEY_SIZE or len(contents.identity_seed) != KEY_SIZE:
        raise ValueError("backup keys and seeds are 32 bytes")
    n = nonce if nonce is not None else random_nonce()
    plain = pack_body({"v": 1, "identity": contents.identity_seed})
    return n + aead_seal(backup_key, n, plain, _backup_aad(user_id, version))


def open_backup(backup_key: bytes, *, user_id: str, version: int, blob: bytes) -> BackupContents:
    """Open a backup blob; any failure (wrong key, user, version, tampering) is the one
    opaque :class:`DecryptionFailed`."""
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionFailed()
    plain = aead_open(
        backup_key, blob[:NONCE_SIZE], blob[NONCE_SIZE:], _backup_aad(user_id, version)
    )
    try:
        data = unpack_body(plain)
    except MalformedFrame as exc:
        raise DecryptionFailed() from exc
    seed = data.get("identity") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("v") != 1 or not isinstance(seed, bytes):
        raise DecryptionFailed()
    if len(seed) != KEY_SIZE:
        raise DecryptionFailed()
    return BackupContents(identity_seed=seed)


def backup_wrap_context(user_id: str, device_id: str, ephemeral_public: bytes) -> bytes:
    return blake2b_256(user_id, device_id, ephemeral_public, person=BACKUP_WRAP_PERSON)


def wrap_backup_key(
    backup_key: bytes,
    *,
    user_id: str,
    recipient_device: str,
    recipient_public: bytes,
    ephemeral: ReceivingKey | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The backup key wrapped to one device: ``ephemeral_public || wrap`` (104 bytes), where
    ``wrap`` is :func:`~medrelay_protocol.crypto.wrap_secret` with ``context_hash =
    blake2b_256(user_id, device_id, ephemeral_public; "mr-backup-wrap")``."""
    eph = ephemeral if ephemeral is not None else ReceivingKey.generate()
    context = backup_wrap_context(user_id, recipient_device, eph.public)
    wrap = wrap_secret(
        backup_key,
        ephemeral=eph,
        recipient_device=recipient_device,
        recipient_public=recipient_public,
        context_hash=context,
        nonce=nonce,
    )
    return eph.public + wrap


def unwrap_backup_key(
    share: bytes, *, user_id: str, device_id: str, receiving: ReceivingKey
) -> bytes:
    if len(share) != BACKUP_SHARE_SIZE:
        raise DecryptionFailed()
    eph, wrap = share[:KEY_SIZE], share[KEY_SIZE:]
    return unwrap_secret(
        wrap,
        receiving=receiving,
        ephemeral_public=eph,
        recipient_device=device_id,
        context_hash=backup_wrap_context(user_id, device_id, eph),
    )
