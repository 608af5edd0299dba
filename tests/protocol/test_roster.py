"""The signed, hash-chained roster: what verifies, and every way a change is refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import SigningKey, device_id_for, sign_with_label
from medrelay_protocol.errors import (
    BadSignature,
    FrameTooLarge,
    MalformedFrame,
    NotAuthorised,
    RosterError,
    RosterForked,
    UncertifiedDevice,
    UnsupportedVersion,
)
from medrelay_protocol.identity import DeviceCertificate
from medrelay_protocol.roster import (
    RosterEntry,
    RosterState,
    certified_devices,
    make_change,
    make_external_change,
    make_genesis,
    removes,
    verify_entry,
    verify_roster,
)
from medrelay_protocol.roster_entry import GENESIS_PREV, ROSTER_LABEL, entry_head, sign_entry
from medrelay_protocol.verified import VerifiedDevices

ROOM = "room-7f3a"
T0 = 1_700_000_000


def _seed(*parts: str) -> bytes:
    return hashlib.sha256("/".join(parts).encode()).digest()


@dataclass
class Person:
    user: str
    identity: SigningKey
    device: SigningKey
    cert: DeviceCertificate

    @classmethod
    def make(cls, user: str, kind: str = "person", device_name: str = "phone") -> Person:
        identity = SigningKey(_seed(user, "identity"))
        device = SigningKey(_seed(user, device_name))
        cert = DeviceCertificate.issue(identity, user, device.public, kind, T0)
        return cls(user, identity, device, cert)

    def second_device(self, name: str, kind: str = "person") -> Person:
        device = SigningKey(_seed(self.user, name))
        cert = DeviceCertificate.issue(self.identity, self.user, device.public, kind, T0)
        return Person(self.user, self.identity, device, cert)

    def change(self, state: RosterState, action: str, **params: Any) -> bytes:
        return make_change(
            state,
            action,
            params,
            signer_user=self.user,
            device_key=self.device,
            device_cert=self.cert,
            issued_at=T0 + state.length,
        )


ALICE = Person.make("alice")
BOB = Person.make("bob")
CAROL = Person.make("carol")
DAVE = Person.make("dave")
WARD = Person.make("ward7-tablet", kind="tablet")
EXTERNAL = SigningKey(_seed("institution", "external-sender"))


def add(signer: Person, state: RosterState, who: Person, role: str) -> bytes:
    return signer.change(state, "add", user=who.user, identity_key=who.identity.public, role=role)


def genesis(*, external: bool = True, history: str = "joined") -> bytes:
    return make_genesis(
        ROOM,
        ALICE.user,
        ALICE.identity,
        ALICE.device,
        ALICE.cert,
        external_sender=EXTERNAL.public if external else None,
        history=history,
        issued_at=T0,
    )


def build(*steps: tuple[Person, str, dict[str, Any]]) -> tuple[RosterState, list[bytes]]:
    entries = [genesis()]
    state, _ = verify_entry(None, entries[0])
    for signer, action, params in steps:
        raw = signer.change(state, action, **params)
        state, _ = verify_entry(state, raw)
        entries.append(raw)
    return state, entries


def adds(who: Person, role: str) -> dict[str, Any]:
    return {"user": who.user, "identity_key": who.identity.public, "role": role}


@pytest.fixture
def room() -> RosterState:
    """alice (owner), bob (member), carol (observer), the ward tablet (device)."""
    state, _ = build(
        (ALICE, "add", adds(BOB, "member")),
        (BOB, "add", adds(CAROL, "observer")),
        (ALICE, "add", adds(WARD, "device")),
    )
    return state


# ---------------------------------------------------------------------------------------
# A valid chain


def test_valid_chain_verifies_and_tracks_members() -> None:
    state, entries = build(
        (ALICE, "add", adds(BOB, "member")),
        (BOB, "add", adds(CAROL, "observer")),
        (ALICE, "role", {"user": "carol", "role": "member"}),
        (ALICE, "history", {"visibility": "shared"}),
        (CAROL, "leave", {}),
        (ALICE, "remove", {"user": "bob"}),
    )
    again = verify_roster(entries, room=ROOM)
    assert again == state
    assert state.length == 7 and state.room == ROOM and state.history == "shared"
    assert set(state.members) == {"alice"}
    assert state.role_of("alice") == "owner" and state.role_of("bob") is None
    assert state.is_member("alice") and not state.is_member("carol")
    assert state.external_sender == EXTERNAL.public


def test_heads_chain_each_entry_to_the_previous() -> None:
    state0, entry0 = verify_entry(None, genesis())
    raw1 = add(ALICE, state0, BOB, "member")
    state1, entry1 = verify_entry(state0, raw1)
    assert entry0.prev_head == GENESIS_PREV
    assert entry1.prev_head == entry0.head == state0.head
    assert entry1.head == state1.head == entry_head(entry0.head, raw1[:-64], raw1[-64:])
    assert entry1.raw == raw1 and entry1.index == 1 and entry1.action == "add"
    assert entry1.signer_user == "alice"
    assert entry1.signer_device == device_id_for(ALICE.device.public)
    assert state1.members["bob"].added_at_index == 1
    assert state1.members["bob"].identity_key == BOB.identity.public


def test_member_adds_member_with_history_from_seq(room: RosterState) -> None:
    raw = BOB.change(room, "add", history_from_seq=42, **adds(DAVE, "member"))
    state, entry = verify_entry(room, raw)
    assert state.members["dave"].history_from_seq == 42
    assert entry.params["history_from_seq"] == 42


def test_removes_names_the_user_taken_out(room: RosterState) -> None:
    state, left = verify_entry(room, CAROL.change(room, "leave"))
    _, removed = verify_entry(state, ALICE.change(state, "remove", user="bob"))
    _, added = verify_entry(room, add(ALICE, room, DAVE, "member"))
    assert removes(left) == "carol"
    assert removes(removed) == "bob"
    assert removes(added) is None


def test_removed_user_may_be_added_again(room: RosterState) -> None:
    state, _ = verify_entry(room, ALICE.change(room, "remove", user="bob"))
    state, _ = verify_entry(state, add(ALICE, state, BOB, "observer"))
    assert state.members["bob"].role == "observer"
    assert state.members["bob"].added_at_index == room.length + 1


# ---------------------------------------------------------------------------------------
# Signatures and certificates


def test_garbage_signature_is_refused(room: RosterState) -> None:
    raw = add(ALICE, room, DAVE, "member")
    with pytest.raises(BadSignature):
        verify_entry(room, raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(BadSignature):
        verify_entry(room, raw[:-64] + bytes(64))


def test_tampered_body_is_refused(room: RosterState) -> None:
    raw = add(ALICE, room, DAVE, "member")
    body = pack_body(
        [1, ROOM, room.length, room.head, "add", {**adds(DAVE, "owner")}, _signer(ALICE), T0]
    )
    with pytest.raises(BadSignature):  # alice's signature over a different body
        verify_entry(room, body + raw[-64:])


def _signer(p: Person) -> dict[str, Any]:
    return {"user": p.user, "device_cert": p.cert.raw}


def test_unsigned_entry_is_refused(room: RosterState) -> None:
    body = pack_body([1, ROOM, room.length, room.head, "leave", {}, _signer(BOB), T0])
    with pytest.raises(MalformedFrame):
        verify_entry(room, body[:10])
    with pytest.raises(BadSignature):
        verify_entry(room, body + bytes(64))


def test_device_not_certified_by_pinned_identity_key_is_refused(room: RosterState) -> None:
    rogue_identity = SigningKey(_seed("bob", "another identity"))
    cert = DeviceCertificate.issue(rogue_identity, "bob", BOB.device.public, "person", T0)
    raw = make_change(
        room,
        "add",
        adds(DAVE, "member"),
        signer_user="bob",
        device_key=BOB.device,
        device_cert=cert,
        issued_at=T0,
    )
    with pytest.raises(UncertifiedDevice):
        verify_entry(room, raw)


def test_server_invented_device_is_refused(room: RosterState) -> None:
    """The server makes a device key, certifies it with a key of its own and signs an add of
    its own user in alice's name: the certificate does not verify under alice's pinned key."""
    server_identity = SigningKey(_seed("server", "identity"))
    server_device = SigningKey(_seed("server", "device"))
    cert = DeviceCertificate.issue(server_identity, "alice", server_device.public, "person", T0)
    mallory = Person.make("mallory")
    raw = make_change(
        room,
        "add",
        adds(mallory, "member"),
        signer_user="alice",
        device_key=server_device,
        device_cert=cert,
        issued_at=T0,
    )
    with pytest.raises(UncertifiedDevice):
        verify_entry(room, raw)


def test_certificate_naming_another_user_is_refused(room: RosterState) -> None:
    cert = DeviceCertificate.issue(BOB.identity, "alice", BOB.device.public, "person", T0)
    raw = make_change(
        room,
        "add",
        adds(DAVE, "member"),
        signer_user="bob",
        device_key=BOB.device,
        device_cert=cert,
        issued_at=T0,
    )
    with pytest.raises(UncertifiedDevice):
        verify_entry(room, raw)


def test_garbage_certificate_is_uncertified(room: RosterState) -> None:
    raw = sign_entry(
        room=ROOM,
        index=room.length,
        prev_head=room.head,
        action="leave",
        params={},
        signer={"user": "bob", "device_cert": b"\x01" * 100},
        issued_at=T0,
        key=BOB.device,
    )
    with pytest.raises(UncertifiedDevice):
        verify_entry(room, raw)


def test_certified_device_signing_with_another_key_is_refused(room: RosterState) -> None:
    raw = make_change(
        room,
        "leave",
        {},
        signer_user="bob",
        device_key=SigningKey(_seed("bob", "not the certified key")),
        device_cert=BOB.cert,
        issued_at=T0,
    )
    with pytest.raises(BadSignature):
        verify_entry(room, raw)


def test_non_member_signer_is_not_authorised(room: RosterState) -> None:
    with pytest.raises(NotAuthorised):
        verify_entry(room, add(DAVE, room, Person.make("erin"), "member"))


def test_genesis_must_be_signed_by_the_owner_device() -> None:
    raw = make_genesis(
        ROOM, "alice", ALICE.identity, BOB.device, BOB.cert, external_sender=None,
        history="none", issued_at=T0,
    )  # fmt: skip
    with pytest.raises(UncertifiedDevice):
        verify_entry(None, raw)
    raw = sign_entry(
        room=ROOM, index=0, prev_head=GENESIS_PREV, action="genesis",
        params={"owner": "alice", "identity_key": ALICE.identity.public, "history": "none"},
        signer=_signer(BOB), issued_at=T0, key=BOB.device,
    )  # fmt: skip
    with pytest.raises(NotAuthorised):
        verify_entry(None, raw)


def test_genesis_only_first() -> None:
    state, _ = verify_entry(None, genesis())
    second = sign_entry(
        room=ROOM, index=1, prev_head=state.head, action="genesis",
        params={"owner": "alice", "identity_key": ALICE.identity.public, "history": "none"},
        signer=_signer(ALICE), issued_at=T0, key=ALICE.device,
    )  # fmt: skip
    with pytest.raises(RosterError):
        verify_entry(state, second)
    with pytest.raises(RosterError):
        verify_entry(None, add(ALICE, state, BOB, "member"))
    with pytest.raises(RosterError):
        verify_roster([])


# ---------------------------------------------------------------------------------------
# Authority


@pytest.mark.parametrize(
    ("signer", "action", "params"),
    [
        (BOB, "add", adds(DAVE, "owner")),
        (BOB, "add", adds(DAVE, "device")),
        (CAROL, "add", adds(DAVE, "observer")),
        (BOB, "remove", {"user": "carol"}),
        (CAROL, "remove", {"user": "bob"}),
        (BOB, "role", {"user": "carol", "role": "member"}),
        (BOB, "history", {"visibility": "shared"}),
        (BOB, "remove", {"user": "bob"}),
    ],
)
def test_member_without_authority_is_refused(
    room: RosterState, signer: Person, action: str, params: dict[str, Any]
) -> None:
    with pytest.raises(NotAuthorised):
        verify_entry(room, signer.change(room, action, **params))


@pytest.mark.parametrize(
    ("action", "params"),
    [
        ("add", adds(DAVE, "member")),
        ("remove", {"user": "carol"}),
        ("role", {"user": "carol", "role": "member"}),
        ("history", {"visibility": "shared"}),
    ],
)
def test_tablet_certificate_may_not_change_membership(
    room: RosterState, action: str, params: dict[str, Any]
) -> None:
    # Even a tablet certificate of the owner: the certificate kind is checked, not only the role.
    owner_tablet = ALICE.second_device("tablet", kind="tablet")
    with pytest.raises(NotAuthorised):
        verify_entry(room, owner_tablet.change(room, action, **params))
    with pytest.raises(NotAuthorised):
        verify_entry(room, WARD.change(room, action, **params))


def test_tablet_may_leave(room: RosterState) -> None:
    state, _ = verify_entry(room, WARD.change(room, "leave"))
    assert not state.is_member(WARD.user)


def test_tablet_may_not_create_a_room() -> None:
    tablet = ALICE.second_device("tablet", kind="tablet")
    raw = make_genesis(
        ROOM, "alice", ALICE.identity, tablet.device, tablet.cert, external_sender=None,
        history="none", issued_at=T0,
    )  # fmt: skip
    with pytest.raises(NotAuthorised):
        verify_entry(None, raw)


def test_owner_may_add_owner_and_second_owner_may_remove_first(room: RosterState) -> None:
    state, _ = verify_entry(room, add(ALICE, room, DAVE, "owner"))
    state, _ = verify_entry(state, DAVE.change(state, "remove", user="alice"))
    assert state.owners() == ["dave"]


# ---------------------------------------------------------------------------------------
# External sender


def test_external_sender_may_remove_and_revoke_but_not_add(room: RosterState) -> None:
    raw = make_external_change(room, "remove", {"user": "bob"}, external_key=EXTERNAL, issued_at=T0)
    state, entry = verify_entry(room, raw)
    assert not state.is_member("bob")
    assert entry.external and entry.signer_user is None and entry.signer_device is None
    assert removes(entry) == "bob"

    device = device_id_for(CAROL.device.public)
    revoke = make_external_change(
        state, "revoke_device", {"user": "carol", "device": device}, external_key=EXTERNAL,
        issued_at=T0,
    )  # fmt: skip
    state, _ = verify_entry(state, revoke)
    assert state.is_revoked("carol", device)

    for action, params in [("add", adds(DAVE, "member")), ("history", {"visibility": "none"})]:
        raw = make_external_change(state, action, params, external_key=EXTERNAL, issued_at=T0)
        with pytest.raises(NotAuthorised):
            verify_entry(state, raw)


def test_external_sender_may_remove_the_last_owner(room: RosterState) -> None:
    raw = make_external_change(
        room, "remove", {"user": "alice"}, external_key=EXTERNAL, issued_at=T0
    )
    state, _ = verify_entry(room, raw)
    assert state.owners() == []


def test_wrong_external_key_is_refused(room: RosterState) -> None:
    raw = make_external_change(
        room, "remove", {"user": "bob"}, external_key=SigningKey(_seed("x")), issued_at=T0
    )
    with pytest.raises(BadSignature):
        verify_entry(room, raw)


def test_room_without_external_sender_refuses_external_changes() -> None:
    state, _ = verify_entry(None, genesis(external=False))
    raw = make_external_change(
        state, "remove", {"user": "alice"}, external_key=EXTERNAL, issued_at=T0
    )
    with pytest.raises(NotAuthorised):
        verify_entry(state, raw)


# ---------------------------------------------------------------------------------------
# Device revocation


def test_user_revokes_own_device_which_then_cannot_sign(room: RosterState) -> None:
    laptop = BOB.second_device("laptop")
    raw = BOB.change(room, "revoke_device", user="bob", device=laptop.cert.device_id)
    state, _ = verify_entry(room, raw)
    assert state.is_revoked("bob", laptop.cert.device_id)
    with pytest.raises(UncertifiedDevice):
        verify_entry(state, laptop.change(state, "add", **adds(DAVE, "member")))
    with pytest.raises(RosterError):  # already revoked
        verify_entry(
            state, BOB.change(state, "revoke_device", user="bob", device=laptop.cert.device_id)
        )


def test_member_may_not_revoke_another_users_device(room: RosterState) -> None:
    raw = ALICE.change(room, "revoke_device", user="bob", device=BOB.cert.device_id)
    with pytest.raises(NotAuthorised):
        verify_entry(room, raw)


def test_revocation_is_scoped_to_the_user_named(room: RosterState) -> None:
    """Naming bob's device id under alice's own user revokes nothing of bob's."""
    raw = ALICE.change(room, "revoke_device", user="alice", device=BOB.cert.device_id)
    state, _ = verify_entry(room, raw)
    assert not state.is_revoked("bob", BOB.cert.device_id)
    state, _ = verify_entry(state, add(BOB, state, DAVE, "member"))
    assert state.is_member("dave")


