"""The broker is only the fast path (I8): lost publishes are gaps that nodes detect by seq
and fill from the store, or catch on the slow poll when nothing else arrives."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from medrelay_client.client import Client
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.settings import Limits

from ..polling import until
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
        # each gap was shown by a later publish and read from the store at most once (one
        # read may fill several); operators see the count. The wait before that read is
        # tested in tests/server/test_delivery_gaps.py
        reads = _gap_reads(h)
        assert 1 <= reads["broker"] <= 5 and reads["poll"] == 0, reads


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
        assert _gap_reads(h)["poll"] >= 1


def _gap_reads(h: Harness) -> dict[str, float]:
    """``medrelay_gap_reads_total`` by reason, from the app's metrics."""
    registry = h.gateway.metrics.registry
    return {
        reason: registry.get_sample_value("medrelay_gap_reads_total", {"reason": reason}) or 0.0
        for reason in ("broker", "notify", "reconnect", "poll")
    }


class _Reads:
    """Counts the store reads the slow poll could make."""

    def __init__(self, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in ("last_seqs", "room_state", "current_rooms", "rooms_for_user"):
            original = getattr(h.store, name)

            async def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
                self.calls[_name] += 1
                return await _f(*args)

            monkeypatch.setattr(h.store, name, counted)


async def test_the_slow_poll_reads_all_rooms_and_users_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One read for every subscribed room (``resync``) and one for every connected user
    (``resync_users``), not one each: with thousands of them the poll was a burst of reads
    that held back live delivery."""
    async with lossy(tmp_path, Limits(poll_interval=3600)) as (h, broker):
        alice, bob, room = await _pair(h)
        other = await alice.create_room()
        await alice.add(other, "bob")
        await bob.wait_for_key(other)
        broker.dropping = True  # every room publish from here on is lost
        await alice.send_text(room, "in the first room")
        await alice.send_text(other, "in the second room")
        reads = _Reads(h, monkeypatch)
        await h.gateway.delivery.resync()
        assert reads.calls == Counter(last_seqs=1)
        assert texts(await collect_until(bob, "in the first room", timeout=10)) == [
            "in the first room"
        ]
        # a join bob's connection missed (its user notice lost): the users' poll finds it
        hub = h.gateway.delivery.hubs[other]
        conn = next(c for c in hub.conns if c.user == "bob")
        await h.gateway.delivery.unsubscribe(conn, other)
        assert other not in conn.cursors
        await h.gateway.delivery.resync_users()
        assert reads.calls == Counter(last_seqs=1, current_rooms=1)

        async def joined() -> bool:
            return other in conn.cursors

        await until(joined)
        assert "in the second room" in texts(
            await collect_until(bob, "in the second room", timeout=10)
        )
