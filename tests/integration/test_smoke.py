from __future__ import annotations

from .conftest import Harness


async def test_two_doctors_talk(harness: Harness) -> None:
    alice = await harness.client("alice")
    bob = await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    seq = await alice.send_text(room, "BP 90/60, please review")
    got = []
    while True:
        m = await bob.next_message()
        got.append(m)
        if m.kind == "message":
            break
    assert got[-1].body == {"type": "text", "text": "BP 90/60, please review"}
    assert got[-1].seq == seq
