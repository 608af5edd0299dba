"""History for newcomers (ARCHITECTURE 5.6, 5.8): a summoned specialist granted history from
seq N reads exactly from N on; a member removed and re-added sees nothing from the gap."""

from __future__ import annotations

from medrelay_client.client import Client, Message

from .conftest import Harness


def _texts(messages: list[Message]) -> list[str]:
    return [m.body["text"] for m in messages if m.kind == "message" and m.problem is None]


async def _history(client: Client, room: str) -> list[Message]:
    return await client.history(room, limit=200)


async def test_specialist_granted_history_from_n_reads_exactly_from_n(harness: Harness) -> None:
    alice, bob = await harness.client("alice"), await harness.client("bob")
    carol = await harness.client("carol")  # the specialist, registered once
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    seqs = {}
    for i in range(6):
        sender = alice if i % 2 == 0 else bob
        seqs[i] = await sender.send_text(room, f"case note {i}")
    alice.logic.rosters.pop(room, None)
    n = seqs[3]
    await alice.add(room, "carol", history_from_seq=n)
    await carol.wait_for_key(room)
    # the grant event arrives in carol's stream; wait for its notice
    while True:
        m = await carol.next_message(10)
        if isinstance(m.body, dict) and m.body.get("action") == "history_grant":
            break
    history = await _history(carol, room)
    assert _texts(history) == ["case note 3", "case note 4", "case note 5"]
    assert min(m.seq for m in history) >= n
    audit = await harness.store.audit_records(room=room)
    grants = [r for r in audit if r.action == "history_grant"]
    assert len(grants) == 1 and grants[0].target == "carol" and grants[0].user == "alice"


async def test_without_a_grant_a_newcomer_reads_nothing_before_joining(harness: Harness) -> None:
    alice, dave = await harness.client("alice"), await harness.client("dave")
    room = await alice.create_room()
    await alice.send_text(room, "before dave")
    await alice.add(room, "dave")
    await dave.wait_for_key(room)
    after = await alice.send_text(room, "after dave")
    history = await _history(dave, room)
    assert _texts(history) == ["after dave"]
    assert all(m.seq >= after - 2 for m in history)  # add, its rekey, then the message


async def test_removed_and_readded_member_sees_nothing_from_the_gap(harness: Harness) -> None:
    alice, erin = await harness.client("alice"), await harness.client("erin")
    room = await alice.create_room()
    await alice.add(room, "erin")
    await erin.wait_for_key(room)
    inside = await alice.send_text(room, "while erin is in")
    await alice.remove(room, "erin")
    gap = await alice.send_text(room, "while erin is out")
    await alice.add(room, "erin")
    await erin.wait_for_key(room)
    back = await alice.send_text(room, "erin is back")
    history = await _history(erin, room)
    seqs = {m.seq for m in history}
    assert gap not in seqs  # the server never hands over what was said while she was out
    assert {inside, back} <= seqs
    assert _texts(history) == ["erin is back"]
    # her client wiped the room's keys at the removal: the earlier message stays unreadable
    earlier = next(m for m in history if m.seq == inside)
    assert earlier.problem is not None and "no key for epoch" in earlier.problem
