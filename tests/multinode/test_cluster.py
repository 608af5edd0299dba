"""Two gateway processes (``scripts/cluster.Cluster``) over the shared Redis and a fresh
PostgreSQL database: members on different nodes talk, a removal on node A cuts the member
off on node B at exactly its seq, clients of a SIGKILLed node fail over and resume with
nothing lost or doubled, and a reconnect storm is absorbed (the time is printed)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from scripts.cluster import Cluster

from .checker import Ledger, check, up_to
from .conftest import People
from .helpers import send_many, send_reliably

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


async def _room(people: People, owner: str, *members: str) -> str:
    room = await people.clients[owner].create_room()
    for m in members:
        await people.clients[owner].add(room, m)
    return room


def _diagnose(people: People, users: list[str]) -> str:
    out = []
    for u in users:
        c = people.clients[u]
        runner = c._runner
        state = "running" if runner and not runner.done() else repr(runner and runner.exception())
        out.append(f"{u}: runner {state}, fatal {c.fatal}, connected {c._connected.is_set()}")
        if runner and runner.done() and runner.exception() is not None:
            import traceback

            out.append("".join(traceback.format_exception(runner.exception()))[-1500:])
    return f"{len(users)} clients never resumed:\n" + "\n".join(out)


async def _settle(people: People, room: str, ledger: Ledger, users: list[str], **kw: float) -> None:
    """Wait (bounded) until each user has every acknowledged seq; the checker judges after."""
    for u in users:
        with contextlib.suppress(TimeoutError):
            await people.inboxes[u].wait_seqs(room, ledger.seqs(room), **kw)


async def test_members_on_different_nodes_exchange(cluster: Cluster, people: People) -> None:
    alice = await people.join("alice", cluster.url(0))
    bob = await people.join("bob", cluster.url(1))
    room = await _room(people, "alice", "bob")
    ledger = Ledger()
    await asyncio.gather(
        send_many(alice, room, "alice", 15, ledger), send_many(bob, room, "bob", 15, ledger)
    )
    await _settle(people, room, ledger, ["alice", "bob"])
    check(ledger, {u: people.inboxes[u].got for u in ("alice", "bob")})


async def test_removal_on_a_cuts_member_off_on_b_at_its_seq(
    cluster: Cluster, people: People
) -> None:
    alice = await people.join("alice", cluster.url(0))
    await people.join("bob", cluster.url(1))
    await people.join("carol", cluster.url(1))  # a witness on bob's node
    room = await _room(people, "alice", "bob", "carol")
    ledger = Ledger()
    await send_many(alice, room, "before", 5, ledger)

    around = asyncio.create_task(send_many(alice, room, "around", 20, ledger, every=0.01))
    await ledger.reached(10)
    removed_at = await alice.remove(room, "bob")
    await around
    await send_many(alice, room, "after", 5, ledger)

    bob_may_see = up_to(removed_at)
    await _settle(people, room, ledger, ["alice", "carol"])
    with contextlib.suppress(TimeoutError):
        await people.inboxes["bob"].wait_seqs(
            room, {s for s in ledger.seqs(room) if s <= removed_at}
        )
    assert any(s > removed_at for s in ledger.seqs(room)), "no message after the removal"
    bob_seqs = people.inboxes["bob"].seqs(room, None)
    assert max(bob_seqs) <= removed_at, f"bob saw {bob_seqs} after removal at {removed_at}"
    check(
        ledger,
        {u: people.inboxes[u].got for u in ("alice", "bob", "carol")},
        {"bob": bob_may_see},
    )


async def test_sigkilled_node_clients_fail_over_nothing_lost_or_doubled(
    cluster: Cluster, people: People
) -> None:
    alice = await people.join("alice", cluster.url(0))
    bob = await people.join("bob", cluster.url(1))
    carol = await people.join("carol", cluster.url(1))
    room = await _room(people, "alice", "bob", "carol")
    first = {u: people.clients[u].session for u in ("bob", "carol")}
    for c in (bob, carol):
        c.url = cluster.url(0)  # what the proxy would do once node 1 stops answering

    ledger = Ledger()
    senders = asyncio.gather(
        send_many(alice, room, "alice", 40, ledger, every=0.01),
        send_many(bob, room, "bob", 15, ledger, every=0.02),
    )
    await ledger.reached(12)
    cluster.kill(1)
    await asyncio.wait_for(senders, 60)

    await _settle(people, room, ledger, ["alice", "bob", "carol"], timeout=30)
    assert all(people.clients[u].session is not first[u] for u in ("bob", "carol"))
    check(ledger, {u: people.inboxes[u].got for u in ("alice", "bob", "carol")})


@pytest.mark.slow
async def test_reconnect_storm_after_sigkill(cluster: Cluster, people: People) -> None:
    n = 40
    alice = await people.join("alice", cluster.url(0))
    users = [f"u{i:02d}" for i in range(n)]
    await asyncio.gather(*(people.join(u, cluster.url(1)) for u in users))
    rooms = []
    for group in range(4):  # four rooms of ten: adds stay cheap, the storm is all 40
        rooms.append(await _room(people, "alice", *users[group * 10 : group * 10 + 10]))
    for u in users:
        people.clients[u].url = cluster.url(0)

    ledger = Ledger()
    t0 = time.monotonic()
    cluster.kill(1)
    posted = [await send_reliably(alice, r, "after the storm", ledger) for r in rooms]
    done_at: dict[str, float] = {}

    async def resumed(i: int, u: str) -> None:
        room, seq = rooms[i // 10], posted[i // 10]
        await people.inboxes[u].wait_seqs(room, {seq}, timeout=60)
        done_at[u] = time.monotonic() - t0

    results = await asyncio.gather(
        *(resumed(i, u) for i, u in enumerate(users)), return_exceptions=True
    )
    stuck = [u for u, r in zip(users, results, strict=True) if isinstance(r, BaseException)]
    assert not stuck, _diagnose(people, stuck)
    times = sorted(done_at.values())
    print(
        f"\nreconnect storm: {n} clients of a SIGKILLed node resumed on the other node; "
        f"median {times[n // 2]:.2f}s, p90 {times[int(n * 0.9)]:.2f}s, all {times[-1]:.2f}s"
    )
    assert times[-1] < 30
    for i, room in enumerate(rooms):
        members = ["alice", *users[i * 10 : i * 10 + 10]]
        check(
            Ledger({k: v for k, v in ledger.acked.items() if k[0] == room}),
            {u: [m for m in people.inboxes[u].got if m.room == room] for u in members},
        )
