"""Delivery reads a room's gap from the store only when the broker will not fill it:

* database notifications are a backstop for lost broker publishes (``Delivery.notify``): a
  notified seq is checked against what the broker delivered only once ``notify_grace`` has
  passed since that seq was notified, so a busy room whose newest commit is still on its way
  through the broker costs no store read;
* an event that arrives on the broker before an earlier one (two nodes commit in one room,
  each publishes after its own commit) waits up to ``reorder_grace`` for it; events are
  still processed strictly in seq order, so a removal still cuts its member off at its seq
  (I2), and a failed read leaves nothing waiting for the slow poll.

Unit tests: the store is a stub that counts reads. Where a test drives the notification
timer itself, the grace is an hour and the test calls what the timer would."""

from __future__ import annotations

from typing import Any, cast

from medrelay_protocol.canonical import pack_body
from medrelay_server.delivery import (
    EARLY_BYTES,
    EARLY_EVENTS,
    Delivery,
    Effects,
    Registry,
    RoomHub,
    broker_message,
    event_frame,
)
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.gateway.connection import Connection
from medrelay_server.store.base import Store, StoredEvent

from ..polling import until

ROOM = "ward-7"
HOUR = 3600.0


class _Reads:
    """The one store call a gap fill makes; every event up to ``last`` exists. ``failures``
    reads raise first (the store is away)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.last = 0
        self.failures = 0

    async def room_events(self, room: str, after_seq: int, *, limit: int) -> list[StoredEvent]:
        self.calls.append(after_seq)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("store away")
        return [_event(s) for s in range(after_seq + 1, min(self.last, after_seq + limit) + 1)]


class _Device:
    """A connection as ``Delivery._offer_all`` sees it; ``taken`` is what it was given
    (always through the queue: it has no direct write)."""

    def __init__(self, user: str, *, cursor: int = 4, closed: bool = False) -> None:
        self.user = user
        self.device = user + "-1"
        self.closed = closed
        self.catching_up: set[str] = set()
        self.cursors = {ROOM: cursor}
        self.taken: list[int] = []

    def write_direct(self, frame: bytes) -> bool:
        return False

    def enqueue(self, frame: bytes, *, event: tuple[str, int], direct: bool = True) -> bool:
        self.taken.append(event[1])
        return True


def _event(seq: int, size: int = 64) -> StoredEvent:
    return StoredEvent(ROOM, seq, "message", "dev-a", "alice", 0, b"x" * size, b"m" * 16)


class _Setup:
    def __init__(self) -> None:
        self.reads = _Reads()
        self.delivery = Delivery(
            store=cast(Store, self.reads),
            broker=InMemoryBroker(),
            registry=Registry(),
            replay_batch=100,
        )
        self.delivery.notify_grace = HOUR
        self.delivery.reorder_grace = 0.05
        self.processed: list[int] = []
        process = self.delivery._process

        def recorded(hub: RoomHub, seq: int, kind: str, frame: bytes, eff: Effects) -> None:
            self.processed.append(seq)
            process(hub, seq, kind, frame, eff)

        self.delivery._process = recorded  # type: ignore[method-assign]
        self.hub = RoomHub(ROOM, 4, {"alice": "owner"})
        # a hub lives while it has connections: one that takes nothing
        self.hub.conns.add(cast(Connection, _Device("carol", closed=True)))
        self.delivery.hubs[ROOM] = self.hub
        self.wakes: list[int] = []
        wake = self.delivery.wake

        async def counted(room: str, seq: int) -> None:
            await wake(room, seq)
            self.wakes.append(seq)  # once its check is over

        self.delivery.wake = counted  # type: ignore[method-assign]

    async def broker(self, seq: int, size: int = 64) -> None:
        """The broker delivers ``seq``."""
        self.reads.last = max(self.reads.last, seq)
        await self.delivery._on_room_message("room:" + ROOM, broker_message(_event(seq, size)))

    async def timer(self, wakes: int) -> None:
        """What the notification timer does when its grace is over; returns once that
        many wakes have finished."""
        self.delivery._wake_notified(ROOM)

        async def enough() -> bool:
            return len(self.wakes) >= wakes

        await until(enough)

    async def processed_up_to(self, seq: int) -> None:
        async def done() -> bool:
            return self.hub.processed >= seq

        await until(done)


async def test_a_seq_notified_just_before_a_wake_is_checked_after_its_own_grace() -> None:
    s = _Setup()
    s.reads.last = 5
    s.delivery.notify(ROOM, 5)
    await s.broker(5)
    s.reads.last = 6
    s.delivery.notify(ROOM, 6)  # committed now; the broker has it on its way
    await s.timer(1)  # the wake scheduled by the notification of 5
    assert s.wakes == [5] and s.hub.processed == 5
    assert s.delivery._notified == {ROOM: [6, 6]}  # 6 gets a grace of its own
    await s.broker(6)  # arrives within it
    await s.timer(2)
    assert s.wakes == [5, 6] and s.hub.processed == 6
    assert s.reads.calls == []  # the broker delivered everything: no store read


async def test_a_lost_publish_is_read_once() -> None:
    s = _Setup()
    s.reads.last = 7  # 5, 6 and 7 committed; the broker lost them all
    for seq in (5, 6, 7):
        s.delivery.notify(ROOM, seq)
    await s.timer(1)
    # the wake for 5 reads the gap and takes every event the read returned
    assert s.processed == [5, 6, 7] and s.reads.calls == [4]
    await s.timer(2)  # the one for 7 finds it processed
    assert s.wakes == [5, 7] and s.reads.calls == [4]


async def test_many_notifications_keep_one_wake_per_room() -> None:
    s = _Setup()
    for seq in range(5, 200):
        s.delivery.notify(ROOM, seq)
    assert s.delivery._notified == {ROOM: [5, 199]}
    assert s.wakes == []


async def test_an_event_ahead_of_an_earlier_one_waits_for_it_on_the_broker() -> None:
    s = _Setup()
    s.reads.last = 7
    await s.broker(7)
    await s.broker(6)
    assert s.processed == [] and sorted(s.hub.early) == [6, 7]
    await s.broker(5)
    assert s.processed == [5, 6, 7] and s.hub.processed == 7
    assert s.hub.early == {} and s.hub.early_bytes == 0 and s.hub.reorder is None
    assert s.reads.calls == []
    await s.broker(6)  # a duplicate: nothing
    assert s.processed == [5, 6, 7]


async def test_an_earlier_event_lost_on_the_broker_is_read_after_the_grace() -> None:
    s = _Setup()
    s.reads.last = 6
    await s.broker(6)  # 5 was lost
    await s.processed_up_to(6)
    assert s.processed == [5, 6] and s.reads.calls == [4]
    assert s.hub.early == {} and s.hub.early_bytes == 0


async def test_a_failed_read_is_tried_again_after_another_grace() -> None:
    """The store away when the wait ends: the events keep waiting and the read is tried
    again a grace later, not at the slow poll."""
    s = _Setup()
    s.reads.last = 7
    s.reads.failures = 1
    await s.broker(7)  # 5 and 6 were lost
    await s.processed_up_to(7)
    assert s.processed == [5, 6, 7] and s.reads.calls == [4, 4]
    assert s.hub.early == {} and s.hub.reorder is None


async def test_events_waiting_for_an_earlier_one_are_bounded_in_number() -> None:
    """Past ``EARLY_EVENTS`` waiting, the next one reads the gap at once."""
    s = _Setup()
    first, last = 6, 6 + EARLY_EVENTS
    s.reads.last = last
    for seq in range(first, last):
        await s.broker(seq)
    assert len(s.hub.early) == EARLY_EVENTS and s.processed == []
    await s.broker(last)
    assert s.processed == list(range(5, last + 1)) and s.reads.calls == [4]
    assert s.hub.early == {} and s.hub.reorder is None


async def test_events_waiting_for_an_earlier_one_are_bounded_in_bytes() -> None:
    """Large events: the one that would take the waiting frames past ``EARLY_BYTES``
    reads the gap at once, long before ``EARLY_EVENTS`` wait."""
    size = 60_000
    frame = len(event_frame(_event(6, size)))
    s = _Setup()
    seq = 5
    while not s.processed:
        seq += 1
        await s.broker(seq, size)
        assert s.hub.early_bytes <= EARLY_BYTES
    assert seq - 6 == EARLY_BYTES // frame < EARLY_EVENTS  # that many waited
    assert s.processed == list(range(5, seq + 1)) and s.reads.calls == [4]
    assert s.hub.early == {} and s.hub.early_bytes == 0


def _roster_removal(seq: int, user: str) -> bytes:
    """A broker message for a roster event that removes ``user`` (its effects travel with
    it, as ``broker_message`` sends them)."""
    ev = StoredEvent(ROOM, seq, "roster", "dev-a", "alice", 0, b"entry", b"r" * 16)
    return pack_body([ROOM, seq, "roster", event_frame(ev), [{}, [user], {}, []]])


async def test_a_removal_that_waited_still_cuts_its_member_off_at_its_seq() -> None:
    """I2 across the reorder wait: 7 (a message) and 6 (bob's removal) arrive before 5;
    bob gets 5 and his own removal and nothing after it, alice gets all three, in order."""
    s = _Setup()
    alice, bob = _Device("alice"), _Device("bob")
    s.hub.members["bob"] = "member"
    for device in (alice, bob):
        s.hub.conns.add(cast(Connection, device))
    s.reads.last = 7
    await s.broker(7)
    await s.delivery._on_room_message("room:" + ROOM, _roster_removal(6, "bob"))
    assert s.processed == [] and bob.taken == []
    await s.broker(5)
    assert s.processed == [5, 6, 7]
    assert alice.taken == [5, 6, 7]
    assert bob.taken == [5, 6] and ROOM not in bob.cursors
    assert "bob" not in s.hub.members and cast(Any, bob) not in s.hub.conns
    assert s.reads.calls == []


async def test_events_waiting_over_all_rooms_are_bounded() -> None:
    """The node-wide bound (``early_bytes_limit``): once the rooms' waiting frames reach
    it, an event ahead in another room reads its gap at once; the count goes back to
    zero as the events are processed, and when a hub is dropped."""
    s = _Setup()
    other = RoomHub("ward-8", 4, {})
    other.conns.add(cast(Connection, _Device("carol", closed=True)))
    s.delivery.hubs["ward-8"] = other
    frame = len(event_frame(_event(6)))
    s.delivery.early_bytes_limit = 2 * frame
    s.reads.last = 7
    for seq in (6, 7):  # two frames wait in ward-7: the node's bound is reached
        await s.broker(seq)
    assert s.delivery.early_bytes == 2 * frame
    ahead = StoredEvent("ward-8", 6, "message", "dev-a", "alice", 0, b"x" * 64, b"m" * 16)
    await s.delivery._on_room_message("room:ward-8", broker_message(ahead))
    assert other.early == {} and other.processed == 7  # read at once (the stub's events)
    assert s.reads.calls == [4]
    await s.broker(5)  # ward-7's wait ends
    assert s.processed[-3:] == [5, 6, 7] and s.delivery.early_bytes == 0
    await s.broker(9)  # waits again; the hub is then dropped with it
    assert s.delivery.early_bytes == frame
    s.delivery._forget_early(s.delivery.hubs.pop(ROOM))
    assert s.delivery.early_bytes == 0 and s.hub.reorder is None
