"""Appending envelopes and reading a room's event stream through a user's membership.

A user sees seq s of a room when s lies inside one of their membership intervals, where a
member whose role may not receive room messages (a bedside tablet, role ``device``) sees only
the roster and rekey events of the interval, or inside one of their history grants.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from medrelay_protocol import policy
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .audit import ChainWriter, write_audit
from .base import AppendResult, AuditRecord, StoredEvent
from .rows import (
    EVENT_COLUMNS,
    current_role,
    event_of,
    insert_event,
    lock_room,
    refuse,
)

MESSAGE_KINDS = {
    "message": policy.may_post,
    "summon": policy.may_summon,
    "grant": policy.may_commit_epoch,  # history grants: only roles that hold and commit keys
}
KINDS_FOR_NON_RECEIVERS = ("roster", "rekey")
RECEIVER_ROLES = tuple(role for role in policy.ROLES if policy.may_receive(role))


async def append_message(
    conn: AsyncConnection,
    writer: ChainWriter,
    room: str,
    *,
    user: str,
    device: str,
    mid: bytes,
    envelope: bytes,
    kind: str,
    epoch: int,
    allow_pending: bool,
    now: int,
    audit: Sequence[AuditRecord],
) -> AppendResult:
    """Membership is checked before idempotency (a removed user learns nothing, not even
    the seq of an earlier send); idempotency before the epoch, so a retry of a send that
    was stored returns its ack even after the epoch moved on."""
    allowed = MESSAGE_KINDS.get(kind)
    if allowed is None:
        raise refuse(ErrorCode.INVALID_FIELD, "not a message kind")
    state = await lock_room(conn, room)
    role = await current_role(conn, room, user)
    if role is None or not allowed(role):
        raise refuse(ErrorCode.FORBIDDEN, "may not post")
    e = t.events.c
    query = sa.select(*EVENT_COLUMNS).where(e.room == room, e.sender_device == device, e.mid == mid)
    row = (await conn.execute(query)).one_or_none()
    if row is not None:
        original = event_of(row)
        if original.payload != envelope or original.kind != kind or original.sender_user != user:
            raise refuse(ErrorCode.IDEMPOTENCY_MISMATCH, "mid reused with other bytes")
        await write_audit(
            conn, writer, audit, now=now, room=room, seqs=(original.seq, original.seq)
        )
        return AppendResult(original, duplicate=True)
    if epoch != state.epoch:
        raise refuse(ErrorCode.STALE_EPOCH, "not the current epoch")
    if state.pending_rekey and not allow_pending:
        raise refuse(ErrorCode.REKEY_REQUIRED, "a rekey is pending")
    seq = state.last_seq + 1
    stored = StoredEvent(room, seq, kind, device, user, now, envelope, mid)
    await insert_event(conn, stored)
    await conn.execute(sa.update(t.rooms).where(t.rooms.c.room == room).values(last_seq=seq))
    await write_audit(conn, writer, audit, now=now, room=room, seqs=(seq, seq))
    return AppendResult(stored, duplicate=False)


def _visible_to(user: str) -> sa.ColumnElement[bool]:
    e, m, g = t.events.c, t.memberships.c, t.grants.c
    interval = sa.exists().where(
        m.room == e.room,
        m.user_id == user,
        m.from_seq <= e.seq,
        sa.or_(m.to_seq.is_(None), m.to_seq >= e.seq),
        sa.or_(m.role.in_(RECEIVER_ROLES), e.kind.in_(KINDS_FOR_NON_RECEIVERS)),
    )
    grant = sa.exists().where(
        g.room == e.room, g.user_id == user, g.from_seq <= e.seq, g.to_seq >= e.seq
    )
    return sa.or_(interval, grant)


def _with_wrap(device: str) -> sa.Select[tuple[object, ...]]:
    e, w = t.events.c, t.wraps.c
    joined = t.events.outerjoin(
        t.wraps, sa.and_(w.room == e.room, w.seq == e.seq, w.device_id == device)
    )
    return sa.select(*EVENT_COLUMNS, w.wrap).select_from(joined)


def _events_of(rows: Sequence[sa.Row[tuple[object, ...]]]) -> list[StoredEvent]:
    out = []
    for row in rows:
        wrap = row._mapping["wrap"]
        out.append(event_of(row, None if wrap is None else bytes(wrap)))
    return out


async def events_after(
    conn: AsyncConnection, room: str, after_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = (
        _with_wrap(device)
        .where(e.room == room, e.seq > after_seq, _visible_to(user))
        .order_by(e.seq)
        .limit(max(limit, 0))
    )
    return _events_of((await conn.execute(query)).all())


async def events_before(
    conn: AsyncConnection, room: str, before_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = _with_wrap(device).where(e.room == room, _visible_to(user))
    if before_seq > 0:
        query = query.where(e.seq < before_seq)
    query = query.order_by(e.seq.desc()).limit(max(limit, 0))
    return _events_of((await conn.execute(query)).all())[::-1]


async def room_events(
    conn: AsyncConnection, room: str, after_seq: int, *, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = (
        sa.select(*EVENT_COLUMNS)
        .where(e.room == room, e.seq > after_seq)
        .order_by(e.seq)
        .limit(max(limit, 0))
    )
    return [event_of(row) for row in await conn.execute(query)]


async def visible(conn: AsyncConnection, room: str, seq: int, user: str) -> bool:
    m, g = t.memberships.c, t.grants.c
    interval = sa.select(m.from_seq).where(
        m.room == room,
        m.user_id == user,
        m.from_seq <= seq,
        sa.or_(m.to_seq.is_(None), m.to_seq >= seq),
    )
    grant = sa.select(g.from_seq).where(
        g.room == room, g.user_id == user, g.from_seq <= seq, g.to_seq >= seq
    )
    query = sa.select(sa.or_(interval.exists(), grant.exists()))
    return bool((await conn.execute(query)).scalar())


async def record_receipt(conn: AsyncConnection, room: str, device: str, seq: int, now: int) -> int:
    """One atomic upsert that keeps the larger seq, so concurrent receipts never move a
    device's cumulative receipt backwards."""
    r = t.receipts.c
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    row = insert(t.receipts).values(room=room, device_id=device, seq=seq, updated_at=now)
    newer = row.excluded.seq > r.seq
    upsert = row.on_conflict_do_update(
        index_elements=[r.room, r.device_id],
        set_={
            "seq": sa.case((newer, row.excluded.seq), else_=r.seq),
            "updated_at": sa.case((newer, row.excluded.updated_at), else_=r.updated_at),
        },
    ).returning(r.seq)
    return int((await conn.execute(upsert)).scalar_one())


async def receipt_of(conn: AsyncConnection, room: str, device: str) -> int:
    r = t.receipts.c
    query = sa.select(r.seq).where(r.room == room, r.device_id == device)
    return int((await conn.execute(query)).scalar_one_or_none() or 0)
