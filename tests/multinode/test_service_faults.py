"""Two gateway processes while the services under them fail, each service of the test's own
on another loopback port: Redis restarted mid-traffic (the last messages are published while
it is down, so only a resync, NOTIFY or the slow poll can deliver them), and PostgreSQL
stopped for a few seconds. After each, the checker must find every acknowledged message at
every member device exactly once, in order, and nothing unacknowledged."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .checker import Ledger, check
from .conftest import Database, People, fresh_schema_async, start_cluster
from .helpers import send_many
from .procs import PostgresServer, RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow]

USERS = ("alice", "bob", "carol")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    # not under tmp_path: that is root-only (0700), and the server runs as ``postgres``
    workdir = Path(tempfile.mkdtemp(prefix="medrelay-pg-"))
    server = PostgresServer(workdir)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)


async def _three_on_two_nodes(people: People, urls: list[str]) -> str:
    """alice and carol on node 0, bob on node 1, one room."""
    alice = await people.join("alice", urls[0])
    await people.join("bob", urls[1])
    await people.join("carol", urls[0])
    room = await alice.create_room()
    await alice.add(room, "bob")
    await alice.add(room, "carol")
    return room


async def _judge(people: People, room: str, ledger: Ledger, timeout: float) -> None:
    for u in USERS:
        try:
            await people.inboxes[u].wait_seqs(room, ledger.seqs(room), timeout=timeout)
        except TimeoutError:
            timeout = 0.5  # the checker says what is missing; don't wait again per user
    check(ledger, {u: people.inboxes[u].got for u in USERS})


async def test_redis_restarted_mid_traffic(
    own_redis: RedisServer, people: People, tmp_path: Path
) -> None:
    async with fresh_schema_async() as db:
        await _redis_restart(own_redis, people, db, tmp_path)


async def _redis_restart(
    own_redis: RedisServer, people: People, db: Database, tmp_path: Path
) -> None:
    with start_cluster(
        2, broker_url=own_redis.url, database=db, workdir=tmp_path / "cluster"
    ) as cluster:
        room = await _three_on_two_nodes(people, cluster.urls)
        alice, bob = people.clients["alice"], people.clients["bob"]
        ledger = Ledger()
        await asyncio.gather(
            send_many(alice, room, "alice before", 10, ledger),
            send_many(bob, room, "bob before", 10, ledger),
        )
        await asyncio.to_thread(own_redis.kill)
        await send_many(alice, room, "alice while redis is down", 3, ledger)
        await send_many(bob, room, "bob while redis is down", 3, ledger)
        await asyncio.to_thread(own_redis.start)
        # no message after the restart: nothing later reveals the gap by seq
        await _judge(people, room, ledger, timeout=15)


async def test_postgres_stopped_for_a_few_seconds(
    own_postgres: PostgresServer, own_redis: RedisServer, people: People, tmp_path: Path
) -> None:
    with start_cluster(
        2,
        broker_url=own_redis.url,
        database=Database(own_postgres.url),
        workdir=tmp_path / "cluster",
    ) as cluster:
        room = await _three_on_two_nodes(people, cluster.urls)
        alice, bob = people.clients["alice"], people.clients["bob"]
        ledger = Ledger()
        await send_many(alice, room, "before", 5, ledger)
        during = asyncio.gather(
            send_many(alice, room, "alice across the outage", 10, ledger, every=0.1),
            send_many(bob, room, "bob across the outage", 10, ledger, every=0.1),
        )
        await ledger.reached(8)
        await asyncio.to_thread(own_postgres.stop, "fast")
        await asyncio.sleep(3)  # the outage itself
        await asyncio.to_thread(own_postgres.start)
        await asyncio.wait_for(during, 60)
        await send_many(bob, room, "after", 3, ledger)
        await _judge(people, room, ledger, timeout=20)
