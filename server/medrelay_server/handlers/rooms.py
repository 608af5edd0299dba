"""Room creation and membership commits: the server verifies every roster change and rekey
manifest it is given, then applies them with a compare-and-set on the roster head.

The server can refuse but never invent: it holds no key that could sign a roster entry,
certificate or manifest, so it cannot add a member or a device on its own (I5). It refuses a
rekey that does not wrap for exactly the certified devices of the members after the change
(I6, ``RECIPIENTS_MISMATCH`` with the missing and extra device ids).
"""

from __future__ import annotations

from collections.abc import Mapping

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.epochs import RekeyManifest, check_recipients
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import Commit as CommitFrame
from medrelay_protocol.frames import Committed, CreateRoom
from medrelay_protocol.policy import may_commit_epoch
from medrelay_protocol.roster import RosterEntry, RosterState, certified_devices, verify_entry
from medrelay_protocol.roster import verify_roster as verify_roster_chain

from ..gateway.connection import Connection
from ..gateway.context import Gateway
from ..store.base import AuditRecord, Commit, MembershipChange, RoomState

MEMBER_CHANGES_NEEDING_REKEY = frozenset({"add", "remove"})
PENDING_CHANGES = frozenset({"leave", "revoke_device"})


def _refuse(exc: MedrelayError) -> RequestError:
    return RequestError(exc.code, exc.message)


async def expected_devices(gw: Gateway, roster: RosterState) -> dict[str, bytes]:
    """Certified, unrevoked devices of the roster's members: device id -> receiving key.
    Signatures seen before are not checked again (``gw.devices_checked``); expiry,
    revocation and roles are checked at every call."""
    records = await gw.store.devices_for(sorted(roster.members))
    live = [r for r in records if not r.revoked]
    certs: dict[str, list[bytes]] = {}
    for r in live:
        certs.setdefault(r.user, []).append(r.certificate)
    now = gw.clock.now()
    checked = gw.devices_checked
    certified = certified_devices(roster, certs, now=now, verify=checked.certificate)

    out: dict[str, bytes] = {}
    for r in live:
        if r.device_id in certified:
            try:  # an expired bundle cannot be wrapped to, by clients or by the rule here
                bundle = checked.bundle(r.bundle, r.signing_key, now=now)
            except MedrelayError:
                continue
            out[r.device_id] = bundle.receiving_key
    return out


async def _check_manifest(
    gw: Gateway,
    conn: Connection,
    *,
    room: str,
    raw: bytes,
    wraps: Mapping[str, bytes],
    epoch: int,
    roster: RosterState,
    device_list_version: int | None,
) -> RekeyManifest:
    try:
        manifest = RekeyManifest.verify(raw, conn.device_key)
    except MedrelayError as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "rekey manifest signature invalid") from exc
    if manifest.committer_device != conn.device or manifest.room != room:
        raise RequestError(ErrorCode.INVALID_FIELD, "manifest names another device or room")
    if manifest.epoch_number != epoch:
        raise RequestError(ErrorCode.STALE_EPOCH, f"the next epoch is {epoch}")
    if manifest.roster_head != roster.head:
        raise RequestError(ErrorCode.ROSTER_CONFLICT, "manifest names another roster head")
    if device_list_version is not None and manifest.device_list_version != device_list_version:
        raise RequestError(
            ErrorCode.RECIPIENTS_MISMATCH, "stale device list version; fetch devices again"
        )
    expected = await expected_devices(gw, roster)
    missing, extra = check_recipients(manifest.recipients, expected)
    if missing or extra:
        raise RequestError(
            ErrorCode.RECIPIENTS_MISMATCH,
            "wraps must cover exactly the certified member devices",
            detail={"missing": missing, "extra": extra},
        )
    if set(wraps) != set(manifest.recipients):
        raise RequestError(ErrorCode.INVALID_FIELD, "wraps do not match the manifest")
    for device, wrap in wraps.items():
        try:
            manifest.check_wrap(device, wrap)
        except MedrelayError as exc:
            raise RequestError(ErrorCode.BAD_SIGNATURE, "a wrap is not the one signed") from exc
    return manifest


