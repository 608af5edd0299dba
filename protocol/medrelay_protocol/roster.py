"""The signed, hash-chained membership log of a room (ARCHITECTURE §5.1).

Clients verify the whole roster before wrapping a key to anyone, and the server verifies each
change before accepting it (compare-and-set on the head). The wire format is in
:mod:`medrelay_protocol.roster_entry`; this module decides whether an entry may extend a
verified :class:`RosterState`.

:func:`verify_entry` checks, in this order, and stops at the first failure:

1. shape: strict decoding and bounds (:class:`MalformedFrame`, :class:`FrameTooLarge`);
2. position: ``index == state.length`` and ``prev_head == state.head``, otherwise the entry
   does not extend this roster: a replayed old change, a gap, or another branch
   (:class:`RosterForked`, wire ``ROSTER_CONFLICT``: fetch the roster and retry);
3. room: the entry names this room (:class:`RosterError`);
4. signer: a member signer must be a current member (:class:`NotAuthorised`); its device
   certificate must verify under that member's *pinned* identity key, name that user and not
   be revoked, else :class:`UncertifiedDevice` (so a device the server invented, certified by
   any other key, is refused with that code rather than a generic signature error); then the
   entry signature must verify under the certified device key (:class:`BadSignature`). The
   external sender's signature must verify under the key named in the genesis entry;
5. authority (:mod:`medrelay_protocol.policy`; :class:`NotAuthorised`): the external sender
   may only ``remove`` and ``revoke_device``; a tablet certificate may not sign ``add``,
   ``remove``, ``role`` or ``history``; a user may revoke only their own devices;
6. semantics (:class:`RosterError`): no adding an existing member, no removing a non-member,
   no no-op role or history change, and a member-signed change may not leave the room
   without an owner. The external sender may remove the last owner: a lapsed registration
   must take effect, and the room then continues without an owner.

The builders (:func:`make_genesis`, :func:`make_change`, :func:`make_external_change`) live
beside the wire format in :mod:`~medrelay_protocol.roster_entry` and are re-exported here.
They sign and do not judge: run :func:`verify_entry` on what they return to get the new state
(and to refuse locally what the server would refuse).

A fresh client cannot tell a genuine genesis from one the server made up; that is what
pinning identity keys (one fingerprint per user) and pinning ``(length, head)`` between
sessions (:func:`verify_roster`) are for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from .crypto import verify_with_label
from .errors import (
    CryptoError,
    FrameError,
    NotAuthorised,
    RosterError,
    RosterForked,
    UncertifiedDevice,
)
from .identity import DEVICE_KIND_TABLET, DeviceCertificate
from .policy import (
    DEVICE,
    OWNER,
    may_add,
    may_change_role,
    may_remove,
    may_set_history,
)
from .roster_entry import (
    ADD,
    GENESIS,
    GENESIS_PREV,
    HISTORY,
    LEAVE,
    REMOVE,
    REVOKE_DEVICE,
    ROLE,
    ROSTER_LABEL,
    DecodedEntry,
    decode_entry,
    make_change,
    make_external_change,
    make_genesis,
)

CertificateCheck = Callable[[bytes, bytes], DeviceCertificate]
"""Checks a device certificate's signature under an identity key: ``(raw, key) -> cert``."""

__all__ = [
    "CLOCK_SKEW",
    "Member",
    "RosterEntry",
    "RosterState",
    "certified_devices",
    "make_change",
    "make_external_change",
    "make_genesis",
    "removes",
    "verify_entry",
    "verify_roster",
]

CLOCK_SKEW = 300
"""Seconds a device certificate's ``issued_at`` may lie in the future of ``now``."""

_TABLET_FORBIDDEN = frozenset({GENESIS, ADD, REMOVE, ROLE, HISTORY})
_EXTERNAL_ALLOWED = frozenset({REMOVE, REVOKE_DEVICE})


@dataclass(frozen=True, slots=True)
class Member:
    user: str
    role: str
    identity_key: bytes
    added_at_index: int
    history_from_seq: int | None = None


