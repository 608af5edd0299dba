"""Message envelopes: header as associated data, padded msgpack body, sender signature.

``envelope = msgpack [header_bytes, nonce, ciphertext, signature]`` where

* ``header_bytes = msgpack [1, room, epoch, roster_head, sender_device, counter, mid, priority]``
* ``ciphertext = XChaCha20-Poly1305(message_key(K, room, epoch, head), nonce, pad(body),
  aad=header_bytes)``
* ``signature = SignWithLabel(device_key, "message", header_bytes, nonce, ciphertext)``

The server checks the signature and the header's room, sender device and mid against the
``send`` frame without being able to read the body.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .canonical import pack_body, unpack_body
from .crypto import (
    KEY_SIZE,
    MID_SIZE,
    NONCE_SIZE,
    SIGNATURE_SIZE,
    SigningKey,
    aead_open,
    aead_seal,
    device_id_for,
    message_key,
    pad,
    random_nonce,
    sign_with_label,
    unpad,
    verify_with_label,
)
from .errors import MalformedFrame

MESSAGE_LABEL = "message"
PRIORITIES = ("routine", "urgent", "signal")
MAX_ENVELOPE = 70 * 1024
MAX_ROOM_ID = 64


@dataclass(frozen=True, slots=True)
class MessageHeader:
    room: str
    epoch: int
    roster_head: bytes
    sender_device: str
    counter: int
    mid: bytes
    priority: str = "routine"

    def __post_init__(self) -> None:
        if not 0 < len(self.room) <= MAX_ROOM_ID:
            raise MalformedFrame("header: bad room")
        if len(self.roster_head) != KEY_SIZE or len(self.mid) != MID_SIZE:
            raise MalformedFrame("header: bad length")
        if self.priority not in PRIORITIES or self.epoch < 0 or self.counter < 0:
            raise MalformedFrame("header: bad field")

    def encode(self) -> bytes:
        return pack_body(
            [
                1,
                self.room,
                self.epoch,
                self.roster_head,
                self.sender_device,
                self.counter,
                self.mid,
                self.priority,
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> MessageHeader:
        fields = unpack_body(data, max_size=1024)
        if not isinstance(fields, list) or len(fields) != 8 or fields[0] != 1:
            raise MalformedFrame("header: bad shape")
        _, room, epoch, head, device, counter, mid, priority = fields
        types: tuple[tuple[Any, type], ...] = (
            (room, str),
            (epoch, int),
            (head, bytes),
            (device, str),
            (counter, int),
            (mid, bytes),
            (priority, str),
        )
        if any(not isinstance(v, t) or isinstance(v, bool) for v, t in types):
            raise MalformedFrame("header: wrong field type")
        return cls(room, epoch, head, device, counter, mid, priority)


@dataclass(frozen=True, slots=True, repr=False)
class Envelope:
    header_bytes: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes

    @property
    def header(self) -> MessageHeader:
        return MessageHeader.decode(self.header_bytes)

    def encode(self) -> bytes:
        return pack_body([self.header_bytes, self.nonce, self.ciphertext, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        fields = unpack_body(data, max_size=MAX_ENVELOPE)
        if not isinstance(fields, list) or len(fields) != 4:
            raise MalformedFrame("envelope: bad shape")
        if not all(isinstance(f, bytes) for f in fields):
            raise MalformedFrame("envelope: wrong field type")
        header, nonce, ct, sig = fields
        if len(nonce) != NONCE_SIZE or len(sig) != SIGNATURE_SIZE:
            raise MalformedFrame("envelope: bad length")
        return cls(header, nonce, ct, sig)

    def verify(self, sender_key: bytes) -> MessageHeader:
        """Check the sender signature and that the header names the signing device."""
        verify_with_label(
            sender_key,
            MESSAGE_LABEL,
            self.signature,
            self.header_bytes,
            self.nonce,
            self.ciphertext,
        )
        header = self.header
        if header.sender_device != device_id_for(sender_key):
            raise MalformedFrame("envelope: header names another device")
        return header

    def __repr__(self) -> str:
        return f"Envelope(header={len(self.header_bytes)}B, ciphertext={len(self.ciphertext)}B)"


def seal_message(
    header: MessageHeader,
    body: object,
    *,
    epoch_secret: bytes,
    device: SigningKey,
    nonce: bytes | None = None,
) -> Envelope:
    """Encrypt and sign ``body`` (any msgpack value: text, FHIR vitals, attachment pointer)."""
    if header.sender_device != device_id_for(device.public):
        raise ValueError("header names another device")
    header_bytes = header.encode()
    n = nonce if nonce is not None else random_nonce()
    key = message_key(epoch_secret, header.room, header.epoch, header.roster_head)
    ct = aead_seal(key, n, pad(pack_body(body)), header_bytes)
    sig = sign_with_label(device, MESSAGE_LABEL, header_bytes, n, ct)
    return Envelope(header_bytes, n, ct, sig)


def open_message(
    envelope: Envelope, *, sender_key: bytes, epoch_secret: bytes
) -> tuple[MessageHeader, Any]:
    """Verify, then decrypt. Signature failures raise ``BadSignature``; every decryption
    failure raises the opaque ``DecryptionFailed``."""
    header = envelope.verify(sender_key)
    key = message_key(epoch_secret, header.room, header.epoch, header.roster_head)
    plain = unpad(aead_open(key, envelope.nonce, envelope.ciphertext, envelope.header_bytes))
    return header, unpack_body(plain, max_size=len(plain))
