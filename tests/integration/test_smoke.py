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


async def test_committer_sees_no_refusal_for_its_own_rekeys(harness: Harness) -> None:
    """The committer's own rekey events come back to it; they are not shown as refused."""
    alice = await harness.client("alice")
    await harness.client("bob")  # registered, so that alice can add bob
    room = await alice.create_room()
    await alice.add(room, "bob")
    last = await alice.send_text(room, "hello")
    seen = []
    while not seen or seen[-1].seq < last:
        seen.append(await alice.next_message())
    assert [m.problem for m in seen if m.problem] == []