# ---------------------------------------------------------------------------------------
# Semantics


def test_leave_works_for_members(room: RosterState) -> None:
    state, entry = verify_entry(room, BOB.change(room, "leave"))
    assert not state.is_member("bob") and entry.action == "leave"
    with pytest.raises(NotAuthorised):  # no longer a member: may not sign anything
        verify_entry(state, BOB.change(state, "leave"))


@pytest.mark.parametrize(
    ("signer", "action", "params"),
    [
        (ALICE, "leave", {}),
        (ALICE, "remove", {"user": "alice"}),
        (ALICE, "role", {"user": "alice", "role": "member"}),
        (ALICE, "add", adds(BOB, "member")),
        (ALICE, "remove", {"user": "dave"}),
        (ALICE, "role", {"user": "dave", "role": "member"}),
        (ALICE, "role", {"user": "bob", "role": "member"}),
        (ALICE, "history", {"visibility": "joined"}),
    ],
    ids=[
        "last-owner-leaves",
        "last-owner-removes-self",
        "last-owner-demotes-self",
        "add-existing-member",
        "remove-non-member",
        "role-of-non-member",
        "role-unchanged",
        "history-unchanged",
    ],
)
def test_changes_that_make_no_sense_are_refused(
    room: RosterState, signer: Person, action: str, params: dict[str, Any]
) -> None:
    with pytest.raises(RosterError) as caught:
        verify_entry(room, signer.change(room, action, **params))
    assert type(caught.value) is RosterError


