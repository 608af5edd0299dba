"""The ``Broker`` contract (``medrelay_server.fanout.base``), run against every implementation:
``InMemoryBroker`` and ``RedisBroker`` on the real Redis at 127.0.0.1:6379.

Redis tests are marked ``redis``; when Redis is unreachable they fail (never skip). Every test
uses topics of its own, so runs and nodes sharing the Redis never see each other. Waits are on
conditions, never on sleeps: "nothing else arrived" is shown by a later payload from the same
publisher arriving (per-publisher order).

The ``nodes`` fixture makes "nodes": for Redis each is its own ``RedisBroker`` (its own
connections); in memory all nodes of one process share one broker, which is what the
embedded default is.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from medrelay_server.fanout.base import Broker
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.fanout.redis import BrokerUnavailable, RedisBroker

REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT = 10.0

NewNode = Callable[[], Awaitable[Broker]]


class Sink:
    """A handler that records what it gets and lets a test wait for a count."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self._changed = asyncio.Condition()

    async def __call__(self, topic: str, payload: bytes) -> None:
        self.got.append((topic, payload))
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> list[bytes]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.got) >= n)
        return self.payloads

    @property
    def payloads(self) -> list[bytes]:
        return [p for _, p in self.got]


def topic() -> str:
    return f"test:{secrets.token_hex(8)}"


async def start_redis_broker(url: str = REDIS_URL, **kw: object) -> RedisBroker:
    broker = RedisBroker(url, node_id=f"test-{secrets.token_hex(3)}", **kw)  # type: ignore[arg-type]
    await broker.start()
    try:
        await asyncio.wait_for(broker.wait_live(), TIMEOUT)
    except TimeoutError:
        await broker.close()
        pytest.fail(f"Redis at {url} is unreachable (the redis tests need it running)")
    await broker.ping()
    return broker


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[NewNode]:
    started: list[Broker] = []
    shared = InMemoryBroker()

    async def new() -> Broker:
        if request.param == "memory":
            if not started:
                await shared.start()
                started.append(shared)
            return shared
        broker = await start_redis_broker()
        started.append(broker)
        return broker

    try:
        yield new
    finally:
        for b in started:
            await b.close()


async def test_publish_reaches_subscriber(nodes: NewNode) -> None:
    b = await nodes()
    t, sink = topic(), Sink()
    await b.subscribe(t, sink)
    await b.publish(t, b"hello")
    assert await sink.wait_for(1) == [b"hello"]
    assert sink.got[0][0] == t


