"""Handlers for sending, receiving, resuming and reading rooms."""

from __future__ import annotations

import time

from medrelay_protocol import codec
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.envelope import Envelope
from medrelay_protocol.errors import BadSignature, MalformedFrame, RequestError
from medrelay_protocol.frames import (
    Ack,
    GetRoster,
    History,
    HistoryPage,
    ListRooms,
    Presence,
    PresenceEvent,
    ReadMarker,
    ReadMarkerEvent,
    Receipt,
    RoomInfo,
    Rooms,
    Roster,
    Send,
    Summon,
    Sync,
    Synced,
    Typing,
    TypingEvent,
)
from medrelay_protocol.policy import may_read_history

from ..delivery import ROOM_TOPIC, event_frame
from ..gateway.connection import Connection
from ..gateway.context import Gateway

EPHEMERAL_TOPIC = "signal:"


async def require_member(gw: Gateway, conn: Connection, room: str) -> str:
    """The caller's role in ``room``; ``FORBIDDEN`` for a non-member and for an unknown room
    alike, so room ids cannot be probed."""
    role = await gw.store.member_role(room, conn.user)
    if role is None:
        raise _not_a_member()
    return role


def _not_a_member() -> RequestError:
    return RequestError(ErrorCode.FORBIDDEN, "not a member of this room")


def _checked_envelope(conn: Connection, room: str, mid: bytes, raw: bytes) -> tuple[int, str]:
    try:
        env = Envelope.decode(raw)
        header = env.verify(conn.device_key)
    except (BadSignature, MalformedFrame) as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "envelope signature invalid") from exc
    if header.sender_device != conn.device:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "envelope names another device")
    if header.room != room or header.mid != mid:
        raise RequestError(ErrorCode.INVALID_FIELD, "envelope header does not match the frame")
    return header.epoch, header.priority


async def _store_and_fan_out(
    gw: Gateway, conn: Connection, frame: Send | Summon, *, kind: str, urgent: bool
) -> None:
    gw.rate_check(conn)
    epoch, priority = _checked_envelope(conn, frame.room, frame.mid, frame.envelope)
    if urgent and priority != "urgent":
        raise RequestError(ErrorCode.INVALID_FIELD, "a summon must carry priority urgent")
    # membership and role (``policy.may_post`` / ``may_summon``) are checked by the store
    # inside the send's transaction, which also fills the role into the audit record: a
    # separate read before it would cost a transaction and could only be staler
    detail = f"{priority}; summoned {frame.role}" if isinstance(frame, Summon) else priority
    record = gw.audit(
        conn, kind, room=frame.room, mid=frame.mid, detail=detail, patient_tag=frame.patient_tag
    )
    started = time.monotonic()
    result = await gw.store.append_message(
        frame.room,
        user=conn.user,
        device=conn.device,
        mid=frame.mid,
        envelope=frame.envelope,
        kind=kind,
        epoch=epoch,
        allow_pending=urgent,
        now=gw.clock.now(),
        audit=[record],
    )
    gw.metrics.send_store_seconds.observe(time.monotonic() - started)
    ev = result.event
    gw.reply(conn, Ack(rid=frame.rid, room=ev.room, seq=ev.seq, mid=frame.mid, ts=ev.ts))
    if not result.duplicate:
        gw.metrics.sends.inc()
        await gw.delivery.publish([ev])


async def handle_send(gw: Gateway, conn: Connection, frame: Send) -> None:
    await _store_and_fan_out(gw, conn, frame, kind="message", urgent=False)


async def handle_summon(gw: Gateway, conn: Connection, frame: Summon) -> None:
    await _store_and_fan_out(gw, conn, frame, kind="summon", urgent=True)


async def handle_receipt(gw: Gateway, conn: Connection, frame: Receipt) -> None:
    """A device can only acknowledge what this connection delivered to it. The room's
    cursor exists only while the connection follows the room as a member (set after the
    membership check of ``sync``, dropped at the removal's seq), so it stands for the
    membership check; a receipt for a room the connection does not follow moves nothing
    (and a non-member gets ``FORBIDDEN``, after a read: this is not the common path).

    The device's stored receipt is read once per room and connection and then kept on the
    connection; a receipt that moves it forward is stored with the next flush of the
    delivery journal (batched), and one that moves nothing costs nothing."""
    cursor = conn.cursors.get(frame.room)
    if cursor is None:  # not followed here: nothing to acknowledge, but a non-member is told
        await require_member(gw, conn, frame.room)
        return
    seq = min(frame.seq, cursor)
    before = conn.acked.get(frame.room)
    if before is None:
        before = conn.acked[frame.room] = await gw.store.receipt_of(frame.room, conn.device)
    if seq <= before:
        return
    conn.acked[frame.room] = seq
    # stored and journaled in the delivery journal's next flush (one transaction for many)
    gw.journal.record_receipt(
        conn.user, conn.device, frame.room, seq, gw.clock.now(), previous=before
    )


