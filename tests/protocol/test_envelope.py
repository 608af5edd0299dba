"""Unit tests of medrelay_protocol.envelope: headers, sealing, opening, decoding."""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    MAX_BODY,
    TAG_SIZE,
    SigningKey,
    aead_open,
    aead_seal,
    device_id_for,
    message_key,
    pad,
    sign_with_label,
    unpad,
)
from medrelay_protocol.envelope import (
    MAX_ENVELOPE,
    MAX_ROOM_ID,
    MESSAGE_LABEL,
    PRIORITIES,
    Envelope,
    MessageHeader,
    open_message,
    seal_message,
)
from medrelay_protocol.errors import (
    BadSignature,
    DecryptionFailed,
    FrameError,
    FrameTooLarge,
    MalformedFrame,
)

SENDER = SigningKey(bytes(range(32)))
OTHER = SigningKey(bytes(range(32, 64)))
SECRET = bytes(range(64, 96))
HEAD = bytes(range(96, 128))
MID = bytes(range(16))
NONCE = bytes(range(128, 152))
BODY = {"type": "text", "text": "BP 82/50, starting fluids", "at": 1_760_000_000}


def _header(device: SigningKey = SENDER, **changes: Any) -> MessageHeader:
    fields: dict[str, object] = {
        "room": "ward-7-resus",
        "epoch": 3,
        "roster_head": HEAD,
        "sender_device": device_id_for(device.public),
        "counter": 12,
        "mid": MID,
        "priority": "urgent",
    }
    fields.update(changes)
    return MessageHeader(**fields)  # type: ignore[arg-type]


def _seal(body: object = BODY, **kwargs: object) -> Envelope:
    args: dict[str, object] = {"epoch_secret": SECRET, "device": SENDER}
    args.update(kwargs)
    return seal_message(_header(), body, **args)  # type: ignore[arg-type]


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


# ---------------------------------------------------------------------------------------
# Headers


def test_header_encoding_is_the_documented_msgpack_array() -> None:
    h = _header()
    expected = msgpack.packb(
        [1, h.room, 3, HEAD, h.sender_device, 12, MID, "urgent"], use_bin_type=True
    )
    assert h.encode() == expected
    assert MessageHeader.decode(h.encode()) == h


header_strategy = st.builds(
    MessageHeader,
    room=st.text(min_size=1, max_size=MAX_ROOM_ID),
    epoch=st.integers(min_value=0, max_value=2**64 - 1),
    roster_head=st.binary(min_size=32, max_size=32),
    sender_device=st.text(max_size=40),
    counter=st.integers(min_value=0, max_value=2**64 - 1),
    mid=st.binary(min_size=16, max_size=16),
    priority=st.sampled_from(PRIORITIES),
)


@settings(max_examples=100)
@given(header_strategy)
def test_header_round_trip(header: MessageHeader) -> None:
    assert MessageHeader.decode(header.encode()) == header


@pytest.mark.parametrize(
    "changes",
    [
        {"room": ""},
        {"room": "r" * (MAX_ROOM_ID + 1)},
        {"roster_head": HEAD[:31]},
        {"mid": MID + b"\x00"},
        {"priority": "stat"},
        {"epoch": -1},
        {"counter": -1},
    ],
)
def test_header_validation(changes: dict[str, Any]) -> None:
    with pytest.raises(MalformedFrame):
        _header(**changes)


@pytest.mark.parametrize(
    "fields",
    [
        [2, "room", 3, HEAD, "dev", 0, MID, "routine"],  # version
        [1, "room", 3, HEAD, "dev", 0, MID],  # short
        [1, "room", 3, HEAD, "dev", 0, MID, "routine", 0],  # long
        [1, b"room", 3, HEAD, "dev", 0, MID, "routine"],  # room as bytes
        [1, "room", True, HEAD, "dev", 0, MID, "routine"],  # bool epoch
        [1, "room", 3, "head", "dev", 0, MID, "routine"],  # head as str
        [1, "room", 3, HEAD, "dev", 0.0, MID, "routine"],  # float counter
        [1, "room", -3, HEAD, "dev", 0, MID, "routine"],  # negative epoch
        [1, "room", 3, HEAD[:8], "dev", 0, MID, "routine"],  # short head
        [1, "room", 3, HEAD, "dev", 0, MID, "whenever"],  # unknown priority
        {"room": "room"},
    ],
)
def test_header_decode_refuses_bad_shapes(fields: object) -> None:
    with pytest.raises(MalformedFrame):
        MessageHeader.decode(pack_body(fields))


