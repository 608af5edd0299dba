"""Retention: ciphertext past the room's retention is deleted and the deletion journaled;
the journal is cut only at a witnessed anchor, after which it still verifies from there."""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa
from medrelay_server.journal import rows
from medrelay_server.journal.retention import RetentionSettings, purge, set_room_retention
from medrelay_server.store import schema as t
from medrelay_server.store.base import AuditRecord

from .conftest import JOURNAL_NOW

if TYPE_CHECKING:
    from .conftest import JournalEnv

DAY = 86_400


async def _room(env: JournalEnv, room: str) -> None:
    store = env.one
    await store.create_room(
        room,
        genesis=b"g",
        head=b"h",
        owner="alice",
        sender_device="alice-1",
        manifest=b"m",
        wraps={"alice-1": b"w"},
        now=env.clock.now(),
        audit=[AuditRecord("room_create", "success", user="alice")],
    )


async def _send(env: JournalEnv, room: str, mid: bytes) -> None:
    await env.one.append_message(
        room,
        user="alice",
        device="alice-1",
        mid=mid,
        envelope=b"ciphertext",
        kind="message",
        epoch=1,
        allow_pending=False,
        now=env.clock.now(),
        audit=[AuditRecord("message", "success", user="alice", mid=mid)],
    )


async def _seqs(env: JournalEnv, room: str) -> list[int]:
    async with env.one.database.read() as conn:
        e = t.events.c
        found = await conn.execute(sa.select(e.seq).where(e.room == room).order_by(e.seq))
        return list(found.scalars())


async def test_envelope_retention(journal_env: JournalEnv) -> None:
    env = journal_env
    await _room(env, "short")
    await _room(env, "long")
    await set_room_retention(env.one, "short", 2 * DAY)
    for i in range(3):
        await _send(env, "short", b"s%015d" % i)
        await _send(env, "long", b"l%015d" % i)
    await env.one.put_chunk(
        "short", b"blob", 0, b"x", True, user="alice", now=env.clock.now(),
        max_blob_bytes=9, max_room_bytes=9,
    )  # fmt: skip
    env.clock.advance(3 * DAY)
    await _send(env, "short", b"s-fresh" + bytes(9))
    report = await purge(env.one, env.clock.now(), RetentionSettings(30 * DAY, None))
    # kept: the genesis roster event (1), the newest rekey (2), the fresh message (6)
    assert await _seqs(env, "short") == [1, 2, 6]
    assert await _seqs(env, "long") == [1, 2, 3, 4, 5]
    assert (report.rooms, report.events, report.blobs) == (1, 3, 1)
    assert await env.one.get_chunk(b"blob", 0) is None
    [record] = [r for r in await env.one.audit_records() if r.action == "retention_delete"]
    assert (record.room, record.seq_from, record.seq_to) == ("short", 3, 5)
    assert record.detail is not None and "events=3" in record.detail
    assert (await purge(env.one, env.clock.now(), RetentionSettings(30 * DAY, None))).rooms == 0


async def test_journal_cut_at_a_witnessed_anchor(journal_env: JournalEnv) -> None:
    env = journal_env
    await env.records(env.one, 5)
    await env.records(env.two, 3)
    first = await env.anchors.anchor_now()  # covers node-1#5, node-2#3
    env.clock.advance(400 * DAY)
    await env.records(env.one, 2)
    await env.anchors.anchor_now()
    await env.records(env.one, 1)
    assert first is not None and first.ts < env.clock.now() - 365 * DAY
    report = await purge(env.one, env.clock.now(), RetentionSettings(None, 365 * DAY))
    assert (report.cut_at_anchor, report.journal_records) == (1, 8)
    async with env.one.database.read() as conn:
        nodes = {n.node: (n.base_idx, n.head_idx) for n in await rows.nodes(conn)}
        kept = [e.idx async for e in rows.entries(conn, "node-1")]
    assert nodes == {  # #9: the journal_cut record; the delivery streams are empty
        "node-1": (5, 9),
        "node-2": (3, 3),
        "node-1/deliveries": (0, 0),
        "node-2/deliveries": (0, 0),
    }
    assert kept == [6, 7, 8, 9]
    verified = await env.verify()
    assert verified.ok, verified.problems
    # nothing more to cut at that anchor
    again = await purge(env.one, env.clock.now(), RetentionSettings(None, 365 * DAY))
    assert again.journal_records == 0

    # a base that no witness holds is refused
    async with env.one.database.write() as conn:
        await conn.execute(
            sa.update(t.journal_nodes).where(t.journal_nodes.c.node == "node-2").values(base_idx=2)
        )
    problem = (await env.verify()).first
    assert problem is not None and problem.kind == "BASE_UNANCHORED"


async def test_no_cut_without_a_witnessed_anchor(journal_env: JournalEnv) -> None:
    env = journal_env
    await env.records(env.one, 3)
    env.clock.advance(400 * DAY)
    report = await purge(env.one, env.clock.now(), RetentionSettings(None, 365 * DAY))
    assert report.journal_records == 0 and env.clock.now() > JOURNAL_NOW


async def test_scheduled_purge_job_runs_and_stops(journal_env: JournalEnv) -> None:
    """The background job built for ``create_app(background=...)`` purges on start, then
    waits its interval, and returns as soon as the app's stop event is set."""
    import asyncio

    from medrelay_server.journal.retention import retention_job
    from medrelay_server.settings import Settings

    env = journal_env
    await _room(env, "job-room")
    await _send(env, "job-room", b"j" * 16)
    env.clock.advance(100 * DAY)
    settings = Settings(envelope_retention_days=30, journal_retention_days=None)
    job = retention_job(env.one, settings, env.clock)
    stop = asyncio.Event()
    task = asyncio.create_task(job(stop))
    async with asyncio.timeout(10):
        while True:  # wait for the first purge to be journaled (the job runs it at once)
            records = await env.one.audit_records(room="job-room")
            if any(r.action == "retention_delete" for r in records):
                break
            await asyncio.sleep(0.01)
    stop.set()
    async with asyncio.timeout(5):
        await task
    assert await _seqs(env, "job-room") == [1, 2]  # kept: the roster and the newest rekey
