"""Every frame of the medrelay wire protocol, one frozen dataclass each.

A frame travels as one msgpack map: ``{"t": <type>, <field>: <value>, ...}``. Fields set to
``None`` are omitted. Request frames carry ``rid`` (a client request id, 1-64 characters)
that the reply or ``error`` echoes. ``docs/protocol.md`` section 3 is the normative table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .schema import Record, bound, build_specs

ROOM = 64
DEVICE = 32
USER = 128
TOKEN = 8192
SIGNED = 8192
ENVELOPE = 70 * 1024
MANIFEST = 64 * 1024
WRAP = 128
CHUNK = 300 * 1024
ROLE_CHOICES = ("owner", "member", "observer", "device")
PRESENCE_CHOICES = ("online", "away", "offline")
KIND_CHOICES = ("message", "roster", "rekey", "summon", "grant")
APPROVAL_STATES = ("pending", "approved")
REQUEST_ID = 32
BACKUP = 64 * 1024
BACKUP_SHARE = 104

R = TypeVar("R", bound=Record)

FRAME_TYPES: dict[str, type[Frame]] = {}


class Frame(Record):
    __slots__ = ()
    TYPE: ClassVar[str] = ""
    CLIENT: ClassVar[bool] = True


def register(name: str, *, client: bool) -> Callable[[type[R]], type[R]]:
    def wrap(cls: type[R]) -> type[R]:
        if not issubclass(cls, Frame):
            raise TypeError("register() is for Frame subclasses")
        cls.TYPE = name
        cls.CLIENT = client
        cls.SPECS = build_specs(cls)
        if name in FRAME_TYPES:
            raise RuntimeError(f"duplicate frame type {name}")
        FRAME_TYPES[name] = cls
        return cls

    return wrap


def record(cls: type[R]) -> type[R]:
    cls.SPECS = build_specs(cls)
    return cls


def client_frame(name: str) -> Callable[[type[R]], type[R]]:
    return register(name, client=True)


def server_frame(name: str) -> Callable[[type[R]], type[R]]:
    return register(name, client=False)


# Factories, not shared constants: ``dataclass`` writes each field's name onto its Field
# object, so one Field reused by several fields (or classes) silently loses all but one.
def RID() -> Any:
    return bound(min_len=1, max_len=64)


def ROOM_ID() -> Any:
    return bound(min_len=1, max_len=ROOM)


def DEVICE_ID() -> Any:
    return bound(min_len=1, max_len=DEVICE)


def SEQ() -> Any:
    return bound(lo=0)


# ----------------------------------------------------------------------------- records


@record
@dataclass(frozen=True, slots=True)
class UserDevices(Record):
    user: str = bound(min_len=1, max_len=USER)
    identity_key: bytes | None = bound(min_len=32, max_len=32, default=None)
    certificates: tuple[bytes, ...] = bound(max_len=64, default=())
    bundles: tuple[bytes, ...] = bound(max_len=64, default=())
    revoked: tuple[str, ...] = bound(max_len=256, default=())
    attestation: bytes | None = bound(min_len=1, max_len=1024, default=None)


@record
@dataclass(frozen=True, slots=True)
class RoomInfo(Record):
    room: str = ROOM_ID()
    role: str = bound(choices=ROLE_CHOICES)
    last_seq: int = SEQ()
    epoch: int = SEQ()
    pending_rekey: bool = False


@record
@dataclass(frozen=True, slots=True)
class PendingDevice(Record):
    """A new device of the user waiting to be approved (``approvals.requests``)."""

    request: str = bound(min_len=1, max_len=REQUEST_ID)
    device: str = DEVICE_ID()
    device_key: bytes = bound(min_len=32, max_len=32)
    bundle: bytes = bound(min_len=1, max_len=1024)
    created_at: int = SEQ()
    expires_at: int = SEQ()


# ------------------------------------------------------------------ client -> server


@client_frame("hello")
@dataclass(frozen=True, slots=True)
class Hello(Frame):
    """First frame: proves the device key over the server's challenge nonce."""

    rid: str = RID()
    device: str = DEVICE_ID()
    device_key: bytes = bound(min_len=32, max_len=32)
    proof: bytes = bound(min_len=64, max_len=64)
    token: str | None = bound(min_len=1, max_len=TOKEN, default=None)
    v: int = bound(lo=1, hi=1, default=1)


@client_frame("reauth")
@dataclass(frozen=True, slots=True)
class Reauth(Frame):
    rid: str = RID()
    token: str = bound(min_len=1, max_len=TOKEN)


