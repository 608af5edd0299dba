"""Approving a new device from an existing one, and the user's encrypted key backup.

The server carries, stores and forwards; it cannot approve anything itself. A request holds
the new device's public keys (proven by its connection's handshake); the approval is a
certificate the user's identity key signed, checked here against the pinned key, plus the
backup key wrapped to the new device, which the server cannot open. The backup is an opaque
blob under a version that only moves forward by one.
"""

from __future__ import annotations

import secrets

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.enrolment import MAX_BACKUP
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import (
    Approvals,
    ApproveDevice,
    Backup,
    GetBackup,
    ListApprovals,
    Ok,
    PendingDevice,
    PutBackup,
    RequestApproval,
)
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate

from ..gateway.connection import Connection
from ..gateway.context import Gateway, approval_status


async def handle_request_approval(gw: Gateway, conn: Connection, frame: RequestApproval) -> None:
    now = gw.clock.now()
    if frame.device_key != conn.device_key:
        raise RequestError(ErrorCode.FORBIDDEN, "a device asks approval for its own key only")
    if conn.kind != "person":
        raise RequestError(ErrorCode.FORBIDDEN, "tablets are enrolled by an administrator")
    known = await gw.store.get_device(conn.device)
    if known is not None:
        raise RequestError(ErrorCode.ALREADY_EXISTS, "this device is registered already")
    try:
        DeviceBundle.verify(frame.bundle, conn.device_key, now=now)
    except MedrelayError as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "bundle invalid") from exc
    record = await gw.store.request_approval(
        request_id=secrets.token_hex(8),
        user=conn.user,
        device_id=conn.device,
        device_key=conn.device_key,
        bundle=frame.bundle,
        now=now,
        ttl=gw.approval_ttl,
        max_pending=gw.max_pending_approvals,
    )
    identity = await gw.store.get_identity(conn.user) if record.approved else None
    gw.reply(conn, approval_status(record, identity, rid=frame.rid))
    if not record.approved and record.created_at == now:
        await gw.store.journal([gw.audit(conn, "device_request", target=conn.device)])
    if not record.approved:
        await gw.announce_approval(conn.user, "request", record.id)


async def handle_list_approvals(gw: Gateway, conn: Connection, frame: ListApprovals) -> None:
    records = await gw.store.pending_requests(conn.user, gw.clock.now())
    requests = tuple(
        PendingDevice(
            request=r.id,
            device=r.device_id,
            device_key=r.device_key,
            bundle=r.bundle,
            created_at=r.created_at,
            expires_at=r.expires_at,
        )
        for r in records[:16]
    )
    gw.reply(conn, Approvals(rid=frame.rid, requests=requests))


async def handle_approve_device(gw: Gateway, conn: Connection, frame: ApproveDevice) -> None:
    now = gw.clock.now()
    record = await gw.store.get_request(frame.request)
    if record is None or record.user != conn.user:
        raise RequestError(ErrorCode.UNKNOWN_REQUEST, "no such request")
    if record.expires_at <= now:
        raise RequestError(ErrorCode.REQUEST_EXPIRED, "the request expired; ask again")
    identity = await gw.store.get_identity(conn.user)
    if identity is None:
        raise RequestError(ErrorCode.FORBIDDEN, "no identity key is pinned")
    try:
        cert = DeviceCertificate.verify(frame.certificate, identity)
    except MedrelayError as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "certificate invalid") from exc
    if (cert.user_id, cert.device_id, cert.device_key, cert.kind) != (
        conn.user,
        record.device_id,
        record.device_key,
        "person",
    ):
        raise RequestError(ErrorCode.FORBIDDEN, "certificate names another device")
    await gw.store.approve_request(
        user=conn.user,
        request_id=record.id,
        certificate=frame.certificate,
        backup_share=frame.backup_share,
        approver=conn.device,
        now=now,
    )
    await gw.store.journal(
        [gw.audit(conn, "device_approve", target=record.device_id, detail=record.id)]
    )
    gw.reply(conn, Ok(rid=frame.rid))
    await gw.announce_approval(conn.user, "approved", record.id)


async def handle_put_backup(gw: Gateway, conn: Connection, frame: PutBackup) -> None:
    if len(frame.blob) > MAX_BACKUP:
        raise RequestError(ErrorCode.QUOTA_EXCEEDED, f"a key backup is at most {MAX_BACKUP} bytes")
    await gw.store.put_backup(
        conn.user, version=frame.version, blob=frame.blob, device=conn.device, now=gw.clock.now()
    )
    await gw.store.journal([gw.audit(conn, "key_backup", detail=f"version {frame.version}")])
    gw.reply(conn, Ok(rid=frame.rid))


async def handle_get_backup(gw: Gateway, conn: Connection, frame: GetBackup) -> None:
    stored = await gw.store.get_backup(conn.user)
    if stored is None:
        gw.reply(conn, Backup(rid=frame.rid, version=0))
        return
    version, blob = stored
    gw.reply(conn, Backup(rid=frame.rid, version=version, blob=blob))
