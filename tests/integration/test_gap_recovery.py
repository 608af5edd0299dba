"""The broker is only the fast path (I8): lost publishes are gaps that nodes detect by seq
and fill from the store, or catch on the slow poll when nothing else arrives."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from medrelay_client.client import Client
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.settings import Limits

from .conftest import Harness, _harness
from .rawclient import collect_until, texts


class LossyBroker(InMemoryBroker):
    """Drops the room publishes that ``drop(n)`` selects (n counts room publishes from 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.dropping = False
        self.every = 1

    async def publish(self, topic: str, payload: bytes) -> None:
        if topic.startswith("room:") and self.dropping:
            self.count += 1
            if self.count % self.every == 0:
                return
        await super().publish(topic, payload)


@asynccontextmanager
async def lossy(tmp_path: Path, limits: Limits) -> AsyncIterator[tuple[Harness, LossyBroker]]:
    broker = LossyBroker()
    gen = _harness(tmp_path, limits, broker)
    h = await anext(gen)
    try:
        yield h, broker
    finally:
        await gen.aclose()


async def _pair(h: Harness) -> tuple[Client, Client, str]:
    alice = await h.client("alice")
    bob = await h.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    return alice, bob, room


async def test_every_other_publish_lost_is_filled_from_the_store(tmp_path: Path) -> None:
    async with lossy(tmp_path, Limits(poll_interval=3600)) as (h, broker):
        alice, bob, room = await _pair(h)
        broker.dropping, broker.every = True, 2
        sent = [f"vitals {i}" for i in range(11)]  # publishes 2, 4, ... 10 are lost; 11 is not
        for text in sent:
            await alice.send_text(room, text)
        got = await collect_until(bob, sent[-1], timeout=10)
        assert texts(got) == sent
        seqs = [m.seq for m in got if m.kind == "message"]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_silent_broker_is_caught_by_the_slow_poll(tmp_path: Path) -> None:
    async with lossy(tmp_path, Limits(poll_interval=0.05)) as (h, broker):
        alice, bob, room = await _pair(h)
        broker.dropping, broker.every = True, 1  # nothing reaches other connections live
        sent = ["first", "second", "third"]
        for text in sent:
            await alice.send_text(room, text)
        got = await collect_until(bob, sent[-1], timeout=10)
        assert texts(got) == sent
        assert broker.count >= len(sent)  # the broker really dropped them