@client_frame("register_device")
@dataclass(frozen=True, slots=True)
class RegisterDevice(Frame):
    """Publish (or refresh) this user's identity key, a device certificate and bundle."""

    rid: str = RID()
    identity_key: bytes = bound(min_len=32, max_len=32)
    certificate: bytes = bound(min_len=1, max_len=1024)
    bundle: bytes = bound(min_len=1, max_len=1024)
    attestation: bytes | None = bound(min_len=1, max_len=1024, default=None)
    """The institution's identity attestation: needed when the user has no pinned key yet."""


@client_frame("get_devices")
@dataclass(frozen=True, slots=True)
class GetDevices(Frame):
    rid: str = RID()
    users: tuple[str, ...] = bound(max_len=256)


@client_frame("create_room")
@dataclass(frozen=True, slots=True)
class CreateRoom(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    genesis: bytes = bound(min_len=1, max_len=SIGNED)
    manifest: bytes | None = bound(min_len=1, max_len=MANIFEST, default=None)
    wraps: dict[str, bytes] | None = bound(max_len=1024, item_max_len=WRAP, default=None)


@client_frame("commit")
@dataclass(frozen=True, slots=True)
class Commit(Frame):
    """A roster change and/or a rekey, committed atomically. ``wraps`` maps device -> wrap."""

    rid: str = RID()
    room: str = ROOM_ID()
    change: bytes | None = bound(min_len=1, max_len=SIGNED, default=None)
    manifest: bytes | None = bound(min_len=1, max_len=MANIFEST, default=None)
    wraps: dict[str, bytes] | None = bound(max_len=1024, item_max_len=WRAP, default=None)


@client_frame("get_roster")
@dataclass(frozen=True, slots=True)
class GetRoster(Frame):
    rid: str = RID()
    room: str = ROOM_ID()


@client_frame("list_rooms")
@dataclass(frozen=True, slots=True)
class ListRooms(Frame):
    rid: str = RID()


@client_frame("send")
@dataclass(frozen=True, slots=True)
class Send(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    mid: bytes = bound(min_len=16, max_len=16)
    envelope: bytes = bound(min_len=1, max_len=ENVELOPE)
    patient_tag: bytes | None = bound(min_len=16, max_len=32, default=None)
    """Optional: an HMAC of the patient id under an institution key the server never holds,
    journaled so the institution can answer "who accessed patient X"; opaque here."""


@client_frame("summon")
@dataclass(frozen=True, slots=True)
class Summon(Frame):
    """An urgent page: an envelope whose header says ``urgent``, plus the summoned role in
    clear so the server can route it. Never blocked by a pending rekey."""

    rid: str = RID()
    room: str = ROOM_ID()
    mid: bytes = bound(min_len=16, max_len=16)
    envelope: bytes = bound(min_len=1, max_len=ENVELOPE)
    role: str = bound(min_len=1, max_len=64)
    patient_tag: bytes | None = bound(min_len=16, max_len=32, default=None)


@client_frame("grant_history")
@dataclass(frozen=True, slots=True)
class GrantHistory(Frame):
    """A signed history grant (see ``grants.py``) for a member added with
    ``history_from_seq``; stored as a room event of kind ``grant``. ``mid`` makes it
    idempotent like a send."""

    rid: str = RID()
    room: str = ROOM_ID()
    mid: bytes = bound(min_len=16, max_len=16)
    grant: bytes = bound(min_len=1, max_len=ENVELOPE)


@client_frame("receipt")
@dataclass(frozen=True, slots=True)
class Receipt(Frame):
    """Cumulative: every event of ``room`` up to ``seq`` was received by this device."""

    room: str = ROOM_ID()
    seq: int = SEQ()
    rid: str | None = bound(min_len=1, max_len=64, default=None)


@client_frame("sync")
@dataclass(frozen=True, slots=True)
class Sync(Frame):
    """Resume: replay every room's events after the given seq, then go live."""

    rid: str = RID()
    rooms: dict[str, int] = bound(max_len=1024)


@client_frame("history")
@dataclass(frozen=True, slots=True)
class History(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    before: int = SEQ()
    limit: int = bound(lo=1, hi=200, default=50)


@client_frame("blob_put")
@dataclass(frozen=True, slots=True)
class BlobPut(Frame):
    """One encrypted attachment chunk. Chunks are put in order; ``final`` closes the blob."""

    rid: str = RID()
    room: str = ROOM_ID()
    blob: bytes = bound(min_len=16, max_len=16)
    index: int = bound(lo=0, hi=4096)
    data: bytes = bound(min_len=1, max_len=CHUNK)
    final: bool = False


@client_frame("blob_get")
@dataclass(frozen=True, slots=True)
class BlobGet(Frame):
    rid: str = RID()
    blob: bytes = bound(min_len=16, max_len=16)
    index: int = bound(lo=0, hi=4096)


@client_frame("typing")
@dataclass(frozen=True, slots=True)
class Typing(Frame):
    room: str = ROOM_ID()
    active: bool = True


@client_frame("read_marker")
@dataclass(frozen=True, slots=True)
class ReadMarker(Frame):
    room: str = ROOM_ID()
    seq: int = SEQ()


@client_frame("presence")
@dataclass(frozen=True, slots=True)
class Presence(Frame):
    """Ephemeral: shared with members of the rooms this connection follows; never stored."""

    status: str = bound(choices=PRESENCE_CHOICES)


@client_frame("request_approval")
@dataclass(frozen=True, slots=True)
class RequestApproval(Frame):
    """A new, uncertified device asks the user's other devices to approve it. Idempotent:
    asking again returns the same request while it lives. Reply: ``approval_status``."""

    rid: str = RID()
    device_key: bytes = bound(min_len=32, max_len=32)
    bundle: bytes = bound(min_len=1, max_len=1024)


@client_frame("list_approvals")
@dataclass(frozen=True, slots=True)
class ListApprovals(Frame):
    """The user's pending device requests (for a device that connects later)."""

    rid: str = RID()


@client_frame("approve_device")
@dataclass(frozen=True, slots=True)
class ApproveDevice(Frame):
    """An existing device approves a request: the new device's certificate (signed by the
    identity key) and its share of the key backup (the backup key wrapped to it)."""

    rid: str = RID()
    request: str = bound(min_len=1, max_len=REQUEST_ID)
    certificate: bytes = bound(min_len=1, max_len=1024)
    backup_share: bytes = bound(min_len=BACKUP_SHARE, max_len=BACKUP_SHARE)


@client_frame("put_backup")
@dataclass(frozen=True, slots=True)
class PutBackup(Frame):
    """Store the user's encrypted key backup; ``version`` must be the stored one + 1."""

    rid: str = RID()
    version: int = bound(lo=1)
    blob: bytes = bound(min_len=1, max_len=BACKUP)


@client_frame("get_backup")
@dataclass(frozen=True, slots=True)
class GetBackup(Frame):
    rid: str = RID()


# ------------------------------------------------------------------ server -> client


@server_frame("challenge")
@dataclass(frozen=True, slots=True)
class Challenge(Frame):
    nonce: bytes = bound(min_len=32, max_len=32)
    server_time: int = SEQ()
    v: int = bound(lo=1, hi=1, default=1)


@server_frame("welcome")
@dataclass(frozen=True, slots=True)
class Welcome(Frame):
    rid: str = RID()
    user: str = bound(min_len=1, max_len=USER)
    device: str = DEVICE_ID()
    session: str = bound(min_len=1, max_len=64)
    server_time: int = SEQ()
    limits: dict[str, int] | None = bound(max_len=64, default=None)
    generation: str | None = bound(min_len=1, max_len=128, default=None)
    """The store's stream generation: it changes when the database was restored or failed
    over, i.e. when a room's seqs may have rolled back or been reused."""


@server_frame("reauth_required")
@dataclass(frozen=True, slots=True)
class ReauthRequired(Frame):
    deadline: int = SEQ()


@server_frame("ok")
@dataclass(frozen=True, slots=True)
class Ok(Frame):
    rid: str = RID()


@server_frame("ack")
@dataclass(frozen=True, slots=True)
class Ack(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    seq: int = SEQ()
    mid: bytes = bound(min_len=16, max_len=16)
    ts: int = SEQ()


@server_frame("deliver")
@dataclass(frozen=True, slots=True)
class Deliver(Frame):
    """One stored event of a room. ``payload`` is an envelope (message, summon), a roster
    entry (roster) or a rekey manifest (rekey); ``wrap`` is this device's own wrap only."""

    room: str = ROOM_ID()
    seq: int = bound(lo=1)
    kind: str = bound(choices=KIND_CHOICES)
    sender: str = bound(max_len=DEVICE)
    user: str = bound(max_len=USER)
    ts: int = SEQ()
    payload: bytes = bound(min_len=1, max_len=MANIFEST + SIGNED)
    wrap: bytes | None = bound(min_len=1, max_len=WRAP, default=None)


@server_frame("synced")
@dataclass(frozen=True, slots=True)
class Synced(Frame):
    rid: str = RID()
    heads: dict[str, int] = bound(max_len=1024)


@server_frame("history_page")
@dataclass(frozen=True, slots=True)
class HistoryPage(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    events: tuple[Deliver, ...] = bound(max_len=200)
    more: bool = False


@server_frame("devices")
@dataclass(frozen=True, slots=True)
class Devices(Frame):
    rid: str = RID()
    users: tuple[UserDevices, ...] = bound(max_len=256)


@server_frame("rooms")
@dataclass(frozen=True, slots=True)
class Rooms(Frame):
    rid: str = RID()
    rooms: tuple[RoomInfo, ...] = bound(max_len=4096)


@server_frame("roster")
@dataclass(frozen=True, slots=True)
class Roster(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    entries: tuple[bytes, ...] = bound(max_len=4096)
    epoch: int = SEQ()
    device_list_version: int = SEQ()
    pending_rekey: bool = False


@server_frame("committed")
@dataclass(frozen=True, slots=True)
class Committed(Frame):
    rid: str = RID()
    room: str = ROOM_ID()
    seq: int = SEQ()


@server_frame("blob_chunk")
@dataclass(frozen=True, slots=True)
class BlobChunk(Frame):
    rid: str = RID()
    blob: bytes = bound(min_len=16, max_len=16)
    index: int = bound(lo=0, hi=4096)
    data: bytes = bound(min_len=1, max_len=CHUNK)
    final: bool = False


@server_frame("typing_event")
@dataclass(frozen=True, slots=True)
class TypingEvent(Frame):
    room: str = ROOM_ID()
    user: str = bound(min_len=1, max_len=USER)
    active: bool = True


@server_frame("read_marker_event")
@dataclass(frozen=True, slots=True)
class ReadMarkerEvent(Frame):
    room: str = ROOM_ID()
    user: str = bound(min_len=1, max_len=USER)
    seq: int = SEQ()


@server_frame("presence_event")
@dataclass(frozen=True, slots=True)
class PresenceEvent(Frame):
    user: str = bound(min_len=1, max_len=USER)
    status: str = bound(choices=PRESENCE_CHOICES)


@server_frame("approval_status")
@dataclass(frozen=True, slots=True)
class ApprovalStatus(Frame):
    """To the requesting device: the reply to ``request_approval``, and pushed (no ``rid``)
    once another device approved it, then carrying the certificate and backup share."""

    request: str = bound(min_len=1, max_len=REQUEST_ID)
    state: str = bound(choices=APPROVAL_STATES)
    expires_at: int = SEQ()
    rid: str | None = bound(min_len=1, max_len=64, default=None)
    identity_key: bytes | None = bound(min_len=32, max_len=32, default=None)
    certificate: bytes | None = bound(min_len=1, max_len=1024, default=None)
    backup_share: bytes | None = bound(min_len=BACKUP_SHARE, max_len=BACKUP_SHARE, default=None)


@server_frame("device_request")
@dataclass(frozen=True, slots=True)
class DeviceRequest(Frame):
    """Pushed to the user's registered devices when a new device asks for approval."""

    request: str = bound(min_len=1, max_len=REQUEST_ID)
    device: str = DEVICE_ID()
    device_key: bytes = bound(min_len=32, max_len=32)
    bundle: bytes = bound(min_len=1, max_len=1024)
    created_at: int = SEQ()
    expires_at: int = SEQ()


@server_frame("approvals")
@dataclass(frozen=True, slots=True)
class Approvals(Frame):
    rid: str = RID()
    requests: tuple[PendingDevice, ...] = bound(max_len=16)


@server_frame("backup")
@dataclass(frozen=True, slots=True)
class Backup(Frame):
    """The user's encrypted key backup; ``version`` 0 and no ``blob`` when there is none."""

    rid: str = RID()
    version: int = SEQ()
    blob: bytes | None = bound(min_len=1, max_len=BACKUP, default=None)


@server_frame("error")
@dataclass(frozen=True, slots=True)
class Error(Frame):
    """A refused request. ``missing``/``extra`` list devices for ``RECIPIENTS_MISMATCH``;
    ``resume`` gives per-room seqs a client should resume from after a close."""

    code: int = bound(lo=1000, hi=4999)
    message: str = bound(max_len=256)
    rid: str | None = bound(min_len=1, max_len=64, default=None)
    missing: tuple[str, ...] = bound(max_len=1024, default=())
    extra: tuple[str, ...] = bound(max_len=1024, default=())
    retry_after_ms: int | None = bound(lo=0, hi=3_600_000, default=None)
    resume: dict[str, int] | None = bound(max_len=1024, default=None)
