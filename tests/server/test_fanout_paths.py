"""``Delivery``'s live fan-out: in one pass over a room, a connection that is next in line
gets the frame written at once when its socket takes it (journaled with the room's other
direct writes, in one call) or queued (journaled by its writer once written); one that is
not in line, closed or not entitled gets nothing, as before."""

from __future__ import annotations

from typing import cast

from medrelay_server.delivery import Delivery, Effects, Registry, RoomHub
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.gateway.connection import Connection
from medrelay_server.store.base import Store

ROOM = "r" * 24


class Peer:
    def __init__(self, user: str, *, direct: bool = True) -> None:
        self.direct = direct
        self.now: list[bytes] = []
        self.queued: list[bytes] = []
        self.written: list[tuple[str, int]] = []
        self.conn = Connection(
            user, user + "-1", b"k" * 32, "person", self.send, self.close, 8, 2**40,
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
        self.queued.append(data)

    async def close(self, code: int, reason: str) -> None:
        return None


async def test_one_pass_writes_queues_and_journals_each_recipient_once() -> None:
    journaled: list[tuple[list[str], str, int]] = []
    delivered: list[int] = []
    delivery = Delivery(
        store=cast(Store, None),
        broker=InMemoryBroker(),
        registry=Registry(),
        replay_batch=16,
        on_delivered=delivered.append,
        on_written=lambda conns, room, seq: journaled.append(
            (sorted(c.user for c in conns), room, seq)
        ),
    )
    members = {"ann": "member", "ben": "member", "cat": "device", "dan": "member"}
    ann, ben, cat, dan = Peer("ann"), Peer("ben", direct=False), Peer("cat"), Peer("dan")
    eve = Peer("eve")  # connected to the room's hub but not a member
    dan.conn.closed = True
    hub = RoomHub(ROOM, 0, members)
    peers = (ann, ben, cat, dan, eve)
    hub.conns.update(p.conn for p in peers)
    delivery.hubs[ROOM] = hub
    try:
        delivery._process(hub, 1, "message", b"frame-1", Effects())
        assert hub.processed == 1
        assert ann.now == [b"frame-1"] and ben.now == [] and cat.now == [] and eve.now == []
        assert journaled == [(["ann"], ROOM, 1)]  # the direct writes, together
        assert delivered == [2]  # ann written, ben queued
        await ben.conn.flush(timeout=10)  # ben's writer task journals its own write
        assert ben.written == [(ROOM, 1)]
        assert ben.queued == [b"frame-1"] and ann.written == []
        # in line: cursors moved for everyone open, entitled or not; dan is closed
        assert [p.conn.cursors[ROOM] for p in peers] == [1, 1, 1, 0, 1]
        # a device-role member gets roster events
        delivery._process(hub, 2, "roster", b"frame-2", Effects())
        assert cat.now == [b"frame-2"]
        assert journaled[-1] == (["ann", "cat"], ROOM, 2)
        await ben.conn.flush(timeout=10)
        assert ben.written == [(ROOM, 1), (ROOM, 2)]
    finally:
        for p in peers:
            await p.conn.stop()
