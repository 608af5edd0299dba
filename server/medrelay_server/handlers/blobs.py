"""Attachments: opaque encrypted chunks bound to a room, served only to its current members."""

from __future__ import annotations

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import BlobChunk, BlobGet, BlobPut, Ok
from medrelay_protocol.policy import may_post

from ..gateway.connection import Connection
from ..gateway.context import Gateway
from .messages import require_member


async def handle_blob_put(gw: Gateway, conn: Connection, frame: BlobPut) -> None:
    role = await require_member(gw, conn, frame.room)
    if not may_post(role):
        raise RequestError(ErrorCode.FORBIDDEN, "this role may not post")
    limits = gw.settings.limits
    await gw.store.put_chunk(
        frame.room,
        frame.blob,
        frame.index,
        frame.data,
        frame.final,
        user=conn.user,
        now=gw.clock.now(),
        max_blob_bytes=limits.max_blob_bytes,
        max_room_bytes=limits.max_room_blob_bytes,
    )
    if frame.final:
        await gw.store.journal(
            [
                gw.audit(
                    conn,
                    "attachment_upload",
                    room=frame.room,
                    target=frame.blob.hex(),
                    seq_to=frame.index + 1,
                )
            ]
        )
    gw.reply(conn, Ok(rid=frame.rid))


async def handle_blob_get(gw: Gateway, conn: Connection, frame: BlobGet) -> None:
    found = await gw.store.get_chunk(frame.blob, frame.index)
    if found is None:
        raise RequestError(ErrorCode.FORBIDDEN, "no such attachment for you")
    room, data, final = found
    role = await gw.store.member_role(room, conn.user)
    if role is None or role == "device":
        raise RequestError(ErrorCode.FORBIDDEN, "no such attachment for you")
    if frame.index == 0:
        await gw.store.journal(
            [gw.audit(conn, "attachment_download", room=room, target=frame.blob.hex())]
        )
    gw.reply(
        conn, BlobChunk(rid=frame.rid, blob=frame.blob, index=frame.index, data=data, final=final)
    )