def test_entry_of_another_room_is_refused(room: RosterState) -> None:
    raw = sign_entry(
        room="other-room", index=room.length, prev_head=room.head, action="leave", params={},
        signer=_signer(BOB), issued_at=T0, key=BOB.device,
    )  # fmt: skip
    with pytest.raises(RosterError):
        verify_entry(room, raw)
    with pytest.raises(RosterError):
        verify_roster([genesis()], room="other-room")


# ---------------------------------------------------------------------------------------
# Forks, replays, rollbacks


def test_two_entries_at_the_same_index_fork() -> None:
    state, entries = build((ALICE, "add", adds(BOB, "member")))
    branch_a = add(ALICE, state, CAROL, "member")
    branch_b = add(ALICE, state, DAVE, "member")
    state_a, _ = verify_entry(state, branch_a)
    with pytest.raises(RosterForked):
        verify_entry(state_a, branch_b)
    with pytest.raises(RosterForked):
        verify_roster([*entries, branch_b], pinned=(state_a.length, state_a.head))
    assert verify_roster([*entries, branch_a], pinned=(state_a.length, state_a.head)) == state_a


def test_pinned_head_must_be_on_the_chain_at_its_length() -> None:
    state, entries = build(
        (ALICE, "add", adds(BOB, "member")), (ALICE, "add", adds(CAROL, "member"))
    )
    early = verify_roster(entries[:2])
    assert verify_roster(entries, pinned=(2, early.head)) == state
    with pytest.raises(RosterForked):
        verify_roster(entries, pinned=(2, state.head))
    with pytest.raises(RosterForked):
        verify_roster(entries, pinned=(0, state.head))