async def handle_sync(gw: Gateway, conn: Connection, frame: Sync) -> None:
    """Replay each named room after the given seq, then keep it live; also joins every room
    the user is a member of but did not name (from seq 0). One read gives the user's
    current rooms, and with them the membership check of every named room: ``FORBIDDEN``
    for a room the user is not a current member of, or that does not exist, as
    :func:`require_member` (a read per named room) answers."""
    current = [state.room for state, _role in await gw.store.rooms_for_user(conn.user)]
    members_of = set(current)
    rooms = dict(frame.rooms)
    for room in rooms:
        if room not in members_of:
            raise _not_a_member()
    for room in current:
        rooms.setdefault(room, 0)
    for room, after in rooms.items():
        await gw.delivery.subscribe(conn, room, after)
    heads = {room: conn.cursors.get(room, 0) for room in rooms}
    gw.reply(conn, Synced(rid=frame.rid, heads=heads))


async def handle_history(gw: Gateway, conn: Connection, frame: History) -> None:
    role = await require_member(gw, conn, frame.room)
    if not may_read_history(role):
        raise RequestError(ErrorCode.FORBIDDEN, "this role may not read history")
    conn_role = role
    limit = min(frame.limit, gw.settings.limits.history_page)
    events = await gw.store.events_before(
        frame.room, frame.before, user=conn.user, device=conn.device, limit=limit + 1
    )
    more = len(events) > limit
    page = events[-limit:] if more else events
    frames = tuple(codec.decode(event_frame(ev)) for ev in page)
    await gw.store.journal(
        [
            gw.audit(
                conn,
                "history_read",
                room=frame.room,
                role=conn_role,
                seq_from=page[0].seq if page else None,
                seq_to=page[-1].seq if page else None,
            )
        ]
    )
    gw.reply(conn, HistoryPage(rid=frame.rid, room=frame.room, events=frames, more=more))  # type: ignore[arg-type]


async def handle_list_rooms(gw: Gateway, conn: Connection, frame: ListRooms) -> None:
    rooms = await gw.store.rooms_for_user(conn.user)
    infos = tuple(
        RoomInfo(
            room=s.room,
            role=role,
            last_seq=s.last_seq,
            epoch=s.epoch,
            pending_rekey=s.pending_rekey,
        )
        for s, role in rooms
    )
    gw.reply(conn, Rooms(rid=frame.rid, rooms=infos))


async def handle_get_roster(gw: Gateway, conn: Connection, frame: GetRoster) -> None:
    await require_member(gw, conn, frame.room)
    state = await gw.store.room_state(frame.room)
    entries = await gw.store.roster_entries(frame.room)
    if state is None:
        raise _not_a_member()
    gw.reply(
        conn,
        Roster(
            rid=frame.rid,
            room=frame.room,
            entries=tuple(entries),
            epoch=state.epoch,
            pending_rekey=state.pending_rekey,
            device_list_version=state.device_list_version,
        ),
    )


async def handle_typing(gw: Gateway, conn: Connection, frame: Typing) -> None:
    """Ephemeral: never stored or journaled; shed first under load; dropped for non-members."""
    hub = gw.delivery.hubs.get(frame.room)
    if hub is None or conn.user not in hub.members:
        return
    data = codec.encode(TypingEvent(room=frame.room, user=conn.user, active=frame.active))
    _fan_out_local(gw, frame.room, data, exclude=conn.user)


async def handle_read_marker(gw: Gateway, conn: Connection, frame: ReadMarker) -> None:
    """Read markers are shared with the room's members as an ephemeral signal."""
    hub = gw.delivery.hubs.get(frame.room)
    if hub is None or conn.user not in hub.members:
        return
    data = codec.encode(ReadMarkerEvent(room=frame.room, user=conn.user, seq=frame.seq))
    _fan_out_local(gw, frame.room, data, exclude=None)


async def handle_presence(gw: Gateway, conn: Connection, frame: Presence) -> None:
    announce_presence(gw, conn, frame.status)


def announce_presence(gw: Gateway, conn: Connection, status: str) -> None:
    """Tell the members of every room this connection follows (on this node)."""
    data = codec.encode(PresenceEvent(user=conn.user, status=status))
    for room in tuple(conn.cursors):
        _fan_out_local(gw, room, data, exclude=conn.user)


def _fan_out_local(gw: Gateway, room: str, data: bytes, *, exclude: str | None) -> None:
    hub = gw.delivery.hubs.get(room)
    if hub is None:
        return
    for other in tuple(hub.conns):
        if other.user != exclude and hub.members.get(other.user) not in (None, "device"):
            other.enqueue(data, ephemeral=True)


__all__ = ["ROOM_TOPIC"]
