"""PostgreSQL: a send batch in one round trip when this node's predictions hold.

A batch the usual way (:class:`~.messages.SendBatch`) is five round trips: BEGIN, the room
locks, the roles and retried sends, the writes, COMMIT. Under load each waits for the busy
event loop as well as for the database (``docs/performance.md``, "Seventh round"). Most
batches need none of that reading: the node committed the previous batch in the same rooms
and knows what it left, namely each room's last seq, epoch and pending flag, the senders'
roles, and its own journal head.

So the node plans the batch from what it remembers (:class:`Predictions`), exactly as
``SendBatch`` would plan it from what it reads (:func:`~.messages.plan_send`), and sends
the plan and the predictions in one call of ``medrelay_send_batch_or_state`` (migration
0011, amending 0007-0010's ``medrelay_send_batch``). The call is its own transaction. It
locks the rooms in room order, then checks every prediction with statements that see
everything committed before the locks were granted, and writes only if all hold. A removal
committed just before is therefore seen exactly as ``SendBatch``'s own read sees it (I2):
it moved the room's last seq and ended the member's role, so the call writes nothing.

Where nodes share a room, the other node's commits move its last seq between this node's
plan and its call. Such a call answers every room's state as it read it under the locks;
the batch is planned again from that (roles are still checked by the next call) and called
again, up to :data:`CALLS` calls. Any other miss, the last call's miss, and any batch whose
plan refuses a send (a refusal is only ever made from what was read under the locks) run
the usual way, which then teaches the node the rooms' state again.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from medrelay_protocol.errors import RequestError

from .audit import ChainWriter, pg_audit_rows
from .base import AppendResult, AuditRecord, StoredEvent
from .engine import Database, raw_errors
from .held import HeldConnection
from .messages import plan_send
from .rows import EVENTS_CHANNEL

DEFAULT_ROOMS = 4096
"""Rooms remembered, least recently used first out (a room is about 300 bytes plus about
150 per member)."""
DEFAULT_MEMBERS = 100_000
"""Members' roles remembered over all rooms (about 15 MB): large rooms leave fewer rooms."""

CALLS = 4
"""Calls per batch at most: a call that finds a room moved on (another node committed
there) returns the rooms' state, and the batch is planned again from it and called again,
up to this many calls in all, before it runs the usual way."""

STORED, ROOM_MOVED, ROLE_CHANGED, RETRIED, HEAD_MOVED = range(5)
"""``medrelay_send_batch_or_state``'s answers: stored, or which prediction failed."""
MISSES = {ROOM_MOVED: "room", ROLE_CHANGED: "role", RETRIED: "retried", HEAD_MOVED: "head"}

_CALL = (  # constant text only: S608 cannot see that
    "SELECT o_code, o_last, o_epochs, o_pending FROM medrelay_send_batch_or_state("  # noqa: S608
    + ", ".join(f"${i}" for i in range(1, 19))
    + ")"
)

_State = tuple[int, int, bool]


@dataclass(slots=True)
class _Room:
    state: _State | None
    """(last seq, epoch, pending) as last seen committed; None once a call found it moved
    without saying how (the next batch there reads it)."""
    roles: dict[str, str] = field(default_factory=dict)
    """Members' current roles as last read: kept while the room's seq moves on (another
    node's send changes no role); dropped with the room when a call found one changed."""