def test_header_decode_refuses_oversized() -> None:
    with pytest.raises(FrameTooLarge):
        MessageHeader.decode(pack_body([1, "r" * 2000]))


# ---------------------------------------------------------------------------------------
# Seal / open


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        "plain text",
        {"type": "vitals", "fhir": {"hr": 128, "spo2": 0.91}, "blob": b"\x00\xff"},
        ["nested", [1, 2, [3]], None, True],
        "x" * 3000,
    ],
)
def test_seal_open_round_trip(body: object) -> None:
    env = _seal(body)
    header, opened = open_message(env, sender_key=SENDER.public, epoch_secret=SECRET)
    assert header == _header()
    assert opened == body
    decoded = Envelope.decode(env.encode())
    assert decoded == env
    assert open_message(decoded, sender_key=SENDER.public, epoch_secret=SECRET)[1] == body


def test_seal_is_the_documented_construction() -> None:
    env = _seal(nonce=NONCE)
    h = _header()
    assert env.header_bytes == h.encode()
    assert env.nonce == NONCE
    key = message_key(SECRET, h.room, h.epoch, h.roster_head)
    assert env.ciphertext == aead_seal(key, NONCE, pad(pack_body(BODY)), env.header_bytes)
    assert env.signature == sign_with_label(
        SENDER, MESSAGE_LABEL, env.header_bytes, NONCE, env.ciphertext
    )
    assert env.encode() == msgpack.packb(
        [env.header_bytes, NONCE, env.ciphertext, env.signature], use_bin_type=True
    )
    assert _seal(nonce=NONCE) == env  # deterministic given the nonce
    assert _seal().nonce != _seal().nonce  # random nonce otherwise


def test_ciphertext_length_hides_body_length_within_a_bucket() -> None:
    short, longer = _seal("ok"), _seal("a much longer clinical note " * 5)
    assert len(short.ciphertext) == len(longer.ciphertext) == 256 + TAG_SIZE


def test_seal_refuses_header_naming_another_device() -> None:
    with pytest.raises(ValueError):
        seal_message(_header(OTHER), BODY, epoch_secret=SECRET, device=SENDER)


def test_seal_refuses_oversized_body() -> None:
    with pytest.raises(ValueError):
        _seal(b"x" * MAX_BODY)


def test_repr_leaks_nothing() -> None:
    env = _seal("diagnosis: confidential")
    text = repr(env)
    assert "confidential" not in text
    assert env.ciphertext.hex()[:16] not in text
    assert env.signature.hex()[:16] not in text


def test_signature_by_another_device_is_refused() -> None:
    env = _seal()
    with pytest.raises(BadSignature):
        open_message(env, sender_key=OTHER.public, epoch_secret=SECRET)


def test_envelope_resigned_by_another_device_is_refused() -> None:
    # OTHER takes SENDER's envelope and signs it with its own key: the header still names
    # SENDER's device, so checking against OTHER's key refuses it.
    env = _seal()
    resigned = dataclasses.replace(
        env,
        signature=sign_with_label(
            OTHER, MESSAGE_LABEL, env.header_bytes, env.nonce, env.ciphertext
        ),
    )
    with pytest.raises(MalformedFrame):
        open_message(resigned, sender_key=OTHER.public, epoch_secret=SECRET)
    with pytest.raises(BadSignature):
        open_message(resigned, sender_key=SENDER.public, epoch_secret=SECRET)


@pytest.mark.parametrize(
    "changes",
    [
        {"room": "ward-8-resus"},
        {"epoch": 4},
        {"counter": 13},
        {"priority": "routine"},
        {"mid": bytes(16)},
        {"roster_head": bytes(32)},
    ],
    ids=lambda c: next(iter(c)),
)
def test_edited_header_is_refused(changes: dict[str, Any]) -> None:
    env = _seal()
    relabelled = dataclasses.replace(env, header_bytes=_header(**changes).encode())
    with pytest.raises(BadSignature):
        open_message(relabelled, sender_key=SENDER.public, epoch_secret=SECRET)


def test_tampered_envelope_fields_are_refused() -> None:
    env = _seal()
    tampered = [
        dataclasses.replace(env, nonce=_flip(env.nonce, 0)),
        dataclasses.replace(env, ciphertext=_flip(env.ciphertext, 0)),
        dataclasses.replace(env, ciphertext=env.ciphertext[:-1]),
        dataclasses.replace(env, signature=_flip(env.signature, 63)),
        dataclasses.replace(env, header_bytes=env.header_bytes + b"\x00"),
    ]
    for bad in tampered:
        with pytest.raises(BadSignature):
            open_message(bad, sender_key=SENDER.public, epoch_secret=SECRET)