def test_rollback_to_a_shorter_roster_is_refused() -> None:
    state, entries = build((ALICE, "add", adds(BOB, "member")), (ALICE, "remove", {"user": "bob"}))
    with pytest.raises(RosterForked):
        verify_roster(entries[:-1], pinned=(state.length, state.head))


def test_replayed_old_change_is_refused() -> None:
    state, entries = build((ALICE, "add", adds(BOB, "member")), (ALICE, "remove", {"user": "bob"}))
    with pytest.raises(RosterForked):
        verify_entry(state, entries[1])  # the old add of bob, re-submitted


def test_change_naming_a_stale_head_is_refused(room: RosterState) -> None:
    stale = sign_entry(
        room=ROOM, index=room.length, prev_head=bytes(31) + b"\x01", action="leave", params={},
        signer=_signer(BOB), issued_at=T0, key=BOB.device,
    )  # fmt: skip
    with pytest.raises(RosterForked):
        verify_entry(room, stale)
    ahead = sign_entry(
        room=ROOM, index=room.length + 1, prev_head=room.head, action="leave", params={},
        signer=_signer(BOB), issued_at=T0, key=BOB.device,
    )  # fmt: skip
    with pytest.raises(RosterForked):
        verify_entry(room, ahead)


# ---------------------------------------------------------------------------------------
# Shape


