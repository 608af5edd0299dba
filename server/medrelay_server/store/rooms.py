"""Room creation, roster commits and membership intervals.

Membership is a set of intervals per (room, user): an add committed at seq S opens
``[S, open)``; a removal committed at seq L closes the open interval at L (inclusive, so the
removed user still receives the removal itself); a role change at S closes the old interval
at S - 1 and opens ``[S, open)`` with the new role, so every seq is read under the role the
user held at that seq. A history grant ``[N, S - 1]`` is recorded apart from the intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from medrelay_protocol import policy
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .audit import ChainWriter, write_audit
from .base import AuditRecord, Commit, MembershipChange, RoomState, StoredEvent
from .rows import (
    current_role,
    insert_event,
    insert_wraps,
    lock_room,
    refuse,
    room_state_of,
)

INITIAL_EPOCH = 1
INITIAL_DEVICE_LIST_VERSION = 0


async def create_room(
    conn: AsyncConnection,
    writer: ChainWriter,
    room: str,
    *,
    genesis: bytes,
    head: bytes,
    owner: str,
    sender_device: str,
    manifest: bytes,
    wraps: Mapping[str, bytes],
    now: int,
    audit: Sequence[AuditRecord],
) -> list[StoredEvent]:
    exists = await conn.execute(sa.select(t.rooms.c.room).where(t.rooms.c.room == room))
    if exists.first() is not None:
        raise refuse(ErrorCode.ALREADY_EXISTS, "room exists")
    await conn.execute(
        sa.insert(t.rooms).values(
            room=room,
            last_seq=2,
            roster_head=head,
            roster_length=1,
            epoch=INITIAL_EPOCH,
            pending_rekey=False,
            device_list_version=INITIAL_DEVICE_LIST_VERSION,
            created_at=now,
        )
    )
    roster_event = StoredEvent(room, 1, "roster", sender_device, owner, now, genesis)
    rekey_event = StoredEvent(room, 2, "rekey", sender_device, owner, now, manifest)
    await insert_event(conn, roster_event)
    await insert_event(conn, rekey_event)
    await insert_wraps(conn, room, 2, sorted(wraps.items()))
    await conn.execute(sa.insert(t.roster).values(room=room, idx=0, entry=genesis))
    await _open_interval(conn, room, owner, policy.OWNER, 1)
    await write_audit(conn, writer, audit, now=now, room=room, seqs=(1, 2))
    return [roster_event, rekey_event]


async def commit(
    conn: AsyncConnection, writer: ChainWriter, c: Commit, *, now: int, audit: Sequence[AuditRecord]
) -> list[StoredEvent]:
    _check_shape(c)
    state = await lock_room(conn, c.room)
    if state.roster_head != c.expected_head:
        raise refuse(ErrorCode.ROSTER_CONFLICT, "roster head moved")
    if state.epoch != c.expected_epoch:
        raise refuse(ErrorCode.STALE_EPOCH, "epoch moved")
    if c.device_list_version is not None and c.device_list_version != state.device_list_version:
        raise refuse(ErrorCode.RECIPIENTS_MISMATCH, "device list changed")
    await _check_sender(conn, c)
    first = state.last_seq + 1
    seq = state.last_seq
    out: list[StoredEvent] = []
    if c.entry is not None:
        seq += 1
        out.append(StoredEvent(c.room, seq, "roster", c.sender_device, c.sender_user, now, c.entry))
        await insert_event(conn, out[-1])
        await conn.execute(
            sa.insert(t.roster).values(room=c.room, idx=state.roster_length, entry=c.entry)
        )
    if c.manifest is not None:
        seq += 1
        out.append(
            StoredEvent(c.room, seq, "rekey", c.sender_device, c.sender_user, now, c.manifest)
        )
        await insert_event(conn, out[-1])
        await insert_wraps(conn, c.room, seq, sorted(c.wraps.items()))
    if c.membership is not None:
        await _apply_membership(conn, c.room, c.membership, first, now)
    if c.revoke_device is not None:
        user, device = c.revoke_device
        d = t.devices.c
        await conn.execute(
            sa.update(t.devices)
            .where(d.device_id == device, d.user_id == user)
            .values(revoked=True)
        )
    await conn.execute(
        sa.update(t.rooms).where(t.rooms.c.room == c.room).values(**_next(state, c, seq))
    )
    await write_audit(conn, writer, audit, now=now, room=c.room, seqs=(first, seq))
    return out


def _check_shape(c: Commit) -> None:
    if (c.entry is None) != (c.new_head is None):
        raise refuse(ErrorCode.INVALID_FIELD, "entry and new_head go together")
    if c.entry is None and c.manifest is None:
        raise refuse(ErrorCode.INVALID_FIELD, "empty commit")
    if c.membership is not None and c.entry is None:
        raise refuse(ErrorCode.INVALID_FIELD, "a membership change needs a roster entry")
    if c.manifest is None and (c.wraps or c.new_epoch is not None):
        raise refuse(ErrorCode.INVALID_FIELD, "wraps and new_epoch need a manifest")
    if c.new_epoch is not None and c.new_epoch <= c.expected_epoch:
        raise refuse(ErrorCode.INVALID_FIELD, "epochs only move forward")


async def _check_sender(conn: AsyncConnection, c: Commit) -> None:
    """The sender must be a current member, or be joining by this very commit (a summoned
    doctor's self-add under a standing authorisation). Rekeying needs a role that may
    commit epochs (bedside tablets may not)."""
    if c.external:
        if c.manifest is not None or (c.membership is not None and c.membership.add):
            raise refuse(ErrorCode.FORBIDDEN, "an external sender may only remove")
        return
    role = await current_role(conn, c.room, c.sender_user)
    if role is None and c.membership is not None:
        role = c.membership.add.get(c.sender_user)
    if role is None:
        raise refuse(ErrorCode.FORBIDDEN, "not a member")
    if c.manifest is not None and not policy.may_commit_epoch(role):
        raise refuse(ErrorCode.FORBIDDEN, "role may not commit epochs")


def _next(state: RoomState, c: Commit, last_seq: int) -> dict[str, object]:
    values: dict[str, object] = {"last_seq": last_seq}
    if c.entry is not None:
        values["roster_head"] = c.new_head
        values["roster_length"] = state.roster_length + 1
    if c.manifest is not None:
        values["epoch"] = c.new_epoch if c.new_epoch is not None else state.epoch + 1
        values["pending_rekey"] = c.pending_rekey
    else:
        # A change that does not rekey never clears a pending rekey.
        values["pending_rekey"] = state.pending_rekey or c.pending_rekey
    return values


async def _apply_membership(
    conn: AsyncConnection, room: str, change: MembershipChange, seq: int, now: int
) -> None:
    for user in change.history_from_seq:
        if user not in change.add:
            raise refuse(ErrorCode.INVALID_FIELD, "history grant without an add")
    for user, role in change.add.items():
        if not policy.is_role(role):
            raise refuse(ErrorCode.INVALID_FIELD, "unknown role")
        await _set_role(conn, room, user, role, seq)
        start = change.history_from_seq.get(user)
        if start is not None and start < seq:
            if not policy.may_read_history(role):
                raise refuse(ErrorCode.FORBIDDEN, "role may not read history")
            await conn.execute(
                sa.insert(t.grants).values(
                    room=room, user_id=user, from_seq=max(start, 1), to_seq=seq - 1, granted_at=now
                )
            )
    for user, role in change.roles.items():
        if not policy.is_role(role):
            raise refuse(ErrorCode.INVALID_FIELD, "unknown role")
        if await current_role(conn, room, user) is None:
            raise refuse(ErrorCode.NOT_FOUND, "not a member")
        await _set_role(conn, room, user, role, seq)
    for user in change.remove:
        m = t.memberships.c
        closed = await conn.execute(
            sa.update(t.memberships)
            .where(m.room == room, m.user_id == user, m.to_seq.is_(None))
            .values(to_seq=seq)
        )
        if closed.rowcount != 1:
            raise refuse(ErrorCode.NOT_FOUND, "not a member")


async def _set_role(conn: AsyncConnection, room: str, user: str, role: str, seq: int) -> None:
    m = t.memberships.c
    current = m.room == room, m.user_id == user, m.to_seq.is_(None)
    row = (await conn.execute(sa.select(m.from_seq, m.role).where(*current))).one_or_none()
    if row is not None and row.role == role:
        return
    if row is not None and row.from_seq == seq:
        await conn.execute(sa.update(t.memberships).where(*current).values(role=role))
        return
    if row is not None:
        await conn.execute(sa.update(t.memberships).where(*current).values(to_seq=seq - 1))
    await _open_interval(conn, room, user, role, seq)


async def _open_interval(conn: AsyncConnection, room: str, user: str, role: str, seq: int) -> None:
    await conn.execute(
        sa.insert(t.memberships).values(room=room, user_id=user, role=role, from_seq=seq)
    )


# reads ----------------------------------------------------------------------------------


async def roster_entries(conn: AsyncConnection, room: str) -> list[bytes]:
    r = t.roster.c
    query = sa.select(r.entry).where(r.room == room).order_by(r.idx)
    return [bytes(e) for e in (await conn.execute(query)).scalars()]


# reads built once with bind parameters: building and cache-keying a select per call cost
# more than running it (bench.store_ops)
_MEMBERS = sa.select(t.memberships.c.user_id, t.memberships.c.role).where(
    t.memberships.c.room == sa.bindparam("room", type_=sa.String),
    t.memberships.c.to_seq.is_(None),
)
_ROOMS_FOR_USER = (
    sa.select(t.rooms, t.memberships.c.role)
    .join(t.memberships, t.rooms.c.room == t.memberships.c.room)
    .where(
        t.memberships.c.user_id == sa.bindparam("user", type_=sa.String),
        t.memberships.c.to_seq.is_(None),
    )
    .order_by(t.rooms.c.room)
)


async def members(conn: AsyncConnection, room: str) -> dict[str, str]:
    return {row.user_id: row.role for row in await conn.execute(_MEMBERS, {"room": room})}


IN_CHUNK = 500
"""Names per ``IN (...)`` of the reads over many rooms or users (one statement each)."""


async def last_seqs(conn: AsyncConnection, rooms: Sequence[str]) -> dict[str, int]:
    """Each existing room's last seq, in one statement per :data:`IN_CHUNK` rooms."""
    c = t.rooms.c
    out: dict[str, int] = {}
    for i in range(0, len(rooms), IN_CHUNK):
        query = sa.select(c.room, c.last_seq).where(c.room.in_(rooms[i : i + IN_CHUNK]))
        out.update((row.room, row.last_seq) for row in await conn.execute(query))
    return out


async def current_rooms(conn: AsyncConnection, users: Sequence[str]) -> dict[str, set[str]]:
    """The rooms each user is a current member of (users in none are left out), in one
    statement per :data:`IN_CHUNK` users."""
    m = t.memberships.c
    out: dict[str, set[str]] = {}
    for i in range(0, len(users), IN_CHUNK):
        query = sa.select(m.user_id, m.room).where(
            m.user_id.in_(users[i : i + IN_CHUNK]), m.to_seq.is_(None)
        )
        for row in await conn.execute(query):
            out.setdefault(row.user_id, set()).add(row.room)
    return out


async def rooms_for_user(conn: AsyncConnection, user: str) -> list[tuple[RoomState, str]]:
    rows = await conn.execute(_ROOMS_FOR_USER, {"user": user})
    return [(room_state_of(row), row.role) for row in rows]
