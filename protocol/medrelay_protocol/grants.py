"""History grants: the adder's device wraps the epoch secrets that cover a newcomer's
history range to the newcomer's certified devices.

A summoned specialist usually needs the case so far. The signed Add names
``history_from_seq``; after it commits, the adder's client builds one grant covering the
epochs in use from that seq up to the Add, wrapped to the newcomer's devices taken from the
adder's *own* verified roster and certificate checks (never the server's word). The server
checks the signature, that the grantee was added with exactly that ``history_from_seq`` by
the grant's signer, stores the grant as a room event of kind ``grant`` and journals the
disclosure; the store already opened exactly that seq range to the grantee.

Wire: ``body || signature`` with label ``"history-grant"``, body = msgpack
``[1, room, grantee, from_seq, granter_device, ephemeral_public,
[[epoch, roster_head, key_commitment, {device_id: wrap}], ...]]``. Each wrap is
:func:`~medrelay_protocol.crypto.wrap_secret` of the epoch secret with associated data bound
to :func:`grant_context` and the recipient device id. The wraps travel inside the grant
(every member device receives the event; only the grantee's devices can open their wraps).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .canonical import pack_body, unpack_body
from .crypto import (
    KEY_SIZE,
    SIGNATURE_SIZE,
    ReceivingKey,
    SigningKey,
    blake2b_256,
    check_commitment,
    device_id_for,
    key_commitment,
    sign_with_label,
    unwrap_secret,
    verify_with_label,
    wrap_secret,
)
from .errors import MalformedFrame

GRANT_LABEL = "history-grant"
MAX_GRANT_EPOCHS = 64
MAX_GRANT_DEVICES = 16


def grant_context(
    room: str,
    grantee: str,
    from_seq: int,
    epoch: int,
    roster_head: bytes,
    commitment: bytes,
    granter_device: str,
    ephemeral_public: bytes,
) -> bytes:
    return blake2b_256(
        room,
        grantee,
        from_seq,
        epoch,
        roster_head,
        commitment,
        granter_device,
        ephemeral_public,
        person=b"mr-grant-ctx",
    )


@dataclass(frozen=True, slots=True, repr=False)
class GrantedEpoch:
    number: int
    roster_head: bytes
    commitment: bytes
    wraps: Mapping[str, bytes]


@dataclass(frozen=True, slots=True, repr=False)
class HistoryGrant:
    room: str
    grantee: str
    from_seq: int
    granter_device: str
    ephemeral_public: bytes
    epochs: tuple[GrantedEpoch, ...]
    raw: bytes

    def __repr__(self) -> str:
        n = len(self.epochs)
        return f"HistoryGrant(room={self.room!r}, grantee={self.grantee!r}, epochs={n})"

    @classmethod
    def verify(cls, raw: bytes, granter_key: bytes) -> HistoryGrant:
        """Check the granter's signature over the exact bytes, then decode strictly."""
        if len(raw) <= SIGNATURE_SIZE:
            raise MalformedFrame("grant too short")
        body, sig = raw[:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]
        verify_with_label(granter_key, GRANT_LABEL, sig, body)
        grant = cls._decode(body, raw)
        if grant.granter_device != device_id_for(granter_key):
            raise MalformedFrame("grant names another device")
        return grant

    @classmethod
    def parse_unverified(cls, raw: bytes) -> HistoryGrant:
        if len(raw) <= SIGNATURE_SIZE:
            raise MalformedFrame("grant too short")
        return cls._decode(raw[:-SIGNATURE_SIZE], raw)

    @classmethod
    def _decode(cls, body: bytes, raw: bytes) -> HistoryGrant:
        f = unpack_body(body)
        if not isinstance(f, list) or len(f) != 7 or f[0] != 1:
            raise MalformedFrame("grant: bad shape")
        _, room, grantee, from_seq, device, eph, epochs = f
        if not (
            isinstance(room, str)
            and isinstance(grantee, str)
            and _uint(from_seq)
            and isinstance(device, str)
            and isinstance(eph, bytes)
            and len(eph) == KEY_SIZE
            and isinstance(epochs, list)
            and 0 < len(epochs) <= MAX_GRANT_EPOCHS
        ):
            raise MalformedFrame("grant: bad field")
        return cls(room, grantee, from_seq, device, eph, tuple(_epoch(e) for e in epochs), raw)

    def open(self, *, device_id: str, receiving: ReceivingKey) -> dict[int, bytes]:
        """This device's epoch secrets, each checked against its commitment."""
        out: dict[int, bytes] = {}
        for e in self.epochs:
            wrap = e.wraps.get(device_id)
            if wrap is None:
                continue
            context = grant_context(
                self.room,
                self.grantee,
                self.from_seq,
                e.number,
                e.roster_head,
                e.commitment,
                self.granter_device,
                self.ephemeral_public,
            )
            secret = unwrap_secret(
                wrap,
                receiving=receiving,
                ephemeral_public=self.ephemeral_public,
                recipient_device=device_id,
                context_hash=context,
            )
            check_commitment(secret, self.room, e.number, e.roster_head, e.commitment)
            out[e.number] = secret
        return out


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _epoch(value: Any) -> GrantedEpoch:
    if not isinstance(value, list) or len(value) != 4:
        raise MalformedFrame("grant: bad epoch")
    number, head, commitment, wraps = value
    if not (
        _uint(number)
        and isinstance(head, bytes)
        and isinstance(commitment, bytes)
        and isinstance(wraps, dict)
        and 0 < len(wraps) <= MAX_GRANT_DEVICES
        and all(isinstance(k, str) and isinstance(v, bytes) for k, v in wraps.items())
    ):
        raise MalformedFrame("grant: bad epoch")
    return GrantedEpoch(number, head, commitment, MappingProxyType(dict(wraps)))


def build_grant(
    *,
    room: str,
    grantee: str,
    from_seq: int,
    granter: SigningKey,
    epochs: Mapping[int, tuple[bytes, bytes]],
    recipients: Mapping[str, bytes],
) -> bytes:
    """``epochs``: epoch number -> (roster head, secret); ``recipients``: the grantee's
    certified device ids -> X25519 receiving keys (from the granter's own verification)."""
    if not 0 < len(epochs) <= MAX_GRANT_EPOCHS or not 0 < len(recipients) <= MAX_GRANT_DEVICES:
        raise ValueError("a grant covers 1..64 epochs for 1..16 devices")
    ephemeral = ReceivingKey.generate()
    device = device_id_for(granter.public)
    items = []
    for number in sorted(epochs):
        head, secret = epochs[number]
        commitment = key_commitment(secret, room, number, head)
        context = grant_context(
            room, grantee, from_seq, number, head, commitment, device, ephemeral.public
        )
        wraps = {
            dev: wrap_secret(
                secret,
                ephemeral=ephemeral,
                recipient_device=dev,
                recipient_public=pub,
                context_hash=context,
            )
            for dev, pub in sorted(recipients.items())
        }
        items.append([number, head, commitment, wraps])
    body = pack_body([1, room, grantee, from_seq, device, ephemeral.public, items])
    return body + sign_with_label(granter, GRANT_LABEL, body)