def _signed(fields: list[Any]) -> bytes:
    body = pack_body(fields)
    return body + sign_with_label(BOB.device, ROSTER_LABEL, body)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.__setitem__(4, "promote"),
        lambda f: f.__setitem__(5, {"surprise": 1}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "extra": True}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "identity_key": b"short"}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "user": "x" * 129}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "role": "admin"}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "history_from_seq": -1}),
        lambda f: f.__setitem__(5, {**adds(DAVE, "member"), "history_from_seq": True}),
        lambda f: f.__setitem__(6, {"external": 1}),
        lambda f: f.__setitem__(6, {"user": "bob"}),
        lambda f: f.__setitem__(3, b"short"),
        lambda f: f.__setitem__(2, "1"),
        lambda f: f.__setitem__(1, "r" * 65),
        lambda f: f.append(0),
    ],
)
def test_malformed_entries_are_refused(room: RosterState, mutate: Any) -> None:
    fields: list[Any] = [
        1, ROOM, room.length, room.head, "add", adds(DAVE, "member"), _signer(BOB), T0,
    ]  # fmt: skip
    mutate(fields)
    with pytest.raises(MalformedFrame):
        verify_entry(room, _signed(fields))


def test_unknown_version_and_oversize(room: RosterState) -> None:
    fields: list[Any] = [2, ROOM, room.length, room.head, "leave", {}, _signer(BOB), T0]
    with pytest.raises(UnsupportedVersion):
        verify_entry(room, _signed(fields))
    with pytest.raises(FrameTooLarge):
        verify_entry(room, b"\x00" * 5000)


