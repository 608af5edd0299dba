"""Auditors' questions, answered from the journal (never from message content).

* :func:`who_saw`: which devices received seq ``s`` of a room, and when: from the
  ``deliver`` records covering ``s`` (written to the device's socket), the first cumulative
  ``receipt`` reaching ``s`` (acknowledged by the device) and ``history_read`` records
  covering ``s`` (fetched as history).
* :func:`trail`: the records about a user (as actor or target), a room, since a time.
* :func:`seq_of_mid`: a message's seq from its client id, via its ``send`` record.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..store import schema as t
from ..store.audit import entry_of
from .chain import ChainEntry

SEND_ACTIONS = ("message", "summon")
SEEN_ACTIONS = ("deliver", "history_read")


@dataclass(frozen=True, slots=True)
class Sighting:
    device: str
    user: str | None
    delivered_at: int | None
    acknowledged_at: int | None
    via: str  # "deliver" | "history_read" | "receipt"
    delivered_by: int | None = None
    """A batched record covers a range written over a period: the seq was written to the
    device at some time in [delivered_at, delivered_by]."""


async def seq_of_mid(conn: AsyncConnection, room: str, mid: bytes) -> int | None:
    a = t.audit.c
    query = (
        sa.select(a.seq_from)
        .where(a.room == room, a.mid == mid, a.action.in_(SEND_ACTIONS), a.outcome == "success")
        .order_by(a.ts)
        .limit(1)
    )
    seq = (await conn.execute(query)).scalar_one_or_none()
    if seq is not None:
        return int(seq)
    e = t.events.c
    found = await conn.execute(sa.select(e.seq).where(e.room == room, e.mid == mid))
    value = found.scalar_one_or_none()
    return None if value is None else int(value)


async def who_saw(conn: AsyncConnection, room: str, seq: int) -> list[Sighting]:
    a = t.audit.c
    covering = sa.and_(a.room == room, a.seq_from <= seq, a.seq_to >= seq)
    seen = (
        await conn.execute(
            sa.select(a.action, a.device_id, a.user_id, a.ts, a.ts_end)
            .where(covering, a.action.in_(SEEN_ACTIONS), a.outcome == "success")
            .order_by(a.ts, a.id)
        )
    ).all()
    acked = (
        await conn.execute(
            sa.select(a.device_id, a.user_id, sa.func.min(a.ts).label("ts"))
            .where(a.room == room, a.action == "receipt", a.seq_to >= seq)
            .group_by(a.device_id, a.user_id)
        )
    ).all()
    ack_at = {row.device_id: int(row.ts) for row in acked if row.device_id is not None}
    out: dict[str, Sighting] = {}
    for r in seen:
        if r.device_id is None or r.device_id in out:
            continue
        until = int(r.ts if r.ts_end is None else r.ts_end)
        out[r.device_id] = Sighting(
            r.device_id, r.user_id, int(r.ts), ack_at.get(r.device_id), r.action, until
        )
    for ack in acked:
        if ack.device_id is not None and ack.device_id not in out:
            out[ack.device_id] = Sighting(ack.device_id, ack.user_id, None, int(ack.ts), "receipt")
    return sorted(out.values(), key=lambda s: (s.delivered_at or s.acknowledged_at or 0, s.device))


async def trail(
    conn: AsyncConnection,
    *,
    user: str | None = None,
    room: str | None = None,
    since: int | None = None,
    until: int | None = None,
    limit: int | None = None,
) -> list[ChainEntry]:
    """Matching records in time order (then by node and index)."""
    a = t.audit.c
    query = sa.select(t.audit).where(a.node.is_not(None))
    if user is not None:
        query = query.where(sa.or_(a.user_id == user, a.target == user))
    if room is not None:
        query = query.where(a.room == room)
    if since is not None:
        query = query.where(a.ts >= since)
    if until is not None:
        query = query.where(a.ts < until)
    query = query.order_by(a.ts, a.node, a.idx)
    if limit is not None:
        query = query.limit(limit)
    return [entry_of(r) for r in await conn.execute(query)]