async def verified_roster(gw: Gateway, state: RoomState) -> RosterState:
    """The room's roster as stored, verified: kept from this node's last change of the room
    when the store still reports that head and length, else verified from its genesis."""
    known = gw.rosters.get(state.room, state.roster_head, state.roster_length)
    if known is not None:
        return known
    roster = verify_roster_chain(await gw.store.roster_entries(state.room), room=state.room)
    gw.rosters.put(roster)
    return roster


def _signed_by_caller(conn: Connection, entry: RosterEntry) -> None:
    if entry.external:
        return
    if entry.signer_user != conn.user or entry.signer_device != conn.device:
        raise RequestError(ErrorCode.FORBIDDEN, "a change must be signed by the sending device")


async def handle_create_room(gw: Gateway, conn: Connection, frame: CreateRoom) -> None:
    try:
        roster, entry = verify_entry(None, frame.genesis)
    except MedrelayError as exc:
        raise _refuse(exc) from exc
    _signed_by_caller(conn, entry)
    if roster.room != frame.room or frame.manifest is None or frame.wraps is None:
        raise RequestError(ErrorCode.INVALID_FIELD, "genesis must name this room, with a rekey")
    owner = roster.members[conn.user]
    pinned = await gw.store.get_identity(conn.user)
    if pinned is not None and pinned != owner.identity_key:
        raise RequestError(ErrorCode.FORBIDDEN, "genesis names another identity key")
    await _check_manifest(
        gw,
        conn,
        room=frame.room,
        raw=frame.manifest,
        wraps=frame.wraps,
        epoch=1,
        roster=roster,
        device_list_version=None,
    )
    events = await gw.store.create_room(
        frame.room,
        genesis=frame.genesis,
        head=roster.head,
        owner=conn.user,
        sender_device=conn.device,
        manifest=frame.manifest,
        wraps=frame.wraps,
        now=gw.clock.now(),
        audit=[
            gw.audit(conn, "room_create", room=frame.room),
            gw.audit(conn, "key_rotation", room=frame.room, detail="epoch 1"),
        ],
    )
    gw.rosters.put(roster)
    gw.reply(conn, Committed(rid=frame.rid, room=frame.room, seq=events[-1].seq))
    await gw.delivery.publish(events)


def _membership(entry: RosterEntry) -> MembershipChange | None:
    p = entry.params
    if entry.action == "add":
        history = p.get("history_from_seq")
        return MembershipChange(
            add={str(p["user"]): str(p["role"])},
            history_from_seq={str(p["user"]): int(history)} if history is not None else {},
        )
    if entry.action == "remove":
        return MembershipChange(remove=(str(p["user"]),))
    if entry.action == "leave" and entry.signer_user is not None:
        return MembershipChange(remove=(entry.signer_user,))
    if entry.action == "role":
        return MembershipChange(roles={str(p["user"]): str(p["role"])})
    return None


async def handle_commit(gw: Gateway, conn: Connection, frame: CommitFrame) -> None:
    state = await gw.store.room_state(frame.room)
    role = await gw.store.member_role(frame.room, conn.user)
    if state is None or role is None:
        raise RequestError(ErrorCode.FORBIDDEN, "not a member of this room")
    try:
        roster = await verified_roster(gw, state)
    except MedrelayError as exc:  # our own store holds a bad chain: never build on it
        raise RequestError(ErrorCode.INTERNAL_ERROR, "stored roster does not verify") from exc
    new_roster, entry = roster, None
    if frame.change is not None:
        try:
            new_roster, entry = verify_entry(roster, frame.change)
        except MedrelayError as exc:
            raise _refuse(exc) from exc
        _signed_by_caller(conn, entry)
    elif frame.manifest is None:
        raise RequestError(ErrorCode.INVALID_FIELD, "a commit needs a change or a rekey")
    commit = await _plan(gw, conn, frame, state, role, roster, new_roster, entry)
    audit = []
    if entry is not None:
        audit.append(
            gw.audit(
                conn,
                "membership_change",
                room=frame.room,
                target=_target(entry),
                detail=entry.action,
            )
        )
    if commit.new_epoch is not None:
        audit.append(
            gw.audit(conn, "key_rotation", room=frame.room, detail=f"epoch {commit.new_epoch}")
        )
    if commit.revoke_device is not None:
        audit.append(
            gw.audit(conn, "device_revoke", room=frame.room, target=commit.revoke_device[1])
        )
    events = await gw.store.commit(commit, now=gw.clock.now(), audit=audit)
    gw.rosters.put(new_roster)  # committed: the next change starts from it
    gw.reply(conn, Committed(rid=frame.rid, room=frame.room, seq=events[-1].seq))
    await gw.delivery.publish(events)


