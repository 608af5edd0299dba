"""History grants: signed by the granter's device, wraps open only on the grantee's devices
and are checked against each epoch's key commitment."""

import os

import pytest
from medrelay_protocol.crypto import ReceivingKey, SigningKey, device_id_for
from medrelay_protocol.errors import BadSignature, CommitmentMismatch, DecryptionFailed
from medrelay_protocol.grants import HistoryGrant, build_grant

ROOM = "room-g"


def _setup() -> tuple[SigningKey, ReceivingKey, str, dict[int, tuple[bytes, bytes]], bytes]:
    granter = SigningKey.generate()
    receiving = ReceivingKey.generate()
    device = device_id_for(SigningKey.generate().public)
    epochs = {3: (os.urandom(32), os.urandom(32)), 4: (os.urandom(32), os.urandom(32))}
    raw = build_grant(
        room=ROOM,
        grantee="carol",
        from_seq=17,
        granter=granter,
        epochs=epochs,
        recipients={device: receiving.public},
    )
    return granter, receiving, device, epochs, raw


def test_round_trip_gives_exactly_the_granted_secrets() -> None:
    granter, receiving, device, epochs, raw = _setup()
    grant = HistoryGrant.verify(raw, granter.public)
    assert (grant.room, grant.grantee, grant.from_seq) == (ROOM, "carol", 17)
    assert grant.open(device_id=device, receiving=receiving) == {
        n: secret for n, (_head, secret) in epochs.items()
    }
    assert "carol" in repr(grant) and epochs[3][1].hex() not in repr(grant)


def test_signature_of_another_device_is_refused() -> None:
    _granter, _receiving, _device, _epochs, raw = _setup()
    with pytest.raises(BadSignature):
        HistoryGrant.verify(raw, SigningKey.generate().public)


def test_tampered_grant_is_refused() -> None:
    granter, _receiving, _device, _epochs, raw = _setup()
    bad = bytearray(raw)
    bad[10] ^= 1
    with pytest.raises(BadSignature):
        HistoryGrant.verify(bytes(bad), granter.public)


def test_other_device_cannot_open() -> None:
    granter, _receiving, device, _epochs, raw = _setup()
    grant = HistoryGrant.verify(raw, granter.public)
    with pytest.raises(DecryptionFailed):
        grant.open(device_id=device, receiving=ReceivingKey.generate())
    assert grant.open(device_id="someone-else", receiving=ReceivingKey.generate()) == {}


def test_wrong_commitment_is_detected() -> None:
    """A granter who wraps a different key than the one committed for that epoch is caught."""
    granter = SigningKey.generate()
    receiving = ReceivingKey.generate()
    device = device_id_for(SigningKey.generate().public)
    head, real = os.urandom(32), os.urandom(32)
    raw = build_grant(
        room=ROOM,
        grantee="carol",
        from_seq=1,
        granter=granter,
        epochs={5: (head, real)},
        recipients={device: receiving.public},
    )
    grant = HistoryGrant.verify(raw, granter.public)
    forged = type(grant.epochs[0])(5, head, os.urandom(32), grant.epochs[0].wraps)
    tampered = HistoryGrant(
        grant.room,
        grant.grantee,
        grant.from_seq,
        grant.granter_device,
        grant.ephemeral_public,
        (forged,),
        grant.raw,
    )
    with pytest.raises((CommitmentMismatch, DecryptionFailed)):
        tampered.open(device_id=device, receiving=receiving)
