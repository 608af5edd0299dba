"""The client against a test double of a malicious server (I5, I6).

The double speaks the real frames to the real client logic (``RoomLogic``) but serves what
an attacker controlling the server would: forged roster entries, devices certified by no
user, replayed and forked roster histories, a manifest that gives members different keys,
and messages relabelled to another room or sender. Each is refused by the client.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from medrelay_client.keystore import KeyStore
from medrelay_client.rooms import RoomLogic
from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import ReceivingKey, SigningKey, sign_with_label, wrap_secret
from medrelay_protocol.envelope import MessageHeader, seal_message
from medrelay_protocol.epochs import (
    MANIFEST_LABEL,
    EpochId,
    RekeyManifest,
    build_rekey,
    wrap_hash,
)
from medrelay_protocol.errors import (
    BadSignature,
    CommitmentMismatch,
    MedrelayError,
    NotAuthorised,
    RequestError,
    RosterForked,
)
from medrelay_protocol.frames import (
    Commit,
    Committed,
    Deliver,
    Devices,
    GetDevices,
    GetRoster,
    Ok,
    RegisterDevice,
    Roster,
    UserDevices,
)
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate
from medrelay_protocol.roster import RosterState, make_change, make_genesis, verify_entry

ROOM = "consult-1"
NOW = int(time.time())


@dataclass
class Person:
    keys: KeyStore
    cert: DeviceCertificate
    bundle: DeviceBundle

    @classmethod
    def make(cls, user: str, identity: SigningKey | None = None) -> Person:
        keys = KeyStore.create(user)
        if identity is not None:
            keys.identity = identity
        cert = DeviceCertificate.issue(keys.identity, user, keys.device.public, "person", NOW)
        bundle = DeviceBundle.issue(keys.device, keys.receiving.public, NOW + 86400)
        return cls(keys, cert, bundle)

    @property
    def devices(self) -> UserDevices:
        return UserDevices(
            user=self.keys.user,
            identity_key=self.keys.identity.public,
            certificates=(self.cert.raw,),
            bundles=(self.bundle.raw,),
        )


@dataclass
class EvilServer:
    """Answers the client's requests from state the test sets up (and corrupts)."""

    entries: list[bytes]
    people: dict[str, UserDevices]
    epoch: int = 1
    commits: list[Commit] = field(default_factory=list)
    refuse_commits_with: RequestError | None = None

    async def request(self, frame: Any, expect: type[Any]) -> Any:
        if isinstance(frame, GetRoster):
            return Roster(
                rid=frame.rid,
                room=frame.room,
                entries=tuple(self.entries),
                epoch=self.epoch,
                pending_rekey=False,
                device_list_version=0,
            )
        if isinstance(frame, GetDevices):
            users = tuple(self.people[u] for u in frame.users if u in self.people)
            return Devices(rid=frame.rid, users=users)
        if isinstance(frame, Commit):
            self.commits.append(frame)
            if self.refuse_commits_with is not None:
                raise self.refuse_commits_with
            return Committed(rid=frame.rid, room=frame.room, seq=100)
        if isinstance(frame, RegisterDevice):
            return Ok(rid=frame.rid)
        raise AssertionError(f"unexpected request {frame.TYPE}")


@dataclass
class World:
    alice: Person
    bob: Person
    server: EvilServer
    logic: RoomLogic
    state: RosterState


def _world() -> World:
    alice, bob = Person.make("alice"), Person.make("bob")
    genesis = make_genesis(
        ROOM,
        "alice",
        alice.keys.identity,
        alice.keys.device,
        alice.cert,
        external_sender=None,
        history="joined",
        issued_at=NOW,
    )
    state, _ = verify_entry(None, genesis)
    add_bob = make_change(
        state,
        "add",
        {"user": "bob", "identity_key": bob.keys.identity.public, "role": "member"},
        signer_user="alice",
        device_key=alice.keys.device,
        device_cert=alice.cert,
        issued_at=NOW,
    )
    state, _ = verify_entry(state, add_bob)
    server = EvilServer([genesis, add_bob], {"alice": alice.devices, "bob": bob.devices})
    logic = RoomLogic(alice.keys, server.request)
    logic.cert = alice.cert
    secret = os.urandom(32)
    logic.keys.room(ROOM).epochs[1] = secret
    logic.keys.room(ROOM).heads[1] = state.head
    logic.keys.room(ROOM).current = 1
    return World(alice, bob, server, logic, state)


