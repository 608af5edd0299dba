"""The configured server (uvicorn, websockets-sansio) gives every connection the direct write
of ``gateway/direct.py``, and live deliveries take it: if an upgrade of uvicorn or
websockets removes the fast path, this fails instead of the fan-out silently slowing down."""

from __future__ import annotations

import gc
from typing import Any

import httpx
import msgpack
from medrelay_server.gateway.connection import Connection
from medrelay_server.gateway.direct import SharedFrames

from bench.stats import STAGES, gc_pauses, parse_gc_pauses, parse_send_stages, stage_means

from .conftest import Harness, three_in_a_room


def _count_paths(conn: Connection, counts: dict[str, int]) -> None:
    direct, queued = conn.write_now, conn.send_bytes
    assert direct is not None

    def write_now(data: bytes) -> bool:
        ok = direct(data)
        counts["direct"] += ok
        return ok

    async def send_bytes(data: bytes) -> None:
        counts["queued"] += 1
        await queued(data)

    conn.write_now, conn.send_bytes = write_now, send_bytes


async def test_live_deliveries_are_written_directly(harness: Harness) -> None:
    alice = await harness.client("alice")
    bob = await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    (bob_conn,) = [c for c in harness.gateway.registry.all() if c.user == "bob"]
    counts = {"direct": 0, "queued": 0}
    _count_paths(bob_conn, counts)
    sent = [await alice.send_text(room, f"obs {i}") for i in range(5)]
    got: list[int] = []
    while len(got) < len(sent):
        m = await bob.next_message()
        if m.kind == "message":
            got.append(m.seq)
    assert got == sent
    assert counts["direct"] >= len(sent)  # the events, plus any roster frames
    assert counts["queued"] == 0  # an idle loopback socket never needs the writer task


class CountingFrames(SharedFrames):
    """Records each payload it frames (a miss of its one-entry cache)."""

    __slots__ = ("framed",)

    def __init__(self) -> None:
        super().__init__()
        self.framed: list[dict[str, Any]] = []

    def wire(self, payload: bytes) -> bytes:
        if payload is not self._payload:
            self.framed.append(msgpack.unpackb(payload))
        return super().wire(payload)


async def test_an_event_is_framed_once_for_all_its_recipients(harness: Harness) -> None:
    frames = harness.gateway.frames = CountingFrames()  # before anyone connects
    alice, bob, carol, room = await three_in_a_room(harness)
    seq = await alice.send_text(room, "one event, three sockets")
    for client in (alice, bob, carol):
        while (m := await client.next_message()).kind != "message":
            pass
        assert m.seq == seq
    events = [f for f in frames.framed if f.get("t") == "deliver" and f.get("seq") == seq]
    assert len(events) == 1  # written to three sockets, framed once
    assert events[0]["kind"] == "message" and events[0]["room"] == room


