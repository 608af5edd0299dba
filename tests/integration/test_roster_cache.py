"""A room change verifies one roster entry, not the room's whole chain: the gateway keeps
the verified roster of the rooms it changed (``rosters.py``). When its copy is missing or
names another head (another node changed the room), it verifies the stored chain again."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from medrelay_protocol.roster import RosterState
from medrelay_server.handlers import rooms
from medrelay_server.rosters import VerifiedRosters

from .conftest import Harness


def _count_chain_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Rooms whose whole stored chain a change verified from its genesis."""
    checked: list[str] = []
    original = rooms.verify_roster_chain

    def counted(entries: Sequence[bytes], **kw: Any) -> RosterState:
        state = original(entries, **kw)
        checked.append(state.room)
        return state

    monkeypatch.setattr(rooms, "verify_roster_chain", counted)
    return checked


async def test_changes_reuse_the_verified_roster(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await harness.client("alice")
    for user in ("bob", "carol", "dave"):
        await harness.client(user)
    checked = _count_chain_checks(monkeypatch)
    room = await alice.create_room()
    for user in ("bob", "carol"):
        await alice.add(room, user)
    assert checked == []  # every change started from the state the last one left
    harness.gateway.rosters = VerifiedRosters()  # as after a restart
    await alice.add(room, "dave")
    assert checked == [room]  # verified from the genesis once, then kept
    await alice.remove(room, "carol")
    assert checked == [room]
    state = await harness.store.room_state(room)
    assert state is not None
    kept = harness.gateway.rosters.get(room, state.roster_head, state.roster_length)
    assert kept is not None and sorted(kept.members) == ["alice", "bob", "dave"]


async def test_a_stale_copy_is_not_used(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy under an older head (the room changed elsewhere) misses: the stored chain is
    verified again, and the change is checked against it."""
    alice = await harness.client("alice")
    for user in ("bob", "carol"):
        await harness.client(user)
    room = await alice.create_room()
    await alice.add(room, "bob")
    state = await harness.store.room_state(room)
    assert state is not None
    stale = harness.gateway.rosters.get(room, state.roster_head, state.roster_length)
    assert stale is not None
    await alice.add(room, "carol")
    harness.gateway.rosters.put(stale)  # as if this node had missed the last change
    checked = _count_chain_checks(monkeypatch)
    await alice.remove(room, "bob")
    assert checked == [room]
    assert sorted(await harness.store.members(room)) == ["alice", "carol"]
