"""Messaging through a real gateway: both directions, resume after being offline or dropped,
idempotent retries, history paging, no plaintext at rest, and refusals for non-members."""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import pytest
from medrelay_client.client import Client
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import (
    Ack,
    Error,
    GetRoster,
    History,
    HistoryPage,
    Receipt,
    Send,
    Sync,
    Synced,
)

from ..polling import until
from .conftest import Harness
from .rawclient import (
    TIMEOUT,
    RawClient,
    collect_until,
    envelope_for,
    next_of_kind,
    texts,
)


async def _pair(harness: Harness) -> tuple[Client, Client, str]:
    alice = await harness.client("alice")
    bob = await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    return alice, bob, room


def _strictly_increasing(seqs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(seqs))


async def test_two_clients_exchange_both_ways(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    s1 = await alice.send_text(room, "alice -> bob: K+ 6.1, repeat?")
    m1 = await next_of_kind(bob)
    assert (m1.seq, m1.body, m1.sender_user) == (
        s1,
        {"type": "text", "text": "alice -> bob: K+ 6.1, repeat?"},
        "alice",
    )
    assert m1.problem is None
    s2 = await bob.send_text(room, "bob -> alice: repeated, 6.0")
    seen_by_alice = await collect_until(alice, "bob -> alice: repeated, 6.0")
    m2 = seen_by_alice[-1]
    assert (m2.seq, m2.body, m2.sender_user, m2.problem) == (
        s2,
        {"type": "text", "text": "bob -> alice: repeated, 6.0"},
        "bob",
        None,
    )
    assert s2 > s1
    # alice's stream holds her own message before bob's answer, in seq order
    assert texts(seen_by_alice)[-2:] == ["alice -> bob: K+ 6.1, repeat?", m2.body["text"]]


async def test_offline_member_resumes_every_message_once_in_order(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    dave = await harness.client("dave")  # registers dave's device, so he can be added
    await dave.close()
    await alice.add(room, "dave")
    sent: dict[str, int] = {}
    for i in range(6):
        sender = alice if i % 2 == 0 else bob
        text = f"while dave was away #{i}"
        sent[text] = await sender.send_text(room, text)

    dave = await harness.client("dave", start=False)
    await dave.start()
    last = "while dave was away #5"
    got = await collect_until(dave, last, timeout=20)
    assert all(m.problem is None for m in got), [m.problem for m in got]
    assert _strictly_increasing([m.seq for m in got])
    assert sorted(texts(got)) == sorted(sent)
    assert {m.seq for m in got if m.kind == "message"} == set(sent.values())

    # and nothing comes again: the next event after them is the next new message
    seq = await alice.send_text(room, "sentinel")
    after = await collect_until(dave, "sentinel")
    assert texts(after) == ["sentinel"]
    assert [m.seq for m in after][-1] == seq
    assert _strictly_increasing([m.seq for m in got + after])


async def test_dropped_connection_reconnects_and_receives_everything_once(
    harness: Harness,
) -> None:
    alice, bob, room = await _pair(harness)
    first = bob.session
    await bob.drop_connection()
    sent = []
    for i in range(8):
        text = f"during the outage #{i}"
        await alice.send_text(room, text)
        sent.append(text)
    got = await collect_until(bob, sent[-1], timeout=20)
    assert bob.session is not first, "the client should have reconnected by itself"
    assert texts(got) == sent
    assert _strictly_increasing([m.seq for m in got])
    await alice.send_text(room, "after the outage")
    after = await collect_until(bob, "after the outage")
    assert texts(after) == ["after the outage"]


async def test_idempotent_retry_over_a_raw_socket(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    raw = await RawClient.open(harness.server.url, alice.keys, harness.token("alice"))
    try:
        sealed = await alice.logic.seal(room, {"type": "text", "text": "sent twice"})
        frame = Send(rid="dup", room=room, mid=sealed.mid, envelope=sealed.envelope)
        await raw.send(frame)
        await raw.send(frame)
        first = await raw.reply_to("dup")
        second = await raw.reply_to("dup")
        assert isinstance(first, Ack), first
        assert isinstance(second, Ack), second
        assert (first.seq, first.mid) == (second.seq, second.mid) == (first.seq, sealed.mid)

        events = await harness.store.room_events(room, 0, limit=1000)
        assert [ev.seq for ev in events if ev.mid == sealed.mid] == [first.seq]
        got = await collect_until(bob, "sent twice")
        assert texts(got) == ["sent twice"]

        rk = alice.keys.room(room)
        other = envelope_for(
            alice.keys.device,
            room,
            mid=sealed.mid,
            epoch=rk.current,
            roster_head=rk.heads[rk.current],
            counter=rk.counter + 100,
            secret=rk.epochs[rk.current],
            body={"type": "text", "text": "different bytes, same mid"},
        ).encode()
        reply = await raw.request(Send(rid="dup2", room=room, mid=sealed.mid, envelope=other))
        assert isinstance(reply, Error), reply
        assert reply.code == ErrorCode.IDEMPOTENCY_MISMATCH
        assert reply.rid == "dup2"
    finally:
        await raw.close()


async def test_history_pages_ascending_with_more(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    sent = [f"obs {i}" for i in range(7)]
    seqs = [await alice.send_text(room, t) for t in sent]

    pages: list[HistoryPage] = []
    before = 0
    while True:
        page: HistoryPage = await bob.request(
            History(rid=bob.rid(), room=room, before=before, limit=3), HistoryPage
        )
        pages.append(page)
        assert 0 < len(page.events) <= 3
        page_seqs = [ev.seq for ev in page.events]
        assert _strictly_increasing(page_seqs), page_seqs
        if before:
            assert page_seqs[-1] < before
        if not page.more:
            break
        assert len(page.events) == 3
        before = page_seqs[0]
        assert len(pages) < 20
    assert len(pages) >= 3
    assert all(p.more for p in pages[:-1]) and not pages[-1].more
    all_events = [ev for p in reversed(pages) for ev in p.events]
    all_seqs = [ev.seq for ev in all_events]
    assert _strictly_increasing(all_seqs)
    assert set(seqs) <= set(all_seqs)
    assert all_seqs[-1] == seqs[-1]


async def test_history_decrypts_messages_already_received_live(harness: Harness) -> None:
    """Reading back history is not a replay attack: the same event (same seq) read again
    must decrypt to what was sent."""
    alice, bob, room = await _pair(harness)
    sent = [f"obs {i}" for i in range(4)]
    for t in sent:
        await alice.send_text(room, t)
    await collect_until(bob, sent[-1])
    newest = await bob.history(room, limit=4)
    assert [(m.body, m.problem) for m in newest] == [
        ({"type": "text", "text": t}, None) for t in sent
    ]


async def test_database_holds_no_plaintext(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    markers = [f"PLAINTEXT-MARKER-{os.urandom(8).hex()}" for _ in range(3)]
    for m in markers[:2]:
        await alice.send_text(room, f"patient note {m}")
    await bob.send_text(room, f"reply {markers[2]}")
    await collect_until(alice, f"reply {markers[2]}")

    events = await harness.store.room_events(room, 0, limit=1000)
    last_payload = events[-1].payload
    raw = _database_bytes(harness.tmp)
    assert last_payload in raw, "control: the stored ciphertext should be in the file"
    for m in markers:
        assert m.encode() not in raw
        assert m.encode("utf-16-le") not in raw


def _database_bytes(tmp: Path) -> bytes:
    db = tmp / "medrelay.sqlite3"
    out = db.read_bytes()
    for suffix in ("-wal", "-journal"):
        extra = db.with_name(db.name + suffix)
        if extra.exists():
            out += extra.read_bytes()
    return out


async def test_non_member_is_forbidden_send_history_sync(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    await alice.send_text(room, "members only")
    mallory = await harness.client("mallory")

    env = envelope_for(mallory.keys.device, room)
    send = Send(rid=mallory.rid(), room=room, mid=env.header.mid, envelope=env.encode())
    with pytest.raises(RequestError) as sent:
        await mallory.request(send, Ack)
    assert sent.value.code == ErrorCode.FORBIDDEN

    with pytest.raises(RequestError) as hist:
        await mallory.request(
            History(rid=mallory.rid(), room=room, before=0, limit=50), HistoryPage
        )
    assert hist.value.code == ErrorCode.FORBIDDEN

    with pytest.raises(RequestError) as sync:
        await mallory.request(Sync(rid=mallory.rid(), rooms={room: 0}), Synced)
    assert sync.value.code == ErrorCode.FORBIDDEN

    with pytest.raises(RequestError) as roster:
        await mallory.request(GetRoster(rid=mallory.rid(), room=room), object)
    assert roster.value.code == ErrorCode.FORBIDDEN

    with pytest.raises(RequestError) as receipt:
        await mallory.request(Receipt(rid=mallory.rid(), room=room, seq=1), object)
    assert receipt.value.code == ErrorCode.FORBIDDEN

    # mallory's sync of no room delivers nothing of it, and the room still works for members
    synced = await mallory.request(Sync(rid=mallory.rid(), rooms={}), Synced)
    assert room not in synced.heads
    events = await harness.store.room_events(room, 0, limit=1000)
    assert all(ev.sender_user != "mallory" for ev in events)
    await asyncio.wait_for(bob.send_text(room, "still fine"), 10)
    assert texts(await collect_until(alice, "still fine"))[-1] == "still fine"


async def test_a_members_receipt_is_stored_with_the_journal_flush(harness: Harness) -> None:
    alice, bob, room = await _pair(harness)
    seq = await alice.send_text(room, "acknowledge me")
    await next_of_kind(bob)  # bob's client acknowledges what it received (cumulative)

    async def stored() -> bool:
        await harness.gateway.journal.flush()
        return await harness.store.receipt_of(room, bob.keys.device_id) >= seq

    await until(stored, timeout=TIMEOUT)
    acked = [r for r in await harness.store.audit_records(room=room) if r.action == "receipt"]
    assert any(r.device == bob.keys.device_id and (r.seq_to or 0) >= seq for r in acked)
