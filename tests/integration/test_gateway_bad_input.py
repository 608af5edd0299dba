"""Bad input over a raw socket: every case gets its documented error or close code, and the
server stays up: an already-connected pair of clients keeps exchanging messages afterwards
(I7: bounded resources, typed errors, never a crash)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_protocol import codec
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.frames import (
    Ack,
    Challenge,
    Deliver,
    Error,
    Frame,
    ListRooms,
    Rooms,
    Send,
    Sync,
    Synced,
)
from medrelay_server.settings import Limits
from websockets.exceptions import InvalidStatus

from .conftest import Harness, _harness, three_in_a_room
from .rawclient import (
    RawClient,
    assert_alive,
    close_code_after,
    collect_until,
    connect_ws,
    envelope_for,
    flip_signature,
    hello_for,
    raw_map,
    recv_frame,
    room_envelope,
    texts,
)


@dataclass
class World:
    harness: Harness
    alice: Client
    bob: Client
    carol: Client
    room: str
    raws: list[RawClient] = field(default_factory=list)

    async def raw(self, user: str = "carol", **kw: object) -> RawClient:
        client = {"alice": self.alice, "bob": self.bob, "carol": self.carol}[user]
        raw = await RawClient.open(
            self.harness.server.url, client.keys, self.harness.token(user), **kw
        )
        self.raws.append(raw)
        return raw

    async def alive(self) -> None:
        await assert_alive(self.alice, self.bob, self.room)
        await assert_alive(self.bob, self.alice, self.room)


async def _world(h: Harness) -> World:
    # carol holds the current epoch key before anyone seals for her
    return World(h, *await three_in_a_room(h))


@pytest.fixture
async def world(harness: Harness) -> AsyncIterator[World]:
    w = await _world(harness)
    try:
        yield w
    finally:
        for raw in w.raws:
            with contextlib.suppress(Exception):
                await raw.close()


@contextlib.asynccontextmanager
async def harness_with(tmp_path: Path, limits: Limits) -> AsyncIterator[Harness]:
    """Like the ``harness`` fixture, with custom limits."""
    gen = _harness(tmp_path, limits)
    h = await anext(gen)
    try:
        yield h
    finally:
        await gen.aclose()


# ------------------------------------------------------------------- framing


async def test_oversized_frame_gets_frame_too_large_and_close_4002(world: World) -> None:
    raw = await world.raw()
    await raw.send_raw(os.urandom(600 * 1024))
    code, frames = await raw.closed_with()
    errors = [f for f in frames if isinstance(f, Error)]
    assert [e.code for e in errors] == [ErrorCode.FRAME_TOO_LARGE]
    assert code == CloseCode.FRAME_TOO_LARGE
    await world.alive()


async def test_text_frame_closes_4001(world: World) -> None:
    raw = await world.raw()
    await raw.send_raw('{"t": "list_rooms", "rid": "x"}')
    code, _ = await raw.closed_with()
    assert code == CloseCode.UNSUPPORTED_DATA
    await world.alive()


@pytest.mark.parametrize(
    "data",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x82\xa1t\xaalist_rooms",  # truncated map
        b"\x81\xa1t\xaalist_rooms\x00",  # trailing bytes
        b"\x82\xa1t\xaalist_rooms\xa1t\xaalist_rooms",  # duplicate key
        b"\x81\x01\x02",  # integer map key
        b"\xc7\x01\x05\x00",  # ext type
    ],
    ids=["reserved-byte", "truncated", "trailing", "duplicate-key", "int-key", "ext"],
)
async def test_malformed_msgpack_is_bad_frame_and_connection_stays(
    world: World, data: bytes
) -> None:
    raw = await world.raw()
    error = await raw.error_for(data, None)
    assert error.code == ErrorCode.BAD_FRAME
    reply = await raw.request(ListRooms(rid="after"))
    assert isinstance(reply, Rooms)
    assert world.room in {r.room for r in reply.rooms}
    await world.alive()


async def test_unknown_frame_type(world: World) -> None:
    raw = await world.raw()
    for t in ("no_such_frame", "welcome", "deliver"):  # unknown, and server-only types
        error = await raw.error_for(raw_map(t=t, rid=f"u-{t}"), f"u-{t}")
        assert error.code == ErrorCode.UNKNOWN_FRAME_TYPE
    error = await raw.error_for(raw_map(rid="no-t"), "no-t")
    assert error.code == ErrorCode.UNKNOWN_FRAME_TYPE
    assert isinstance(await raw.request(ListRooms(rid="after")), Rooms)
    await world.alive()


async def test_wrong_field_types_are_invalid_field_with_rid(world: World) -> None:
    raw = await world.raw()
    mid, env = os.urandom(16), b"\x01"
    cases = [
        (raw_map(t="send", rid="w1", room=5, mid=mid, envelope=env), "w1"),
        (raw_map(t="send", rid="w2", room=world.room, mid="not bytes", envelope=env), "w2"),
        (raw_map(t="send", rid="w3", room=world.room, mid=b"short", envelope=env), "w3"),
        (raw_map(t="history", rid="w4", room=world.room, before="zero"), "w4"),
        (raw_map(t="history", rid="w5", room=world.room, before=-1), "w5"),
        (raw_map(t="history", rid="w6", room=world.room, before=0, limit=True), "w6"),
        (raw_map(t="sync", rid="w7", rooms=[world.room]), "w7"),
        (raw_map(t="list_rooms", rid="w8", extra_field=1), "w8"),
        (raw_map(t="send", rid="w9", room=world.room, mid=mid), "w9"),  # missing field
        (raw_map(t="list_rooms", rid=7), None),  # rid itself unparseable: no rid to echo
        (raw_map(t="list_rooms", rid="r" * 65), None),
    ]
    for data, rid in cases:
        error = await raw.error_for(data, rid)
        assert (error.code, error.rid) == (ErrorCode.INVALID_FIELD, rid), data
    assert isinstance(await raw.request(ListRooms(rid="after")), Rooms)
    await world.alive()


# ------------------------------------------------------------------- sends


async def test_send_to_unknown_room_is_forbidden(world: World) -> None:
    raw = await world.raw()
    env = envelope_for(world.carol.keys.device, "no-such-room")
    reply = await raw.request(
        Send(rid="s1", room="no-such-room", mid=env.header.mid, envelope=env.encode())
    )
    assert isinstance(reply, Error) and reply.code == ErrorCode.FORBIDDEN and reply.rid == "s1"
    await world.alive()


async def test_forged_sender_device_is_bad_signature(world: World) -> None:
    raw = await world.raw()
    cases = {
        # names carol's device (this connection's), signed by some other key
        "other-key": envelope_for(
            world.carol.keys.device, world.room, signer=SigningKey.generate()
        ),
        # a well-signed envelope of alice's device, sent on carol's connection
        "other-device": envelope_for(world.alice.keys.device, world.room),
    }
    for name, env in cases.items():
        reply = await raw.request(
            Send(rid=name, room=world.room, mid=env.header.mid, envelope=env.encode())
        )
        assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_SIGNATURE, (name, reply)
        assert reply.rid == name
    events = await world.harness.store.room_events(world.room, 0, limit=1000)
    assert not any(ev.mid in {e.header.mid for e in cases.values()} for ev in events)
    await world.alive()


async def test_flipped_signature_is_bad_signature(world: World) -> None:
    raw = await world.raw()
    env = room_envelope(world.carol.keys, world.room, {"type": "text", "text": "tampered"})
    reply = await raw.request(
        Send(rid="b1", room=world.room, mid=env.header.mid, envelope=flip_signature(env.encode()))
    )
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_SIGNATURE
    assert reply.rid == "b1"
    # the untampered bytes are still accepted: the refusal was about the signature only
    ok = await raw.request(
        Send(rid="b2", room=world.room, mid=env.header.mid, envelope=env.encode())
    )
    assert isinstance(ok, Ack), ok
    await world.alive()


async def test_replayed_mid_with_other_bytes_is_idempotency_mismatch(world: World) -> None:
    raw = await world.raw()
    keys = world.carol.keys
    env = room_envelope(keys, world.room, {"type": "text", "text": "original"})
    first = await raw.request(
        Send(rid="i1", room=world.room, mid=env.header.mid, envelope=env.encode())
    )
    assert isinstance(first, Ack)
    other = room_envelope(keys, world.room, {"type": "text", "text": "other"}, mid=env.header.mid)
    reply = await raw.request(
        Send(rid="i2", room=world.room, mid=env.header.mid, envelope=other.encode())
    )
    assert isinstance(reply, Error) and reply.code == ErrorCode.IDEMPOTENCY_MISMATCH
    assert reply.rid == "i2"
    again = await raw.request(
        Send(rid="i3", room=world.room, mid=env.header.mid, envelope=env.encode())
    )
    assert isinstance(again, Ack) and again.seq == first.seq
    await world.alive()


async def test_flood_is_rate_limited_with_retry_after(tmp_path: Path) -> None:
    """A slow refill (one token every 10 s) so that no timing of the run can refill the
    bucket during the flood: exactly the burst is accepted, the rest is refused."""
    limits = Limits(sends_per_second=0.1, send_burst=5)
    async with harness_with(tmp_path, limits) as h:
        world = await _world(h)
        n = limits.send_burst + 20
        raw = await world.raw()
        try:
            envs = [
                room_envelope(world.carol.keys, world.room, {"type": "text", "text": f"f{i}"})
                for i in range(n)
            ]
            for i, env in enumerate(envs):
                await raw.send(
                    Send(rid=f"f{i}", room=world.room, mid=env.header.mid, envelope=env.encode())
                )
            replies = [await raw.reply_to(f"f{i}") for i in range(n)]
        finally:
            await raw.close()
        acks = [r for r in replies if isinstance(r, Ack)]
        limited = [r for r in replies if isinstance(r, Error)]
        assert all(e.code == ErrorCode.RATE_LIMITED for e in limited), limited
        assert len(acks) == limits.send_burst  # carol's client had not sent yet
        assert len(limited) == n - limits.send_burst
        assert all(e.retry_after_ms is not None and e.retry_after_ms > 0 for e in limited)
        await assert_alive(world.alice, world.bob, world.room)


# ------------------------------------------------------------------- handshake


async def test_no_hello_within_deadline_closes_4003(tmp_path: Path) -> None:
    async with harness_with(tmp_path, Limits(handshake_seconds=0.3)) as h:
        alice = await h.client("alice")
        bob = await h.client("bob")
        room = await alice.create_room()
        await alice.add(room, "bob")
        ws = await connect_ws(h.server.url, token=h.token("eve"))
        assert isinstance(await recv_frame(ws), Challenge)
        code, frames = await close_code_after(ws, timeout=5)
        assert code == CloseCode.HANDSHAKE_TIMEOUT
        assert frames == []
        await assert_alive(alice, bob, room)


async def _handshake_close(h: Harness, hello_bytes_for: object, **kw: object) -> int | None:
    ws = await connect_ws(h.server.url, **kw)  # type: ignore[arg-type]
    challenge = await recv_frame(ws)
    assert isinstance(challenge, Challenge)
    data = hello_bytes_for(challenge.nonce)  # type: ignore[operator]
    await ws.send(data)
    code, frames = await close_code_after(ws)
    assert not any(isinstance(f, Frame) and f.TYPE == "welcome" for f in frames)
    return code


async def test_bad_token_closes_4004(world: World) -> None:
    h = world.harness
    keys = KeyStore.create("eve")
    other_issuer = h.issuer.__class__()
    for token in ("not-a-token", "mrdev1.e30.AAAA", other_issuer.issue("eve", 2_000_000_000)):
        in_hello = await _handshake_close(
            h, lambda nonce, t=token: codec.encode(hello_for(keys, nonce, t))
        )
        assert in_hello == CloseCode.AUTH_FAILED
        on_upgrade = await _handshake_close(
            h, lambda nonce: codec.encode(hello_for(keys, nonce)), token=token
        )
        assert on_upgrade == CloseCode.AUTH_FAILED
    expired = h.issuer.issue("eve", 1_000_000, ttl=10)
    code = await _handshake_close(h, lambda nonce: codec.encode(hello_for(keys, nonce, expired)))
    assert code == CloseCode.AUTH_FAILED
    await world.alive()


async def test_proof_over_wrong_nonce_closes_4004(world: World) -> None:
    h = world.harness
    keys = world.carol.keys
    code = await _handshake_close(
        h,
        lambda _nonce: codec.encode(hello_for(keys, os.urandom(32), h.token("carol"))),
    )
    assert code == CloseCode.AUTH_FAILED
    # a proof for the right nonce but under another user's token is refused as well
    code = await _handshake_close(
        h, lambda nonce: codec.encode(hello_for(keys, nonce, h.token("alice")))
    )
    assert code == CloseCode.AUTH_FAILED
    await world.alive()


async def test_first_frame_not_hello_closes_4000(world: World) -> None:
    h = world.harness
    for data in (codec.encode(ListRooms(rid="x")), b"\xc1", raw_map(t="nope")):
        code = await _handshake_close(h, lambda _n, d=data: d, token=h.token("carol"))
        assert code == CloseCode.PROTOCOL_ERROR
    await world.alive()


async def _refused_at_upgrade(h: Harness, **kw: object) -> int | None:
    """The close code of a connection the server refuses before any frame (None if the
    upgrade itself was refused with an HTTP status instead)."""
    try:
        ws = await connect_ws(h.server.url, token=h.token("carol"), **kw)  # type: ignore[arg-type]
    except InvalidStatus as exc:
        pytest.fail(
            f"refused with HTTP {exc.response.status_code} on the upgrade, "
            "so the client never sees a close code"
        )
    code, _ = await close_code_after(ws)
    return code


async def test_missing_subprotocol_closes_4000(world: World) -> None:
    try:
        code = await _refused_at_upgrade(world.harness, subprotocols=())
        assert code == CloseCode.PROTOCOL_ERROR
    finally:
        await world.alive()


async def test_origin_not_allowed_closes_4013(world: World) -> None:
    try:
        code = await _refused_at_upgrade(world.harness, origin="https://evil.example")
        assert code == CloseCode.ORIGIN_REFUSED
    finally:
        await world.alive()


async def test_too_many_connections_for_one_device_closes_4008(world: World) -> None:
    h = world.harness
    per_device = Limits().connections_per_device  # what the harness fixture runs with
    keys = KeyStore.create("frank")
    opened = [await RawClient.open(h.server.url, keys, h.token("frank")) for _ in range(per_device)]
    world.raws.extend(opened)
    code = await _handshake_close(
        h, lambda nonce: codec.encode(hello_for(keys, nonce)), token=h.token("frank")
    )
    assert code == CloseCode.TOO_MANY_CONNECTIONS
    for raw in opened:  # the earlier ones are untouched
        assert isinstance(await raw.request(ListRooms(rid="still")), Rooms)
    await opened[0].close()
    await opened[0].ws.wait_closed()
    # a freed slot can be used again (once the server noticed the close)
    async with asyncio.timeout(10):
        while True:
            ws = await connect_ws(h.server.url, token=h.token("frank"))
            challenge = await recv_frame(ws)
            assert isinstance(challenge, Challenge)
            await ws.send(codec.encode(hello_for(keys, challenge.nonce)))
            try:
                reply = await recv_frame(ws)
            except Exception:
                assert ws.close_code == CloseCode.TOO_MANY_CONNECTIONS
                continue
            assert reply.TYPE == "welcome"
            await ws.close()
            break
    await world.alive()


SMALL_QUEUE = Limits(outbound_queue=8, sends_per_second=10_000, send_burst=10_000)


async def test_slow_consumer_is_closed_4006(tmp_path: Path) -> None:
    async with harness_with(tmp_path, SMALL_QUEUE) as h:
        alice, bob, carol, room = await three_in_a_room(h)
        await carol.close()
        start = carol.keys.room(room).last_seq

        slow = await RawClient.open(
            h.server.url, carol.keys, h.token("carol"), max_queue=1, rcvbuf=4096
        )
        synced = await slow.request(Sync(rid="sync", rooms={room: start}))
        assert isinstance(synced, Synced)

        # large messages fill the socket buffers quickly; carol never reads meanwhile
        big = "v" * 60_000
        n = 120
        last = ""
        for i in range(n):
            last = f"{i} {big}"
            await alice.send_text(room, last)
        await collect_until(bob, last, timeout=30)  # every event was offered to carol too

        code, frames = await slow.closed_with(timeout=20)
        assert code == CloseCode.SLOW_CONSUMER
        got = [f.seq for f in slow.pushed + frames if isinstance(f, Deliver)]
        assert got == list(range(start + 1, start + 1 + len(got))), "in order, once, no gap"
        assert len(got) < n, "the slow consumer was cut off, not buffered without limit"
        await assert_alive(alice, bob, room)


async def test_resume_of_a_backlog_larger_than_the_outbound_queue(tmp_path: Path) -> None:
    """After a slow-consumer close (or any absence) the client resumes from its last seq
    and reads promptly: it must catch up, however long the backlog is compared with the
    outbound queue."""
    async with harness_with(tmp_path, SMALL_QUEUE) as h:
        alice, bob, carol, room = await three_in_a_room(h)
        await carol.close()
        sent = [f"backlog {i}" for i in range(4 * SMALL_QUEUE.outbound_queue)]
        for text in sent:
            await alice.send_text(room, text)
        carol = await h.client("carol", start=False)
        start = asyncio.create_task(carol.start())
        try:
            got = await collect_until(carol, sent[-1], timeout=10)
        finally:
            start.cancel()
        assert texts(got) == sent
        await assert_alive(alice, bob, room)


# ------------------------------------------------------------------- http


async def test_health_ready_and_metrics(world: World) -> None:
    raw = await world.raw()
    await raw.error_for(b"\xc1", None)  # one BAD_FRAME for the error counter
    async with httpx.AsyncClient(base_url=world.harness.server.http, timeout=10) as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"store": "ok", "broker": "ok"}
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
    assert "medrelay_connections" in text
    assert "medrelay_errors_total" in text
    connections = re.search(r"^medrelay_connections (\S+)$", text, re.M)
    assert connections is not None and float(connections.group(1)) >= 4  # 3 clients + raw
    bad_frames = re.search(r'^medrelay_errors_total\{code="1000"\} (\S+)$', text, re.M)
    assert bad_frames is not None and float(bad_frames.group(1)) >= 1
    await world.alive()
