"""Pending device approvals and the users' encrypted key backups.

The store keeps what clients hand it and never sees a key: a request holds the new device's
public keys (and, once approved, the certificate the identity key signed and the backup
key wrapped to the device); a backup is an opaque blob under a version that only moves
forward by one (compare-and-set), so two devices cannot overwrite each other blindly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .base import ApprovalRecord
from .rows import refuse


def _record(row: Any) -> ApprovalRecord:
    return ApprovalRecord(
        id=row.id,
        user=row.user_id,
        device_id=row.device_id,
        device_key=bytes(row.device_key),
        bundle=bytes(row.bundle),
        created_at=row.created_at,
        expires_at=row.expires_at,
        certificate=None if row.certificate is None else bytes(row.certificate),
        backup_share=None if row.backup_share is None else bytes(row.backup_share),
        approved_by=row.approved_by,
        approved_at=row.approved_at,
    )


async def _lock_identity(conn: AsyncConnection, user: str) -> None:
    """Serialise a user's requests on the user's identity row (SQLite writes are serial)."""
    i = t.identities.c
    query = sa.select(i.user_id).where(i.user_id == user).with_for_update()
    if (await conn.execute(query)).scalar() is None:
        raise refuse(ErrorCode.FORBIDDEN, "this user has no device that could approve")


async def request_approval(
    conn: AsyncConnection,
    *,
    request_id: str,
    user: str,
    device_id: str,
    device_key: bytes,
    bundle: bytes,
    now: int,
    ttl: int,
    max_pending: int,
) -> ApprovalRecord:
    """The live request of (user, device), or a new one. Requests expired for longer than
    ``ttl`` are forgotten; at most ``max_pending`` unapproved live requests per user."""
    await _lock_identity(conn, user)
    a = t.approval_requests.c
    await conn.execute(
        sa.delete(t.approval_requests).where(a.user_id == user, a.expires_at <= now - ttl)
    )
    rows = [
        _record(r)
        for r in await conn.execute(
            sa.select(t.approval_requests).where(a.user_id == user, a.expires_at > now)
        )
    ]
    for r in rows:
        if r.device_id == device_id:
            if r.device_key != device_key:
                raise refuse(ErrorCode.ALREADY_EXISTS, "device id taken")
            return r
    if sum(1 for r in rows if not r.approved) >= max_pending:
        raise refuse(ErrorCode.TOO_MANY_REQUESTS, "too many devices waiting for approval")
    record = ApprovalRecord(
        id=request_id,
        user=user,
        device_id=device_id,
        device_key=device_key,
        bundle=bundle,
        created_at=now,
        expires_at=now + ttl,
    )
    await conn.execute(
        sa.insert(t.approval_requests).values(
            id=record.id,
            user_id=user,
            device_id=device_id,
            device_key=device_key,
            bundle=bundle,
            created_at=now,
            expires_at=record.expires_at,
        )
    )
    return record


async def pending_requests(conn: AsyncConnection, user: str, now: int) -> list[ApprovalRecord]:
    a = t.approval_requests.c
    query = (
        sa.select(t.approval_requests)
        .where(a.user_id == user, a.expires_at > now, a.certificate.is_(None))
        .order_by(a.created_at, a.id)
    )
    return [_record(r) for r in await conn.execute(query)]


async def get_request(conn: AsyncConnection, request_id: str) -> ApprovalRecord | None:
    a = t.approval_requests.c
    row = (
        await conn.execute(sa.select(t.approval_requests).where(a.id == request_id))
    ).one_or_none()
    return None if row is None else _record(row)


async def approve(
    conn: AsyncConnection,
    *,
    user: str,
    request_id: str,
    certificate: bytes,
    backup_share: bytes,
    approver: str,
    now: int,
) -> ApprovalRecord:
    """Attach the certificate and backup share to a live request of ``user``:
    ``UNKNOWN_REQUEST`` (none, or another user's), ``REQUEST_EXPIRED``, ``ALREADY_EXISTS``
    (approved already)."""
    a = t.approval_requests.c
    query = sa.select(t.approval_requests).where(a.id == request_id).with_for_update()
    row = (await conn.execute(query)).one_or_none()
    if row is None or row.user_id != user:
        raise refuse(ErrorCode.UNKNOWN_REQUEST, "no such request")
    old = _record(row)
    if old.expires_at <= now:
        raise refuse(ErrorCode.REQUEST_EXPIRED, "the request expired; ask again")
    if old.approved:
        raise refuse(ErrorCode.ALREADY_EXISTS, "already approved")
    await conn.execute(
        sa.update(t.approval_requests)
        .where(a.id == request_id)
        .values(
            certificate=certificate,
            backup_share=backup_share,
            approved_by=approver,
            approved_at=now,
        )
    )
    return dataclasses.replace(
        old,
        certificate=certificate,
        backup_share=backup_share,
        approved_by=approver,
        approved_at=now,
    )


async def put_backup(
    conn: AsyncConnection, *, user: str, version: int, blob: bytes, device: str, now: int
) -> None:
    """Compare-and-set: ``version`` must be the stored version + 1 (1 for the first)."""
    b = t.key_backups.c
    query = sa.select(b.version).where(b.user_id == user).with_for_update()
    current = (await conn.execute(query)).scalar()
    if version != (current or 0) + 1:
        raise refuse(ErrorCode.BACKUP_CONFLICT, f"the stored backup is version {current or 0}")
    if current is None:
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        stmt = (
            insert(t.key_backups)
            .values(user_id=user, version=version, blob=blob, updated_at=now, updated_by=device)
            .on_conflict_do_nothing()
        )
        if (await conn.execute(stmt)).rowcount != 1:  # a concurrent first put won
            raise refuse(ErrorCode.BACKUP_CONFLICT, "the stored backup moved")
        return
    await conn.execute(
        sa.update(t.key_backups)
        .where(b.user_id == user, b.version == current)
        .values(version=version, blob=blob, updated_at=now, updated_by=device)
    )


async def get_backup(conn: AsyncConnection, user: str) -> tuple[int, bytes] | None:
    b = t.key_backups.c
    row = (await conn.execute(sa.select(b.version, b.blob).where(b.user_id == user))).one_or_none()
    return None if row is None else (int(row.version), bytes(row.blob))
