"""History grants: the server checks a grant as far as it can see and opens nothing itself.

The range of seqs a newcomer may read was opened when the signed Add with
``history_from_seq`` committed; the grant carries the keys for it. The server refuses a grant
that is not signed by the sending device, that names a user who was not added with exactly
that ``history_from_seq`` by the sender, or whose wraps do not go to exactly the grantee's
certified devices (I6); it stores the grant as a ``grant`` event and journals the
disclosure.
"""

from __future__ import annotations

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import Ack, GrantHistory
from medrelay_protocol.grants import HistoryGrant
from medrelay_protocol.roster import verify_roster
from medrelay_protocol.roster_entry import decode_entry

from ..gateway.connection import Connection
from ..gateway.context import Gateway
from .messages import require_member
from .rooms import expected_devices


async def handle_grant_history(gw: Gateway, conn: Connection, frame: GrantHistory) -> None:
    gw.rate_check(conn)
    await require_member(gw, conn, frame.room)
    try:
        grant = HistoryGrant.verify(frame.grant, conn.device_key)
    except MedrelayError as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "grant signature invalid") from exc
    if grant.room != frame.room:
        raise RequestError(ErrorCode.INVALID_FIELD, "grant names another room")
    entries = await gw.store.roster_entries(frame.room)
    roster = verify_roster(entries, room=frame.room)
    member = roster.members.get(grant.grantee)
    if member is None or member.history_from_seq != grant.from_seq:
        raise RequestError(ErrorCode.FORBIDDEN, "grantee was not added with this history range")
    adder = decode_entry(entries[member.added_at_index]).signer_user
    if adder != conn.user:
        raise RequestError(ErrorCode.FORBIDDEN, "only the member who added them may grant")
    devices = await expected_devices(gw, roster)
    records = await gw.store.devices_for([grant.grantee])
    wanted = {r.device_id for r in records} & set(devices)
    for epoch in grant.epochs:
        if set(epoch.wraps) != wanted:
            raise RequestError(
                ErrorCode.RECIPIENTS_MISMATCH,
                "a grant must wrap to exactly the grantee's certified devices",
                detail={
                    "missing": sorted(wanted - set(epoch.wraps)),
                    "extra": sorted(set(epoch.wraps) - wanted),
                },
            )
    state = await gw.store.room_state(frame.room)
    assert state is not None
    record = gw.audit(
        conn,
        "history_grant",
        room=frame.room,
        target=grant.grantee,
        detail=f"from seq {grant.from_seq}; epochs {[e.number for e in grant.epochs]}",
    )
    result = await gw.store.append_message(
        frame.room,
        user=conn.user,
        device=conn.device,
        mid=frame.mid,
        envelope=frame.grant,
        kind="grant",
        epoch=state.epoch,
        allow_pending=True,
        now=gw.clock.now(),
        audit=[record],
    )
    ev = result.event
    gw.reply(conn, Ack(rid=frame.rid, room=ev.room, seq=ev.seq, mid=frame.mid, ts=ev.ts))
    if not result.duplicate:
        await gw.delivery.publish([ev])
