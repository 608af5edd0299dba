"""Stream generation: after the server's database was restored to an earlier state (or
failed over to a standby that missed commits), clients notice the rollback instead of
silently skipping the reused seqs."""

from __future__ import annotations

import sqlalchemy as sa
from medrelay_server.store import schema as t

from .conftest import Harness
from .rawclient import collect_until


async def test_client_detects_a_rolled_back_stream_and_takes_the_reused_seqs(
    harness: Harness,
) -> None:
    alice, bob = await harness.client("alice"), await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    for text in ("one", "two", "three"):
        last = await alice.send_text(room, text)
    await collect_until(bob, "three")
    assert bob.keys.room(room).last_seq == last
    await bob.close()
    assert not await harness.gateway.delivery.check_generation()  # learns the generation
    # what a restore of an older backup looks like: the last two events gone, new generation
    async with harness.store.database.write() as conn:
        await conn.execute(
            sa.delete(t.events).where(t.events.c.room == room, t.events.c.seq > last - 2)
        )
        await conn.execute(
            sa.update(t.rooms).where(t.rooms.c.room == room).values(last_seq=last - 2)
        )
        await conn.execute(
            sa.update(t.meta)
            .where(t.meta.c.key == "generation")
            .values(value="restored-from-backup")
        )
    assert await harness.gateway.delivery.check_generation()  # what the slow poll does
    bob2 = await harness.client("bob")
    notice = await bob2.next_message(10)
    assert notice.problem is not None and "rolled back" in notice.problem
    assert notice.seq == last - 2
    reused = await alice.send_text(room, "after the restore")
    assert reused == last - 1  # the seq bob had already seen, now a different message
    got = await collect_until(bob2, "after the restore")
    assert got[-1].seq == reused