class Predictions:
    """What this node last saw committed in the rooms it sends into: each room's last seq,
    epoch and pending flag, and its members' roles. Only ever a guess (the call checks
    each one); bounded to ``max_rooms`` rooms and ``max_members`` roles in all, least
    recently used rooms out."""

    def __init__(self, max_rooms: int = DEFAULT_ROOMS, max_members: int = DEFAULT_MEMBERS) -> None:
        if max_rooms < 1 or max_members < 1:
            raise ValueError("max_rooms and max_members must be at least 1")
        self._max = max_rooms
        self._max_members = max_members
        self._members = 0
        self._rooms: collections.OrderedDict[str, _Room] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._rooms)

    @property
    def members(self) -> int:
        """Roles remembered over all rooms."""
        return self._members

    def lookup(
        self, items: Sequence[dict[str, Any]]
    ) -> tuple[dict[str, list[Any]], dict[tuple[str, str], str]] | None:
        """The batch's state as :func:`plan_send` takes it, or None if any room's state or
        any sender's role is unknown."""
        state: dict[str, list[Any]] = {}
        roles: dict[tuple[str, str], str] = {}
        for kw in items:
            room, user = str(kw["room"]), str(kw["user"])
            known = self._rooms.get(room)
            if known is None or known.state is None or user not in known.roles:
                return None
            if room not in state:
                state[room] = list(known.state)
                self._rooms.move_to_end(room)
            roles[(room, user)] = known.roles[user]
        return state, roles

    def learn(self, state: dict[str, list[Any]], roles: dict[tuple[str, str], str]) -> None:
        """After a committed batch: ``state`` (room -> [last seq, epoch, pending]) as it
        left the rooms, and the roles of all their current members as it read them."""
        members: dict[str, dict[str, str]] = {room: {} for room in state}
        for (room, user), role in roles.items():
            if room in members:
                members[room][user] = role
        for room, (last_seq, epoch, pending) in state.items():
            known = self._rooms.get(room)
            if known is None:
                self._rooms[room] = _Room((last_seq, epoch, bool(pending)), members[room])
                self._members += len(members[room])
            else:
                if known.state is None or last_seq >= known.state[0]:
                    known.state = (last_seq, epoch, bool(pending))
                self._members += len(members[room]) - len(known.roles)
                known.roles = members[room]
            self._rooms.move_to_end(room)
        while len(self._rooms) > self._max:
            self._members -= len(self._rooms.popitem(last=False)[1].roles)
        while self._members > self._max_members and len(self._rooms) > 1:
            self._members -= len(self._rooms.popitem(last=False)[1].roles)

    def sent(self, last: dict[str, int]) -> None:
        for room, seq in last.items():
            known = self._rooms.get(room)
            if known is not None and known.state is not None:
                known.state = (max(known.state[0], seq), *known.state[1:])

    def restate(self, states: dict[str, _State]) -> None:
        """A call found these rooms in these states (read under their locks); their
        members' roles are kept (a call checks them apart). A later seq heard meanwhile
        (another commit's NOTIFY, arrived before the answer) is kept."""
        for room, state in states.items():
            known = self._rooms.get(room)
            if known is not None and (known.state is None or state[0] >= known.state[0]):
                known.state = state

    def moved(self, rooms: Sequence[str]) -> None:
        """The rooms' state is not what this node thought: read it next time."""
        for room in rooms:
            known = self._rooms.get(room)
            if known is not None:
                known.state = None

    def forget(self, rooms: Sequence[str]) -> None:
        for room in rooms:
            known = self._rooms.pop(room, None)
            if known is not None:
                self._members -= len(known.roles)

    def heard(self, room: str, seq: int) -> None:
        """A node committed ``room`` up to ``seq`` (its NOTIFY), this one or another: the
        next batch there is planned after it. A send leaves the epoch and pending flag as
        they were; a membership change that moved them makes the next call miss and
        answer with the room's state."""
        known = self._rooms.get(room)
        if known is not None and known.state is not None and seq > known.state[0]:
            known.state = (seq, *known.state[1:])


@dataclass(frozen=True, slots=True)
class Trip:
    """One batch's calls: its outcomes if it was stored (None if every call missed, or
    the batch was not tried), the calls' time in seconds, and each missed call's miss."""

    outcomes: list[AppendResult] | None
    seconds: float = 0.0
    misses: tuple[str, ...] = ()

    @property
    def calls(self) -> int:
        return len(self.misses) + (self.outcomes is not None)


NOT_TRIED = Trip(None)


def _event_row(ev: StoredEvent) -> tuple[Any, ...]:
    """One ``medrelay_event_row`` (migration 0010)."""
    return (ev.room, ev.seq, ev.kind, ev.sender_device, ev.sender_user, ev.ts, ev.payload, ev.mid)


