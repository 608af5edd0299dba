"""Cryptographic constructions of medrelay, over PyNaCl (libsodium).

Every construction here is specified byte for byte in ``docs/protocol.md`` section 5 and
has vectors in ``tests/vectors/``. Rules kept throughout:

* one signing function, :func:`sign_with_label`, for every signature (RFC 9420 §5.1.2 style);
* every decryption failure raises the same opaque :class:`DecryptionFailed`;
* private key objects print redacted and expose their bytes only through an explicit method;
* time is a parameter (``now``), never read from a clock here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from .errors import BadSignature, DecryptionFailed, KeyExpired, LowOrderPoint, MalformedFrame

DOMAIN = b"medrelay/1 "
KEY_SIZE = 32
NONCE_SIZE = 24
SIGNATURE_SIZE = 64
MID_SIZE = 16
TAG_SIZE = 16

Field = bytes | str | int


def encode_field(value: Field) -> bytes:
    """One length-prefixed field: u32 big-endian length, then the bytes.

    ``str`` is UTF-8; ``int`` is an unsigned 64-bit big-endian integer (8 bytes).
    """
    if isinstance(value, bool):
        raise TypeError("bool is not a signature field")
    if isinstance(value, int):
        if not 0 <= value < 2**64:
            raise ValueError("integer field out of range")
        raw = struct.pack(">Q", value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raw = bytes(value)
    return struct.pack(">I", len(raw)) + raw


def labelled_content(label: str, fields: Iterable[Field]) -> bytes:
    """The exact bytes signed by :func:`sign_with_label`."""
    return encode_field(DOMAIN + label.encode("ascii")) + b"".join(encode_field(f) for f in fields)


def blake2b_256(*fields: Field, person: bytes, key: bytes = b"") -> bytes:
    """BLAKE2b-256 over length-prefixed fields with a 16-byte personalisation."""
    h = hashlib.blake2b(digest_size=32, key=key, person=person.ljust(16, b"\0"))
    for f in fields:
        h.update(encode_field(f))
    return h.digest()


# ---------------------------------------------------------------------------------------
# Signing keys (Ed25519)


class SigningKey:
    """An Ed25519 private key (user identity key or device signing key). Prints redacted."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_SIZE:
            raise ValueError("an Ed25519 seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(KEY_SIZE))

    @property
    def public(self) -> bytes:
        return bytes(self._key.verify_key)

    def private_bytes(self) -> bytes:
        """The 32-byte seed, for a key store. Never log it."""
        return bytes(self._key)

    def sign_raw(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message).signature)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.hex()[:16]}…, private=<redacted>)"


def sign_with_label(key: SigningKey, label: str, *fields: Field) -> bytes:
    """Sign ``fields`` under ``label``: the one signing function of the protocol."""
    return key.sign_raw(labelled_content(label, fields))


def verify_with_label(public: bytes, label: str, signature: bytes, *fields: Field) -> None:
    """Strict Ed25519 verification of :func:`sign_with_label`; raises :class:`BadSignature`."""
    verify_raw(public, labelled_content(label, fields), signature)


def verify_raw(public: bytes, message: bytes, signature: bytes) -> None:
    if len(public) != KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise BadSignature("bad signature")
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise BadSignature("bad signature") from exc


# ---------------------------------------------------------------------------------------
# Key agreement (X25519)


class ReceivingKey:
    """An X25519 private key a device receives wraps with. Prints redacted."""

    __slots__ = ("_sk",)

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_SIZE:
            raise ValueError("an X25519 private key is 32 bytes")
        self._sk = bytes(private)

    @classmethod
    def generate(cls) -> ReceivingKey:
        return cls(os.urandom(KEY_SIZE))

    @property
    def public(self) -> bytes:
        return bytes(sodium.crypto_scalarmult_base(self._sk))

    def private_bytes(self) -> bytes:
        return self._sk

    def exchange(self, peer_public: bytes) -> bytes:
        return x25519(self._sk, peer_public)

    def __repr__(self) -> str:
        return f"ReceivingKey(public={self.public.hex()[:16]}…, private=<redacted>)"


def x25519(private: bytes, peer_public: bytes) -> bytes:
    """X25519; a low-order peer point (all-zero shared secret) raises :class:`LowOrderPoint`."""
    if len(private) != KEY_SIZE or len(peer_public) != KEY_SIZE:
        raise LowOrderPoint("X25519 keys are 32 bytes")
    try:
        shared = bytes(sodium.crypto_scalarmult(private, peer_public))
    except nacl.exceptions.RuntimeError as exc:
        raise LowOrderPoint("peer key is a low-order point") from exc
    if not any(shared):  # defence in depth; libsodium already refuses this
        raise LowOrderPoint("peer key is a low-order point")
    return shared