async def test_unsigned_member_addition_is_refused() -> None:
    w = _world()
    mallory = SigningKey.generate()
    forged = make_change(
        w.state,
        "add",
        {"user": "mallory", "identity_key": mallory.public, "role": "owner"},
        signer_user="alice",
        device_key=w.alice.keys.device,
        device_cert=w.alice.cert,
        issued_at=NOW,
    )
    w.server.entries.append(forged[:-64] + bytes(64))  # the signature stripped
    with pytest.raises(BadSignature):
        await w.logic.roster(ROOM)
    with pytest.raises(MedrelayError):
        await w.logic.add(ROOM, "carol", "member", history_from_seq=None)
    assert w.server.commits == []  # no key was ever wrapped on that roster


async def test_member_addition_without_authority_is_refused() -> None:
    w = _world()
    mallory = SigningKey.generate()
    by_bob = make_change(
        w.state,
        "add",
        {"user": "mallory", "identity_key": mallory.public, "role": "owner"},
        signer_user="bob",
        device_key=w.bob.keys.device,
        device_cert=w.bob.cert,
        issued_at=NOW,
    )
    w.server.entries.append(by_bob)
    with pytest.raises(NotAuthorised):
        await w.logic.roster(ROOM)


async def test_device_certified_by_no_user_never_gets_a_wrap() -> None:
    """The server adds a device to bob's list under an identity key bob never had."""
    w = _world()
    fake = Person.make("bob", identity=SigningKey.generate())
    w.server.people["bob"] = UserDevices(
        user="bob",
        identity_key=w.bob.keys.identity.public,
        certificates=(w.bob.cert.raw, fake.cert.raw),
        bundles=(w.bob.bundle.raw, fake.bundle.raw),
    )
    recipients = await w.logic.recipients((await w.logic.roster(ROOM))[0])
    assert fake.keys.device_id not in recipients
    assert set(recipients) == {w.alice.keys.device_id, w.bob.keys.device_id}


async def test_forged_recipients_mismatch_cannot_slip_in_a_device() -> None:
    """The server claims the rekey misses an uncertified device and keeps refusing: every
    retry still wraps to exactly the certified devices, and the client gives up."""
    w = _world()
    fake = Person.make("bob", identity=SigningKey.generate())
    w.server.people["bob"] = UserDevices(
        user="bob",
        identity_key=w.bob.keys.identity.public,
        certificates=(w.bob.cert.raw, fake.cert.raw),
        bundles=(w.bob.bundle.raw, fake.bundle.raw),
    )
    w.server.refuse_commits_with = RequestError(
        ErrorCode.RECIPIENTS_MISMATCH,
        "missing devices",
        detail={"missing": [fake.keys.device_id], "extra": []},
    )
    carol = Person.make("carol")
    w.server.people["carol"] = carol.devices
    with pytest.raises(RequestError) as info:
        await w.logic.add(ROOM, "carol", "member", history_from_seq=None)
    assert info.value.code == ErrorCode.RECIPIENTS_MISMATCH
    assert len(w.server.commits) == 3
    for commit in w.server.commits:
        assert commit.wraps is not None
        assert fake.keys.device_id not in commit.wraps
        assert set(commit.wraps) == {
            w.alice.keys.device_id,
            w.bob.keys.device_id,
            carol.keys.device_id,
        }


async def test_replayed_membership_change_is_refused() -> None:
    w = _world()
    w.server.entries.append(w.server.entries[1])  # the add of bob, served again
    with pytest.raises(RosterForked):
        await w.logic.roster(ROOM)


async def test_forked_or_rolled_back_roster_is_refused() -> None:
    w = _world()
    await w.logic.roster(ROOM)  # pins (2, head)
    genesis = w.server.entries[0]
    state0, _ = verify_entry(None, genesis)
    carol = Person.make("carol")
    other = make_change(
        state0,
        "add",
        {"user": "carol", "identity_key": carol.keys.identity.public, "role": "member"},
        signer_user="alice",
        device_key=w.alice.keys.device,
        device_cert=w.alice.cert,
        issued_at=NOW,
    )
    w.server.entries = [genesis, other]  # same length, another history
    with pytest.raises(RosterForked):
        await w.logic.roster(ROOM)
    w.server.entries = [genesis]  # rolled back
    with pytest.raises(RosterForked):
        await w.logic.roster(ROOM)


