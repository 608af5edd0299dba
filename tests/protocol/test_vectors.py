"""Check tests/vectors/medrelay-crypto-vectors.json against the library: every output is
recomputed from its inputs, and every signed or sealed value is also verified or opened.

The file is written by ``scripts/gen_vectors.py --write``; its "description" key documents
the format for clients in other languages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    aead_open,
    blake2b_256,
    check_commitment,
    decrypt_attachment,
    device_id_for,
    encode_field,
    fingerprint,
    key_commitment,
    labelled_content,
    message_key,
    pad,
    sign_with_label,
    unpad,
    unwrap_secret,
    verify_with_label,
    wrap_key,
    wrap_secret,
    x25519,
)
from medrelay_protocol.envelope import Envelope, MessageHeader, open_message, seal_message
from medrelay_protocol.errors import BadSignature, DecryptionFailed, KeyExpired, LowOrderPoint
from medrelay_protocol.identity import (
    BUNDLE_LABEL,
    CERT_LABEL,
    DeviceBundle,
    DeviceCertificate,
    sign_connect_proof,
    verify_connect_proof,
)

VECTORS_PATH = Path(__file__).resolve().parent.parent / "vectors" / "medrelay-crypto-vectors.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

SECTIONS = (
    "labelled_content",
    "blake2b_256",
    "device_id",
    "fingerprint",
    "epoch_keys",
    "x25519",
    "wrap",
    "pad",
    "unpad_invalid",
    "device_certificate",
    "device_bundle",
    "connect_proof",
    "message",
    "attachment",
    "identity_attestation",
    "approval_code",
    "key_backup",
    "backup_wrap",
)


def x(value: str) -> bytes:
    return bytes.fromhex(value)


def cases(section: str) -> list[Any]:
    return [pytest.param(v, id=f"{section}-{i}") for i, v in enumerate(VECTORS[section])]


def field(spec: dict[str, str]) -> bytes | str | int:
    kind, value = spec["type"], spec["value"]
    if kind == "bytes":
        return x(value)
    if kind == "str":
        return value
    assert kind == "int"
    return int(value)


def test_file_shape() -> None:
    assert VECTORS["protocol"] == "medrelay/1"
    assert isinstance(VECTORS["description"], list) and len(VECTORS["description"]) > 10
    assert set(SECTIONS) <= set(VECTORS)
    for section in SECTIONS:
        assert len(VECTORS[section]) > 0, section


@pytest.mark.parametrize("vec", cases("labelled_content"))
def test_labelled_content(vec: dict[str, Any]) -> None:
    key = SigningKey(x(vec["seed"]))
    assert key.public.hex() == vec["public"]
    fields = [field(f) for f in vec["fields"]]
    assert labelled_content(vec["label"], fields).hex() == vec["content"]
    assert sign_with_label(key, vec["label"], *fields).hex() == vec["signature"]
    assert key.sign_raw(x(vec["content"])).hex() == vec["signature"]
    verify_with_label(key.public, vec["label"], x(vec["signature"]), *fields)
    with pytest.raises(BadSignature):
        verify_with_label(key.public, vec["label"] + "x", x(vec["signature"]), *fields)


def test_labelled_content_hand_written_example() -> None:
    vec = VECTORS["labelled_content"][0]
    assert vec["name"] == "hand-written example"
    assert vec["content"] == (
        "0000000f" + b"medrelay/1 test".hex() + "000000020102" + "000000026869"
        "000000080000000000000005"
    )


def test_field_split_vectors_differ() -> None:
    by_name = {v["name"]: v for v in VECTORS["labelled_content"]}
    a, b = by_name["field split a|bc"], by_name["field split ab|c"]
    assert a["content"] != b["content"] and a["signature"] != b["signature"]


@pytest.mark.parametrize("vec", cases("blake2b_256"))
def test_blake2b_256(vec: dict[str, Any]) -> None:
    fields = [field(f) for f in vec["fields"]]
    digest = blake2b_256(*fields, person=vec["person"].encode("ascii"), key=x(vec["key"]))
    assert digest.hex() == vec["digest"]


@pytest.mark.parametrize("vec", cases("device_id"))
def test_device_id(vec: dict[str, Any]) -> None:
    assert device_id_for(x(vec["public"])) == vec["device_id"]


@pytest.mark.parametrize("vec", cases("fingerprint"))
def test_fingerprint(vec: dict[str, Any]) -> None:
    assert fingerprint(vec["user_id"], x(vec["identity_public"])) == vec["fingerprint"]
    groups = vec["fingerprint"].split(" ")
    assert len(groups) == 12 and all(len(g) == 5 and g.isdigit() for g in groups)


@pytest.mark.parametrize("vec", cases("epoch_keys"))
def test_epoch_keys(vec: dict[str, Any]) -> None:
    args = (x(vec["secret"]), vec["room"], vec["epoch"], x(vec["roster_head"]))
    assert key_commitment(*args).hex() == vec["key_commitment"]
    assert message_key(*args).hex() == vec["message_key"]
    check_commitment(*args, x(vec["key_commitment"]))


@pytest.mark.parametrize("vec", cases("x25519"))
def test_x25519(vec: dict[str, Any]) -> None:
    assert ReceivingKey(x(vec["private"])).public.hex() == vec["public"]
    if "error" in vec:
        assert vec["error"] == "LowOrderPoint"
        with pytest.raises(LowOrderPoint):
            x25519(x(vec["private"]), x(vec["peer_public"]))
    else:
        assert x25519(x(vec["private"]), x(vec["peer_public"])).hex() == vec["shared"]


@pytest.mark.parametrize("vec", cases("wrap"))
def test_wrap(vec: dict[str, Any]) -> None:
    eph = ReceivingKey(x(vec["ephemeral_private"]))
    rec = ReceivingKey(x(vec["recipient_private"]))
    assert eph.public.hex() == vec["ephemeral_public"]
    assert rec.public.hex() == vec["recipient_public"]
    shared = x25519(eph.private_bytes(), rec.public)
    assert shared.hex() == vec["shared"]
    assert rec.exchange(eph.public) == shared
    assert wrap_key(shared, eph.public, rec.public).hex() == vec["wrap_key"]
    assert (
        encode_field(x(vec["context_hash"])) + encode_field(vec["recipient_device"])
    ).hex() == vec["aad"]
    wrap = wrap_secret(
        x(vec["secret"]),
        ephemeral=eph,
        recipient_device=vec["recipient_device"],
        recipient_public=rec.public,
        context_hash=x(vec["context_hash"]),
        nonce=x(vec["nonce"]),
    )
    assert wrap.hex() == vec["wrap"]
    # Open it as the recipient, and directly with the documented key, nonce and AAD.
    opened = unwrap_secret(
        x(vec["wrap"]),
        receiving=rec,
        ephemeral_public=x(vec["ephemeral_public"]),
        recipient_device=vec["recipient_device"],
        context_hash=x(vec["context_hash"]),
    )
    assert opened.hex() == vec["secret"]
    raw = x(vec["wrap"])
    assert raw[:24].hex() == vec["nonce"]
    assert aead_open(x(vec["wrap_key"]), raw[:24], raw[24:], x(vec["aad"])).hex() == vec["secret"]
    with pytest.raises(DecryptionFailed):
        unwrap_secret(
            raw,
            receiving=rec,
            ephemeral_public=eph.public,
            recipient_device=vec["recipient_device"][::-1],
            context_hash=x(vec["context_hash"]),
        )


@pytest.mark.parametrize("vec", cases("pad"))
def test_pad(vec: dict[str, Any]) -> None:
    assert pad(x(vec["body"])).hex() == vec["padded"]
    assert unpad(x(vec["padded"])).hex() == vec["body"]


@pytest.mark.parametrize("vec", cases("unpad_invalid"))
def test_unpad_invalid(vec: dict[str, Any]) -> None:
    assert vec["error"] == "DecryptionFailed"
    with pytest.raises(DecryptionFailed):
        unpad(x(vec["padded"]))


@pytest.mark.parametrize("vec", cases("device_certificate"))
def test_device_certificate(vec: dict[str, Any]) -> None:
    identity = SigningKey(x(vec["identity_seed"]))
    device = SigningKey(x(vec["device_seed"]))
    assert identity.public.hex() == vec["identity_public"]
    assert device.public.hex() == vec["device_key"]
    cert = DeviceCertificate.issue(
        identity, vec["user_id"], device.public, vec["kind"], vec["issued_at"]
    )
    assert cert.raw.hex() == vec["raw"] == vec["body"] + vec["signature"]
    assert cert.device_id == vec["device_id"]
    assert (
        pack_body(
            [1, vec["user_id"], vec["device_id"], device.public, vec["kind"], vec["issued_at"]]
        ).hex()
        == vec["body"]
    )
    verify_with_label(identity.public, CERT_LABEL, x(vec["signature"]), x(vec["body"]))
    verified = DeviceCertificate.verify(x(vec["raw"]), x(vec["identity_public"]))
    assert (verified.user_id, verified.device_id, verified.device_key.hex()) == (
        vec["user_id"],
        vec["device_id"],
        vec["device_key"],
    )
    assert (verified.kind, verified.issued_at) == (vec["kind"], vec["issued_at"])
    with pytest.raises(BadSignature):
        DeviceCertificate.verify(x(vec["raw"]), x(vec["device_key"]))


@pytest.mark.parametrize("vec", cases("device_bundle"))
def test_device_bundle(vec: dict[str, Any]) -> None:
    device = SigningKey(x(vec["device_seed"]))
    rec = ReceivingKey(x(vec["receiving_private"]))
    assert device.public.hex() == vec["device_key"]
    assert rec.public.hex() == vec["receiving_public"]
    bundle = DeviceBundle.issue(device, rec.public, vec["expires_at"])
    assert bundle.raw.hex() == vec["raw"] == vec["body"] + vec["signature"]
    assert bundle.device_id == vec["device_id"]
    assert pack_body([1, vec["device_id"], rec.public, vec["expires_at"]]).hex() == vec["body"]
    verify_with_label(device.public, BUNDLE_LABEL, x(vec["signature"]), x(vec["body"]))
    verified = DeviceBundle.verify(x(vec["raw"]), x(vec["device_key"]), now=vec["expires_at"] - 1)
    assert verified.receiving_key.hex() == vec["receiving_public"]
    assert verified.expires_at == vec["expires_at"]
    with pytest.raises(KeyExpired):
        DeviceBundle.verify(x(vec["raw"]), x(vec["device_key"]), now=vec["expires_at"])


@pytest.mark.parametrize("vec", cases("connect_proof"))
def test_connect_proof(vec: dict[str, Any]) -> None:
    device = SigningKey(x(vec["device_seed"]))
    assert device.public.hex() == vec["device_key"]
    assert device_id_for(device.public) == vec["device_id"]
    proof = sign_connect_proof(device, x(vec["challenge"]), vec["user_id"])
    assert proof.hex() == vec["proof"]
    verify_connect_proof(x(vec["device_key"]), x(vec["challenge"]), vec["user_id"], proof)
    with pytest.raises(BadSignature):
        verify_connect_proof(x(vec["device_key"]), x(vec["challenge"]), "someone-else", proof)


@pytest.mark.parametrize("vec", cases("message"))
def test_message(vec: dict[str, Any]) -> None:
    device = SigningKey(x(vec["sender_seed"]))
    assert device.public.hex() == vec["sender_key"]
    hv = vec["header"]
    header = MessageHeader(
        room=hv["room"],
        epoch=hv["epoch"],
        roster_head=x(hv["roster_head"]),
        sender_device=hv["sender_device"],
        counter=hv["counter"],
        mid=x(hv["mid"]),
        priority=hv["priority"],
    )
    assert header.sender_device == device_id_for(device.public)
    assert header.encode().hex() == vec["header_bytes"]
    assert pack_body(vec["body"]).hex() == vec["body_msgpack"]
    key = message_key(x(vec["epoch_secret"]), header.room, header.epoch, header.roster_head)
    assert key.hex() == vec["message_key"]
    assert pad(x(vec["body_msgpack"])).hex() == vec["padded"]

    # Recompute.
    env = seal_message(
        header,
        vec["body"],
        epoch_secret=x(vec["epoch_secret"]),
        device=device,
        nonce=x(vec["nonce"]),
    )
    assert env.header_bytes.hex() == vec["header_bytes"]
    assert env.ciphertext.hex() == vec["ciphertext"]
    assert env.signature.hex() == vec["signature"]
    assert env.encode().hex() == vec["envelope"]
    assert (
        msgpack.packb(
            [x(vec["header_bytes"]), x(vec["nonce"]), x(vec["ciphertext"]), x(vec["signature"])],
            use_bin_type=True,
        ).hex()
        == vec["envelope"]
    )

    # Verify and open the stored bytes.
    decoded = Envelope.decode(x(vec["envelope"]))
    verify_with_label(
        x(vec["sender_key"]),
        "message",
        decoded.signature,
        decoded.header_bytes,
        decoded.nonce,
        decoded.ciphertext,
    )
    padded = aead_open(key, decoded.nonce, decoded.ciphertext, decoded.header_bytes)
    assert padded.hex() == vec["padded"]
    assert unpack_body(unpad(padded)) == vec["body"]
    opened_header, body = open_message(
        decoded, sender_key=x(vec["sender_key"]), epoch_secret=x(vec["epoch_secret"])
    )
    assert opened_header == header
    assert body == vec["body"]


@pytest.mark.parametrize("vec", cases("attachment"))
def test_attachment(vec: dict[str, Any]) -> None:
    chunks = [x(c) for c in vec["chunks"]]
    assert len(chunks) == 1  # one FINAL chunk keeps the file small
    plain = b"".join(decrypt_attachment(x(vec["key"]), x(vec["header"]), x(vec["file_id"]), chunks))
    assert plain.hex() == vec["plaintext"]
    with pytest.raises(DecryptionFailed):
        b"".join(decrypt_attachment(x(vec["key"]), x(vec["header"]), b"another-file-id!", chunks))
    with pytest.raises(DecryptionFailed):
        b"".join(decrypt_attachment(x(vec["key"]), x(vec["header"]), x(vec["file_id"]), []))


# device enrolment (protocol.md 5.19-5.21) ----------------------------------------------


@pytest.mark.parametrize("vec", cases("identity_attestation"))
def test_identity_attestation(vec: dict[str, Any]) -> None:
    from medrelay_protocol.crypto import SigningKey
    from medrelay_protocol.enrolment import IdentityAttestation

    institution = SigningKey(x(vec["institution_seed"]))
    assert institution.public == x(vec["institution_public"])
    att = IdentityAttestation.issue(
        institution,
        user_id=vec["user_id"],
        identity_key=x(vec["identity_key"]),
        institution=vec["institution"],
        issued_at=vec["issued_at"],
    )
    assert att.raw == x(vec["raw"]) == x(vec["body"]) + x(vec["signature"])
    got = IdentityAttestation.verify(x(vec["raw"]), x(vec["institution_public"]))
    assert (got.user_id, got.institution, got.issued_at) == (
        vec["user_id"],
        vec["institution"],
        vec["issued_at"],
    )


@pytest.mark.parametrize("vec", cases("approval_code"))
def test_approval_code(vec: dict[str, Any]) -> None:
    from medrelay_protocol.enrolment import approval_code, approval_qr, check_approval_code

    assert approval_code(vec["user_id"], x(vec["device_key"])) == vec["code"]
    assert approval_qr(vec["user_id"], x(vec["device_key"])) == vec["qr"]
    check_approval_code(vec["code"], vec["user_id"], x(vec["device_key"]))
    check_approval_code(vec["qr"], vec["user_id"], x(vec["device_key"]))


@pytest.mark.parametrize("vec", cases("key_backup"))
def test_key_backup(vec: dict[str, Any]) -> None:
    from medrelay_protocol.enrolment import BackupContents, open_backup, seal_backup

    blob = seal_backup(
        x(vec["backup_key"]),
        user_id=vec["user_id"],
        version=vec["version"],
        contents=BackupContents(identity_seed=x(vec["identity_seed"])),
        nonce=x(vec["nonce"]),
    )
    assert blob == x(vec["blob"])
    opened = open_backup(
        x(vec["backup_key"]), user_id=vec["user_id"], version=vec["version"], blob=blob
    )
    assert opened.identity_seed == x(vec["identity_seed"])


@pytest.mark.parametrize("vec", cases("backup_wrap"))
def test_backup_wrap(vec: dict[str, Any]) -> None:
    from medrelay_protocol.crypto import ReceivingKey
    from medrelay_protocol.enrolment import unwrap_backup_key, wrap_backup_key

    share = wrap_backup_key(
        x(vec["backup_key"]),
        user_id=vec["user_id"],
        recipient_device=vec["recipient_device"],
        recipient_public=x(vec["recipient_public"]),
        ephemeral=ReceivingKey(x(vec["ephemeral_private"])),
        nonce=x(vec["nonce"]),
    )
    assert share == x(vec["share"])
    key = unwrap_backup_key(
        share,
        user_id=vec["user_id"],
        device_id=vec["recipient_device"],
        receiving=ReceivingKey(x(vec["recipient_private"])),
    )
    assert key == x(vec["backup_key"])