async def test_per_publisher_order(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, sink = topic(), Sink()
    await sub.subscribe(t, sink)
    sent = [i.to_bytes(4, "big") for i in range(500)]
    for p in sent:
        await pub.publish(t, p)
    assert await sink.wait_for(len(sent)) == sent


async def test_payloads_are_opaque_bytes(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, sink = topic(), Sink()
    await sub.subscribe(t, sink)
    payloads = [
        b"",
        b"\x00",
        b"\xff\xfe\xfd not utf-8 \xc3\x28 \x80",
        b"\r\n*1\r\n$4\r\nPING\r\n",  # looks like RESP: still just bytes
        os.urandom(256 * 1024),
    ]
    for p in payloads:
        await pub.publish(t, p)
    assert await sink.wait_for(len(payloads)) == payloads
    assert all(isinstance(p, bytes) for p in sink.payloads)


async def test_unsubscribe_stops_delivery_to_that_handler(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, gone, stays = topic(), Sink(), Sink()
    await sub.subscribe(t, gone)
    await sub.subscribe(t, stays)
    await pub.publish(t, b"1")
    await gone.wait_for(1)
    await sub.unsubscribe(t, gone)
    await pub.publish(t, b"2")
    await pub.publish(t, b"3")
    assert await stays.wait_for(3) == [b"1", b"2", b"3"]
    assert gone.payloads == [b"1"]


async def test_last_unsubscribe_then_resubscribe(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, first, again, witness = topic(), Sink(), Sink(), Sink()
    await sub.subscribe(t, first)
    await sub.unsubscribe(t, first)
    await pub.publish(t, b"while nobody listens")
    await sub.subscribe(t, again)
    await pub.publish(t, b"back")
    assert await again.wait_for(1) == [b"back"]
    w = topic()
    await sub.subscribe(w, witness)
    await pub.publish(w, b"later")
    await witness.wait_for(1)
    assert first.payloads == []
    assert again.payloads == [b"back"]


async def test_multiple_handlers_each_get_every_payload(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t = topic()
    sinks = [Sink() for _ in range(3)]
    for s in sinks:
        await sub.subscribe(t, s)
    await pub.publish(t, b"a")
    await pub.publish(t, b"b")
    for s in sinks:
        assert await s.wait_for(2) == [b"a", b"b"]


async def test_same_handler_twice_is_counted(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, sink = topic(), Sink()
    await sub.subscribe(t, sink)
    await sub.subscribe(t, sink)
    await pub.publish(t, b"x")
    assert await sink.wait_for(2) == [b"x", b"x"]
    await sub.unsubscribe(t, sink)
    await pub.publish(t, b"y")
    assert await sink.wait_for(3) == [b"x", b"x", b"y"]


async def test_a_failing_handler_does_not_stop_the_others(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    t, before, after = topic(), Sink(), Sink()

    async def boom(topic: str, payload: bytes) -> None:
        raise RuntimeError("handler bug")

    await sub.subscribe(t, before)
    await sub.subscribe(t, boom)
    await sub.subscribe(t, after)
    await pub.publish(t, b"1")
    await pub.publish(t, b"2")
    assert await before.wait_for(2) == [b"1", b"2"]
    assert await after.wait_for(2) == [b"1", b"2"]


async def test_topics_are_isolated(nodes: NewNode) -> None:
    pub, sub = await nodes(), await nodes()
    a, b = topic(), topic()
    sink_a, sink_b = Sink(), Sink()
    await sub.subscribe(a, sink_a)
    await sub.subscribe(b, sink_b)
    await pub.publish(b, b"for b")
    await pub.publish(topic(), b"for nobody")
    await pub.publish(a, b"for a")
    assert await sink_a.wait_for(1) == [b"for a"]
    assert await sink_b.wait_for(1) == [b"for b"]
    assert {t for t, _ in sink_a.got} == {a}
    assert {t for t, _ in sink_b.got} == {b}


async def test_nodes_see_each_others_publishes(nodes: NewNode) -> None:
    n1, n2 = await nodes(), await nodes()
    t, s1, s2 = topic(), Sink(), Sink()
    await n1.subscribe(t, s1)
    await n2.subscribe(t, s2)
    await n1.publish(t, b"from n1")
    await n2.publish(t, b"from n2")
    for s in (s1, s2):
        assert sorted(await s.wait_for(2)) == [b"from n1", b"from n2"]


async def test_unsubscribed_node_gets_nothing_others_still_do(nodes: NewNode) -> None:
    n1, n2 = await nodes(), await nodes()
    t, s1, s2 = topic(), Sink(), Sink()
    await n1.subscribe(t, s1)
    await n2.subscribe(t, s2)
    await n2.unsubscribe(t, s2)
    await n1.publish(t, b"only n1")
    await n1.publish(t, b"still only n1")
    assert await s1.wait_for(2) == [b"only n1", b"still only n1"]
    assert s2.payloads == []


async def test_ping_when_up(nodes: NewNode) -> None:
    await (await nodes()).ping()


# ------------------------------------------------------------------- Redis specifics


@pytest.mark.redis
async def test_redis_subscribes_only_to_requested_topics() -> None:
    b = await start_redis_broker()
    try:
        t, sink = topic(), Sink()
        await b.subscribe(t, sink)
        probe = await start_redis_broker()
        try:
            assert probe._pub is not None
            channels = await probe._pub.execute_command("PUBSUB", "CHANNELS", "test:*")
            assert t.encode() in channels
            await b.unsubscribe(t, sink)
            await b.publish(topic(), b"barrier")  # same connection order: unsub processed
            w, witness = topic(), Sink()
            await b.subscribe(w, witness)
            channels = await probe._pub.execute_command("PUBSUB", "CHANNELS", "test:*")
            assert t.encode() not in channels
        finally:
            await probe.close()
    finally:
        await b.close()


@pytest.mark.redis
async def test_redis_sharded_mode_on_a_standalone_server() -> None:
    n1 = await start_redis_broker(sharded=True)
    n2 = await start_redis_broker(sharded=True)
    classic = await start_redis_broker(sharded=False)
    try:
        t, s1, s_classic = topic(), Sink(), Sink()
        await n1.subscribe(t, s1)
        await classic.subscribe(t, s_classic)
        await n2.publish(t, b"sharded")
        await classic.publish(t, b"classic")
        assert await s1.wait_for(1) == [b"sharded"]
        assert await s_classic.wait_for(1) == [b"classic"]  # separate namespaces
    finally:
        for b in (n1, n2, classic):
            await b.close()


async def test_redis_ping_raises_when_unreachable() -> None:
    from tests.multinode.procs import free_port

    b = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", node_id="nobody")
    await b.start()
    try:
        with pytest.raises(BrokerUnavailable):
            await b.ping()
        await b.publish(topic(), b"dropped, not raised")
        assert b.dropped == 1
    finally:
        await b.close()
