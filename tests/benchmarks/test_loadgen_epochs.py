"""The load generator learns a room's epoch from the rekey events it receives
(``bench.loadgen.epoch_of``): from the manifest's epoch number, so a rekey replayed after a
resume, or delivered twice, cannot move the epoch it seals under past the room's."""

from __future__ import annotations

import hashlib

from medrelay_protocol.crypto import ReceivingKey, SigningKey, device_id_for
from medrelay_protocol.epochs import EpochId, build_rekey

from bench.loadgen import epoch_of

ROOM = "ward-7"


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _manifest(number: int) -> bytes:
    device = SigningKey(_key("tablet"))
    rekey = build_rekey(
        room=ROOM,
        epoch_number=number,
        prev_epoch=EpochId(number - 1, _key("head")) if number > 1 else None,
        roster_head=_key("head"),
        device_list_version=3,
        committer=SigningKey(_key("committer")),
        recipients={device_id_for(device.public): ReceivingKey(_key("receiving")).public},
    )
    return rekey.manifest


def test_the_epoch_is_the_manifests_number() -> None:
    assert [epoch_of(_manifest(n)) for n in (1, 2, 9)] == [1, 2, 9]


def test_a_replayed_rekey_leaves_the_epoch_where_it_is() -> None:
    epoch = 5
    for number in (3, 4, 5, 5):  # history replayed after a resume, then the last one twice
        epoch = max(epoch, epoch_of(_manifest(number)))
    assert epoch == 5
    epoch = max(epoch, epoch_of(_manifest(6)))
    assert epoch == 6


def test_a_payload_that_is_not_a_manifest_names_no_epoch() -> None:
    assert epoch_of(b"") == 0
    assert epoch_of(b"\x00" * 200) == 0
    assert epoch_of(_manifest(4)[:-70]) == 0
