"""``RedisBroker`` under Redis faults, each on a Redis of the test's own (another loopback
port): the server restarted, and a subscription dropped by Redis for an overrun output
buffer. After each the broker must reconnect, re-subscribe, call ``on_resync`` and carry new
publishes again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from medrelay_server.fanout.redis import BrokerUnavailable, RedisBroker

from tests.server.test_broker_contract import TIMEOUT, Sink, start_redis_broker, topic

from .procs import RedisServer, redis_cluster

pytestmark = pytest.mark.redis


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


class Resyncs:
    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Condition()

    async def __call__(self) -> None:
        self.count += 1
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, n: int, timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count >= n)


@pytest.fixture
async def node(own_redis: RedisServer) -> AsyncIterator[RedisBroker]:
    b = await start_redis_broker(own_redis.url, backoff_base=0.05, backoff_max=0.5)
    try:
        yield b
    finally:
        await b.close()


async def test_redis_restart_reconnects_resubscribes_and_resyncs(
    own_redis: RedisServer, node: RedisBroker
) -> None:
    resyncs = Resyncs()
    node.on_resync = resyncs
    other = await start_redis_broker(own_redis.url, backoff_base=0.05, backoff_max=0.5)
    try:
        topics = [topic() for _ in range(50)]
        sinks = [Sink() for _ in topics]
        for t, s in zip(topics, sinks, strict=True):
            await node.subscribe(t, s)
        await other.publish(topics[0], b"before")
        await sinks[0].wait_for(1)

        own_redis.kill()
        await other.publish(topics[0], b"lost while down")  # dropped, never raised
        with pytest.raises(BrokerUnavailable):
            await node.ping()
        own_redis.start()

        await resyncs.wait_for(1)
        await asyncio.wait_for(other.wait_live(), TIMEOUT)
        await node.ping()
        assert node.reconnects >= 1
        for t in topics:
            await other.publish(t, b"after")
        for s in sinks[1:]:
            assert await s.wait_for(1) == [b"after"]
        assert await sinks[0].wait_for(2) == [b"before", b"after"]
        assert other.dropped >= 1
    finally:
        await other.close()


async def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "late")
    b = RedisBroker(server.url, node_id="late", backoff_base=0.05, backoff_max=0.3)
    resyncs = Resyncs()
    b.on_resync = resyncs
    await b.start()
    try:
        t, sink = topic(), Sink()
        await b.subscribe(t, sink)  # registered while Redis is unreachable
        with pytest.raises(BrokerUnavailable):
            await b.ping()
        server.start()
        await asyncio.wait_for(b.wait_live(), TIMEOUT)
        await resyncs.wait_for(1)  # a topic was wanted while down: the node must resync
        await b.publish(t, b"hello")
        assert await sink.wait_for(1) == [b"hello"]
    finally:
        await b.close()
        server.kill()


async def test_output_buffer_overrun_drops_link_then_reconnect_and_resync(
    own_redis: RedisServer, node: RedisBroker
) -> None:
    admin = aioredis.Redis.from_url(own_redis.url)
    resyncs = Resyncs()
    node.on_resync = resyncs
    t = topic()
    release = asyncio.Event()
    got: list[bytes] = []
    stalled = asyncio.Event()

    async def slow(topic: str, payload: bytes) -> None:
        got.append(payload)
        stalled.set()
        await release.wait()  # the node stalls: Redis buffers for it, up to the limit

    try:
        await node.subscribe(t, slow)
        await admin.publish(t, b"first")
        await asyncio.wait_for(stalled.wait(), TIMEOUT)  # the reader now sits in the handler
        await admin.config_set("client-output-buffer-limit", "pubsub 1kb 1kb 0")
        chunk = b"\xa5" * 4096
        for _ in range(8):  # 16 MiB: more than the kernel's socket buffers hold
            async with admin.pipeline(transaction=False) as pipe:
                for _ in range(500):
                    pipe.publish(t, chunk)
                await pipe.execute()
        clients = await admin.client_list(_type="pubsub")
        assert not any(c.get("name") == f"medrelay-{node.node_id}" for c in clients), (
            "Redis should have dropped the stalled subscriber"
        )
        await admin.config_set("client-output-buffer-limit", "pubsub 32mb 8mb 60")
        assert resyncs.count == 0
        release.set()
        await resyncs.wait_for(1)
        await asyncio.wait_for(node.wait_live(), TIMEOUT)
        assert node.reconnects == 1
        assert len(got) < 8 * 500  # Redis dropped the backlog, not this process's memory

        after, sink = topic(), Sink()
        await node.subscribe(after, sink)
        await admin.publish(t, b"flows again")
        await admin.publish(after, b"and here")
        assert await sink.wait_for(1) == [b"and here"]
        assert got[-1] == b"flows again"
    finally:
        await admin.aclose()


async def test_redis_cluster_sharded_pubsub_and_a_shard_restart(tmp_path: Path) -> None:
    shards = redis_cluster(tmp_path / "cluster")
    try:
        a = await start_redis_broker(shards[0].url, backoff_base=0.05, backoff_max=0.5)
        b = await start_redis_broker(shards[1].url, backoff_base=0.05, backoff_max=0.5)
        resyncs = Resyncs()
        a.on_resync = resyncs
        try:
            assert a.sharded and b.sharded  # detected from cluster_enabled:1
            topics = [f"room:{i}" for i in range(30)]  # spread over every shard
            sinks = [Sink() for _ in topics]
            for t, s in zip(topics, sinks, strict=True):
                await a.subscribe(t, s)
            await asyncio.wait_for(a.wait_live(), TIMEOUT)
            assert len(a._links) == len(shards)  # one subscriber link per primary
            for t in topics:
                await b.publish(t, t.encode())
            for t, s in zip(topics, sinks, strict=True):
                assert await s.wait_for(1) == [t.encode()]

            shards[2].restart()  # same port, same nodes.conf: it rejoins owning its slots
            await asyncio.to_thread(shards[2].wait_cluster_ok)
            await resyncs.wait_for(1)
            await asyncio.wait_for(a.wait_live(), TIMEOUT)
            await asyncio.wait_for(b.wait_live(), TIMEOUT)
            for t in topics:
                await b.publish(t, b"again")
            for t, s in zip(topics, sinks, strict=True):
                assert (await s.wait_for(2))[-1] == b"again", t
        finally:
            await a.close()
            await b.close()
    finally:
        for s in shards:
            s.kill()
