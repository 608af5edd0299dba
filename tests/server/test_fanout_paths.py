"""``Delivery``'s live fan-out: in one pass over a room, a connection that is next in line
gets the frame written at once when its socket takes it (journaled with the room's other
direct writes, in one call) or queued (journaled by its writer once written); one that is
not in line, closed or not entitled gets nothing, as before."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from medrelay_protocol.codes import CloseCode
from medrelay_server.delivery import Delivery, Effects, Registry, RoomHub
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.gateway.connection import Connection
from medrelay_server.store.base import Store, StoredEvent

ROOM = "r" * 24


class Peer:
    def __init__(self, user: str, *, direct: bool = True, limit: int = 8) -> None:
        self.direct = direct
        self.now: list[bytes] = []
        self.queued: list[bytes] = []
        self.written: list[tuple[str, int]] = []
        self.closed: list[int] = []
        self.release = asyncio.Event()
        self.release.set()
        self.sending = asyncio.Event()
        self.conn = Connection(
            user, user + "-1", b"k" * 32, "person", self.send, self.close, limit, 2**40,
            write_now=self.write_now,
        )  # fmt: skip
        self.conn.on_written = lambda room, seq: self.written.append((room, seq))
        self.conn.cursors[ROOM] = 0
        self.conn.start()

    def write_now(self, data: bytes) -> bool:
        if self.direct:
            self.now.append(data)
        return self.direct

    async def send(self, data: bytes) -> None:
        self.sending.set()
        await self.release.wait()
        self.queued.append(data)

    async def close(self, code: int, reason: str) -> None:
        self.closed.append(code)


class Reads:
    """The store as a catch-up reads it: nothing stored past the cursor."""

    def __init__(self) -> None:
        self.reads: list[tuple[str, int]] = []
        self.done = asyncio.Event()

    async def events_after(
        self, room: str, after: int, *, user: str, device: str, limit: int
    ) -> list[StoredEvent]:
        self.reads.append((user, after))
        self.done.set()
        return []


class Journaled(list[tuple[str, list[str], int]]):
    """``Delivery``'s journal callback: (room, users written to at once, seq) per call."""

    def __call__(self, conns: list[Connection], room: str, seq: int) -> None:
        self.append((room, sorted(c.user for c in conns), seq))


def room_of(
    peers: tuple[Peer, ...], members: dict[str, str], *, processed: int = 0, **kw: Any
) -> tuple[Delivery, RoomHub]:
    """A ``Delivery`` with one room hub holding ``peers``' connections."""
    kw.setdefault("store", cast(Store, None))
    delivery = Delivery(broker=InMemoryBroker(), registry=Registry(), replay_batch=16, **kw)
    hub = RoomHub(ROOM, processed, members)
    hub.conns.update(p.conn for p in peers)
    delivery.hubs[ROOM] = hub
    return delivery, hub


async def test_one_pass_writes_queues_and_journals_each_recipient_once() -> None:
    journaled, delivered = Journaled(), list[int]()
    members = {"ann": "member", "ben": "member", "cat": "device", "dan": "member"}
    ann, ben, cat, dan = Peer("ann"), Peer("ben", direct=False), Peer("cat"), Peer("dan")
    eve = Peer("eve")  # connected to the room's hub but not a member
    dan.conn.closed = True
    peers = (ann, ben, cat, dan, eve)
    delivery, hub = room_of(peers, members, on_delivered=delivered.append, on_written=journaled)
    try:
        delivery._process(hub, 1, "message", b"frame-1", Effects())
        assert hub.processed == 1
        assert ann.now == [b"frame-1"] and ben.now == [] and cat.now == [] and eve.now == []
        assert journaled == [(ROOM, ["ann"], 1)]  # the direct writes, together
        assert delivered == [2]  # ann written, ben queued
        await ben.conn.flush(timeout=10)  # ben's writer task journals its own write
        assert ben.written == [(ROOM, 1)]
        assert ben.queued == [b"frame-1"] and ann.written == []
        # in line: cursors moved for everyone open, entitled or not; dan is closed
        assert [p.conn.cursors[ROOM] for p in peers] == [1, 1, 1, 0, 1]
        # a device-role member gets roster events
        delivery._process(hub, 2, "roster", b"frame-2", Effects())
        assert cat.now == [b"frame-2"]
        assert journaled[-1] == (ROOM, ["ann", "cat"], 2)
        await ben.conn.flush(timeout=10)
        assert ben.written == [(ROOM, 1), (ROOM, 2)]
    finally:
        for p in peers:
            await p.conn.stop()