async def test_send_store_time_is_exported(node: Harness) -> None:
    alice = await node.client("alice")
    room = await alice.create_room()
    for i in range(3):
        await alice.send_text(room, f"obs {i}")
    async with httpx.AsyncClient(base_url=node.server.http, timeout=10) as http:
        text = (await http.get("/metrics")).text
    counts = [
        line for line in text.splitlines() if line.startswith("medrelay_send_store_seconds_count")
    ]
    assert counts == ["medrelay_send_store_seconds_count 3.0"]
    assert 'medrelay_send_store_seconds_bucket{le="+Inf"} 3.0' in text
    # where that time went: each send's wait for its batch, and each batch's stages (one
    # send awaited after another: a batch each). On PostgreSQL the first batch in the room
    # reads it and the next two are stored in one call each (``store/onetrip.py``)
    one_trip = 0 if node.store.database.is_sqlite else 2
    assert "medrelay_send_wait_seconds_count 3.0" in text
    assert "medrelay_send_batch_sends_sum 3.0" in text
    assert f'medrelay_send_batches_total{{path="one_trip"}} {one_trip:.1f}' in text
    assert f'medrelay_send_batches_total{{path="full"}} {3 - one_trip:.1f}' in text
    assert 'medrelay_send_batches_total{path="later_call"} 0.0' in text
    for stage in ("begin", "read", "write", "commit"):
        assert f'medrelay_send_batch_seconds_count{{stage="{stage}"}} {3 - one_trip:.1f}' in text
    # the bench reads the same names (``bench/stats.py``) for its per-window breakdown
    read = parse_send_stages(text)
    misses = tuple(f"miss_{p}" for p in ("room", "role", "retried", "head"))
    gaps = tuple(f"gap_{r}" for r in ("broker", "notify", "reconnect", "poll"))  # per send
    keys = (*STAGES, "sends", "one_trip", "later_call", *misses, *gaps)
    expected = dict.fromkeys(keys, 3.0)
    expected.update(dict.fromkeys(("begin", "read", "write", "commit"), 3.0 - one_trip))
    expected["call"] = float(one_trip)
    assert {k: count for k, (_, count) in read.items() if count} == {
        k: v for k, v in expected.items() if v
    }
    means = stage_means({}, read)
    assert means["sends"] == 1.0 and means.get("one_trip", 0.0) == one_trip / 3
    # one node: its predictions held
    assert means.get("later_call", 0.0) == 0.0 and all(means[k] == 0.0 for k in misses)
    assert all(0 < means[k] < 10 for k in STAGES if k != "wait" and k in means)


async def test_the_bench_reads_the_collectors_pauses(node: Harness) -> None:
    """``bench.latency`` prints each window's collections from ``medrelay_gc_pause_seconds``
    (``heap.py``): a full collection between two readings shows as one more in generation 2,
    with its pause."""
    async with httpx.AsyncClient(base_url=node.server.http, timeout=10) as http:
        before = parse_gc_pauses((await http.get("/metrics")).text)
        gc.collect()
        after = parse_gc_pauses((await http.get("/metrics")).text)
    assert set(before) == set(after) == {0, 1, 2}
    window = gc_pauses(before, after)
    collections, pause = window[2]
    assert collections >= 1 and pause > 0
    assert all(n >= 0 and t >= 0 for n, t in window.values())


async def test_deliveries_are_counted_once_each(harness: Harness) -> None:
    """``medrelay_deliveries_total`` counts each event handed to a device, written at once
    or queued (the fan-out adds a whole event's deliveries at once)."""
    alice, bob, carol, room = await three_in_a_room(harness)
    registry = harness.gateway.metrics.registry
    queued: list[tuple[str, int]] = []
    delivery = harness.gateway.delivery
    journal_direct = delivery._on_written
    assert journal_direct is not None

    def direct(conns: list[Connection], room: str, seq: int) -> None:
        queued.extend((room, seq) for _ in conns)
        journal_direct(conns, room, seq)

    delivery._on_written = direct
    for conn in harness.gateway.registry.all():
        enqueue = conn.enqueue

        def counting(data: bytes, *, _enqueue: Any = enqueue, **kw: Any) -> bool:
            ok: bool = _enqueue(data, **kw)
            if ok and kw.get("event") is not None:
                queued.append(kw["event"])
            return ok

        conn.enqueue = counting  # type: ignore[method-assign]
    before = registry.get_sample_value("medrelay_deliveries_total") or 0.0
    sent = [await alice.send_text(room, f"count {i}") for i in range(3)]
    for client in (bob, carol):
        got: list[int] = []
        while len(got) < len(sent):
            m = await client.next_message()
            if m.kind == "message":
                got.append(m.seq)
        assert got == sent
    after = registry.get_sample_value("medrelay_deliveries_total") or 0.0
    assert sum(1 for _, seq in queued if seq in sent) >= 2 * len(sent)
    assert after - before == len(queued)
