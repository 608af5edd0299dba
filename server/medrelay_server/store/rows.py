"""Small query helpers shared by the store's modules. Each takes an open connection that
is already inside the caller's transaction; none commits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .base import AuditRecord, RoomState, StoredEvent

EVENT_COLUMNS = (
    t.events.c.room,
    t.events.c.seq,
    t.events.c.kind,
    t.events.c.sender_device,
    t.events.c.sender_user,
    t.events.c.ts,
    t.events.c.payload,
    t.events.c.mid,
)


def refuse(code: ErrorCode, message: str = "") -> RequestError:
    return RequestError(code, message)


def room_state_of(row: Any) -> RoomState:
    return RoomState(
        room=row.room,
        last_seq=row.last_seq,
        roster_head=bytes(row.roster_head),
        roster_length=row.roster_length,
        epoch=row.epoch,
        pending_rekey=bool(row.pending_rekey),
        device_list_version=row.device_list_version,
        created_at=row.created_at,
    )


def event_of(row: Any, wrap: bytes | None = None) -> StoredEvent:
    return StoredEvent(
        room=row.room,
        seq=row.seq,
        kind=row.kind,
        sender_device=row.sender_device,
        sender_user=row.sender_user,
        ts=row.ts,
        payload=bytes(row.payload),
        mid=None if row.mid is None else bytes(row.mid),
        wrap=wrap,
    )


async def lock_room(conn: AsyncConnection, room: str) -> RoomState:
    """The room's row, locked until the transaction ends (``FOR UPDATE`` on PostgreSQL; on
    SQLite the whole database is already write-locked). ``NOT_FOUND`` if there is none."""
    query = sa.select(t.rooms).where(t.rooms.c.room == room).with_for_update()
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        raise refuse(ErrorCode.NOT_FOUND, "no such room")
    return room_state_of(row)


async def get_room(conn: AsyncConnection, room: str) -> RoomState | None:
    row = (await conn.execute(sa.select(t.rooms).where(t.rooms.c.room == room))).one_or_none()
    return None if row is None else room_state_of(row)


async def current_role(conn: AsyncConnection, room: str, user: str) -> str | None:
    m = t.memberships.c
    query = sa.select(m.role).where(m.room == room, m.user_id == user, m.to_seq.is_(None))
    return (await conn.execute(query)).scalar_one_or_none()


async def insert_event(conn: AsyncConnection, event: StoredEvent) -> None:
    await conn.execute(
        sa.insert(t.events).values(
            room=event.room,
            seq=event.seq,
            kind=event.kind,
            sender_device=event.sender_device,
            sender_user=event.sender_user,
            ts=event.ts,
            payload=event.payload,
            mid=event.mid,
        )
    )


async def insert_wraps(
    conn: AsyncConnection, room: str, seq: int, wraps: Sequence[tuple[str, bytes]]
) -> None:
    if wraps:
        rows = [{"room": room, "seq": seq, "device_id": d, "wrap": w} for d, w in wraps]
        await conn.execute(sa.insert(t.wraps), rows)


async def write_audit(
    conn: AsyncConnection,
    records: Sequence[AuditRecord],
    *,
    now: int | None = None,
    room: str | None = None,
    seqs: tuple[int, int] | None = None,
) -> None:
    """Append journal records. Within a write that assigned seqs, records that name no seq
    get the assigned range (callers cannot know it in advance), records that name no room
    get the room, and records with ``ts == 0`` get ``now``."""
    if not records:
        return
    rows = []
    for rec in records:
        if room is not None and rec.room is None:
            rec = dataclasses.replace(rec, room=room)
        if seqs is not None and rec.seq_from is None and rec.seq_to is None:
            rec = dataclasses.replace(rec, seq_from=seqs[0], seq_to=seqs[1])
        if now is not None and rec.ts == 0:
            rec = dataclasses.replace(rec, ts=now)
        rows.append(
            {
                "ts": rec.ts,
                "action": rec.action,
                "outcome": rec.outcome,
                "user_id": rec.user,
                "device_id": rec.device,
                "room": rec.room,
                "seq_from": rec.seq_from,
                "seq_to": rec.seq_to,
                "mid": rec.mid,
                "target": rec.target,
                "source": rec.source,
                "detail": rec.detail,
            }
        )
    await conn.execute(sa.insert(t.audit), rows)


async def read_audit(conn: AsyncConnection, room: str | None) -> list[AuditRecord]:
    query = sa.select(t.audit).order_by(t.audit.c.id)
    if room is not None:
        query = query.where(t.audit.c.room == room)
    return [
        AuditRecord(
            action=r.action,
            outcome=r.outcome,
            user=r.user_id,
            device=r.device_id,
            room=r.room,
            seq_from=r.seq_from,
            seq_to=r.seq_to,
            mid=None if r.mid is None else bytes(r.mid),
            target=r.target,
            source=r.source,
            detail=r.detail,
            ts=r.ts,
        )
        for r in await conn.execute(query)
    ]
