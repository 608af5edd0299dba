"""Unit tests of medrelay_protocol.crypto: labelled signatures, keys, X25519, AEAD, wraps,
commitments, padding, attachments and fingerprints."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medrelay_protocol.crypto import (
    CHUNK_SIZE,
    DOMAIN,
    ENCRYPTED_CHUNK_SIZE,
    KEY_SIZE,
    MAX_BODY,
    NONCE_SIZE,
    PAD_BUCKETS,
    STREAM_HEADER_SIZE,
    TAG_SIZE,
    EncryptedFile,
    ReceivingKey,
    SigningKey,
    aead_open,
    aead_seal,
    blake2b_256,
    check_commitment,
    check_not_expired,
    decrypt_attachment,
    device_id_for,
    encode_field,
    encrypt_attachment,
    fingerprint,
    key_commitment,
    labelled_content,
    message_key,
    pad,
    require_len,
    sign_with_label,
    unpad,
    unwrap_secret,
    verify_raw,
    verify_with_label,
    wrap_key,
    wrap_secret,
    x25519,
)
from medrelay_protocol.errors import (
    BadSignature,
    CommitmentMismatch,
    DecryptionFailed,
    KeyExpired,
    LowOrderPoint,
    MalformedFrame,
)

SEED_A = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
SEED_B = bytes(range(32))


def _opaque(excinfo: pytest.ExceptionInfo[DecryptionFailed]) -> None:
    """Every decryption failure is the same type with the same message (no oracle)."""
    assert type(excinfo.value) is DecryptionFailed
    assert str(excinfo.value) == "decryption failed"


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# ---------------------------------------------------------------------------------------
# encode_field / labelled_content


def test_encode_field_types() -> None:
    assert encode_field(b"\x01\x02") == b"\x00\x00\x00\x02\x01\x02"
    assert encode_field(b"") == b"\x00\x00\x00\x00"
    assert encode_field("é") == b"\x00\x00\x00\x02\xc3\xa9"  # UTF-8, length in bytes
    assert encode_field(5) == b"\x00\x00\x00\x08" + b"\x00" * 7 + b"\x05"
    assert encode_field(2**64 - 1) == b"\x00\x00\x00\x08" + b"\xff" * 8


@pytest.mark.parametrize("value", [-1, 2**64])
def test_encode_field_int_range(value: int) -> None:
    with pytest.raises(ValueError):
        encode_field(value)


@pytest.mark.parametrize("value", [True, False])
def test_encode_field_refuses_bool(value: bool) -> None:
    with pytest.raises(TypeError):
        encode_field(value)


def test_labelled_content_exact_bytes() -> None:
    # Written out by hand: u32 length || "medrelay/1 test", then each field length-prefixed.
    expected = bytes.fromhex(
        "0000000f"  # length of the label field: 15
        "6d656472656c61792f3120"  # "medrelay/1 "
        "74657374"  # "test"
        "00000002 0102"  # b"\x01\x02"
        "00000002 6869"  # "hi"
        "00000008 0000000000000005"  # 5 as u64 big-endian
    )
    assert labelled_content("test", [b"\x01\x02", "hi", 5]) == expected
    assert DOMAIN == b"medrelay/1 "


def test_labelled_content_no_fields() -> None:
    assert labelled_content("x", []) == b"\x00\x00\x00\x0cmedrelay/1 x"


def _parse_fields(data: bytes) -> list[bytes]:
    """Inverse of concatenated encode_field: shows the encoding is a prefix code."""
    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack(">I", data[i : i + 4])
        out.append(data[i + 4 : i + 4 + n])
        i += 4 + n
    assert i == len(data)
    return out


field_lists = st.lists(st.binary(max_size=12), max_size=5)


@settings(max_examples=200)
@given(field_lists, field_lists)
def test_encode_field_injective_on_field_lists(a: list[bytes], b: list[bytes]) -> None:
    enc_a = b"".join(encode_field(f) for f in a)
    enc_b = b"".join(encode_field(f) for f in b)
    assert _parse_fields(enc_a) == a
    assert (enc_a == enc_b) == (a == b)


@settings(max_examples=100)
@given(st.text(min_size=1, max_size=8, alphabet="abcdefgh-"), field_lists)
def test_labelled_content_parses_back(label: str, fields: list[bytes]) -> None:
    parsed = _parse_fields(labelled_content(label, fields))
    assert parsed == [DOMAIN + label.encode(), *fields]


# ---------------------------------------------------------------------------------------
# Signatures


def test_sign_with_label_round_trip_and_determinism() -> None:
    key = SigningKey(SEED_A)
    sig = sign_with_label(key, "device-cert", b"body", "user", 7)
    assert len(sig) == 64
    assert sig == sign_with_label(key, "device-cert", b"body", "user", 7)  # Ed25519
    assert sig == key.sign_raw(labelled_content("device-cert", [b"body", "user", 7]))
    verify_with_label(key.public, "device-cert", sig, b"body", "user", 7)


def test_sign_with_label_domain_separation() -> None:
    key = SigningKey(SEED_A)
    base = sign_with_label(key, "roster", "ab", "c")
    variants = {
        "other label": sign_with_label(key, "rosters", "ab", "c"),
        "label/field shift": sign_with_label(key, "rostera", "b", "c"),
        "field split": sign_with_label(key, "roster", "a", "bc"),
        "joined": sign_with_label(key, "roster", "abc"),
        "extra empty field": sign_with_label(key, "roster", "ab", "c", ""),
        "raw content": key.sign_raw(b"roster" + b"abc"),
    }
    for name, sig in variants.items():
        assert sig != base, name
    with pytest.raises(BadSignature):
        verify_with_label(key.public, "rosters", base, "ab", "c")
    with pytest.raises(BadSignature):
        verify_with_label(key.public, "roster", base, "a", "bc")
    with pytest.raises(BadSignature):
        verify_with_label(key.public, "roster", base, "abc")


def test_verify_failures_raise_bad_signature() -> None:
    key, other = SigningKey(SEED_A), SigningKey(SEED_B)
    sig = sign_with_label(key, "message", b"x")
    with pytest.raises(BadSignature):
        verify_with_label(other.public, "message", sig, b"x")
    with pytest.raises(BadSignature):
        verify_with_label(key.public, "message", sig, b"y")
    for i in (0, 31, 32, 63):
        with pytest.raises(BadSignature):
            verify_with_label(key.public, "message", _flip(sig, i), b"x")
    for bad_sig in (sig[:-1], sig + b"\x00", b""):
        with pytest.raises(BadSignature):
            verify_with_label(key.public, "message", bad_sig, b"x")
    for bad_pub in (key.public[:-1], key.public + b"\x00", b""):
        with pytest.raises(BadSignature):
            verify_with_label(bad_pub, "message", sig, b"x")


def test_verify_raw_refuses_small_order_public_key() -> None:
    # The identity point encoding (y = 1) with R = identity and S = 0 "verifies" under lax
    # verifiers for any message; strict libsodium refuses it.
    identity_point = b"\x01" + bytes(31)
    with pytest.raises(BadSignature):
        verify_raw(identity_point, b"anything", identity_point + bytes(32))


def test_signing_key_properties() -> None:
    key = SigningKey(SEED_A)
    assert key.private_bytes() == SEED_A
    # RFC 8032 §7.1 test 1 public key for this seed.
    assert key.public.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
    assert SigningKey.generate().public != SigningKey.generate().public
    for bad in (b"", SEED_A[:31], SEED_A + b"\x00"):
        with pytest.raises(ValueError):
            SigningKey(bad)


def test_rfc8032_signature_of_empty_message() -> None:
    sig = SigningKey(SEED_A).sign_raw(b"")
    assert sig.hex() == (
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
    )


@pytest.mark.parametrize("make", [lambda: SigningKey(SEED_A), lambda: ReceivingKey(SEED_B)])
def test_private_keys_print_redacted(make: object) -> None:
    key = make()  # type: ignore[operator]
    private_hex = key.private_bytes().hex()
    for text in (repr(key), str(key), f"{key!r}", f"{[key]}"):
        assert private_hex not in text
        assert private_hex[:16] not in text
        assert "redacted" in text


def test_encrypted_file_prints_redacted() -> None:
    enc = encrypt_attachment(b"secret scan", b"f" * 16, key=SEED_B)
    assert SEED_B.hex() not in repr(enc)
    assert "redacted" in repr(enc)


# ---------------------------------------------------------------------------------------
# X25519


def test_x25519_rfc7748_vector() -> None:
    # RFC 7748 §6.1: Alice's private key, Bob's public key, their shared secret.
    alice = ReceivingKey(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert alice.public.hex() == (
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    shared = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    assert alice.exchange(bob_public).hex() == shared
    assert x25519(alice.private_bytes(), bob_public).hex() == shared


def test_x25519_is_symmetric() -> None:
    a, b = ReceivingKey.generate(), ReceivingKey.generate()
    assert a.exchange(b.public) == b.exchange(a.public)
    assert a.exchange(b.public) != a.exchange(ReceivingKey.generate().public)


@pytest.mark.parametrize(
    "point",
    [
        bytes(32),  # 0
        b"\x01" + bytes(31),  # 1
        bytes.fromhex(
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"
        ),  # order 8
        bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),  # p-1
    ],
    ids=["zero", "one", "order8", "p-1"],
)
def test_x25519_low_order_points_refused(point: bytes) -> None:
    with pytest.raises(LowOrderPoint):
        x25519(SEED_B, point)
    with pytest.raises(LowOrderPoint):
        ReceivingKey(SEED_B).exchange(point)


def test_x25519_wrong_lengths_refused() -> None:
    pub = ReceivingKey(SEED_A).public
    for private, public in ((SEED_B[:31], pub), (SEED_B, pub[:31]), (SEED_B, pub + b"\x00")):
        with pytest.raises(LowOrderPoint):
            x25519(private, public)
    with pytest.raises(ValueError):
        ReceivingKey(b"\x00" * 31)


# ---------------------------------------------------------------------------------------
# AEAD


def test_aead_round_trip_and_failures() -> None:
    key, nonce = SEED_B, bytes(range(24))
    ct = aead_seal(key, nonce, b"hello", b"aad")
    assert len(ct) == 5 + TAG_SIZE
    assert aead_open(key, nonce, ct, b"aad") == b"hello"
    cases = [
        (SEED_A, nonce, ct, b"aad"),
        (key, _flip(nonce, 0), ct, b"aad"),
        (key, nonce, ct, b"aaD"),
        (key, nonce, ct, b""),
        (key, nonce, _flip(ct, 0), b"aad"),
        (key, nonce, _flip(ct, len(ct) - 1), b"aad"),
        (key, nonce, ct[:-1], b"aad"),
        (key, nonce, ct + b"\x00", b"aad"),
        (key, nonce, ct[: TAG_SIZE - 1], b"aad"),
        (key[:31], nonce, ct, b"aad"),
        (key, nonce[:23], ct, b"aad"),
    ]
    for args in cases:
        with pytest.raises(DecryptionFailed) as excinfo:
            aead_open(*args)
        _opaque(excinfo)


# ---------------------------------------------------------------------------------------
# Device ids and fingerprints


def test_device_id_for_spec() -> None:
    pub = SigningKey(SEED_A).public
    manual = hashlib.blake2b(
        struct.pack(">I", 32) + pub, digest_size=32, person=b"mr-device-id".ljust(16, b"\0")
    ).hexdigest()[:32]
    assert device_id_for(pub) == manual
    assert re.fullmatch(r"[0-9a-f]{32}", device_id_for(pub))
    assert device_id_for(SigningKey(SEED_B).public) != device_id_for(pub)


def test_blake2b_256_personalisation_and_key_separate() -> None:
    a = blake2b_256(b"x", person=b"mr-a")
    assert len(a) == 32
    assert a != blake2b_256(b"x", person=b"mr-b")
    assert a != blake2b_256(b"x", person=b"mr-a", key=b"k")
    assert a != blake2b_256(b"", b"x", person=b"mr-a")
    assert a == blake2b_256(b"x", person=b"mr-a")


FINGERPRINT_RE = re.compile(r"[0-9]{5}( [0-9]{5}){11}")


def test_fingerprint_format_stable_and_key_bound() -> None:
    pub_a, pub_b = SigningKey(SEED_A).public, SigningKey(SEED_B).public
    fp = fingerprint("dr.jones@st-mary", pub_a)
    assert FINGERPRINT_RE.fullmatch(fp)
    assert len(fp.replace(" ", "")) == 60
    assert fingerprint("dr.jones@st-mary", pub_a) == fp
    assert fingerprint("dr.jones@st-mary", pub_b) != fp
    assert fingerprint("dr.smith@st-mary", pub_a) != fp


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32), st.text(max_size=20))
def test_fingerprint_format_for_any_key(pub: bytes, user: str) -> None:
    assert FINGERPRINT_RE.fullmatch(fingerprint(user, pub))


# ---------------------------------------------------------------------------------------
# Epoch key commitment and message key

HEAD = bytes(range(100, 132))


def test_key_commitment_and_check() -> None:
    secret = SEED_B
    c = key_commitment(secret, "ward-7", 3, HEAD)
    assert len(c) == 32
    check_commitment(secret, "ward-7", 3, HEAD, c)
    assert c != message_key(secret, "ward-7", 3, HEAD)  # distinct personalisations
    mismatches = [
        (SEED_A, "ward-7", 3, HEAD, c),
        (secret, "ward-8", 3, HEAD, c),
        (secret, "ward-7", 4, HEAD, c),
        (secret, "ward-7", 3, _flip(HEAD, 0), c),
        (secret, "ward-7", 3, HEAD, _flip(c, 31)),
        (secret, "ward-7", 3, HEAD, c[:31]),
    ]
    for args in mismatches:
        with pytest.raises(CommitmentMismatch):
            check_commitment(*args)


def test_message_key_depends_on_every_input() -> None:
    k = message_key(SEED_B, "ward-7", 3, HEAD)
    assert len(k) == 32
    assert k != message_key(SEED_A, "ward-7", 3, HEAD)
    assert k != message_key(SEED_B, "ward-70", 3, HEAD)
    assert k != message_key(SEED_B, "ward-7", 30, HEAD)
    assert k != message_key(SEED_B, "ward-7", 3, bytes(32))


# ---------------------------------------------------------------------------------------
# Wraps

CTX = hashlib.sha256(b"manifest").digest()
DEV = "a" * 32


@pytest.fixture
def wrap_parties() -> tuple[ReceivingKey, ReceivingKey, bytes]:
    return ReceivingKey(SEED_A), ReceivingKey(SEED_B), bytes(range(32, 64))


def test_wrap_round_trip(wrap_parties: tuple[ReceivingKey, ReceivingKey, bytes]) -> None:
    eph, recipient, secret = wrap_parties
    wrap = wrap_secret(
        secret,
        ephemeral=eph,
        recipient_device=DEV,
        recipient_public=recipient.public,
        context_hash=CTX,
    )
    assert len(wrap) == NONCE_SIZE + KEY_SIZE + TAG_SIZE
    opened = unwrap_secret(
        wrap,
        receiving=recipient,
        ephemeral_public=eph.public,
        recipient_device=DEV,
        context_hash=CTX,
    )
    assert opened == secret
    # Random nonces: two wraps of the same secret differ.
    again = wrap_secret(
        secret,
        ephemeral=eph,
        recipient_device=DEV,
        recipient_public=recipient.public,
        context_hash=CTX,
    )
    assert again != wrap


def test_wrap_with_fixed_nonce_is_the_documented_construction(
    wrap_parties: tuple[ReceivingKey, ReceivingKey, bytes],
) -> None:
    eph, recipient, secret = wrap_parties
    nonce = bytes(24)
    wrap = wrap_secret(
        secret,
        ephemeral=eph,
        recipient_device=DEV,
        recipient_public=recipient.public,
        context_hash=CTX,
        nonce=nonce,
    )
    shared = x25519(eph.private_bytes(), recipient.public)
    key = wrap_key(shared, eph.public, recipient.public)
    aad = encode_field(CTX) + encode_field(DEV)
    assert wrap == nonce + aead_seal(key, nonce, secret, aad)


def test_unwrap_failures_are_opaque(
    wrap_parties: tuple[ReceivingKey, ReceivingKey, bytes],
) -> None:
    eph, recipient, secret = wrap_parties
    wrap = wrap_secret(
        secret,
        ephemeral=eph,
        recipient_device=DEV,
        recipient_public=recipient.public,
        context_hash=CTX,
    )
    good = {
        "receiving": recipient,
        "ephemeral_public": eph.public,
        "recipient_device": DEV,
        "context_hash": CTX,
    }
    changes: list[tuple[bytes, dict[str, object]]] = [
        (wrap, {"recipient_device": "b" * 32}),
        (wrap, {"context_hash": _flip(CTX, 5)}),
        (wrap, {"receiving": ReceivingKey(bytes(range(64, 96)))}),
        (wrap, {"ephemeral_public": ReceivingKey(bytes(range(1, 33))).public}),
        (wrap, {"ephemeral_public": bytes(32)}),  # low-order: folded into DecryptionFailed
        (wrap, {"ephemeral_public": eph.public[:31]}),
        (wrap[:-1], {}),
        (wrap + b"\x00", {}),
        (b"", {}),
    ]
    changes += [(_flip(wrap, i), {}) for i in range(len(wrap))]
    for blob, change in changes:
        with pytest.raises(DecryptionFailed) as excinfo:
            unwrap_secret(blob, **{**good, **change})  # type: ignore[arg-type]
        _opaque(excinfo)


# ---------------------------------------------------------------------------------------
# Padding


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        (0, 256),
        (1, 256),
        (252, 256),
        (253, 1024),
        (1020, 1024),
        (1021, 4096),
        (4092, 4096),
        (4093, 16384),
        (16381, 65536),
        (MAX_BODY, 65536),
    ],
)
def test_pad_buckets(size: int, bucket: int) -> None:
    body = bytes([7]) * size
    padded = pad(body)
    assert len(padded) == bucket
    assert padded[:4] == struct.pack(">I", size)
    assert padded[4 : 4 + size] == body
    assert not any(padded[4 + size :])
    assert unpad(padded) == body


def test_pad_refuses_oversized_body() -> None:
    with pytest.raises(ValueError):
        pad(bytes(MAX_BODY + 1))


@settings(max_examples=150)
@given(st.binary(max_size=5000))
def test_pad_unpad_round_trip(body: bytes) -> None:
    padded = pad(body)
    assert len(padded) in PAD_BUCKETS
    assert len(padded) == min(b for b in PAD_BUCKETS if b >= len(body) + 4)
    assert unpad(padded) == body


def test_unpad_refuses_tampered_padding() -> None:
    padded = pad(b"hello")
    bad = [
        padded[:-1],  # not a bucket size
        padded + b"\x00",
        b"",
        b"\x00\x00\x00",
        _flip(padded, len(padded) - 1),  # non-zero padding byte
        _flip(padded, 9),  # first padding byte
        struct.pack(">I", 253) + padded[4:],  # length beyond the bucket
        struct.pack(">I", 0xFFFFFFFF) + padded[4:],
        struct.pack(">I", 4) + padded[4:],  # shorter length exposes non-zero bytes
    ]
    for blob in bad:
        with pytest.raises(DecryptionFailed) as excinfo:
            unpad(blob)
        _opaque(excinfo)
    # A longer claimed length over zero padding is indistinguishable and accepted.
    assert unpad(struct.pack(">I", 6) + padded[4:]) == b"hello\x00"


# ---------------------------------------------------------------------------------------
# Attachments

FILE_ID = b"file-0001-abcdef"
ATTACH_KEY = bytes(range(200, 232))


def _decrypt(enc: EncryptedFile, file_id: bytes = FILE_ID, chunks: object = None) -> bytes:
    pieces = decrypt_attachment(
        enc.key,
        enc.header,
        file_id,
        enc.chunks if chunks is None else chunks,  # type: ignore[arg-type]
    )
    return b"".join(pieces)


@pytest.fixture(scope="module")
def three_chunk_file() -> tuple[bytes, EncryptedFile]:
    data = bytes(i % 251 for i in range(2 * CHUNK_SIZE + 1000))
    return data, encrypt_attachment(data, FILE_ID, key=ATTACH_KEY)


def test_attachment_round_trip(three_chunk_file: tuple[bytes, EncryptedFile]) -> None:
    data, enc = three_chunk_file
    assert len(enc.chunks) == 3
    assert enc.size == len(data)
    assert enc.key == ATTACH_KEY
    assert len(enc.header) == STREAM_HEADER_SIZE
    assert all(len(c) == ENCRYPTED_CHUNK_SIZE for c in enc.chunks)  # sizes hide the length
    pieces = list(decrypt_attachment(enc.key, enc.header, FILE_ID, enc.chunks))
    assert [len(p) for p in pieces] == [CHUNK_SIZE, CHUNK_SIZE, 1000]
    assert b"".join(pieces) == data


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE])
def test_attachment_single_chunk_sizes(size: int) -> None:
    data = b"\xab" * size
    enc = encrypt_attachment(data, FILE_ID)
    assert len(enc.chunks) == 1
    assert len(enc.key) == KEY_SIZE
    assert _decrypt(enc) == data


def test_attachment_random_key_and_header() -> None:
    a, b = encrypt_attachment(b"x", FILE_ID), encrypt_attachment(b"x", FILE_ID)
    assert a.key != b.key and a.header != b.header


Chunks = tuple[bytes, ...]

TAMPERED_STREAMS: list[tuple[str, Callable[[Chunks, Chunks], Chunks]]] = [
    ("truncated-final-dropped", lambda c, o: (c[0], c[1])),
    ("empty-stream", lambda c, o: ()),
    ("reordered", lambda c, o: (c[1], c[0], c[2])),
    ("last-two-swapped", lambda c, o: (c[0], c[2], c[1])),
    ("duplicated-chunk", lambda c, o: (c[0], c[0], c[1], c[2])),
    ("extra-chunk-after-final", lambda c, o: (*c, c[2])),
    ("extra-foreign-chunk-after-final", lambda c, o: (*c, o[0])),
    ("chunk-from-another-file", lambda c, o: (c[0], o[1], c[2])),
    ("tampered-first-byte", lambda c, o: (_flip(c[0], 0), c[1], c[2])),
    ("tampered-middle-byte", lambda c, o: (c[0], _flip(c[1], ENCRYPTED_CHUNK_SIZE // 2), c[2])),
    ("tampered-tag", lambda c, o: (c[0], c[1], _flip(c[2], ENCRYPTED_CHUNK_SIZE - 1))),
    ("short-chunk", lambda c, o: (c[0], c[1], c[2][:-1])),
    ("long-chunk", lambda c, o: (c[0], c[1], c[2] + b"\x00")),
]


@pytest.fixture(scope="module")
def other_file(three_chunk_file: tuple[bytes, EncryptedFile]) -> EncryptedFile:
    """The same data under the same key but another file id (and its own stream header)."""
    return encrypt_attachment(three_chunk_file[0], b"file-0002-abcdef", key=ATTACH_KEY)


@pytest.mark.parametrize(("name", "tamper"), TAMPERED_STREAMS, ids=[n for n, _ in TAMPERED_STREAMS])
def test_attachment_tampering_is_refused(
    three_chunk_file: tuple[bytes, EncryptedFile],
    other_file: EncryptedFile,
    name: str,
    tamper: Callable[[Chunks, Chunks], Chunks],
) -> None:
    _, enc = three_chunk_file
    chunks = tamper(enc.chunks, other_file.chunks)
    assert chunks != enc.chunks, name
    with pytest.raises(DecryptionFailed) as excinfo:
        _decrypt(enc, chunks=chunks)
    _opaque(excinfo)


def test_attachment_under_another_file_id_is_refused(
    three_chunk_file: tuple[bytes, EncryptedFile],
) -> None:
    # Same chunks presented under another file id: the AAD names file id and chunk index.
    _, enc = three_chunk_file
    with pytest.raises(DecryptionFailed) as excinfo:
        _decrypt(enc, file_id=b"file-0002-abcdef")
    _opaque(excinfo)


def test_attachment_wrong_key_or_header() -> None:
    enc = encrypt_attachment(b"ecg trace", FILE_ID)
    cases = [
        (bytes(32), enc.header),
        (enc.key[:31], enc.header),
        (enc.key, enc.header[:-1]),
        (enc.key, _flip(enc.header, 0)),
        (enc.key, encrypt_attachment(b"ecg trace", FILE_ID, key=enc.key).header),
    ]
    for key, header in cases:
        with pytest.raises(DecryptionFailed) as excinfo:
            b"".join(decrypt_attachment(key, header, FILE_ID, enc.chunks))
        _opaque(excinfo)


# ---------------------------------------------------------------------------------------
# Small helpers


def test_check_not_expired() -> None:
    check_not_expired(expires_at=100, now=99)
    for now in (100, 101):
        with pytest.raises(KeyExpired):
            check_not_expired(expires_at=100, now=now)


def test_require_len() -> None:
    assert require_len(b"abc", 3, "x") == b"abc"
    with pytest.raises(MalformedFrame):
        require_len(b"abc", 4, "x")
