"""Queries of the server-side device lifecycle (:mod:`medrelay_server.devices_admin`).

Each takes a connection already inside the caller's transaction (``store.database.write()``
or ``.read()``); none commits. Revoking goes through :func:`.devices.put_device`, so a
retirement or an administrator's revocation has exactly the effect of any other revocation:
the flag is permanent and the owner's rooms get a new ``device_list_version`` and become
pending a rekey.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.ext.asyncio import AsyncConnection

from . import devices
from . import schema as t
from .base import DeviceRecord
from .rows import refuse

REVOKED_CHANNEL = "medrelay_devices"
"""PostgreSQL NOTIFY channel: payload a device id, sent when its revocation commits."""
CHUNK = 500


async def revoke(
    conn: AsyncConnection, device_id: str, *, unseen_before: int | None = None
) -> DeviceRecord | None:
    """Mark the device revoked under its row lock. Returns the record as it was, or None when
    nothing changed: already revoked, or (with ``unseen_before``) seen at or after that time
    meanwhile, so a device that connected while a retirement was being decided stays.
    ``NOT_FOUND`` when there is no such device."""
    d = t.devices.c
    lock = sa.select(d.revoked, d.last_seen, d.created_at).where(d.device_id == device_id)
    row = (await conn.execute(lock.with_for_update())).one_or_none()
    if row is None:
        raise refuse(ErrorCode.NOT_FOUND, "no such device")
    if row.revoked:
        return None
    seen = row.last_seen if row.last_seen is not None else row.created_at
    if unseen_before is not None and seen >= unseen_before:
        return None
    record = await devices.get_device(conn, device_id)
    assert record is not None
    await devices.put_device(conn, dataclasses.replace(record, revoked=True))
    return record


async def current_rooms(conn: AsyncConnection, user: str) -> list[str]:
    """Rooms in which ``user`` is a current member (pending a rekey after a revocation)."""
    m = t.memberships.c
    query = sa.select(m.room).where(m.user_id == user, m.to_seq.is_(None)).order_by(m.room)
    return list((await conn.execute(query)).scalars())


async def notify_revoked(conn: AsyncConnection, device_id: str) -> None:
    """Tell every node listening (PostgreSQL only) once this transaction commits."""
    if conn.dialect.name == "postgresql":
        await conn.execute(sa.select(sa.func.pg_notify(REVOKED_CHANNEL, device_id)))


async def touch_devices(conn: AsyncConnection, device_ids: Iterable[str], now: int) -> None:
    """Record ``now`` as last seen for every device in ``device_ids`` (live connections)."""
    d = t.devices.c
    ids = sorted(set(device_ids))
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        await conn.execute(
            sa.update(t.devices)
            .where(d.device_id.in_(chunk), sa.func.coalesce(d.last_seen, 0) < now)
            .values(last_seen=now)
        )


async def revoked_among(conn: AsyncConnection, device_ids: Iterable[str]) -> set[str]:
    """The devices of ``device_ids`` that the directory marks revoked."""
    d = t.devices.c
    ids = sorted(set(device_ids))
    out: set[str] = set()
    for start in range(0, len(ids), CHUNK):
        query = sa.select(d.device_id).where(
            d.device_id.in_(ids[start : start + CHUNK]), d.revoked.is_(True)
        )
        out.update((await conn.execute(query)).scalars())
    return out