async def test_out_of_line_connections_get_a_catch_up_not_the_frame() -> None:
    """A gap, a rekey (its wrap is per device), a connection already catching up or not
    yet subscribed: nothing is written or journaled for them in the pass."""
    journaled, reads = Journaled(), Reads()
    ann, ben, cat, dan = Peer("ann"), Peer("ben"), Peer("cat"), Peer("dan")
    ben.conn.cursors[ROOM] = 3  # ahead: already has 4
    cat.conn.catching_up.add(ROOM)
    del dan.conn.cursors[ROOM]  # not subscribed to the room (yet)
    peers = (ann, ben, cat, dan)
    members = {p.conn.user: "member" for p in peers}
    delivery, hub = room_of(
        peers, members, processed=3, store=cast(Store, reads), on_written=journaled
    )
    try:
        delivery._process(hub, 4, "message", b"frame-4", Effects())  # ann: 0 -> 4 is a gap
        assert journaled == [(ROOM, ["ben"], 4)] and ben.now == [b"frame-4"]
        assert ann.now == [] and cat.now == [] and dan.now == []
        await asyncio.wait_for(reads.done.wait(), 10)
        assert reads.reads == [("ann", 0)]  # the gap is read from the store
        reads.done.clear()
        delivery._process(hub, 5, "rekey", b"frame-5", Effects())
        assert journaled == [(ROOM, ["ben"], 4)]  # a rekey is never fanned out live
        await asyncio.wait_for(reads.done.wait(), 10)
        assert ("ben", 4) in reads.reads
        assert ben.now == [b"frame-4"] and cat.now == [] and dan.now == []
    finally:
        for p in peers:
            await p.conn.stop()


async def test_a_slow_consumer_is_closed_and_the_rest_still_get_the_frame() -> None:
    """A connection whose socket refuses direct writes and whose queue is full is closed
    with ``SLOW_CONSUMER`` (a resume point, not an unbounded buffer); the others in the
    pass are written and journaled as usual."""
    journaled = Journaled()
    ann, slow = Peer("ann"), Peer("slow", direct=False, limit=2)
    slow.release.clear()  # its writer holds the first frame; the queue takes two more
    members = {"ann": "member", "slow": "member"}
    delivery, hub = room_of((ann, slow), members, on_written=journaled)
    try:
        delivery._process(hub, 1, "message", b"f1", Effects())
        await asyncio.wait_for(slow.sending.wait(), 10)  # its writer holds f1
        for seq in range(2, 6):  # f2 and f3 fill its queue; f4 finds it full
            delivery._process(hub, seq, "message", b"f%d" % seq, Effects())
        assert slow.conn.closed and slow.conn.close_code == CloseCode.SLOW_CONSUMER
        assert slow.conn.depth == 2  # never more than its bound
        assert slow.conn.cursors[ROOM] == 4  # f5 found it closed
        assert ann.now == [b"f%d" % s for s in range(1, 6)]
        assert journaled == [(ROOM, ["ann"], s) for s in range(1, 6)]
    finally:
        slow.release.set()
        await ann.conn.stop()
        await slow.conn.stop()


async def test_without_a_journal_callback_each_connection_reports_its_writes() -> None:
    ann = Peer("ann")
    delivery, hub = room_of((ann,), {"ann": "member"})
    try:
        delivery._process(hub, 1, "message", b"f1", Effects())
        assert ann.now == [b"f1"] and ann.written == [(ROOM, 1)]
    finally:
        await ann.conn.stop()
