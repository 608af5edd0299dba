"""Revocation (I2): the removal committed at seq L cuts the removed member off at L, and
what follows is under an epoch key they never received."""

from __future__ import annotations

import asyncio
import time

import pytest
from medrelay_client.client import Client, Message
from medrelay_protocol.envelope import Envelope, open_message
from medrelay_protocol.errors import DecryptionFailed

from .conftest import Harness
from .rawclient import collect_until


async def _room_of_four(h: Harness) -> tuple[Client, Client, Client, Client, str]:
    alice, bob, carol, dave = [await h.client(u) for u in ("alice", "bob", "carol", "dave")]
    room = await alice.create_room()
    for user in ("bob", "carol", "dave"):
        await alice.add(room, user)
    for c in (bob, carol, dave):
        await c.wait_for_key(room)
    return alice, bob, carol, dave, room


class Acks:
    """Seqs acknowledged to the senders; ``wait_for(n)`` wakes when n acks are in."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self._changed = asyncio.Condition()

    async def add(self, seq: int) -> None:
        async with self._changed:
            self.seqs.append(seq)
            self._changed.notify_all()

    async def wait_for(self, n: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.seqs) >= n)


async def _sender(client: Client, room: str, tag: str, stop: asyncio.Event, acks: Acks) -> None:
    i = 0
    while not stop.is_set():
        await acks.add(await client.send_text(room, f"{tag}-{i}"))
        i += 1


async def _drain_until(client: Client, seq: int, into: list[Message]) -> None:
    async with asyncio.timeout(20):
        while not into or into[-1].seq < seq:
            into.append(await client.next_message(20))


async def test_removal_during_traffic_cuts_off_exactly_at_L(harness: Harness) -> None:
    alice, bob, carol, dave, room = await _room_of_four(harness)
    kept = dict(dave.keys.room(room).epochs)  # what a malicious removed client would keep
    stop = asyncio.Event()
    acks = Acks()
    senders = [
        asyncio.create_task(_sender(bob, room, "bob", stop, acks)),
        asyncio.create_task(_sender(carol, room, "carol", stop, acks)),
    ]
    async with asyncio.timeout(20):
        await acks.wait_for(10)
    t0 = time.perf_counter()
    removal_seq = await alice.remove(room, "dave")
    t_commit = time.perf_counter() - t0
    async with asyncio.timeout(20):
        await acks.wait_for(len(acks.seqs) + 10)  # traffic goes on after the removal
    stop.set()
    await asyncio.gather(*senders)
    last = max(acks.seqs)
    seen_by: dict[str, list[Message]] = {}
    for who, c in (("alice", alice), ("bob", bob), ("carol", carol)):
        seen_by[who] = []
        await _drain_until(c, last, seen_by[who])
    # dave: everything up to and including the removal, then nothing.
    dave_seen: list[Message] = []
    await _drain_until(dave, removal_seq, dave_seen)
    t_cut = time.perf_counter() - t0
    assert dave_seen[-1].seq == removal_seq
    assert dave_seen[-1].body == {"type": "notice", "action": "remove", "user": "dave"}
    assert dave._inbox.empty() and max(m.seq for m in dave_seen) == removal_seq
    assert room not in dave.keys.rooms  # the client wiped the room's keys and forgot it
    # everyone else decrypts every message after the removal
    later = [s for s in acks.seqs if s > removal_seq]
    assert later
    for who, seen in seen_by.items():
        decrypted = {m.seq for m in seen if m.kind == "message" and m.problem is None}
        assert set(later) <= decrypted, who
    # the secrets dave kept open nothing sent after the removal
    events = await harness.store.room_events(room, removal_seq, limit=1000)
    messages = [ev for ev in events if ev.kind == "message"]
    assert messages
    sender_keys = {
        d.device_id: d.signing_key for d in await harness.store.devices_for(["bob", "carol"])
    }
    for ev in messages:
        env = Envelope.decode(ev.payload)
        assert env.header.epoch > max(kept)
        for secret in kept.values():
            with pytest.raises(DecryptionFailed):
                open_message(env, sender_key=sender_keys[ev.sender_device], epoch_secret=secret)
    print(
        f"\nremoval commit {t_commit * 1000:.1f} ms; removed device saw its cut-off "
        f"{t_cut * 1000:.1f} ms after the remove call"
    )


async def test_no_freeze_institution_removal_with_only_a_tablet_online(harness: Harness) -> None:
    """The institution's external sender removes a doctor (register lapse) while only the
    bedside tablet is online: the tablet's urgent page still goes through (the rekey is
    pending), and the first doctor device to send afterwards commits the new epoch."""
    from medrelay_protocol.crypto import SigningKey
    from medrelay_protocol.roster import make_external_change, verify_roster
    from medrelay_server.handlers.rooms import commit_external

    institution = SigningKey.generate()
    alice, bob = await harness.client("alice"), await harness.client("bob")
    tablet = await harness.client("ward7-tablet", kind="tablet")
    room = await alice.create_room(external_sender=institution.public)
    await alice.add(room, "bob")
    await alice.add(room, "ward7-tablet", role="device")
    await tablet.wait_for_key(room)
    await bob.wait_for_key(room)
    epoch_before = alice.keys.room(room).current
    await alice.close()
    roster = verify_roster(await harness.store.roster_entries(room), room=room)
    removal = make_external_change(
        roster, "remove", {"user": "bob"}, external_key=institution, issued_at=int(time.time())
    )
    removal_seq = await commit_external(harness.gateway, room, removal, institution="qmh")
    state = await harness.store.room_state(room)
    assert state is not None and state.pending_rekey
    page_seq = await tablet.send_body(room, {"type": "page"}, urgent_role="on-call medicine")
    assert page_seq > removal_seq
    assert (await harness.store.room_state(room)).epoch == epoch_before  # type: ignore[union-attr]
    audit = await harness.store.audit_records(room=room)
    assert any(r.action == "membership_change" and r.target == "bob" for r in audit)
    # bob's device is cut off at the removal: the page after it never reaches him
    bob_seen: list[Message] = []
    await _drain_until(bob, removal_seq, bob_seen)
    assert bob_seen[-1].seq == removal_seq and bob._inbox.empty()
    # the first doctor device to send commits the new epoch, transparently
    alice2 = await harness.client("alice")
    seq = await alice2.send_text(room, "reviewed the page")
    state = await harness.store.room_state(room)
    assert state is not None and not state.pending_rekey and state.epoch == epoch_before + 1
    assert seq > page_seq
    events = await harness.store.room_events(room, page_seq, limit=10)
    assert [e.kind for e in events] == ["rekey", "message"]
    assert bob._inbox.empty()


async def test_epochs_rotate_on_message_count(harness: Harness) -> None:
    """A sender rotates the room's epoch after ``max_epoch_messages`` of its own messages;
    everyone keeps reading across the rotation."""
    alice, bob = await harness.client("alice"), await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    alice.logic.max_epoch_messages = 3
    start = alice.keys.room(room).current
    sent = [f"obs {i}" for i in range(7)]
    for text in sent:
        await alice.send_text(room, text)
    assert alice.keys.room(room).current == start + 2  # after messages 3 and 6
    got: list[Message] = []
    while len([m for m in got if m.kind == "message"]) < len(sent):
        got.append(await bob.next_message(10))
    texts = [m.body["text"] for m in got if m.kind == "message" and m.problem is None]
    assert texts == sent


async def test_member_removed_while_offline_resumes_without_the_room(harness: Harness) -> None:
    """A client that was offline while removed still connects: its resume names the room,
    the server refuses that room, the client forgets it and resumes the others."""
    alice, erin = await harness.client("alice"), await harness.client("erin")
    kept, lost = await alice.create_room(), await alice.create_room()
    for room in (kept, lost):
        await alice.add(room, "erin")
        await erin.wait_for_key(room)
    await erin.close()
    await alice.remove(lost, "erin")
    await alice.send_text(kept, "still yours")
    erin2 = await harness.client("erin")
    got = await collect_until(erin2, "still yours")
    assert got[-1].room == kept
    assert lost not in erin2.keys.rooms and kept in erin2.keys.rooms
