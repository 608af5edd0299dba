"""Identity attestations, approval codes, the key backup and its wraps: round trips,
tampering, wrong keys, wrong labels."""

from __future__ import annotations

import pytest
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    device_id_for,
    sign_with_label,
    wrap_secret,
)
from medrelay_protocol.enrolment import (
    ATTESTATION_LABEL,
    BACKUP_SHARE_SIZE,
    BackupContents,
    CodeMismatch,
    IdentityAttestation,
    approval_code,
    approval_qr,
    check_approval_code,
    new_backup_key,
    open_backup,
    seal_backup,
    unwrap_backup_key,
    wrap_backup_key,
)
from medrelay_protocol.errors import BadSignature, DecryptionFailed, MalformedFrame
from medrelay_protocol.identity import CERT_LABEL

INST = SigningKey.generate()
IDENTITY = SigningKey.generate()


def _attest(**kw: object) -> IdentityAttestation:
    args: dict[str, object] = {
        "user_id": "qmh:dr-chan",
        "identity_key": IDENTITY.public,
        "institution": "qmh",
        "issued_at": 1_760_000_000,
    }
    args.update(kw)
    return IdentityAttestation.issue(INST, **args)  # type: ignore[arg-type]


def test_attestation_round_trip() -> None:
    att = _attest()
    got = IdentityAttestation.verify(att.raw, INST.public)
    assert got == att
    assert IdentityAttestation.parse_unverified(att.raw).identity_key == IDENTITY.public


def test_attestation_tampered_or_wrong_key_or_label() -> None:
    raw = bytearray(_attest().raw)
    raw[5] ^= 1
    with pytest.raises((BadSignature, MalformedFrame)):
        IdentityAttestation.verify(bytes(raw), INST.public)
    with pytest.raises(BadSignature):
        IdentityAttestation.verify(_attest().raw, SigningKey.generate().public)
    body = pack_body([1, "qmh:dr-chan", IDENTITY.public, "qmh", 1])
    as_cert = body + sign_with_label(INST, CERT_LABEL, body)  # another object's label
    with pytest.raises(BadSignature):
        IdentityAttestation.verify(as_cert, INST.public)
    good = body + sign_with_label(INST, ATTESTATION_LABEL, body)
    assert IdentityAttestation.verify(good, INST.public).issued_at == 1
    with pytest.raises(MalformedFrame):
        IdentityAttestation.verify(b"short", INST.public)
    bad_shape = pack_body([1, "u", b"short", "qmh", 1])
    with pytest.raises(MalformedFrame):
        IdentityAttestation.verify(
            bad_shape + sign_with_label(INST, ATTESTATION_LABEL, bad_shape), INST.public
        )
    with pytest.raises(ValueError):
        _attest(identity_key=b"short")


def test_approval_code_shape_and_comparison() -> None:
    key = SigningKey.generate().public
    code = approval_code("alice", key)
    groups = code.split(" ")
    assert [len(g) for g in groups] == [4, 4, 4] and code.replace(" ", "").isdigit()
    assert approval_code("alice", key) == code
    assert approval_code("bob", key) != code
    assert approval_code("alice", SigningKey.generate().public) != code
    check_approval_code(code, "alice", key)
    check_approval_code(code.replace(" ", "-"), "alice", key)
    check_approval_code(f"  {code.replace(' ', '')} ", "alice", key)
    check_approval_code(approval_qr("alice", key), "alice", key)
    other = SigningKey.generate().public
    for wrong in (approval_code("alice", other), approval_qr("alice", other), "", "١٢٣"):
        with pytest.raises(CodeMismatch):
            check_approval_code(wrong, "alice", key)
    with pytest.raises(CodeMismatch):
        check_approval_code(code, "bob", key)


def test_backup_round_trip_and_refusals() -> None:
    key = new_backup_key()
    contents = BackupContents(identity_seed=IDENTITY.private_bytes())
    blob = seal_backup(key, user_id="alice", version=2, contents=contents)
    assert IDENTITY.private_bytes() not in blob
    assert open_backup(key, user_id="alice", version=2, blob=blob) == contents
    assert "redacted" in repr(contents) and IDENTITY.private_bytes().hex() not in repr(contents)
    for kw in (
        {"user_id": "bob", "version": 2},  # another user's backup
        {"user_id": "alice", "version": 1},  # served as another version (rollback)
    ):
        with pytest.raises(DecryptionFailed):
            open_backup(key, blob=blob, **kw)  # type: ignore[arg-type]
    with pytest.raises(DecryptionFailed):
        open_backup(new_backup_key(), user_id="alice", version=2, blob=blob)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(DecryptionFailed):
        open_backup(key, user_id="alice", version=2, blob=bytes(tampered))
    with pytest.raises(DecryptionFailed):
        open_backup(key, user_id="alice", version=2, blob=b"x" * 10)


def test_backup_wrap_round_trip_and_refusals() -> None:
    key = new_backup_key()
    rec = ReceivingKey.generate()
    device = device_id_for(SigningKey.generate().public)
    share = wrap_backup_key(
        key, user_id="alice", recipient_device=device, recipient_public=rec.public
    )
    assert len(share) == BACKUP_SHARE_SIZE
    assert unwrap_backup_key(share, user_id="alice", device_id=device, receiving=rec) == key
    with pytest.raises(DecryptionFailed):  # another device's receiving key
        unwrap_backup_key(
            share, user_id="alice", device_id=device, receiving=ReceivingKey.generate()
        )
    with pytest.raises(DecryptionFailed):  # addressed to another device id
        unwrap_backup_key(share, user_id="alice", device_id="0" * 32, receiving=rec)
    with pytest.raises(DecryptionFailed):  # another user
        unwrap_backup_key(share, user_id="bob", device_id=device, receiving=rec)
    tampered = bytearray(share)
    tampered[40] ^= 1
    with pytest.raises(DecryptionFailed):
        unwrap_backup_key(bytes(tampered), user_id="alice", device_id=device, receiving=rec)
    with pytest.raises(DecryptionFailed):
        unwrap_backup_key(share[:-1], user_id="alice", device_id=device, receiving=rec)
    # a rekey-style wrap of the same key (another context, i.e. label) does not open here
    eph = ReceivingKey.generate()
    rekey_wrap = wrap_secret(
        key,
        ephemeral=eph,
        recipient_device=device,
        recipient_public=rec.public,
        context_hash=b"\0" * 32,
    )
    with pytest.raises(DecryptionFailed):
        unwrap_backup_key(eph.public + rekey_wrap, user_id="alice", device_id=device, receiving=rec)
