"""Request handlers, one function per client frame type; ``HANDLERS`` is the routing table."""

from __future__ import annotations

from medrelay_protocol import frames as f

from ..gateway.context import HandlerFn
from . import blobs, devices, enrolment, grants, messages, rooms

HANDLERS: dict[type[f.Frame], HandlerFn] = {
    f.RegisterDevice: devices.handle_register_device,
    f.GetDevices: devices.handle_get_devices,
    f.CreateRoom: rooms.handle_create_room,
    f.Commit: rooms.handle_commit,
    f.GetRoster: messages.handle_get_roster,
    f.ListRooms: messages.handle_list_rooms,
    f.Send: messages.handle_send,
    f.Summon: messages.handle_summon,
    f.Receipt: messages.handle_receipt,
    f.Sync: messages.handle_sync,
    f.History: messages.handle_history,
    f.BlobPut: blobs.handle_blob_put,
    f.BlobGet: blobs.handle_blob_get,
    f.Typing: messages.handle_typing,
    f.ReadMarker: messages.handle_read_marker,
    f.Presence: messages.handle_presence,
    f.GrantHistory: grants.handle_grant_history,
    f.RequestApproval: enrolment.handle_request_approval,
    f.ListApprovals: enrolment.handle_list_approvals,
    f.ApproveDevice: enrolment.handle_approve_device,
    f.PutBackup: enrolment.handle_put_backup,
    f.GetBackup: enrolment.handle_get_backup,
}
