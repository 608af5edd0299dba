"""Delivery reads a room's gap from the store only when the broker will not fill it:

* database notifications are a backstop for lost broker publishes (``Delivery.notify``): a
  notified seq is checked against what the broker delivered only once ``notify_grace`` has
  passed since that seq was notified, so a busy room whose newest commit is still on its way
  through the broker costs no store read;
* an event that arrives on the broker before an earlier one (two nodes commit in one room,
  each publishes after its own commit) waits up to ``reorder_grace`` for it; events are
  still processed strictly in seq order.

Unit tests: the store is a stub that counts reads."""

from __future__ import annotations

from typing import cast

from medrelay_server.delivery import (
    EARLY_EVENTS,
    Delivery,
    Effects,
    Registry,
    RoomHub,
    broker_message,
)
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.gateway.connection import Connection
from medrelay_server.store.base import Store, StoredEvent

from ..polling import until

ROOM = "ward-7"


class _Reads:
    """The one store call a gap fill makes; every event up to ``last`` exists."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.last = 0

    async def room_events(self, room: str, after_seq: int, *, limit: int) -> list[StoredEvent]:
        self.calls.append(after_seq)
        return [_event(s) for s in range(after_seq + 1, min(self.last, after_seq + limit) + 1)]


class _Listener:
    """A connection in the room that takes nothing (``Delivery._offer`` skips it)."""

    def __init__(self) -> None:
        self.closed = True
        self.catching_up: set[str] = set()


def _event(seq: int) -> StoredEvent:
    return StoredEvent(ROOM, seq, "message", "dev-a", "alice", 0, b"x" * 64, b"m" * 16)


class _Setup:
    def __init__(self) -> None:
        self.reads = _Reads()
        self.delivery = Delivery(
            store=cast(Store, self.reads),
            broker=InMemoryBroker(),
            registry=Registry(),
            replay_batch=100,
        )
        self.delivery.notify_grace = 0.05
        self.delivery.reorder_grace = 0.05
        self.processed: list[int] = []
        process = self.delivery._process

        def recorded(hub: RoomHub, seq: int, kind: str, frame: bytes, eff: Effects) -> None:
            self.processed.append(seq)
            process(hub, seq, kind, frame, eff)

        self.delivery._process = recorded  # type: ignore[method-assign]
        self.hub = RoomHub(ROOM, 4, {})
        self.hub.conns.add(cast(Connection, _Listener()))  # a hub lives while it has any
        self.delivery.hubs[ROOM] = self.hub
        self.wakes: list[int] = []
        wake = self.delivery.wake

        async def counted(room: str, seq: int) -> None:
            await wake(room, seq)
            self.wakes.append(seq)  # once its check is over

        self.delivery.wake = counted  # type: ignore[method-assign]

    async def broker(self, seq: int) -> None:
        """The broker delivers ``seq``."""
        self.reads.last = max(self.reads.last, seq)
        await self.delivery._on_room_message("room:" + ROOM, broker_message(_event(seq)))

    async def woken(self, n: int) -> None:
        async def enough() -> bool:
            return len(self.wakes) >= n

        await until(enough)


async def test_a_seq_notified_just_before_a_wake_is_checked_after_its_own_grace() -> None:
    s = _Setup()
    s.reads.last = 5
    s.delivery.notify(ROOM, 5)
    await s.broker(5)
    s.reads.last = 6
    s.delivery.notify(ROOM, 6)  # committed now; the broker has it on its way
    await s.woken(1)
    assert s.wakes == [5] and s.hub.processed == 5
    await s.broker(6)  # arrives after the first wake, within its own grace
    await s.woken(2)
    assert s.wakes == [5, 6] and s.hub.processed == 6
    assert s.reads.calls == []  # the broker delivered everything: no store read


async def test_a_lost_publish_is_read_after_the_grace() -> None:
    s = _Setup()
    s.reads.last = 7  # 5, 6 and 7 committed; the broker lost them all
    for seq in (5, 6, 7):
        s.delivery.notify(ROOM, seq)
    await s.woken(2)
    # the first wake fills up to 5, the one after it (a grace later) up to 7
    assert s.wakes == [5, 7] and s.reads.calls == [4, 5] and s.hub.processed == 7


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

    async def caught_up() -> bool:
        return s.hub.processed == 6

    await until(caught_up)
    assert s.processed == [5, 6] and s.reads.calls == [4]
    assert s.hub.early == {} and s.hub.early_bytes == 0


async def test_events_waiting_for_an_earlier_one_are_bounded() -> None:
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
