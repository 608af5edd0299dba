"""Epochs and rekeys (ARCHITECTURE §4, §5): the signed rekey manifest, per-device wraps of
the epoch secret, and the checks a recipient and the server make on them.

Wire format::

    manifest = body || SignWithLabel(committer_device_key, "rekey-manifest", body)
    body     = msgpack [1, room, epoch_number, prev_epoch_id, roster_head,
                        device_list_version, committer_device, ephemeral_public,
                        key_commitment, [[device_id, wrap_hash], ...]]   # sorted by device id
    prev_epoch_id = EpochId.encode() of epoch n-1, or b"" for epoch 1
    key_commitment = crypto.key_commitment(secret, room, epoch_number, roster_head)
    wrap_hash      = BLAKE2b-256(wrap; person "mr-wrap-hash")
    context_hash   = BLAKE2b-256(room, epoch_number, prev_epoch_id, roster_head,
                                 device_list_version, committer_device, ephemeral_public,
                                 key_commitment; person "mr-rekey-ctx")
    wrap           = crypto.wrap_secret(secret, aad = context_hash || device_id)

Why wraps are bound to the *context* hash and not to the manifest hash: the signed manifest
lists the hash of every wrap, so a wrap's associated data cannot also be the hash of that
manifest (each would have to be computed before the other). The context hash covers every
manifest field except the wrap list, so a wrap opens only under the exact epoch, roster head,
device-list version, committer, ephemeral key and commitment it was made for; and the
manifest's signature over each wrap's hash stops the server from swapping, replaying or
substituting wraps. Every recipient then checks the key commitment, so a committer cannot
give two members different secrets under one manifest without being caught
(:class:`CommitmentMismatch`).

Recipient exactness (I6) is checked by the server with :func:`check_recipients` against the
current certified member devices; clients must build ``recipients`` only from
:func:`medrelay_protocol.roster.certified_devices` and verified bundles, never from what the
server lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from .canonical import MAX_BODY_SIZE, pack_body, unpack_body
from .crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    SIGNATURE_SIZE,
    TAG_SIZE,
    ReceivingKey,
    SigningKey,
    blake2b_256,
    check_commitment,
    constant_time_equal,
    device_id_for,
    key_commitment,
    new_epoch_secret,
    sign_with_label,
    unwrap_secret,
    verify_with_label,
    wrap_secret,
)
from .epoch_state import (
    ACTIVE,
    FORGOTTEN,
    NO_KEY,
    NOT_YET_RECEIVED,
    PENDING_REKEY,
    TRANSITIONS,
    WITHHELD,
    EpochId,
    EpochState,
    ReplayGuard,
    ReplayWindow,
    should_rotate,
)
from .errors import BadSignature, FrameTooLarge, MalformedFrame, UnsupportedVersion
from .roster_entry import MAX_ROOM_ID, is_device_id

__all__ = [
    "ACTIVE",
    "FORGOTTEN",
    "MANIFEST_LABEL",
    "MAX_RECIPIENTS",
    "NOT_YET_RECEIVED",
    "NO_KEY",
    "PENDING_REKEY",
    "TRANSITIONS",
    "WITHHELD",
    "EpochId",
    "EpochState",
    "Rekey",
    "RekeyManifest",
    "ReplayGuard",
    "ReplayWindow",
    "build_rekey",
    "check_recipients",
    "context_hash",
    "open_rekey",
    "should_rotate",
    "wrap_hash",
]

MANIFEST_LABEL: Final = "rekey-manifest"
MAX_RECIPIENTS: Final = 800
"""Bounds the manifest under the 64 KiB body limit (about 69 bytes per recipient)."""
WRAP_SIZE: Final = NONCE_SIZE + KEY_SIZE + TAG_SIZE


def context_hash(
    room: str,
    epoch_number: int,
    prev_epoch: bytes,
    roster_head: bytes,
    device_list_version: int,
    committer_device: str,
    ephemeral_public: bytes,
    commitment: bytes,
) -> bytes:
    return blake2b_256(
        room,
        epoch_number,
        prev_epoch,
        roster_head,
        device_list_version,
        committer_device,
        ephemeral_public,
        commitment,
        person=b"mr-rekey-ctx",
    )


def wrap_hash(wrap: bytes) -> bytes:
    return blake2b_256(wrap, person=b"mr-wrap-hash")


def _prev_epoch(epoch_number: int, prev: EpochId | None) -> bytes:
    """Epoch 1 has no predecessor; epoch n > 1 names epoch n-1."""
    if (prev is None) != (epoch_number == 1) or (
        prev is not None and prev.number != epoch_number - 1
    ):
        raise MalformedFrame("rekey: previous epoch must be epoch n-1 (none for epoch 1)")
    return prev.encode() if prev is not None else b""


def _is_uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_SIZE


@dataclass(frozen=True, slots=True, repr=False)
class RekeyManifest:
    """A decoded manifest. Obtain one with :meth:`verify` (or :meth:`parse_unverified` to
    learn which committer key to verify with)."""

    room: str
    epoch_number: int
    prev_epoch: EpochId | None
    roster_head: bytes
    device_list_version: int
    committer_device: str
    ephemeral_public: bytes
    key_commitment: bytes
    wrap_hashes: Mapping[str, bytes]
    raw: bytes

    @property
    def epoch(self) -> EpochId:
        return EpochId(self.epoch_number, self.roster_head)

    @property
    def recipients(self) -> tuple[str, ...]:
        return tuple(self.wrap_hashes)

    @property
    def context_hash(self) -> bytes:
        return context_hash(
            self.room,
            self.epoch_number,
            self.prev_epoch.encode() if self.prev_epoch is not None else b"",
            self.roster_head,
            self.device_list_version,
            self.committer_device,
            self.ephemeral_public,
            self.key_commitment,
        )

    def wrap_hash(self, device_id: str) -> bytes:
        digest = self.wrap_hashes.get(device_id)
        if digest is None:
            raise MalformedFrame("rekey: no wrap for this device")
        return digest

    def check_wrap(self, device_id: str, wrap: bytes) -> None:
        """The wrap is the one the committer signed for this device, else
        :class:`BadSignature` (:class:`MalformedFrame` if the device is not a recipient)."""
        if not constant_time_equal(wrap_hash(wrap), self.wrap_hash(device_id)):
            raise BadSignature("rekey: wrap does not match the signed manifest")

    @classmethod
    def verify(cls, raw: bytes, committer_key: bytes) -> RekeyManifest:
        """Check the committer's signature over the exact bytes, then decode strictly; the
        manifest must name the device whose key signed it."""
        body, sig = cls._split(raw)
        verify_with_label(committer_key, MANIFEST_LABEL, sig, body)
        manifest = cls._decode(body, raw)
        if manifest.committer_device != device_id_for(committer_key):
            raise BadSignature("rekey: manifest names another committer")
        return manifest

    @classmethod
    def parse_unverified(cls, raw: bytes) -> RekeyManifest:
        body, _ = cls._split(raw)
        return cls._decode(body, raw)

    @staticmethod
    def _split(raw: bytes) -> tuple[bytes, bytes]:
        if not isinstance(raw, bytes) or len(raw) <= SIGNATURE_SIZE:
            raise MalformedFrame("rekey: manifest too short")
        if len(raw) > MAX_BODY_SIZE + SIGNATURE_SIZE:
            raise FrameTooLarge("rekey: manifest too large")
        return raw[:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]

    @classmethod
    def _decode(cls, body: bytes, raw: bytes) -> RekeyManifest:
        fields = unpack_body(body)
        if not isinstance(fields, list) or len(fields) != 10:
            raise MalformedFrame("rekey: bad shape")
        version, room, number, prev, head, dlv, committer, eph, commitment, wraps = fields
        if version != 1:
            raise UnsupportedVersion("rekey: unsupported manifest version")
        if not isinstance(room, str) or not 0 < len(room) <= MAX_ROOM_ID:
            raise MalformedFrame("rekey: bad room")
        if not _is_uint(number) or number == 0 or not _is_uint(dlv):
            raise MalformedFrame("rekey: bad number")
        if not (_is_key(head) and _is_key(eph) and _is_key(commitment)):
            raise MalformedFrame("rekey: bad key field")
        if not isinstance(prev, bytes) or not is_device_id(committer):
            raise MalformedFrame("rekey: bad field")
        prev_epoch = EpochId.decode(prev) if prev else None
        _prev_epoch(number, prev_epoch)
        hashes = _decode_wraps(wraps)
        return cls(room, number, prev_epoch, head, dlv, committer, eph, commitment, hashes, raw)

    def __repr__(self) -> str:
        return (
            f"RekeyManifest(room={self.room!r}, epoch={self.epoch_number}, "
            f"recipients={len(self.wrap_hashes)})"
        )


def _decode_wraps(wraps: Any) -> Mapping[str, bytes]:
    if not isinstance(wraps, list) or not 0 < len(wraps) <= MAX_RECIPIENTS:
        raise MalformedFrame("rekey: bad recipient list")
    hashes: dict[str, bytes] = {}
    last = ""
    for item in wraps:
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedFrame("rekey: bad recipient")
        device, digest = item
        if not is_device_id(device) or not _is_key(digest) or device <= last:
            raise MalformedFrame("rekey: recipients must be unique and sorted")
        hashes[device] = digest
        last = device
    return MappingProxyType(hashes)


@dataclass(frozen=True, slots=True, repr=False)
class Rekey:
    """What a committer sends: the signed manifest (to every member device) and one wrap per
    recipient device (each to its device only). ``secret`` never prints."""

    manifest: bytes
    wraps: dict[str, bytes]
    secret: bytes
    epoch: EpochId

    def __repr__(self) -> str:
        return f"Rekey(epoch={self.epoch.number}, wraps={len(self.wraps)}, secret=<redacted>)"


def build_rekey(
    *,
    room: str,
    epoch_number: int,
    prev_epoch: EpochId | None,
    roster_head: bytes,
    device_list_version: int,
    committer: SigningKey,
    recipients: Mapping[str, bytes],
    secret: bytes | None = None,
    ephemeral: ReceivingKey | None = None,
    nonces: Mapping[str, bytes] | None = None,
) -> Rekey:
    """Make epoch ``epoch_number``: a fresh secret (unless given), its commitment, one wrap
    per ``recipients`` entry (``device_id -> X25519 receiving public key``) and the signed
    manifest. ``ephemeral`` and ``nonces`` exist for test vectors; leave them unset."""
    if not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise ValueError("a rekey needs between 1 and MAX_RECIPIENTS recipients")
    if not all(is_device_id(d) and _is_key(k) for d, k in recipients.items()):
        raise ValueError("bad recipient device id or receiving key")
    k = secret if secret is not None else new_epoch_secret()
    if len(k) != KEY_SIZE:
        raise ValueError("an epoch secret is 32 bytes")
    eph = ephemeral if ephemeral is not None else ReceivingKey.generate()
    prev = _prev_epoch(epoch_number, prev_epoch)
    epoch = EpochId(epoch_number, roster_head)
    committer_device = device_id_for(committer.public)
    commitment = key_commitment(k, room, epoch_number, roster_head)
    ctx = context_hash(
        room,
        epoch_number,
        prev,
        roster_head,
        device_list_version,
        committer_device,
        eph.public,
        commitment,
    )
    wraps = {
        device: wrap_secret(
            k,
            ephemeral=eph,
            recipient_device=device,
            recipient_public=recipients[device],
            context_hash=ctx,
            nonce=nonces.get(device) if nonces is not None else None,
        )
        for device in sorted(recipients)
    }
    body = pack_body(
        [
            1,
            room,
            epoch_number,
            prev,
            roster_head,
            device_list_version,
            committer_device,
            eph.public,
            commitment,
            [[d, wrap_hash(w)] for d, w in wraps.items()],
        ]
    )
    manifest = body + sign_with_label(committer, MANIFEST_LABEL, body)
    return Rekey(manifest=manifest, wraps=wraps, secret=k, epoch=epoch)


def open_rekey(
    manifest: RekeyManifest, wrap: bytes, *, device_id: str, receiving: ReceivingKey
) -> bytes:
    """Open this device's wrap of a *verified* manifest and return the epoch secret.

    Raises :class:`BadSignature` if the wrap is not the one the manifest signed,
    :class:`DecryptionFailed` if it does not open, and :class:`CommitmentMismatch` if the
    secret is not the one committed to (the committer gave members different keys).
    """
    manifest.check_wrap(device_id, wrap)
    secret = unwrap_secret(
        wrap,
        receiving=receiving,
        ephemeral_public=manifest.ephemeral_public,
        recipient_device=device_id,
        context_hash=manifest.context_hash,
    )
    check_commitment(
        secret, manifest.room, manifest.epoch_number, manifest.roster_head, manifest.key_commitment
    )
    return secret


def check_recipients(
    manifest_recipients: Iterable[str], expected: Iterable[str]
) -> tuple[list[str], list[str]]:
    """``(missing, extra)``, each sorted: devices the rekey should wrap to but does not, and
    devices it wraps to but should not. Both empty means the recipient set is exact (I6)."""
    have, want = set(manifest_recipients), set(expected)
    return sorted(want - have), sorted(have - want)
