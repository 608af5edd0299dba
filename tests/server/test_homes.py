"""Room homes (``server/medrelay_server/homes.py``), as a unit: two or three ``RoomHomes`` over
one in-process broker, each with a recording stand-in for its node's store. The real path
(two ``medrelay serve`` processes, Redis, PostgreSQL) is ``tests/multinode/test_homes.py``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.homes import RoomHomes, home_of
from medrelay_server.metrics import Metrics
from medrelay_server.store.base import AppendResult, AuditRecord, StoredEvent, StoreUnavailable

from ..polling import until


class NodeStore:
    """What a node's store is asked to append; answers with the next seq, or raises ``fail``,
    or holds every call until ``gate`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None
        self.duplicate = False
        self.entered = asyncio.Event()

    async def append_message(self, room: str, **kw: Any) -> AppendResult:
        self.calls.append((room, kw))
        seq = len(self.calls)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        event = StoredEvent(
            room=room,
            seq=seq,
            kind=kw["kind"],
            sender_device=kw["device"],
            sender_user=kw["user"],
            ts=kw["now"] + 1,
            payload=kw["envelope"],
            mid=kw["mid"],
        )
        return AppendResult(event=event, duplicate=self.duplicate)


class Node:
    def __init__(self, name: str, broker: InMemoryBroker, **kw: Any) -> None:
        self.store = NodeStore()
        self.metrics = Metrics()

        async def scope() -> str:
            return "gen-1"

        self.published: list[StoredEvent] = []

        async def publish(events: Sequence[StoredEvent]) -> None:
            self.published.extend(events)

        self.homes = RoomHomes(
            store=self.store,  # type: ignore[arg-type]
            scope=scope,
            broker=broker,
            publish=publish,
            node=name,
            metrics=self.metrics,
            max_body=64 * 1024,
            refresh=0.5,
            **kw,
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.homes.start()
        self.task = asyncio.create_task(self.homes.run(self.stop))

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task
        await self.homes.close()

    def count(self, path: str) -> float:
        value = self.metrics.registry.get_sample_value("medrelay_home_sends_total", {"path": path})
        return value or 0.0


def send_args(room: str, **over: Any) -> dict[str, Any]:
    audit = [AuditRecord(action="message", outcome="success", user="u1", device="d1", room=room)]
    kw: dict[str, Any] = {
        "user": "u1",
        "device": "d1",
        "mid": b"m" * 16,
        "envelope": b"\x01" * 1024,
        "kind": "message",
        "epoch": 3,
        "allow_pending": False,
        "now": 1_000,
        "audit": audit,
    }
    kw.update(over)
    return kw


def room_homed_at(node: str, nodes: Sequence[str]) -> str:
    return next(r for r in (f"room-{i}" for i in range(1000)) if home_of(r, nodes) == node)


async def cluster(broker: InMemoryBroker, *names: str, **kw: Any) -> list[Node]:
    nodes = [Node(name, broker, **kw) for name in names]
    for node in nodes:
        await node.start()

    async def all_heard() -> bool:
        return all(len(n.homes.nodes) == len(names) for n in nodes)

    await until(all_heard)
    return nodes


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Node, Node]]:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=0.3)
    yield a, b
    for n in (a, b):
        await n.close()


def test_homes_are_the_same_whatever_the_order_and_spread() -> None:
    rooms = [f"room-{i}" for i in range(2000)]
    two = [home_of(r, ["node-a", "node-b"]) for r in rooms]
    assert two == [home_of(r, ["node-b", "node-a"]) for r in rooms]
    assert 800 < two.count("node-a") < 1200
    # a third node takes rooms only for itself: no room moves between the first two
    three = [home_of(r, ["node-a", "node-b", "node-c"]) for r in rooms]
    moved = [(old, new) for old, new in zip(two, three, strict=True) if old != new]
    assert moved and all(new == "node-c" for _, new in moved)
    assert 500 < len(moved) < 850


async def test_a_single_node_stores_every_send_itself() -> None:
    (alone,) = await cluster(InMemoryBroker(), "node-a")
    try:
        result = await alone.homes.append_message("room-1", **send_args("room-1"))
        assert result.event.seq == 1 and not result.duplicate
        assert [room for room, _ in alone.store.calls] == ["room-1"]
        assert alone.count("local") == 1 and alone.count("forwarded") == 0
    finally:
        await alone.close()


async def test_a_send_is_stored_by_its_rooms_home(pair: tuple[Node, Node]) -> None:
    a, b = pair
    room = room_homed_at("node-b", a.homes.nodes)
    result = await a.homes.append_message(room, **send_args(room))
    assert a.store.calls == []
    ((stored_room, kw),) = b.store.calls
    assert stored_room == room
    sent = send_args(room)
    for key in ("user", "device", "mid", "envelope", "kind", "epoch", "allow_pending", "now"):
        assert kw[key] == sent[key], key
    # the record keeps the node the client was connected to; the home's journal adds its own
    (record,) = kw["audit"]
    assert record.source == "node:node-a" and record.room == room and record.user == "u1"
    ev = result.event
    assert (ev.room, ev.seq, ev.ts, ev.sender_user, ev.sender_device) == (room, 1, 1001, "u1", "d1")
    assert ev.payload == sent["envelope"] and ev.mid == sent["mid"] and not result.duplicate
    # the home published it (one publisher per room keeps its events in seq order)
    assert result.published and [e.seq for e in b.published] == [1] and a.published == []
    assert a.count("forwarded") == 1 and b.count("served") == 1
    # and the other way round: rooms homed at a are stored by a
    mine = room_homed_at("node-a", a.homes.nodes)
    local = await a.homes.append_message(mine, **send_args(mine))
    assert [r for r, _ in a.store.calls] == [mine] and a.count("local") == 1
    assert not local.published  # the handler publishes what its own node stored


async def test_the_homes_refusal_reaches_the_sender(pair: tuple[Node, Node]) -> None:
    a, b = pair
    room = room_homed_at("node-b", a.homes.nodes)
    b.store.fail = RequestError(ErrorCode.STALE_EPOCH, "epoch moved on")
    with pytest.raises(RequestError) as refused:
        await a.homes.append_message(room, **send_args(room))
    assert refused.value.code == ErrorCode.STALE_EPOCH
    assert a.store.calls == []  # a refusal is an answer: not stored anywhere


async def test_a_home_whose_store_is_unavailable_leaves_the_send_to_the_sender(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    room = room_homed_at("node-b", a.homes.nodes)
    b.store.fail = StoreUnavailable("fenced")
    result = await a.homes.append_message(room, **send_args(room))
    assert [r for r, _ in a.store.calls] == [room] and result.event.seq == 1
    assert a.count("fallback") == 1 and not result.published and b.published == []


async def test_a_silent_home_is_stored_around_and_skipped_for_a_while(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    room = room_homed_at("node-b", a.homes.nodes)
    # b stops taking requests without a goodbye (a crash, a lost subscription)
    await b.homes.broker.unsubscribe(b.homes.topic("node-b"), b.homes._on_message)
    await a.homes.append_message(room, **send_args(room))
    assert [r for r, _ in a.store.calls] == [room] and b.store.calls == []
    assert a.count("fallback") == 1
    # suspended: the next send does not wait for b at all
    seen: list[bytes] = []

    async def spy(topic: str, payload: bytes) -> None:
        seen.append(payload)

    await a.homes.broker.subscribe(b.homes.topic("node-b"), spy)
    await a.homes.append_message(room, **send_args(room, mid=b"n" * 16))
    assert seen == [] and len(a.store.calls) == 2 and a.count("fallback") == 2


async def test_a_goodbye_releases_forwards_waiting_on_that_home() -> None:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=60.0)
    try:
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()  # b takes the send and never finishes it
        waiting = asyncio.create_task(a.homes.append_message(room, **send_args(room)))
        await b.store.entered.wait()
        await b.homes._say("b")  # b stops: a stores the send itself, well before 60 s
        result = await asyncio.wait_for(waiting, 5.0)
        assert result.event.seq == 1 and [r for r, _ in a.store.calls] == [room]
        assert a.homes.nodes == ("node-a",)
        b.store.gate.set()
    finally:
        await a.close()
        await b.close()


async def test_forwards_a_home_takes_are_bounded() -> None:
    broker = InMemoryBroker()
    a, b = await cluster(broker, "node-a", "node-b", timeout=60.0, max_inflight=2)
    try:
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        held = [
            asyncio.create_task(
                a.homes.append_message(room, **send_args(room, mid=bytes([i]) * 16))
            )
            for i in range(2)
        ]

        async def both_taken() -> bool:
            return len(b.store.calls) == 2

        await until(both_taken)
        # a third forward: a is at its own bound of two waiting, so it stores this one itself
        third = await a.homes.append_message(room, **send_args(room, mid=b"c" * 16))
        assert third.event.seq == 1 and a.count("fallback") == 1
        b.store.gate.set()
        assert sorted(r.event.seq for r in await asyncio.gather(*held)) == [1, 2]
    finally:
        await a.close()
        await b.close()


async def test_a_busy_home_says_so_and_the_sender_stores_it() -> None:
    broker = InMemoryBroker()
    a, b = await cluster(broker, "node-a", "node-b", timeout=60.0)
    try:
        b.homes.max_inflight = 1
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        first = asyncio.create_task(a.homes.append_message(room, **send_args(room)))
        await b.store.entered.wait()
        second = await a.homes.append_message(room, **send_args(room, mid=b"s" * 16))
        assert [r for r, _ in a.store.calls] == [room] and second.event.seq == 1
        b.store.gate.set()
        assert (await first).event.seq == 1
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        pack_body("q"),
        pack_body([]),
        pack_body(["z", 1]),
        pack_body(["q", "node-a", 1]),  # short request
        pack_body(["q", "node-a", "1", "r", "u", "d", b"m", b"e", "message", 1, False, 1, []]),
        pack_body(["q", "node-a", 1, "r", "u", "d", b"m", b"e", "message", 1, False, 1, [[1]]]),
        pack_body(["q", "node-a", 1, "r", "u", "d", b"m", b"e", "message", 1, False, 1, [{}]]),
        b"\x91" + b"\xdd\xff\xff\xff\xff",  # a claimed 4-billion-element array
    ],
)
async def test_undecodable_messages_are_dropped(pair: tuple[Node, Node], payload: bytes) -> None:
    a, b = pair
    await a.homes.broker.publish(b.homes.topic("node-b"), payload)
    await a.homes.broker.publish(b.homes.topic(), payload)
    assert b.store.calls == [] and b.homes.nodes == ("node-a", "node-b")
    room = room_homed_at("node-b", a.homes.nodes)  # and b still serves
    assert (await a.homes.append_message(room, **send_args(room))).event.seq == 1
    assert b.count("served") == 1


async def test_nodes_not_heard_from_are_forgotten() -> None:
    broker = InMemoryBroker()
    a, b = await cluster(broker, "node-a", "node-b")
    try:
        b.stop.set()  # b stops saying hello without a goodbye
        assert b.task is not None
        await b.task

        async def forgotten() -> bool:
            return a.homes.nodes == ("node-a",)

        await until(forgotten)
        assert a.metrics.registry.get_sample_value("medrelay_cluster_nodes") == 1
    finally:
        await a.close()
        await b.homes.close()


@pytest.mark.parametrize(
    "answer",
    [
        ["r", 2, 3],  # short
        ["r", "seq", 3, False],
        ["r", 5, "ts", False],
        ["e", 999_999, "no such code", False],
        ["e", int(ErrorCode.FORBIDDEN), b"not text", False],
        ["x", 5, 6, False],
    ],
)
async def test_bad_answers_to_a_waiting_forward_are_dropped(answer: list[object]) -> None:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=60.0)
    try:
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        waiting = asyncio.create_task(a.homes.append_message(room, **send_args(room)))
        await b.store.entered.wait()
        ((rid, (_, future)),) = a.homes._pending.items()
        bad = [answer[0], rid, *answer[1:]]
        await a.homes.broker.publish(a.homes.topic("node-a"), pack_body(bad))
        assert not future.done()  # still waiting for the real answer
        b.store.gate.set()
        assert (await asyncio.wait_for(waiting, 5.0)).event.seq == 1
        assert a.store.calls == []
    finally:
        await a.close()
        await b.close()


async def test_a_retry_the_home_had_stored_comes_back_as_a_duplicate(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    room = room_homed_at("node-b", a.homes.nodes)
    b.store.duplicate = True
    result = await a.homes.append_message(room, **send_args(room))
    assert result.duplicate and result.published and result.event.seq == 1
    assert b.published == []  # a retry is not published again


async def test_a_late_answer_after_the_timeout_is_ignored() -> None:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=0.3)
    try:
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        fallback = await a.homes.append_message(room, **send_args(room))
        assert [r for r, _ in a.store.calls] == [room] and not fallback.published
        b.store.gate.set()  # b stores it after all and answers a forward nobody waits for

        async def answered() -> bool:
            return b.count("served") == 1 and not b.homes._serving

        await until(answered)
        assert a.homes._pending == {} and a.homes._pending_bytes == 0
    finally:
        await a.close()
        await b.close()


async def test_closing_releases_this_nodes_waiting_forwards() -> None:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=60.0)
    try:
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        waiting = asyncio.create_task(a.homes.append_message(room, **send_args(room)))
        await b.store.entered.wait()
        await a.close()  # a stops: its sender's send is stored here, not lost or cancelled
        result = await asyncio.wait_for(waiting, 5.0)
        assert [r for r, _ in a.store.calls] == [room] and result.event.seq == 1
        assert a.homes.nodes == ("node-a",)
        b.store.gate.set()
    finally:
        await b.close()


async def test_a_home_over_its_byte_budget_says_busy() -> None:
    a, b = await cluster(InMemoryBroker(), "node-a", "node-b", timeout=60.0)
    try:
        b.homes.max_bytes = 1500  # room for one 1 KiB envelope
        room = room_homed_at("node-b", a.homes.nodes)
        b.store.gate = asyncio.Event()
        first = asyncio.create_task(a.homes.append_message(room, **send_args(room)))
        await b.store.entered.wait()
        second = await asyncio.wait_for(
            a.homes.append_message(room, **send_args(room, mid=b"s" * 16)), 5.0
        )
        assert [r for r, _ in a.store.calls] == [room] and not second.published
        b.store.gate.set()
        assert (await first).published
        assert b.homes._serving_bytes == 0
    finally:
        await a.close()
        await b.close()


async def test_nodes_follow_a_new_stream_generation() -> None:
    broker = InMemoryBroker()
    a, b = await cluster(broker, "node-a", "node-b")
    try:
        scope = "gen-2"

        async def restored() -> str:
            return scope

        for n in (a, b):
            n.homes._read_scope = restored
        await a.homes._rescope()
        assert a.homes.topic() == "home:gen-2" and a.homes.nodes == ("node-a",)
        await b.homes._rescope()

        async def together_again() -> bool:
            return a.homes.nodes == b.homes.nodes == ("node-a", "node-b")

        await until(together_again)
        room = room_homed_at("node-b", a.homes.nodes)
        assert (await a.homes.append_message(room, **send_args(room))).published
    finally:
        await a.close()
        await b.close()
