"""Small query helpers shared by the store's modules. Each takes an open connection that
is already inside the caller's transaction; none commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .base import RoomState, StoredEvent

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


# reads built once with bind parameters: building and cache-keying a select per call cost
# more than running it (bench.store_ops)
_GET_ROOM = sa.select(t.rooms).where(t.rooms.c.room == sa.bindparam("room", type_=sa.String))
_CURRENT_ROLE = sa.select(t.memberships.c.role).where(
    t.memberships.c.room == sa.bindparam("room", type_=sa.String),
    t.memberships.c.user_id == sa.bindparam("user", type_=sa.String),
    t.memberships.c.to_seq.is_(None),
)


async def get_room(conn: AsyncConnection, room: str) -> RoomState | None:
    row = (await conn.execute(_GET_ROOM, {"room": room})).one_or_none()
    return None if row is None else room_state_of(row)


async def current_role(conn: AsyncConnection, room: str, user: str) -> str | None:
    return (await conn.execute(_CURRENT_ROLE, {"room": room, "user": user})).scalar_one_or_none()


EVENTS_CHANNEL = "medrelay_events"
"""PostgreSQL NOTIFY channel: payload ``room \x1f seq``, sent when the transaction commits."""


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
    if conn.dialect.name == "postgresql":  # wakes every node even if the broker publish is lost
        await notify_event(conn, event.room, event.seq)


_NOTIFY = sa.select(sa.func.pg_notify(EVENTS_CHANNEL, sa.bindparam("payload")))


async def notify_event(conn: AsyncConnection, room: str, seq: int) -> None:
    """PostgreSQL: NOTIFY the events channel (delivered when the transaction commits)."""
    await conn.execute(_NOTIFY, {"payload": f"{room}\x1f{seq}"})


async def insert_wraps(
    conn: AsyncConnection, room: str, seq: int, wraps: Sequence[tuple[str, bytes]]
) -> None:
    if wraps:
        rows = [{"room": room, "seq": seq, "device_id": d, "wrap": w} for d, w in wraps]
        await conn.execute(sa.insert(t.wraps), rows)