# ---------------------------------------------------------------------------------------
# AEAD (XChaCha20-Poly1305, IETF)


def aead_seal(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key))


def aead_open(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open or raise the opaque :class:`DecryptionFailed`, whatever went wrong."""
    if len(key) != KEY_SIZE or len(nonce) != NONCE_SIZE or len(ciphertext) < TAG_SIZE:
        raise DecryptionFailed()
    try:
        return bytes(sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, key))
    except Exception as exc:  # every libsodium failure collapses into one opaque error
        raise DecryptionFailed() from exc


def random_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


# ---------------------------------------------------------------------------------------
# Identity: device ids, fingerprints


def device_id_for(device_signing_public: bytes) -> str:
    """A device id is derived from its signing key, so it cannot be reassigned to another key."""
    return blake2b_256(device_signing_public, person=b"mr-device-id").hex()[:32]


def fingerprint(user_id: str, identity_public: bytes) -> str:
    """The one fingerprint shown per user: 60 decimal digits in twelve groups of five."""
    digest = blake2b_256(user_id, identity_public, person=b"mr-fingerprint")
    digest += blake2b_256(digest, person=b"mr-fingerprint")
    groups = []
    for i in range(12):
        chunk = int.from_bytes(digest[i * 5 : i * 5 + 5], "big")
        groups.append(f"{chunk % 100000:05d}")
    return " ".join(groups)


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


# ---------------------------------------------------------------------------------------
# Epoch secrets, commitments and message keys


def new_epoch_secret() -> bytes:
    return os.urandom(KEY_SIZE)


def key_commitment(secret: bytes, room: str, epoch: int, roster_head: bytes) -> bytes:
    """``BLAKE2b(K, context)``: lets every recipient check it holds the same key as the others."""
    return blake2b_256(room, epoch, roster_head, person=b"mr-key-commit", key=secret)


def message_key(secret: bytes, room: str, epoch: int, roster_head: bytes) -> bytes:
    return blake2b_256(room, epoch, roster_head, person=b"mr-message-key", key=secret)


def check_commitment(
    secret: bytes, room: str, epoch: int, roster_head: bytes, commitment: bytes
) -> None:
    from .errors import CommitmentMismatch

    if not constant_time_equal(key_commitment(secret, room, epoch, roster_head), commitment):
        raise CommitmentMismatch("epoch secret does not match its commitment")


# ---------------------------------------------------------------------------------------
# Wraps of an epoch secret to one recipient device


def wrap_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return blake2b_256(shared, ephemeral_public, recipient_public, person=b"mr-wrap-key")


def wrap_secret(
    secret: bytes,
    *,
    ephemeral: ReceivingKey,
    recipient_device: str,
    recipient_public: bytes,
    context_hash: bytes,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt an epoch secret to one device. Returns ``nonce || ciphertext``.

    Associated data binds the wrap to the manifest context and to the recipient device id.
    """
    shared = ephemeral.exchange(recipient_public)
    key = wrap_key(shared, ephemeral.public, recipient_public)
    n = nonce if nonce is not None else random_nonce()
    aad = encode_field(context_hash) + encode_field(recipient_device)
    return n + aead_seal(key, n, secret, aad)


def unwrap_secret(
    wrap: bytes,
    *,
    receiving: ReceivingKey,
    ephemeral_public: bytes,
    recipient_device: str,
    context_hash: bytes,
) -> bytes:
    """Open a wrap addressed to this device; any failure is :class:`DecryptionFailed`."""
    if len(wrap) != NONCE_SIZE + KEY_SIZE + TAG_SIZE:
        raise DecryptionFailed()
    try:
        shared = receiving.exchange(ephemeral_public)
    except LowOrderPoint as exc:
        raise DecryptionFailed() from exc
    key = wrap_key(shared, ephemeral_public, receiving.public)
    aad = encode_field(context_hash) + encode_field(recipient_device)
    return aead_open(key, wrap[:NONCE_SIZE], wrap[NONCE_SIZE:], aad)


# ---------------------------------------------------------------------------------------
# Padding of message bodies

PAD_BUCKETS = (256, 1024, 4096, 16384, 65536)
MAX_BODY = PAD_BUCKETS[-1] - 4


def pad(body: bytes) -> bytes:
    """``u32 length || body || zeros`` up to the smallest bucket that holds it."""
    if len(body) > MAX_BODY:
        raise ValueError("message body too large")
    need = len(body) + 4
    bucket = next(b for b in PAD_BUCKETS if b >= need)
    return struct.pack(">I", len(body)) + body + bytes(bucket - need)


def unpad(padded: bytes) -> bytes:
    if len(padded) < 4 or len(padded) not in PAD_BUCKETS:
        raise DecryptionFailed()
    (n,) = struct.unpack(">I", padded[:4])
    if n > len(padded) - 4 or any(padded[4 + n :]):
        raise DecryptionFailed()
    return padded[4 : 4 + n]


# ---------------------------------------------------------------------------------------
# Attachments: secretstream chunks of a fixed padded size

CHUNK_SIZE = 256 * 1024
_SS = sodium
_TAG_MESSAGE = sodium.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = sodium.crypto_secretstream_xchacha20poly1305_TAG_FINAL
STREAM_HEADER_SIZE = sodium.crypto_secretstream_xchacha20poly1305_HEADERBYTES
STREAM_ABYTES = sodium.crypto_secretstream_xchacha20poly1305_ABYTES
ENCRYPTED_CHUNK_SIZE = 4 + CHUNK_SIZE + STREAM_ABYTES


@dataclass(frozen=True, slots=True, repr=False)
class EncryptedFile:
    """The output of :func:`encrypt_attachment`: the key travels only inside a message."""

    key: bytes
    header: bytes
    chunks: tuple[bytes, ...]
    size: int

    def __repr__(self) -> str:
        return f"EncryptedFile(chunks={len(self.chunks)}, size={self.size}, key=<redacted>)"


def _chunk_aad(file_id: bytes, index: int) -> bytes:
    return encode_field(DOMAIN + b"attachment") + encode_field(file_id) + encode_field(index)


def encrypt_attachment(data: bytes, file_id: bytes, key: bytes | None = None) -> EncryptedFile:
    """Split ``data`` into fixed-size padded chunks and encrypt them as one secretstream.

    Every chunk carries ``u32 length || data || zeros`` padded to :data:`CHUNK_SIZE`, so chunk
    sizes reveal only the chunk count. The last chunk carries the FINAL tag (no truncation) and
    every chunk's associated data names the file id and index (no swapping between files).
    """
    k = key if key is not None else sodium.crypto_secretstream_xchacha20poly1305_keygen()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    header = bytes(sodium.crypto_secretstream_xchacha20poly1305_init_push(state, k))
    pieces = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]
    chunks = []
    for index, piece in enumerate(pieces):
        tag = _TAG_FINAL if index == len(pieces) - 1 else _TAG_MESSAGE
        plain = struct.pack(">I", len(piece)) + piece + bytes(CHUNK_SIZE - len(piece))
        aad = _chunk_aad(file_id, index)
        chunks.append(
            bytes(sodium.crypto_secretstream_xchacha20poly1305_push(state, plain, aad, tag))
        )
    return EncryptedFile(key=bytes(k), header=header, chunks=tuple(chunks), size=len(data))