def test_every_encoded_byte_is_covered() -> None:
    blob = _seal("short").encode()
    for i in range(len(blob)):
        with pytest.raises((BadSignature, FrameError)):
            env = Envelope.decode(_flip(blob, i))
            open_message(env, sender_key=SENDER.public, epoch_secret=SECRET)


def test_wrong_epoch_secret_is_decryption_failed() -> None:
    env = _seal()
    for secret in (bytes(32), SECRET[::-1]):
        with pytest.raises(DecryptionFailed) as excinfo:
            open_message(env, sender_key=SENDER.public, epoch_secret=secret)
        assert type(excinfo.value) is DecryptionFailed


def test_sender_signed_garbage_is_decryption_failed() -> None:
    # A member device holding the epoch key signs a ciphertext whose padding is wrong:
    # the signature checks out, the body is refused with the same opaque error.
    h = _header()
    header_bytes = h.encode()
    key = message_key(SECRET, h.room, h.epoch, h.roster_head)
    for plain in (b"not padded", pad(b"\xc1")[:-1] + b"\x01"):
        ct = aead_seal(key, NONCE, plain, header_bytes)
        sig = sign_with_label(SENDER, MESSAGE_LABEL, header_bytes, NONCE, ct)
        env = Envelope(header_bytes, NONCE, ct, sig)
        with pytest.raises(DecryptionFailed):
            open_message(env, sender_key=SENDER.public, epoch_secret=SECRET)
    # Same key, AAD of another header: refused although the signature is good.
    ct = aead_seal(key, NONCE, pad(pack_body("x")), _header(counter=99).encode())
    sig = sign_with_label(SENDER, MESSAGE_LABEL, header_bytes, NONCE, ct)
    with pytest.raises(DecryptionFailed):
        open_message(
            Envelope(header_bytes, NONCE, ct, sig), sender_key=SENDER.public, epoch_secret=SECRET
        )


def test_sender_signed_undecodable_body_is_malformed() -> None:
    # Correctly padded and authenticated, but not msgpack: the sender (who holds the key)
    # is at fault, so this is a decoding error rather than the opaque DecryptionFailed.
    h = _header()
    header_bytes = h.encode()
    key = message_key(SECRET, h.room, h.epoch, h.roster_head)
    ct = aead_seal(key, NONCE, pad(b"\xc1"), header_bytes)
    sig = sign_with_label(SENDER, MESSAGE_LABEL, header_bytes, NONCE, ct)
    with pytest.raises(MalformedFrame):
        open_message(
            Envelope(header_bytes, NONCE, ct, sig), sender_key=SENDER.public, epoch_secret=SECRET
        )


def test_body_decrypts_to_padded_msgpack() -> None:
    env = _seal(nonce=NONCE)
    h = _header()
    key = message_key(SECRET, h.room, h.epoch, h.roster_head)
    padded = aead_open(key, NONCE, env.ciphertext, env.header_bytes)
    assert unpad(padded) == pack_body(BODY)


# ---------------------------------------------------------------------------------------
# Envelope.decode


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"garbage",
        b"\x94",  # array of 4 with nothing in it
        b"\x91" * 5000,  # deep nesting
        pack_body([b"h", bytes(24), b"c"]),  # 3 fields
        pack_body([b"h", bytes(24), b"c", bytes(64), b"x"]),  # 5 fields
        pack_body(["h", bytes(24), b"c", bytes(64)]),  # str header
        pack_body([b"h", bytes(23), b"c", bytes(64)]),  # short nonce
        pack_body([b"h", bytes(24), b"c", bytes(63)]),  # short signature
        pack_body({"h": b"h"}),
        pack_body([b"h", bytes(24), b"c", bytes(64)]) + b"\x00",  # trailing bytes
    ],
)
def test_envelope_decode_garbage_is_malformed(data: bytes) -> None:
    with pytest.raises(MalformedFrame):
        Envelope.decode(data)


def test_envelope_decode_refuses_oversized() -> None:
    with pytest.raises(FrameTooLarge):
        Envelope.decode(bytes(MAX_ENVELOPE + 1))


@settings(max_examples=300)
@given(st.binary(max_size=80))
def test_envelope_decode_random_bytes_is_malformed(data: bytes) -> None:
    # 80 bytes cannot hold a 24-byte nonce and a 64-byte signature, so nothing here is valid.
    with pytest.raises(MalformedFrame):
        Envelope.decode(data)


def test_envelope_header_with_garbage_bytes_is_malformed() -> None:
    env = Envelope(b"\xc1", NONCE, b"c" * 20, bytes(64))
    with pytest.raises(MalformedFrame):
        _ = env.header