@dataclass(frozen=True, slots=True)
class RosterState:
    """The verified roster after ``length`` entries. ``revoked_devices`` holds
    ``(user, device_id)`` pairs: a revocation is scoped to the signer's own user, so one member
    cannot revoke another member's device by naming its id."""

    room: str
    head: bytes
    length: int
    members: Mapping[str, Member]
    external_sender: bytes | None
    history: str
    revoked_devices: frozenset[tuple[str, str]] = frozenset()

    def role_of(self, user: str) -> str | None:
        member = self.members.get(user)
        return member.role if member is not None else None

    def is_member(self, user: str) -> bool:
        return user in self.members

    def is_revoked(self, user: str, device_id: str) -> bool:
        return (user, device_id) in self.revoked_devices

    def owners(self) -> list[str]:
        return sorted(u for u, m in self.members.items() if m.role == OWNER)


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One verified entry. ``signer_user`` and ``signer_device`` are None for the external
    sender."""

    index: int
    action: str
    params: Mapping[str, Any]
    signer_user: str | None
    signer_device: str | None
    head: bytes
    prev_head: bytes
    issued_at: int
    raw: bytes

    @property
    def external(self) -> bool:
        return self.signer_user is None


def removes(entry: RosterEntry) -> str | None:
    """The user an entry takes out of the room (remove or leave), else None."""
    if entry.action == REMOVE:
        return str(entry.params["user"])
    if entry.action == LEAVE:
        return entry.signer_user
    return None


# ---------------------------------------------------------------------------------------
# Verification


def _certificate(
    raw: bytes, identity_key: bytes, user: str, verify: CertificateCheck = DeviceCertificate.verify
) -> DeviceCertificate:
    try:
        cert = verify(raw, identity_key)
    except (CryptoError, FrameError) as exc:
        raise UncertifiedDevice("roster: signer device is not certified by its user") from exc
    if cert.user_id != user:
        raise UncertifiedDevice("roster: certificate names another user")
    return cert


def _check_signer(state: RosterState | None, d: DecodedEntry) -> DeviceCertificate | None:
    """Step 4: returns the signer's certificate, or None for the external sender."""
    if d.signer_user is None or d.cert_raw is None:
        if state is None or state.external_sender is None:
            raise NotAuthorised("roster: no external sender in this room")
        verify_with_label(state.external_sender, ROSTER_LABEL, d.signature, d.body)
        return None
    if state is None:  # genesis: the owner's device, certified by the identity key it names
        if d.signer_user != d.params["owner"]:
            raise NotAuthorised("roster: genesis must be signed by the owner")
        cert = _certificate(d.cert_raw, d.params["identity_key"], d.signer_user)
    else:
        member = state.members.get(d.signer_user)
        if member is None:
            raise NotAuthorised("roster: signer is not a member")
        cert = _certificate(d.cert_raw, member.identity_key, d.signer_user)
        if state.is_revoked(d.signer_user, cert.device_id):
            raise UncertifiedDevice("roster: signer device is revoked")
    verify_with_label(cert.device_key, ROSTER_LABEL, d.signature, d.body)
    return cert


def _check_authority(state: RosterState, d: DecodedEntry, cert: DeviceCertificate | None) -> None:
    """Step 5, for non-genesis entries."""
    if cert is None:
        if d.action not in _EXTERNAL_ALLOWED:
            raise NotAuthorised("roster: the external sender may only remove")
        return
    if cert.kind == DEVICE_KIND_TABLET and d.action in _TABLET_FORBIDDEN:
        raise NotAuthorised("roster: a tablet may not change the roster")
    signer_role = state.role_of(str(d.signer_user)) or ""
    if not _role_allows(state, signer_role, d):
        raise NotAuthorised(f"roster: {signer_role or 'signer'} may not {d.action}")


def _role_allows(state: RosterState, signer_role: str, d: DecodedEntry) -> bool:
    p = d.params
    if d.action == ADD:
        return may_add(signer_role, p["role"])
    if d.action == REMOVE:  # removing a non-member is a semantic error, reported in step 6
        target_role = state.role_of(p["user"])
        return target_role is None or may_remove(signer_role, target_role)
    if d.action == ROLE:
        return may_change_role(signer_role)
    if d.action == HISTORY:
        return may_set_history(signer_role)
    if d.action == REVOKE_DEVICE:
        return bool(p["user"] == d.signer_user)
    return d.action == LEAVE


def _without(members: Mapping[str, Member], user: str, *, keep_owner: bool) -> dict[str, Member]:
    if user not in members:
        raise RosterError("roster: not a member")
    rest = {u: m for u, m in members.items() if u != user}
    if (
        keep_owner
        and members[user].role == OWNER
        and not any(m.role == OWNER for m in rest.values())
    ):
        raise RosterError("roster: the last owner may not leave the room without an owner")
    return rest


def _apply(state: RosterState, d: DecodedEntry, head: bytes) -> RosterState:
    """Step 6: the new state, or :class:`RosterError` for a change that makes no sense."""
    p = d.params
    members = dict(state.members)
    revoked = state.revoked_devices
    history = state.history
    if d.action == ADD:
        if p["user"] in members:
            raise RosterError("roster: already a member")
        if p.get("history_from_seq") is not None and history == "none":
            raise RosterError("roster: this room shares no history with newcomers")
        members[p["user"]] = Member(
            p["user"], p["role"], p["identity_key"], d.index, p.get("history_from_seq")
        )
    elif d.action == REMOVE:
        members = _without(members, p["user"], keep_owner=d.signer_user is not None)
    elif d.action == LEAVE:
        members = _without(members, str(d.signer_user), keep_owner=True)
    elif d.action == ROLE:
        old = members.get(p["user"])
        if old is None or old.role == p["role"]:
            raise RosterError("roster: role change of a non-member or to the same role")
        members[p["user"]] = replace(old, role=p["role"])
        if not any(m.role == OWNER for m in members.values()):
            raise RosterError("roster: the room would have no owner")
    elif d.action == HISTORY:
        if p["visibility"] == history:
            raise RosterError("roster: history visibility unchanged")
        history = p["visibility"]
    elif d.action == REVOKE_DEVICE:
        pair = (p["user"], p["device"])
        if p["user"] not in members or pair in revoked:
            raise RosterError("roster: device of a non-member, or already revoked")
        revoked = revoked | {pair}
    else:  # pragma: no cover - verify_entry refuses a genesis after the first entry
        raise RosterError("roster: unexpected action")
    return replace(
        state,
        head=head,
        length=state.length + 1,
        members=MappingProxyType(members),
        history=history,
        revoked_devices=revoked,
    )