def decrypt_attachment(
    key: bytes, header: bytes, file_id: bytes, chunks: Iterable[bytes]
) -> Iterator[bytes]:
    """Yield plaintext pieces in order; raises :class:`DecryptionFailed` on any tampering,
    reordering, truncation or trailing chunk."""
    if len(key) != KEY_SIZE or len(header) != STREAM_HEADER_SIZE:
        raise DecryptionFailed()
    state = sodium.crypto_secretstream_xchacha20poly1305_state()
    try:
        sodium.crypto_secretstream_xchacha20poly1305_init_pull(state, header, key)
    except Exception as exc:
        raise DecryptionFailed() from exc
    finished = False
    for index, chunk in enumerate(chunks):
        if finished or len(chunk) != ENCRYPTED_CHUNK_SIZE:
            raise DecryptionFailed()
        try:
            plain, tag = sodium.crypto_secretstream_xchacha20poly1305_pull(
                state, chunk, _chunk_aad(file_id, index)
            )
        except Exception as exc:
            raise DecryptionFailed() from exc
        (n,) = struct.unpack(">I", plain[:4])
        if n > CHUNK_SIZE or any(plain[4 + n :]):
            raise DecryptionFailed()
        finished = tag == _TAG_FINAL
        yield bytes(plain[4 : 4 + n])
    if not finished:
        raise DecryptionFailed()


def check_not_expired(expires_at: int, now: int) -> None:
    if now >= expires_at:
        raise KeyExpired("receiving key expired")


def require_len(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise MalformedFrame(f"{what} must be {size} bytes")
    return value
