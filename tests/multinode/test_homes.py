"""Room homes across real processes (``server/medrelay_server/homes.py``): two ``medrelay
serve`` nodes over the shared Redis and a fresh PostgreSQL schema. A send reaching node 0
for a room homed on node 1 is stored by node 1 (its journal chain), acknowledged and
delivered as any send, and the record names node 0 as where the client was connected. When
the home is killed, its rooms' sends are stored by the node the sender uses."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import asyncpg
import pytest
from medrelay_server.homes import home_of

from scripts.cluster import Cluster

from ..polling import until
from .checker import Ledger, check
from .conftest import Database, People
from .helpers import send_many

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

NODES = ["node-0", "node-1"]


def _metrics(cluster: Cluster, i: int) -> str:
    with urllib.request.urlopen(cluster.nodes[i].http + "/metrics", timeout=5) as resp:
        return str(resp.read().decode())


async def _value(cluster: Cluster, i: int, sample: str) -> float:
    text = await asyncio.to_thread(_metrics, cluster, i)
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


async def _both_nodes_see_two(cluster: Cluster) -> None:
    async def two() -> bool:
        counts = [await _value(cluster, i, "medrelay_cluster_nodes") for i in (0, 1)]
        return counts == [2, 2]

    await until(two, timeout=30)


async def _rooms(people: People, owner: str, member: str, n: int) -> list[str]:
    """At least ``n`` new rooms, and more (bounded) until both nodes are home to some."""
    rooms: list[str] = []
    while len(rooms) < n or {home_of(r, NODES) for r in rooms} != set(NODES):
        assert len(rooms) < n + 30, "thirty more random rooms all homed on one node"
        room = await people.clients[owner].create_room()
        await people.clients[owner].add(room, member)
        rooms.append(room)
    return rooms


async def test_sends_are_stored_by_their_rooms_home(
    cluster: Cluster, people: People, database: Database
) -> None:
    alice = await people.join("alice", cluster.url(0))
    await people.join("bob", cluster.url(1))
    await _both_nodes_see_two(cluster)
    rooms = await _rooms(people, "alice", "bob", 6)
    homes = {room: home_of(room, NODES) for room in rooms}
    ledger = Ledger()
    await asyncio.gather(*(send_many(alice, room, room, 4, ledger) for room in rooms))
    for room in rooms:
        await people.inboxes["bob"].wait_seqs(room, set(ledger.seqs(room)))
        await people.inboxes["alice"].wait_seqs(room, set(ledger.seqs(room)))
    check(ledger, {u: people.inboxes[u].got for u in ("alice", "bob")})

    away = sum(4 for room in rooms if homes[room] == "node-1")
    counts = {
        path: await _value(cluster, 0, f'medrelay_home_sends_total{{path="{path}"}}')
        for path in ("local", "forwarded", "fallback")
    }
    served = await _value(cluster, 1, 'medrelay_home_sends_total{path="served"}')
    # a forward slower than the timeout on a loaded machine is stored by node 0 instead
    assert counts["local"] == 4 * len(rooms) - away
    assert counts["forwarded"] + counts["fallback"] == away and counts["forwarded"] >= 1
    assert served >= counts["forwarded"]
    # each send's journal record is in the chain of the node that stored it: node 1 for the
    # forwards it served (naming node 0 as where the client was), node 0 for the rest
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        rows = await conn.fetch(
            f'SELECT room, node, source FROM "{database.schema}".audit WHERE action = $1',
            "message",
        )
    finally:
        await conn.close()
    by_node = {n: [r for r in rows if r["node"] == n] for n in NODES}
    assert len(rows) == len(by_node["node-0"]) + len(by_node["node-1"])
    assert len(by_node["node-1"]) == served
    assert all(homes[r["room"]] == "node-1" for r in by_node["node-1"])
    assert all(r["source"] == "node:node-0" for r in by_node["node-1"])
    assert len(by_node["node-0"]) == counts["local"] + counts["fallback"]
    assert all(r["source"] is None for r in by_node["node-0"])


async def test_a_killed_home_is_stored_around(cluster: Cluster, people: People) -> None:
    alice = await people.join("alice", cluster.url(0))
    await people.join("bob", cluster.url(0))
    await _both_nodes_see_two(cluster)
    rooms = await _rooms(people, "alice", "bob", 1)
    away = [room for room in rooms if home_of(room, NODES) == "node-1"]
    cluster.kill(1)  # no goodbye: node 0 finds out when its forward is not answered
    ledger = Ledger()
    await send_many(alice, away[0], "after", 3, ledger)
    await people.inboxes["bob"].wait_seqs(away[0], set(ledger.seqs(away[0])))
    check(ledger, {"bob": people.inboxes["bob"].got})
    assert await _value(cluster, 0, 'medrelay_home_sends_total{path="fallback"}') >= 3

    async def forgotten() -> bool:  # and after three missed hellos it is not a home at all
        return await _value(cluster, 0, "medrelay_cluster_nodes") == 1

    await until(forgotten, timeout=30)
    cluster.start(1)
    await _both_nodes_see_two(cluster)
