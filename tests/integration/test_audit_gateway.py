"""The journal answers "who saw this message, when" for a session run through the real
gateway: every delivery a client received has a journal record, and a removed member's
device never appears for what was said after the removal."""

from __future__ import annotations

import hmac
import os

from medrelay_client.client import Client, Message
from medrelay_server.journal.queries import who_saw

from .conftest import Harness


async def _drain_to(client: Client, seq: int) -> list[Message]:
    got: list[Message] = []
    while not got or got[-1].seq < seq:
        got.append(await client.next_message(10))
    return got


async def test_who_saw_matches_the_devices_that_received(harness: Harness) -> None:
    alice, bob, carol = [await harness.client(u) for u in ("alice", "bob", "carol")]
    room = await alice.create_room()
    await alice.add(room, "bob")
    await alice.add(room, "carol")
    await carol.wait_for_key(room)
    before = await alice.send_text(room, "before the removal")
    await alice.send_file(room, os.urandom(300_000), name="ecg.png", mime="image/png")
    removal = await alice.remove(room, "carol")
    after = await bob.send_text(room, "after the removal")
    received = {
        "alice": await _drain_to(alice, after),
        "bob": await _drain_to(bob, after),
        "carol": await _drain_to(carol, removal),
    }
    await bob.history(room, limit=50)
    await harness.gateway.journal.flush()
    devices = {c.user: c.keys.device_id for c in (alice, bob, carol)}
    async with harness.store.database.read() as conn:
        saw_before = {s.device for s in await who_saw(conn, room, before)}
        saw_after = {s.device for s in await who_saw(conn, room, after)}
    assert saw_before == set(devices.values())
    assert saw_after == {devices["alice"], devices["bob"]}
    # every event a client surfaced has a delivery record covering it for that device
    records = [r for r in await harness.store.audit_records(room=room) if r.action == "deliver"]
    for user, messages in received.items():
        for m in messages:
            assert any(
                r.device == devices[user]
                and r.seq_from is not None
                and r.seq_to is not None
                and r.seq_from <= m.seq <= r.seq_to
                for r in records
            ), (user, m.seq)
    tag = hmac.new(b"institution key, never on the server", b"HKID A123456(7)", "sha256").digest()
    tagged = await alice.send_body(room, {"type": "text", "text": "K 3.1"}, patient_tag=tag)
    all_records = await harness.store.audit_records(room=room)
    send = next(r for r in all_records if r.action == "message" and r.seq_from == tagged)
    assert send.patient_tag == tag and send.role == "owner"
    assert send.institution == "dev" and send.address and send.address.startswith("127.0.0.1:")
    assert b"A123456" not in repr(all_records).encode()
    actions = {r.action for r in await harness.store.audit_records(room=room)}
    assert {"message", "membership_change", "key_rotation", "history_read"} <= actions
    assert {"attachment_upload", "deliver"} <= actions