def test_entry_repr_and_params_are_read_only(room: RosterState) -> None:
    _, entry = verify_entry(room, add(ALICE, room, DAVE, "member"))
    assert isinstance(entry, RosterEntry)
    with pytest.raises(TypeError):
        entry.params["role"] = "owner"  # type: ignore[index]
    with pytest.raises(TypeError):
        room.members["x"] = room.members["alice"]  # type: ignore[index]


# ---------------------------------------------------------------------------------------
# Certified devices


def test_certified_devices_keeps_only_certified_unrevoked_devices(room: RosterState) -> None:
    laptop = BOB.second_device("laptop")
    state, _ = verify_entry(
        room, BOB.change(room, "revoke_device", user="bob", device=laptop.cert.device_id)
    )
    forged = DeviceCertificate.issue(
        SigningKey(_seed("server")), "bob", SigningKey(_seed("srv-dev")).public, "person", T0
    )
    bob_tablet = BOB.second_device("tablet", kind="tablet")
    future = DeviceCertificate.issue(
        CAROL.identity, "carol", SigningKey(_seed("carol", "f")).public, "person", T0 + 10_000
    )
    certs = {
        "alice": [ALICE.cert.raw],
        "bob": [BOB.cert.raw, laptop.cert.raw, forged.raw, bob_tablet.cert.raw, b"garbage"],
        "carol": [CAROL.cert.raw, ALICE.cert.raw, future.raw],
        WARD.user: [WARD.cert.raw],
        "dave": [DAVE.cert.raw],  # not a member
    }
    devices = certified_devices(state, certs, now=T0 + 60)
    assert set(devices) == {
        ALICE.cert.device_id,
        BOB.cert.device_id,
        CAROL.cert.device_id,
        WARD.cert.device_id,
    }
    assert devices[WARD.cert.device_id].kind == "tablet"
    assert devices[BOB.cert.device_id].user_id == "bob"
    later = certified_devices(state, certs, now=T0 + 10_000)
    assert future.device_id in later


