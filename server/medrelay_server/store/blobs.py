"""Attachment chunks: opaque ciphertext bound to one room, uploaded in order, resumable.

A put locks the room row, so the per-room byte quota is checked against a total no
concurrent upload can change. The uploader must be a current member of the room, and only
the user who started a blob may continue it.
"""

from __future__ import annotations

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .rows import current_role, lock_room, refuse


async def put_chunk(
    conn: AsyncConnection,
    room: str,
    blob: bytes,
    index: int,
    data: bytes,
    final: bool,
    *,
    user: str,
    now: int,
    max_blob_bytes: int,
    max_room_bytes: int,
) -> None:
    await lock_room(conn, room)
    if await current_role(conn, room, user) is None:
        raise refuse(ErrorCode.FORBIDDEN, "not a member")
    b = t.blobs.c
    row = (await conn.execute(sa.select(t.blobs).where(b.blob == blob))).one_or_none()
    if row is not None and (row.room != room or row.user_id != user):
        raise refuse(ErrorCode.FORBIDDEN, "blob belongs elsewhere")
    stored = 0 if row is None else row.chunks
    if index < stored:
        was_final = row is not None and bool(row.complete) and index == stored - 1
        await _check_resent(conn, blob, index, data, final=final, was_final=was_final)
        return
    if index > stored or (row is not None and row.complete):
        raise refuse(ErrorCode.INVALID_FIELD, "chunk out of order")
    size = (0 if row is None else row.bytes) + len(data)
    room_total = sa.select(sa.func.coalesce(sa.func.sum(b.bytes), 0)).where(b.room == room)
    room_bytes = int((await conn.execute(room_total)).scalar_one())
    if size > max_blob_bytes or room_bytes + len(data) > max_room_bytes:
        raise refuse(ErrorCode.QUOTA_EXCEEDED, "attachment too large")
    if row is None:
        await conn.execute(
            sa.insert(t.blobs).values(
                blob=blob,
                room=room,
                user_id=user,
                chunks=1,
                bytes=len(data),
                complete=final,
                created_at=now,
            )
        )
    else:
        values = {"chunks": stored + 1, "bytes": size, "complete": final}
        await conn.execute(sa.update(t.blobs).where(b.blob == blob).values(**values))
    await conn.execute(sa.insert(t.blob_chunks).values(blob=blob, idx=index, data=data))


async def _check_resent(
    conn: AsyncConnection,
    blob: bytes,
    index: int,
    data: bytes,
    *,
    final: bool,
    was_final: bool,
) -> None:
    """A chunk sent again when resuming must match what was stored, ``final`` included."""
    c = t.blob_chunks.c
    query = sa.select(c.data).where(c.blob == blob, c.idx == index)
    old = (await conn.execute(query)).scalar_one()
    if bytes(old) != data or final != was_final:
        raise refuse(ErrorCode.INVALID_FIELD, "resent chunk differs")


async def get_chunk(
    conn: AsyncConnection, blob: bytes, index: int
) -> tuple[str, bytes, bool] | None:
    b, c = t.blobs.c, t.blob_chunks.c
    query = (
        sa.select(b.room, b.chunks, b.complete, c.data)
        .join(t.blob_chunks, c.blob == b.blob)
        .where(b.blob == blob, c.idx == index)
    )
    row = (await conn.execute(query)).one_or_none()
    if row is None:
        return None
    return row.room, bytes(row.data), bool(row.complete) and index == row.chunks - 1


async def blob_status(conn: AsyncConnection, blob: bytes) -> tuple[str, int, bool] | None:
    b = t.blobs.c
    query = sa.select(b.room, b.chunks, b.complete).where(b.blob == blob)
    row = (await conn.execute(query)).one_or_none()
    return None if row is None else (row.room, row.chunks, bool(row.complete))


async def delete_room_blobs_before(conn: AsyncConnection, room: str, ts: int) -> int:
    """Delete the room's blobs created before ``ts`` with their chunks; returns how many."""
    b = t.blobs.c
    doomed = sa.select(b.blob).where(b.room == room, b.created_at < ts)
    await conn.execute(sa.delete(t.blob_chunks).where(t.blob_chunks.c.blob.in_(doomed)))
    result = await conn.execute(sa.delete(t.blobs).where(b.room == room, b.created_at < ts))
    return int(result.rowcount)