def _genesis_state(d: DecodedEntry, cert: DeviceCertificate | None, head: bytes) -> RosterState:
    if cert is None or d.action != GENESIS:
        raise RosterError("roster: the first entry must be a genesis signed by the owner")
    if cert.kind == DEVICE_KIND_TABLET:
        raise NotAuthorised("roster: a tablet may not create a room")
    p = d.params
    owner = Member(p["owner"], OWNER, p["identity_key"], 0)
    return RosterState(
        room=d.room,
        head=head,
        length=1,
        members=MappingProxyType({owner.user: owner}),
        external_sender=p.get("external_sender"),
        history=p["history"],
    )


def _entry(d: DecodedEntry, cert: DeviceCertificate | None, head: bytes) -> RosterEntry:
    return RosterEntry(
        index=d.index,
        action=d.action,
        params=MappingProxyType(dict(d.params)),
        signer_user=d.signer_user,
        signer_device=cert.device_id if cert is not None else None,
        head=head,
        prev_head=d.prev_head,
        issued_at=d.issued_at,
        raw=d.body + d.signature,
    )


def verify_entry(state: RosterState | None, raw: bytes) -> tuple[RosterState, RosterEntry]:
    """Verify that ``raw`` validly extends ``state`` (None: ``raw`` must be the genesis) and
    return the new state with the verified entry. See the module docstring for the checks."""
    d = decode_entry(raw)
    length, head = (0, GENESIS_PREV) if state is None else (state.length, state.head)
    if d.index != length or d.prev_head != head:
        raise RosterForked("roster: entry does not extend the current head")
    if state is not None and d.room != state.room:
        raise RosterError("roster: entry belongs to another room")
    if (state is None) != (d.action == GENESIS):
        raise RosterError("roster: a genesis must be the first entry, and only the first")
    cert = _check_signer(state, d)
    new_head = d.head
    if state is None:
        new_state = _genesis_state(d, cert, new_head)
    else:
        _check_authority(state, d, cert)
        new_state = _apply(state, d, new_head)
    return new_state, _entry(d, cert, new_head)


def verify_roster(
    entries: Sequence[bytes],
    *,
    pinned: tuple[int, bytes] | None = None,
    room: str | None = None,
) -> RosterState:
    """Verify a whole roster from its genesis.

    ``pinned`` is ``(length, head)`` from an earlier verification by this client: the chain
    must be at least that long and pass through exactly that head at that length, otherwise
    the server is showing a different or rolled-back history (:class:`RosterForked`).
    ``room``, when given, must be the room the genesis names (a roster of another room is
    refused with :class:`RosterError`).
    """
    if not entries:
        raise RosterError("roster: empty")
    if pinned is not None and len(entries) < pinned[0]:
        raise RosterForked("roster: shorter than the pinned roster (rollback)")
    if pinned is not None and pinned[0] == 0 and pinned[1] != GENESIS_PREV:
        raise RosterForked("roster: pinned head does not match")
    state: RosterState | None = None
    for raw in entries:
        state, _ = verify_entry(state, raw)
        if pinned is not None and state.length == pinned[0] and state.head != pinned[1]:
            raise RosterForked("roster: history differs from the pinned head")
    assert state is not None
    if room is not None and state.room != room:
        raise RosterError("roster: roster of another room")
    return state


def certified_devices(
    state: RosterState,
    certs_by_user: Mapping[str, Sequence[bytes]],
    *,
    now: int,
    verify: CertificateCheck = DeviceCertificate.verify,
) -> dict[str, DeviceCertificate]:
    """The devices a client may wrap keys to: ``device_id -> certificate``.

    For every current member, each certificate must verify under the member's pinned identity
    key and name that member; revoked devices, certificates issued more than
    :data:`CLOCK_SKEW` seconds after ``now``, and tablet certificates of members whose role is
    not ``device`` are left out. Bad certificates are excluded, never raised: the server
    serves them and must not be able to make a client fail by adding garbage. ``verify``
    checks one certificate's signature (``VerifiedDevices.certificate`` keeps outcomes).
    """
    out: dict[str, DeviceCertificate] = {}
    for user, member in state.members.items():
        for raw in certs_by_user.get(user, ()):
            try:
                cert = _certificate(raw, member.identity_key, user, verify)
            except UncertifiedDevice:
                continue
            if state.is_revoked(user, cert.device_id) or cert.issued_at > now + CLOCK_SKEW:
                continue
            if cert.kind == DEVICE_KIND_TABLET and member.role != DEVICE:
                continue
            out[cert.device_id] = cert
    return out
