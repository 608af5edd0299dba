"""The app bounds each group-commit batch by its rooms' deliveries on this node
(``store/group.py``, ``MAX_FANOUT``): the store asks the delivery hubs how many connections
a room's event goes to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from medrelay_server.store.sql import SqlStore

from ..polling import until
from .conftest import Harness


async def test_the_store_counts_a_rooms_local_deliveries(harness: Harness) -> None:
    store = harness.store
    assert isinstance(store, SqlStore) and store._group is not None
    fanout = store._group.fanout
    assert fanout is not None
    alice = await harness.client("alice")
    bob = await harness.client("bob")
    room = await alice.create_room()

    def reaches(n: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return fanout(room) == n

        return check

    await until(reaches(1))
    await alice.add(room, "bob")
    await until(reaches(2))
    await bob.close()
    await until(reaches(1))
    assert fanout("no-such-room") == 0