class OneTrip:
    """Plans batches from :class:`Predictions` and stores them with one call."""

    def __init__(
        self, db: Database, writer: ChainWriter, *, max_rooms: int = DEFAULT_ROOMS
    ) -> None:
        self._db = db
        self._writer = writer
        self.predictions = Predictions(max_rooms)
        self.connection = HeldConnection(db)
        """The call's connection, kept between batches (``held.py``)."""

    async def close(self) -> None:
        await self.connection.close()

    async def run(
        self, items: Sequence[dict[str, Any]], clock: Callable[[], float] = time.monotonic
    ) -> Trip:
        """Store the batch in one call if it can be planned from the predictions and they
        hold; if only rooms moved on, plan it again from the state the call answered and
        call again (up to :data:`CALLS` calls). An error propagates with the batch's rooms
        forgotten (its retry reads them)."""
        seconds, misses = 0.0, tuple[str, ...]()
        for _ in range(CALLS):
            call = await self._call(items, clock)
            if call is None:
                break
            outcomes, took, code, answered = call
            seconds += took
            if outcomes is not None:
                return Trip(outcomes, seconds, misses)
            misses += (MISSES.get(code, "unknown"),)
            if answered is None:
                break
            self.predictions.restate(answered)
        return Trip(None, seconds, misses)

    async def _call(
        self, items: Sequence[dict[str, Any]], clock: Callable[[], float]
    ) -> tuple[list[AppendResult] | None, float, int, dict[str, _State] | None] | None:
        """One call: (outcomes if stored, its time, its answer, the rooms' state if it
        answered with it), or None if the batch cannot be planned from the predictions."""
        known = self.predictions.lookup(items)
        if known is None:
            return None
        state, roles = known
        before = {room: tuple(values) for room, values in state.items()}
        stored: dict[tuple[str, str, bytes], StoredEvent] = {}
        new: list[StoredEvent] = []
        outcomes: list[AppendResult] = []
        records: list[AuditRecord] = []
        for kw in items:
            try:
                outcome, audit = plan_send(kw, state, roles, stored, new)
            except RequestError:  # refused only from what was read under the locks
                return None
            outcomes.append(outcome)
            records.extend(audit)
        taken = self._writer.plan_one_trip(records)
        if taken is None:
            return None
        rooms = sorted(state)
        last = {room: int(state[room][0]) for room in rooms}
        args = [
            rooms,
            *([before[room][i] for room in rooms] for i in range(3)),
            [last[room] for room in rooms],
            *map(list, zip(*roles, strict=True)),
            list(roles.values()),
            [_event_row(ev) for ev in new],
            EVENTS_CHANNEL,
            *taken.condition,
            pg_audit_rows(taken.entries),
        ]
        started = clock()
        try:
            async with self.connection.statement() as pg, raw_errors():
                row = await pg.fetchrow(_CALL, *args)
        except BaseException:  # stored or not is unknown: plan from the stored state
            self._writer.one_trip_done(taken, stored=False, head_moved=True)
            self.predictions.forget(rooms)
            raise
        seconds = clock() - started
        assert row is not None  # a function's one row
        code = int(row[0])
        self._writer.one_trip_done(taken, stored=code == STORED, head_moved=code == HEAD_MOVED)
        if code == STORED:
            self.predictions.sent(last)
            return outcomes, seconds, code, None
        answered = _answered(rooms, row) if code == ROOM_MOVED else None
        if code == ROLE_CHANGED:  # which member's role is not known: read them all again
            self.predictions.forget(rooms)
        elif answered is None:
            self.predictions.moved(rooms)
        return None, seconds, code, answered


def _answered(rooms: list[str], row: Any) -> dict[str, _State] | None:
    """The rooms' state as a call that found one moved answered it (None if a room is
    gone)."""
    last, epochs, pending = row[1], row[2], row[3]
    if last is None or len(last) != len(rooms):
        return None
    return {
        room: (int(seq), int(epoch), bool(flag))
        for room, seq, epoch, flag in zip(rooms, last, epochs, pending, strict=True)
    }
