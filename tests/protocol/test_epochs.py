"""Rekey manifests and wraps, the client epoch state machine, rotation and replay windows."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    device_id_for,
    key_commitment,
    sign_with_label,
    wrap_secret,
)
from medrelay_protocol.epochs import (
    ACTIVE,
    FORGOTTEN,
    MANIFEST_LABEL,
    NO_KEY,
    NOT_YET_RECEIVED,
    PENDING_REKEY,
    TRANSITIONS,
    WITHHELD,
    EpochId,
    EpochState,
    Rekey,
    RekeyManifest,
    ReplayGuard,
    ReplayWindow,
    build_rekey,
    check_recipients,
    open_rekey,
    should_rotate,
    wrap_hash,
)
from medrelay_protocol.errors import (
    BadSignature,
    CommitmentMismatch,
    DecryptionFailed,
    EpochError,
    MalformedFrame,
    ReplayDetected,
    RosterForked,
    StaleEpoch,
    UnknownEpoch,
    UnsupportedVersion,
)

ROOM = "room-7f3a"
HEAD = hashlib.sha256(b"head").digest()
HEAD2 = hashlib.sha256(b"head 2").digest()


def _seed(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


COMMITTER = SigningKey(_seed("committer"))
DEVICES = {name: SigningKey(_seed(f"device {name}")) for name in ("a", "b", "c")}
IDS = {name: device_id_for(key.public) for name, key in DEVICES.items()}
RECEIVING = {IDS[name]: ReceivingKey(_seed(f"receiving {name}")) for name in DEVICES}
PUBLIC = {device: key.public for device, key in RECEIVING.items()}


def rekey(number: int = 2, secret: bytes | None = None) -> tuple[bytes, dict[str, bytes], bytes]:
    prev = EpochId(number - 1, HEAD) if number > 1 else None
    r = build_rekey(
        room=ROOM,
        epoch_number=number,
        prev_epoch=prev,
        roster_head=HEAD2,
        device_list_version=5,
        committer=COMMITTER,
        recipients=PUBLIC,
        secret=secret,
    )
    assert r.epoch == EpochId(number, HEAD2)
    return r.manifest, r.wraps, r.secret


# ---------------------------------------------------------------------------------------
# Manifests and wraps


def test_rekey_round_trip_for_three_recipients() -> None:
    raw, wraps, secret = rekey()
    manifest = RekeyManifest.verify(raw, COMMITTER.public)
    assert manifest.recipients == tuple(sorted(IDS.values()))
    assert manifest.room == ROOM and manifest.epoch_number == 2 and manifest.roster_head == HEAD2
    assert manifest.prev_epoch == EpochId(1, HEAD) and manifest.device_list_version == 5
    assert manifest.committer_device == device_id_for(COMMITTER.public)
    assert manifest.key_commitment == key_commitment(secret, ROOM, 2, HEAD2)
    assert manifest.epoch == EpochId(2, HEAD2)
    assert set(wraps) == set(IDS.values())
    for device, receiving in RECEIVING.items():
        assert manifest.wrap_hash(device) == wrap_hash(wraps[device])
        assert open_rekey(manifest, wraps[device], device_id=device, receiving=receiving) == secret


def test_first_epoch_has_no_predecessor() -> None:
    raw, wraps, secret = rekey(number=1)
    manifest = RekeyManifest.verify(raw, COMMITTER.public)
    assert manifest.prev_epoch is None
    device = IDS["a"]
    assert open_rekey(manifest, wraps[device], device_id=device, receiving=RECEIVING[device]) == (
        secret
    )


def test_fresh_secrets_and_ephemeral_keys_each_time() -> None:
    first, second = rekey(), rekey()
    assert first[2] != second[2]
    m1 = RekeyManifest.parse_unverified(first[0])
    m2 = RekeyManifest.parse_unverified(second[0])
    assert m1.ephemeral_public != m2.ephemeral_public


def test_wrong_device_cannot_open() -> None:
    raw, wraps, _ = rekey()
    manifest = RekeyManifest.verify(raw, COMMITTER.public)
    a, b = IDS["a"], IDS["b"]
    with pytest.raises(BadSignature):  # b's wrap presented as a's
        open_rekey(manifest, wraps[b], device_id=a, receiving=RECEIVING[a])
    with pytest.raises(DecryptionFailed):  # a's wrap with b's key
        open_rekey(manifest, wraps[a], device_id=a, receiving=RECEIVING[b])
    outsider = device_id_for(SigningKey(_seed("outsider")).public)
    with pytest.raises(MalformedFrame):
        open_rekey(manifest, wraps[a], device_id=outsider, receiving=ReceivingKey(_seed("o")))


def test_tampered_wrap_is_refused() -> None:
    raw, wraps, _ = rekey()
    manifest = RekeyManifest.verify(raw, COMMITTER.public)
    a = IDS["a"]
    tampered = wraps[a][:-1] + bytes([wraps[a][-1] ^ 1])
    with pytest.raises(BadSignature):
        manifest.check_wrap(a, tampered)


def test_wrap_does_not_open_under_another_manifest_context() -> None:
    """A wrap replayed into a re-signed manifest for another epoch no longer opens."""
    raw, wraps, _ = rekey()
    fields = unpack_body(raw[:-64])
    fields[4] = HEAD  # another roster head: another context hash
    body = pack_body(fields)
    manifest = RekeyManifest.verify(
        body + sign_with_label(COMMITTER, MANIFEST_LABEL, body), COMMITTER.public
    )
    a = IDS["a"]
    with pytest.raises(DecryptionFailed):
        open_rekey(manifest, wraps[a], device_id=a, receiving=RECEIVING[a])


def test_committer_giving_members_different_keys_is_detected() -> None:
    """The committer commits to secret K, wraps K to a and c but K' to b, and signs the hash
    of every wrap: the signature is fine, the commitment is not."""
    raw, _, secret = rekey()
    honest = RekeyManifest.verify(raw, COMMITTER.public)
    ephemeral = ReceivingKey(_seed("evil ephemeral"))
    other_secret = bytes(32)
    b = IDS["b"]
    fields = unpack_body(raw[:-64])
    fields[7] = ephemeral.public
    ctx = RekeyManifest.parse_unverified(_sign(fields)).context_hash
    evil_wraps = {
        device: wrap_secret(
            other_secret if device == b else secret,
            ephemeral=ephemeral,
            recipient_device=device,
            recipient_public=PUBLIC[device],
            context_hash=ctx,
        )
        for device in sorted(PUBLIC)
    }
    fields[9] = [[d, wrap_hash(w)] for d, w in evil_wraps.items()]
    manifest = RekeyManifest.verify(_sign(fields), COMMITTER.public)
    assert manifest.key_commitment == honest.key_commitment
    for device, receiving in RECEIVING.items():
        if device == b:
            with pytest.raises(CommitmentMismatch):
                open_rekey(manifest, evil_wraps[device], device_id=device, receiving=receiving)
        else:
            got = open_rekey(manifest, evil_wraps[device], device_id=device, receiving=receiving)
            assert got == secret


def _sign(fields: list[object], key: SigningKey = COMMITTER) -> bytes:
    body = pack_body(fields)
    return body + sign_with_label(key, MANIFEST_LABEL, body)


def test_tampered_manifest_is_refused() -> None:
    raw, _, _ = rekey()
    for position in (5, len(raw) // 2, len(raw) - 70, len(raw) - 1):
        tampered = raw[:position] + bytes([raw[position] ^ 0x01]) + raw[position + 1 :]
        with pytest.raises(BadSignature):
            RekeyManifest.verify(tampered, COMMITTER.public)
    with pytest.raises(BadSignature):
        RekeyManifest.verify(raw, DEVICES["a"].public)


def test_manifest_naming_another_committer_is_refused() -> None:
    raw, _, _ = rekey()
    with pytest.raises(BadSignature):  # validly signed by device a, but names the committer
        RekeyManifest.verify(_sign(unpack_body(raw[:-64]), DEVICES["a"]), DEVICES["a"].public)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, ""),
        (2, 0),
        (2, 3),  # names epoch 1 as its predecessor
        (3, b"\x00" * 39),
        (4, b"short"),
        (5, -1),
        (6, "not-a-device-id"),
        (7, b"short"),
        (9, []),
        (9, [["b" * 32, b"\x00" * 32], ["a" * 32, b"\x00" * 32]]),  # not sorted
        (9, [["a" * 32, b"\x00" * 32], ["a" * 32, b"\x00" * 32]]),  # duplicate
        (9, [["a" * 32, b"\x00" * 31]]),
    ],
)
def test_malformed_manifests_are_refused(index: int, value: object) -> None:
    raw, _, _ = rekey()
    fields = unpack_body(raw[:-64])
    fields[index] = value
    with pytest.raises(MalformedFrame):
        RekeyManifest.verify(_sign(fields), COMMITTER.public)


def test_unknown_manifest_version_and_short_input() -> None:
    raw, _, _ = rekey()
    fields = unpack_body(raw[:-64])
    fields[0] = 2
    with pytest.raises(UnsupportedVersion):
        RekeyManifest.verify(_sign(fields), COMMITTER.public)
    with pytest.raises(MalformedFrame):
        RekeyManifest.verify(b"\x00" * 64, COMMITTER.public)


def _build(**overrides: object) -> Rekey:
    args: dict[str, Any] = {
        "room": ROOM,
        "epoch_number": 1,
        "prev_epoch": None,
        "roster_head": HEAD2,
        "device_list_version": 1,
        "committer": COMMITTER,
        "recipients": PUBLIC,
    }
    return build_rekey(**{**args, **overrides})


def test_build_rekey_refuses_bad_inputs() -> None:
    with pytest.raises(MalformedFrame):  # epoch 3 must name epoch 2
        _build(epoch_number=3, prev_epoch=EpochId(1, HEAD))
    with pytest.raises(MalformedFrame):  # epoch 1 names no predecessor
        _build(prev_epoch=EpochId(1, HEAD))
    with pytest.raises(ValueError):
        _build(recipients={})
    with pytest.raises(ValueError):
        _build(recipients={"x": b"k" * 32})
    with pytest.raises(ValueError):
        _build(secret=b"short")


def test_rekey_repr_redacts_the_secret() -> None:
    r = _build()
    text = repr(r) + repr(RekeyManifest.parse_unverified(r.manifest))
    assert "redacted" in text
    assert r.secret.hex() not in text and repr(r.secret) not in text


def test_check_recipients() -> None:
    assert check_recipients(["a", "b"], ["b", "a"]) == ([], [])
    assert check_recipients(["a", "c", "x"], ["a", "b", "c", "d"]) == (["b", "d"], ["x"])
    assert check_recipients([], ["a"]) == (["a"], [])


def test_epoch_id_encoding() -> None:
    epoch = EpochId(7, HEAD)
    assert epoch.encode() == (7).to_bytes(8, "big") + HEAD
    assert EpochId.decode(epoch.encode()) == epoch
    with pytest.raises(MalformedFrame):
        EpochId(0, HEAD)
    with pytest.raises(MalformedFrame):
        EpochId(1, b"short")
    with pytest.raises(MalformedFrame):
        EpochId.decode(b"\x00" * 39)


# ---------------------------------------------------------------------------------------
# EpochState


K1, K2, K3, K4 = (bytes([i]) * 32 for i in range(1, 5))


def test_transition_table_is_total() -> None:
    states, events = {NO_KEY, ACTIVE, PENDING_REKEY}, {"rekey", "removal_committed", "forget"}
    assert set(TRANSITIONS) == {(s, e) for s in states for e in events}


def test_epoch_state_lifecycle() -> None:
    es = EpochState()
    assert es.state == NO_KEY and es.current is None and not es.needs_rekey
    with pytest.raises(EpochError):
        es.send_key()
    es.on_rekey(EpochId(3, HEAD), K1)  # joined at epoch 3
    assert es.state == ACTIVE and es.send_key() == (EpochId(3, HEAD), K1)
    es.on_removal_committed()
    assert es.state == PENDING_REKEY and es.needs_rekey
    with pytest.raises(StaleEpoch):
        es.send_key()
    es.on_removal_committed()
    assert es.state == PENDING_REKEY
    es.on_rekey(EpochId(4, HEAD2), K2)
    assert es.state == ACTIVE and not es.needs_rekey
    assert es.secret_for(3) == K1 and es.secret_for(4) == K2
    assert es.epoch_for(4) == EpochId(4, HEAD2)


def test_unknown_epoch_reasons() -> None:
    es = EpochState()
    with pytest.raises(UnknownEpoch) as caught:
        es.secret_for(1)
    assert caught.value.reason == NOT_YET_RECEIVED
    es.on_rekey(EpochId(3, HEAD), K1)
    with pytest.raises(UnknownEpoch) as caught:
        es.secret_for(2)
    assert (caught.value.epoch, caught.value.reason) == (2, WITHHELD)
    with pytest.raises(UnknownEpoch) as caught:
        es.epoch_for(4)
    assert (caught.value.epoch, caught.value.reason) == (4, NOT_YET_RECEIVED)
    es.forget()
    assert es.state == NO_KEY and es.current is None
    with pytest.raises(UnknownEpoch) as caught:
        es.secret_for(3)
    assert caught.value.reason == FORGOTTEN


def test_rekeys_must_arrive_in_order() -> None:
    es = EpochState()
    es.on_rekey(EpochId(1, HEAD), K1)
    with pytest.raises(StaleEpoch):
        es.on_rekey(EpochId(1, HEAD), K2)
    with pytest.raises(RosterForked):
        es.on_rekey(EpochId(1, HEAD2), K2)
    with pytest.raises(UnknownEpoch) as caught:
        es.on_rekey(EpochId(3, HEAD), K3)
    assert caught.value.epoch == 2
    es.on_rekey(EpochId(2, HEAD2), K2)
    with pytest.raises(StaleEpoch):
        es.on_rekey(EpochId(1, HEAD), K1)
    with pytest.raises(ValueError):
        es.on_rekey(EpochId(3, HEAD), b"short")


def test_readded_user_cannot_go_back_to_an_old_epoch() -> None:
    es = EpochState()
    es.on_rekey(EpochId(5, HEAD), K1)
    es.forget()
    with pytest.raises(StaleEpoch):
        es.on_rekey(EpochId(5, HEAD), K1)
    es.on_rekey(EpochId(8, HEAD2), K2)
    assert es.state == ACTIVE
    with pytest.raises(UnknownEpoch) as caught:
        es.secret_for(5)
    assert caught.value.reason == WITHHELD


def test_history_grants_fill_older_epochs_only() -> None:
    es = EpochState()
    with pytest.raises(EpochError):
        es.on_history_grant(EpochId(1, HEAD), K1)
    es.on_rekey(EpochId(3, HEAD2), K3)
    es.on_history_grant(EpochId(2, HEAD), K2)
    assert es.secret_for(2) == K2
    with pytest.raises(EpochError):
        es.on_history_grant(EpochId(3, HEAD2), K3)
    with pytest.raises(RosterForked):
        es.on_history_grant(EpochId(2, HEAD2), K4)


def test_epoch_state_repr_holds_no_secret() -> None:
    es = EpochState()
    es.on_rekey(EpochId(1, HEAD), K1)
    assert K1.hex() not in repr(es) and repr(K1) not in repr(es)
    assert "current=1" in repr(es)


@pytest.mark.parametrize(
    ("now", "count", "expected"),
    [(1000, 0, False), (1000 + 3599, 999, False), (1000 + 3600, 0, True), (1001, 1000, True)],
)
def test_should_rotate(now: int, count: int, expected: bool) -> None:
    assert should_rotate(now, count, started_at=1000, max_age=3600, max_messages=1000) is expected


# ---------------------------------------------------------------------------------------
# Replay windows


def test_replay_window_accepts_once_and_reports_gaps() -> None:
    w = ReplayWindow()
    assert w.accept(0) == []
    assert w.accept(1) == []
    with pytest.raises(ReplayDetected):
        w.accept(1)
    assert w.accept(5) == [2, 3, 4]
    assert w.missing == [2, 3, 4] and w.highest == 5
    assert w.accept(3) == []
    assert w.missing == [2, 4]
    with pytest.raises(ReplayDetected):
        w.accept(3)
    with pytest.raises(ReplayDetected):
        w.accept(0)


def test_replay_window_first_counter_may_be_late() -> None:
    assert ReplayWindow().accept(2) == [0, 1]


def test_replay_window_memory_is_bounded() -> None:
    w = ReplayWindow(max_missing=4)
    assert w.accept(10) == [6, 7, 8, 9]
    with pytest.raises(ReplayDetected):  # too old to be remembered: refused like a replay
        w.accept(3)
    assert w.accept(12) == [11]
    assert w.missing == [8, 9, 11]  # 6 and 7 fell out of the window
    assert w.accept(2**40) == [2**40 - 4 + i for i in range(4)]
    assert len(w.missing) == 4


@pytest.mark.parametrize("bad", [-1, 2**64, True])
def test_replay_window_refuses_out_of_range_counters(bad: int) -> None:
    with pytest.raises(MalformedFrame):
        ReplayWindow().accept(bad)


def test_replay_guard_keeps_one_window_per_sender_and_epoch() -> None:
    guard = ReplayGuard()
    guard.accept("dev-a", 1, 0)
    guard.accept("dev-b", 1, 0)  # another sender: its own counters
    guard.accept("dev-a", 2, 0)  # another epoch: counters restart
    with pytest.raises(ReplayDetected):
        guard.accept("dev-a", 1, 0)
    guard.drop_epochs_before(2)
    assert guard.accept("dev-a", 1, 0) == []  # window forgotten
    with pytest.raises(ReplayDetected):
        guard.accept("dev-a", 2, 0)
