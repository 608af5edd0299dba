"""PostgreSQL: a send batch in one round trip when this node's predictions hold.

A batch the usual way (:class:`~.messages.SendBatch`) is five round trips: BEGIN, the room
locks, the roles and retried sends, the writes, COMMIT. Under load each waits for the busy
event loop as well as for the database (``docs/performance.md``, "Seventh round"). Most
batches need none of that reading: the node committed the previous batch in the same rooms
and knows what it left, namely each room's last seq, epoch and pending flag, the senders'
roles, and its own journal head.

So the node plans the batch from what it remembers (:class:`Predictions`), exactly as
``SendBatch`` would plan it from what it reads (:func:`~.messages.plan_send`), and sends
the plan and the predictions in one call of ``medrelay_send_batch`` (migrations 0007-0010). The
call is its own transaction. It locks the rooms in room order, then checks every
prediction with statements that see everything committed before the locks were granted,
and writes only if all hold. A removal committed just before is therefore seen exactly as
``SendBatch``'s own read sees it (I2): it moved the room's last seq, so the call writes
nothing. Any miss (and any batch whose plan refuses a send: a refusal is only ever made
from what was read under the locks) runs the usual way, which then teaches the node the
rooms' state again.
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

SHARED_BATCHES = 16
"""After another node's commit in a room, batches there run the usual way this many times
before a call is tried again (in the two-node bench most calls in shared rooms missed)."""

STORED, ROOM_MOVED, ROLE_CHANGED, RETRIED, HEAD_MOVED = range(5)
"""``medrelay_send_batch``'s answers: stored, or which prediction failed."""
MISSES = {ROOM_MOVED: "room", ROLE_CHANGED: "role", RETRIED: "retried", HEAD_MOVED: "head"}

_CALL = "SELECT medrelay_send_batch(" + ", ".join(f"${i}" for i in range(1, 19)) + ")"


@dataclass(slots=True)
class _Room:
    state: tuple[int, int, bool] | None
    """(last seq, epoch, pending) as this node last left it; None once another node
    moved the room on or a call found it moved (the next batch there reads it)."""
    roles: dict[str, str] = field(default_factory=dict)
    """Members' current roles as last read: kept while the room's seq moves on (another
    node's send changes no role); dropped with the room when a call found one changed."""
    sending: int = 0
    """The last seq of this node's batch in flight: its own NOTIFY is not news."""
    shared: int = 0
    """Batches still to run the usual way here: another node commits in this room too, so
    a call would likely miss (and cost a round trip) before reading it anyway."""


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
            if known is None or known.state is None or known.shared or user not in known.roles:
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
                known.shared = max(0, known.shared - 1)
            self._rooms.move_to_end(room)
        while len(self._rooms) > self._max:
            self._members -= len(self._rooms.popitem(last=False)[1].roles)
        while self._members > self._max_members and len(self._rooms) > 1:
            self._members -= len(self._rooms.popitem(last=False)[1].roles)

    def sending(self, last: dict[str, int]) -> None:
        """This node is about to commit these rooms up to these seqs."""
        for room, seq in last.items():
            known = self._rooms.get(room)
            if known is not None:
                known.sending = max(known.sending, seq)

    def sent(self, last: dict[str, int]) -> None:
        for room, seq in last.items():
            known = self._rooms.get(room)
            if known is not None and known.state is not None:
                known.state = (max(known.state[0], seq), *known.state[1:])

    def moved(self, rooms: Sequence[str], *, by_another: bool = False) -> None:
        """The rooms' state is not what this node thought: read it next time.
        ``by_another``: another node commits there, so the next :data:`SHARED_BATCHES`
        batches there run the usual way."""
        for room in rooms:
            known = self._rooms.get(room)
            if known is not None:
                known.state = None
                if by_another:
                    known.shared = SHARED_BATCHES

    def forget(self, rooms: Sequence[str]) -> None:
        for room in rooms:
            known = self._rooms.pop(room, None)
            if known is not None:
                self._members -= len(known.roles)

    def heard(self, room: str, seq: int) -> None:
        """Any node committed ``room`` up to ``seq`` (its NOTIFY): unless that was this
        node's own, the room moved on without us, so the next batch there reads it."""
        known = self._rooms.get(room)
        if known is not None and known.state is not None:
            if seq > max(known.state[0], known.sending):
                self.moved([room], by_another=True)


@dataclass(frozen=True, slots=True)
class Trip:
    """One call: the batch's outcomes if it was stored (None if a prediction missed, or
    the batch was not tried), the call's time in seconds, and which miss."""

    outcomes: list[AppendResult] | None
    seconds: float = 0.0
    miss: str | None = None


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
        hold. An error propagates with the batch's rooms forgotten (its retry reads them)."""
        known = self.predictions.lookup(items)
        if known is None:
            return NOT_TRIED
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
                return NOT_TRIED
            outcomes.append(outcome)
            records.extend(audit)
        taken = self._writer.plan_one_trip(records)
        if taken is None:
            return NOT_TRIED
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
        self.predictions.sending(last)
        started = clock()
        try:
            async with self.connection.statement() as pg, raw_errors():
                code = await pg.fetchval(_CALL, *args)
        except BaseException:  # stored or not is unknown: plan from the stored state
            self._writer.one_trip_done(taken, stored=False, head_moved=True)
            self.predictions.forget(rooms)
            raise
        seconds = clock() - started
        self._writer.one_trip_done(taken, stored=code == STORED, head_moved=code == HEAD_MOVED)
        if code == ROLE_CHANGED:  # which member's role is not known: read them all again
            self.predictions.forget(rooms)
        elif code != STORED:
            self.predictions.moved(rooms, by_another=code == ROOM_MOVED)
        if code != STORED:
            return Trip(None, seconds, MISSES.get(code, "unknown"))
        self.predictions.sent(last)
        return Trip(outcomes, seconds)