def _evil_rekey(w: World, committer: Person) -> tuple[bytes, dict[str, bytes], bytes]:
    """bob (a certified member) commits to secret K but wraps K' to alice."""
    recipients = {
        w.alice.keys.device_id: w.alice.keys.receiving.public,
        w.bob.keys.device_id: w.bob.keys.receiving.public,
    }
    rekey = build_rekey(
        room=ROOM,
        epoch_number=2,
        prev_epoch=EpochId(1, w.state.head),
        roster_head=w.state.head,
        device_list_version=0,
        committer=committer.keys.device,
        recipients=recipients,
    )
    fields = unpack_body(rekey.manifest[:-64])
    ephemeral = ReceivingKey.generate()
    fields[7] = ephemeral.public
    body = pack_body(fields)
    ctx = RekeyManifest.parse_unverified(
        body + sign_with_label(committer.keys.device, MANIFEST_LABEL, body)
    ).context_hash
    other = os.urandom(32)
    wraps = {
        device: wrap_secret(
            other if device == w.alice.keys.device_id else rekey.secret,
            ephemeral=ephemeral,
            recipient_device=device,
            recipient_public=pub,
            context_hash=ctx,
        )
        for device, pub in sorted(recipients.items())
    }
    fields[9] = [[d, wrap_hash(x)] for d, x in wraps.items()]
    body = pack_body(fields)
    return body + sign_with_label(committer.keys.device, MANIFEST_LABEL, body), wraps, rekey.secret


async def test_manifest_giving_members_different_keys_is_refused() -> None:
    w = _world()
    manifest, wraps, _secret = _evil_rekey(w, w.bob)
    ev = Deliver(
        room=ROOM,
        seq=5,
        kind="rekey",
        sender=w.bob.keys.device_id,
        user="bob",
        ts=NOW,
        payload=manifest,
        wrap=wraps[w.alice.keys.device_id],
    )
    with pytest.raises(CommitmentMismatch):
        await w.logic.process(ev)
    assert 2 not in w.logic.keys.room(ROOM).epochs  # the bad key was not kept


async def test_message_relabelled_to_another_room_or_sender_is_refused() -> None:
    w = _world()
    rk = w.logic.keys.room(ROOM)
    header = MessageHeader(
        room=ROOM,
        epoch=1,
        roster_head=rk.heads[1],
        sender_device=w.bob.keys.device_id,
        counter=0,
        mid=os.urandom(16),
    )
    env = seal_message(
        header,
        {"type": "text", "text": "K+ 6.1"},
        epoch_secret=rk.epochs[1],
        device=w.bob.keys.device,
    )
    good = Deliver(
        room=ROOM,
        seq=6,
        kind="message",
        sender=w.bob.keys.device_id,
        user="bob",
        ts=NOW,
        payload=env.encode(),
    )
    body, problem = await w.logic.process(good)
    assert body == {"type": "text", "text": "K+ 6.1"} and problem is None
    w.logic.keys.room("other-room").epochs[1] = rk.epochs[1]
    moved = Deliver(
        room="other-room",
        seq=7,
        kind="message",
        sender=w.bob.keys.device_id,
        user="bob",
        ts=NOW,
        payload=env.encode(),
    )
    with pytest.raises(BadSignature):
        await w.logic.process(moved)
    as_alice = Deliver(
        room=ROOM,
        seq=8,
        kind="message",
        sender=w.alice.keys.device_id,
        user="alice",
        ts=NOW,
        payload=env.encode(),
    )
    with pytest.raises(BadSignature):
        await w.logic.process(as_alice)
    as_other_user = Deliver(
        room=ROOM,
        seq=9,
        kind="message",
        sender=w.bob.keys.device_id,
        user="alice",
        ts=NOW,
        payload=env.encode(),
    )
    with pytest.raises(MedrelayError):
        await w.logic.process(as_other_user)