def test_kept_check_outcomes_still_leave_out_revoked_early_and_wrong_role_devices(
    room: RosterState,
) -> None:
    """With ``VerifiedDevices`` the signatures are checked once; what can change between two
    rekeys is checked at every one: the roster's revocations, ``issued_at`` and roles."""
    laptop = BOB.second_device("laptop")
    bob_tablet = BOB.second_device("tablet", kind="tablet")
    future = DeviceCertificate.issue(
        CAROL.identity, "carol", SigningKey(_seed("carol", "f")).public, "person", T0 + 10_000
    )
    certs = {
        "alice": [ALICE.cert.raw],
        "bob": [BOB.cert.raw, laptop.cert.raw, bob_tablet.cert.raw],
        "carol": [CAROL.cert.raw, future.raw],
    }
    kept = VerifiedDevices()
    before = certified_devices(room, certs, now=T0 + 60, verify=kept.certificate)
    assert laptop.cert.device_id in before and kept.checks == 6
    state, _ = verify_entry(
        room, BOB.change(room, "revoke_device", user="bob", device=laptop.cert.device_id)
    )
    for now in (T0 + 60, T0 + 10_000):
        assert certified_devices(state, certs, now=now, verify=kept.certificate) == (
            certified_devices(state, certs, now=now)
        )
    after = certified_devices(state, certs, now=T0 + 60, verify=kept.certificate)
    assert laptop.cert.device_id not in after  # revoked in the roster after it was kept
    assert bob_tablet.cert.device_id not in after  # a tablet certificate of a member
    assert future.device_id not in after  # issued after now
    assert kept.checks == 6  # every signature came from what was kept


def test_history_grant_refused_when_the_room_shares_no_history() -> None:
    """The signed history-visibility setting binds adds: "none" means no history_from_seq."""
    from medrelay_protocol.crypto import SigningKey
    from medrelay_protocol.errors import RosterError
    from medrelay_protocol.identity import DeviceCertificate
    from medrelay_protocol.roster import make_change, make_genesis, verify_entry

    ident, dev = SigningKey.generate(), SigningKey.generate()
    cert = DeviceCertificate.issue(ident, "owner", dev.public, "person", 1)
    genesis = make_genesis(
        "room-h", "owner", ident, dev, cert, external_sender=None, history="none", issued_at=1
    )
    state, _ = verify_entry(None, genesis)
    params = {"user": "new", "identity_key": SigningKey.generate().public, "role": "member"}
    ok = make_change(
        state, "add", params, signer_user="owner", device_key=dev, device_cert=cert, issued_at=2
    )
    verify_entry(state, ok)  # without a grant the add is fine
    granted = make_change(
        state,
        "add",
        {**params, "history_from_seq": 1},
        signer_user="owner",
        device_key=dev,
        device_cert=cert,
        issued_at=2,
    )
    with pytest.raises(RosterError, match="no history"):
        verify_entry(state, granted)