def _revoked(entry: RosterEntry | None) -> tuple[str, str] | None:
    if entry is None or entry.action != "revoke_device":
        return None
    return str(entry.params["user"]), str(entry.params["device"])


def _target(entry: RosterEntry) -> str | None:
    user = entry.params.get("user", entry.signer_user)
    return str(user) if user is not None else None


async def _plan(
    gw: Gateway,
    conn: Connection,
    frame: CommitFrame,
    state: RoomState,
    role: str,
    roster: RosterState,
    new_roster: RosterState,
    entry: RosterEntry | None,
) -> Commit:
    membership = _membership(entry) if entry is not None else None
    new_epoch: int | None = None
    pending = state.pending_rekey
    if frame.manifest is not None:
        if not may_commit_epoch(role) or conn.kind == "tablet":
            raise RequestError(ErrorCode.FORBIDDEN, "this role may not commit epochs")
        if not new_roster.is_member(conn.user):
            raise RequestError(ErrorCode.INVALID_FIELD, "a leaving member cannot rekey")
        await _check_manifest(
            gw,
            conn,
            room=frame.room,
            raw=frame.manifest,
            wraps=frame.wraps or {},
            epoch=state.epoch + 1,
            roster=new_roster,
            device_list_version=state.device_list_version,
        )
        new_epoch, pending = state.epoch + 1, False
    elif (entry is not None and entry.action in PENDING_CHANGES) or (
        entry is not None and entry.external
    ):
        pending = True
    elif entry is not None and entry.action in MEMBER_CHANGES_NEEDING_REKEY:
        raise RequestError(ErrorCode.REKEY_REQUIRED, "commit this change with its rekey")
    return Commit(
        room=frame.room,
        expected_head=roster.head,
        expected_epoch=state.epoch,
        sender_user=conn.user,
        sender_device=conn.device,
        entry=frame.change,
        new_head=new_roster.head if entry is not None else None,
        membership=membership,
        manifest=frame.manifest,
        wraps=dict(frame.wraps or {}),
        new_epoch=new_epoch,
        pending_rekey=pending,
        device_list_version=state.device_list_version if frame.manifest is not None else None,
        revoke_device=_revoked(entry),
    )


async def commit_external(gw: Gateway, room: str, change: bytes, *, institution: str) -> int:
    """Apply a removal signed by the institution's external sender key (register lapse,
    deprovisioning, lost device): verified against the roster like any change, committed as
    pending, so the next member device that sends commits the new epoch. Returns the seq."""
    state = await gw.store.room_state(room)
    if state is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no such room")
    roster = await verified_roster(gw, state)
    try:
        new_roster, entry = verify_entry(roster, change)
    except MedrelayError as exc:
        raise _refuse(exc) from exc
    if not entry.external:
        raise RequestError(ErrorCode.FORBIDDEN, "not signed by the external sender")
    commit = Commit(
        room=room,
        expected_head=roster.head,
        expected_epoch=state.epoch,
        sender_user=f"institution:{institution}",
        sender_device="",
        entry=change,
        new_head=new_roster.head,
        membership=_membership(entry),
        pending_rekey=True,
        external=True,
        revoke_device=_revoked(entry),
    )
    record = AuditRecord(
        action="device_revoke" if entry.action == "revoke_device" else "membership_change",
        outcome="success",
        user=f"institution:{institution}",
        room=room,
        target=str(entry.params.get("device", _target(entry))),
        detail=f"external {entry.action}",
        ts=gw.clock.now(),
    )
    events = await gw.store.commit(commit, now=gw.clock.now(), audit=[record])
    gw.rosters.put(new_roster)
    await gw.delivery.publish(events)
    return events[-1].seq
