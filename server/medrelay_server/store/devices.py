"""Pinned user identity keys and certified devices.

The store never creates a key or a certificate; it pins what verified callers hand it.
A device's signing key and owner never change; its revocation is permanent. A device list
change that a rekey must account for (a new device, or a device revoked) increments
``device_list_version`` of every room in which the owner is a current member, so a rekey
naming an older version can be refused (ARCHITECTURE I6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .base import DeviceRecord
from .rows import refuse


def _insert_if_absent(conn: AsyncConnection, table: sa.Table, **values: Any) -> Any:
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    return insert(table).values(**values).on_conflict_do_nothing()


async def put_identity(
    conn: AsyncConnection,
    user: str,
    identity_key: bytes,
    now: int,
    attestation: bytes | None = None,
) -> None:
    stmt = _insert_if_absent(
        conn,
        t.identities,
        user_id=user,
        identity_key=identity_key,
        created_at=now,
        attestation=attestation,
    )
    if (await conn.execute(stmt)).rowcount == 1:
        return
    pinned = await get_identity(conn, user)
    if pinned != identity_key:
        raise refuse(ErrorCode.ALREADY_EXISTS, "identity key already pinned")


async def get_identity(conn: AsyncConnection, user: str) -> bytes | None:
    i = t.identities.c
    key = (await conn.execute(sa.select(i.identity_key).where(i.user_id == user))).scalar()
    return None if key is None else bytes(key)


async def get_attestation(conn: AsyncConnection, user: str) -> bytes | None:
    i = t.identities.c
    raw = (await conn.execute(sa.select(i.attestation).where(i.user_id == user))).scalar()
    return None if raw is None else bytes(raw)


async def identities_for(
    conn: AsyncConnection, users: Sequence[str]
) -> dict[str, tuple[bytes, bytes | None]]:
    """Each user's pinned identity key and its attestation, for the users that have one."""
    if not users:
        return {}
    i = t.identities.c
    query = sa.select(i.user_id, i.identity_key, i.attestation).where(i.user_id.in_(list(users)))
    return {
        row.user_id: (
            bytes(row.identity_key),
            None if row.attestation is None else bytes(row.attestation),
        )
        for row in await conn.execute(query)
    }


async def put_device(conn: AsyncConnection, device: DeviceRecord) -> None:
    stmt = _insert_if_absent(
        conn,
        t.devices,
        device_id=device.device_id,
        user_id=device.user,
        signing_key=device.signing_key,
        certificate=device.certificate,
        bundle=device.bundle,
        kind=device.kind,
        revoked=device.revoked,
        created_at=device.created_at,
    )
    if (await conn.execute(stmt)).rowcount == 1:
        await _bump_device_list_versions(conn, device.user)
        return
    d = t.devices.c
    query = sa.select(t.devices).where(d.device_id == device.device_id).with_for_update()
    old = (await conn.execute(query)).one()
    if old.user_id != device.user or bytes(old.signing_key) != device.signing_key:
        raise refuse(ErrorCode.ALREADY_EXISTS, "device id taken")
    revoked = bool(old.revoked) or device.revoked
    await conn.execute(
        sa.update(t.devices)
        .where(d.device_id == device.device_id)
        .values(certificate=device.certificate, bundle=device.bundle, revoked=revoked)
    )
    if revoked and not old.revoked:
        await _bump_device_list_versions(conn, device.user)


async def _bump_device_list_versions(conn: AsyncConnection, user: str) -> None:
    """Lock the user's rooms in a fixed order (no deadlock with another bump), then bump.

    The rooms also become *pending*: the current epoch was not wrapped to a newly certified
    device (nor may a revoked one keep it), so the next member device that sends first
    commits a new epoch for exactly the certified devices (ARCHITECTURE 5.3-5.4)."""
    r, m = t.rooms.c, t.memberships.c
    current = sa.select(m.room).where(m.user_id == user, m.to_seq.is_(None))
    query = sa.select(r.room).where(r.room.in_(current)).order_by(r.room).with_for_update()
    rooms = list((await conn.execute(query)).scalars())
    if rooms:
        await conn.execute(
            sa.update(t.rooms)
            .where(r.room.in_(rooms))
            .values(device_list_version=r.device_list_version + 1, pending_rekey=True)
        )


_GET_DEVICE = sa.select(t.devices).where(
    t.devices.c.device_id == sa.bindparam("device", type_=sa.String)
)
"""Built once (every handshake reads it): building a select per call cost more than running
it (bench.store_ops)."""


async def get_device(conn: AsyncConnection, device_id: str) -> DeviceRecord | None:
    row = (await conn.execute(_GET_DEVICE, {"device": device_id})).one_or_none()
    return None if row is None else _device_of(row)


async def devices_for(conn: AsyncConnection, users: Sequence[str]) -> list[DeviceRecord]:
    if not users:
        return []
    d = t.devices.c
    query = sa.select(t.devices).where(d.user_id.in_(list(users))).order_by(d.user_id, d.device_id)
    return [_device_of(row) for row in await conn.execute(query)]


async def touch_device(conn: AsyncConnection, device_id: str, now: int) -> None:
    d = t.devices.c
    await conn.execute(sa.update(t.devices).where(d.device_id == device_id).values(last_seen=now))


_TOUCH_SEEN = (
    sa.update(t.devices)
    .where(t.devices.c.device_id == sa.bindparam("b_device"))
    .values(last_seen=sa.bindparam("b_ts"))
)


async def touch_devices_seen(conn: AsyncConnection, seen: Sequence[tuple[str, int]]) -> None:
    """Many devices' last-seen times (device, ts) in one executemany, in device order
    (a reconnecting ward's hundreds of devices were one round trip each)."""
    if seen:
        rows = [{"b_device": device, "b_ts": ts} for device, ts in sorted(seen)]
        await conn.execute(_TOUCH_SEEN, rows)


async def unseen_devices(conn: AsyncConnection, before: int, *, limit: int) -> list[DeviceRecord]:
    d = t.devices.c
    seen = sa.func.coalesce(d.last_seen, d.created_at)
    query = (
        sa.select(t.devices)
        .where(d.revoked.is_(False), seen < before)
        .order_by(seen, d.device_id)
        .limit(limit)
    )
    return [_device_of(row) for row in await conn.execute(query)]


def _device_of(row: Any) -> DeviceRecord:
    return DeviceRecord(
        user=row.user_id,
        device_id=row.device_id,
        signing_key=bytes(row.signing_key),
        certificate=bytes(row.certificate),
        bundle=bytes(row.bundle),
        kind=row.kind,
        revoked=bool(row.revoked),
        created_at=row.created_at,
        last_seen=row.last_seen,
    )
