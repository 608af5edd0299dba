"""``audit verify`` against a tampered journal, on SQLite and on PostgreSQL: each kind of
tampering is detected and the first bad record is named; an untouched journal verifies."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy as sa
from medrelay_server.journal import rows
from medrelay_server.journal.chain import chain
from medrelay_server.journal.verify import Report
from medrelay_server.store import schema as t
from medrelay_server.store.audit import _chained_values
from medrelay_server.store.base import AuditRecord, NodeFenced, NodeLeaseHeld

if TYPE_CHECKING:
    from .conftest import JournalEnv

AUDIT = t.audit.c


async def _workload(env: JournalEnv) -> None:
    """node-1: #1..#6, anchor 1, #7..#10, anchor 2, #11..#12 (unwitnessed);
    node-2: #1..#4, anchor 1, #5..#7, anchor 2, #8."""
    await env.records(env.one, 6)
    await env.records(env.two, 4)
    assert await env.anchors.anchor_now() is not None
    await env.records(env.one, 4, "attachment_download")
    await env.records(env.two, 3)
    assert await env.anchors.anchor_now() is not None
    await env.records(env.one, 2)
    await env.records(env.two, 1)


async def _sql(env: JournalEnv, *statements: Any) -> None:
    async with env.one.database.write() as conn:
        for statement in statements:
            await conn.execute(statement)


def _only(report: Report, kind: str, node: str, idx: int | None) -> None:
    assert not report.ok
    first = report.first
    assert first is not None, report
    assert (first.kind, first.node, first.idx) == (kind, node, idx), report.problems


async def test_untouched_journal_verifies(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    report = await journal_env.verify()
    assert report.ok, report.problems
    # two nodes, each with its delivery journal's stream (empty here)
    assert (report.nodes, report.records, report.anchors, report.unwitnessed) == (4, 20, 2, 3)
    assert len(journal_env.witness.anchors()) == 2
    again = await journal_env.anchors.anchor_now()  # heads moved: a third anchor
    assert again is not None and again.anchor_no == 3
    assert await journal_env.anchors.anchor_now() is None  # nothing moved since
    report = await journal_env.verify()
    assert report.ok and report.unwitnessed == 0


async def test_edited_record(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    at = (AUDIT.node == "node-1") & (AUDIT.idx == 3)
    await _sql(journal_env, sa.update(t.audit).where(at).values(user_id="mallory"))
    report = await journal_env.verify()
    _only(report, "EDITED", "node-1", 3)
    assert "edited" in str(report.first)


async def test_edited_and_rehashed_record(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    async with journal_env.one.database.read() as conn:
        entries = [e async for e in rows.entries(conn, "node-1")]
    e = entries[8]  # #9
    forged = dataclasses.replace(e.record, user="mallory")
    [new] = chain("node-1", e.lease, 8, e.prev_hash, [forged])
    at = (AUDIT.node == "node-1") & (AUDIT.idx == 9)
    await _sql(journal_env, sa.update(t.audit).where(at).values(user_id="mallory", hash=new.hash))
    _only(await journal_env.verify(), "EDITED", "node-1", 9)


async def test_deleted_record(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    at = (AUDIT.node == "node-2") & (AUDIT.idx == 5)
    await _sql(journal_env, sa.delete(t.audit).where(at))
    report = await journal_env.verify()
    _only(report, "MISSING", "node-2", 5)
    assert "deleted" in str(report.first)


async def test_deleted_record_and_renumbered(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    await _sql(
        journal_env,
        sa.delete(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx == 4)),
        *_shift("node-1", 5, -1),
    )
    _only(await journal_env.verify(), "MISSING", "node-1", 4)


def _shift(node: str, start: int, by: int) -> list[Any]:
    """Renumber records >= start by ``by`` (in two steps: the (node, idx) index is unique)."""
    where = (AUDIT.node == node) & (AUDIT.idx >= start)
    return [
        sa.update(t.audit).where(where).values(idx=AUDIT.idx + 1_000_000),
        sa.update(t.audit)
        .where((AUDIT.node == node) & (AUDIT.idx >= 1_000_000))
        .values(idx=AUDIT.idx - 1_000_000 + by),
    ]


async def test_inserted_record(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    async with journal_env.one.database.read() as conn:
        entries = [e async for e in rows.entries(conn, "node-1")]
    before = entries[1]  # #2
    forged = AuditRecord("history_read", "success", user="alice", room="r", ts=before.record.ts)
    [new] = chain("node-1", before.lease, 2, before.hash, [forged])
    await _sql(
        journal_env, *_shift("node-1", 3, 1), sa.insert(t.audit).values(_chained_values(new))
    )
    report = await journal_env.verify()
    _only(report, "INSERTED", "node-1", 3)
    assert "inserted" in str(report.first)


async def test_reordered_records(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    swap = [
        sa.update(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx == 7)).values(idx=-1),
        sa.update(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx == 8)).values(idx=7),
        sa.update(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx == -1)).values(idx=8),
    ]
    await _sql(journal_env, *swap)
    report = await journal_env.verify()
    _only(report, "REORDERED", "node-1", 7)
    assert "written as #8" in str(report.first)


async def test_truncated_tail(journal_env: JournalEnv) -> None:
    """The tail is cut past a witnessed head and the registry's head is set back to match:
    the chain is internally sound, the witness still shows it was longer."""
    await _workload(journal_env)
    async with journal_env.one.database.read() as conn:
        entries = [e async for e in rows.entries(conn, "node-1")]
    keep = entries[7]  # #8; the witness holds #10
    await _sql(
        journal_env,
        sa.delete(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx > 8)),
        sa.update(t.journal_nodes)
        .where(t.journal_nodes.c.node == "node-1")
        .values(head_idx=8, head_hash=keep.hash),
    )
    report = await journal_env.verify()
    _only(report, "TRUNCATED", "node-1", 9)
    assert "#10" in str(report.first)


async def test_truncated_unwitnessed_tail_with_head_left(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    await _sql(journal_env, sa.delete(t.audit).where((AUDIT.node == "node-1") & (AUDIT.idx > 11)))
    _only(await journal_env.verify(), "TRUNCATED", "node-1", 12)


async def test_whole_node_chain_deleted(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    await _sql(
        journal_env,
        sa.delete(t.audit).where(AUDIT.node == "node-2"),
        sa.delete(t.journal_nodes).where(t.journal_nodes.c.node == "node-2"),
    )
    report = await journal_env.verify()
    _only(report, "NODE_MISSING", "node-2", 7)
    assert "whole chain" in str(report.first)


async def test_rebuilt_journal(journal_env: JournalEnv) -> None:
    """Edit a record, then recompute every hash after it and the registry's head: each chain
    is sound on its own; only the witnessed heads show the rewrite."""
    await _workload(journal_env)
    async with journal_env.one.database.read() as conn:
        entries = [e async for e in rows.entries(conn, "node-1")]
    records = [e.record for e in entries]
    records[4] = dataclasses.replace(records[4], user="mallory")  # #5
    rebuilt = chain("node-1", entries[0].lease, 0, bytes(32), records)
    updates = [
        sa.update(t.audit)
        .where((AUDIT.node == "node-1") & (AUDIT.idx == e.idx))
        .values(user_id=e.record.user, prev_hash=e.prev_hash, hash=e.hash)
        for e in rebuilt
    ]
    head = sa.update(t.journal_nodes).where(t.journal_nodes.c.node == "node-1")
    await _sql(journal_env, *updates, head.values(head_hash=rebuilt[-1].hash))
    report = await journal_env.verify()
    _only(report, "REWRITTEN", "node-1", 6)
    assert "anchor #1" in str(report.first)


async def test_rebuilt_journal_and_anchor_tables(journal_env: JournalEnv) -> None:
    """Rebuilding the anchor tables as well does not help: the witness keeps its copy."""
    await _workload(journal_env)
    await _sql(
        journal_env,
        sa.delete(t.journal_leaves),
        sa.delete(t.journal_anchors),
        sa.update(t.audit).where((AUDIT.node == "node-2") & (AUDIT.idx == 2)).values(detail="x"),
    )
    report = await journal_env.verify()
    _only(report, "EDITED", "node-2", 2)
    assert [p.kind for p in report.problems if p.idx is None] == ["ANCHOR_MISSING"] * 2


async def test_unchained_row_inserted(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    await _sql(journal_env, sa.insert(t.audit).values(ts=1, action="send", outcome="success"))
    report = await journal_env.verify()
    assert [p.kind for p in report.problems] == ["UNCHAINED"]


async def test_forged_witness_line(journal_env: JournalEnv) -> None:
    await _workload(journal_env)
    path = journal_env.witness.path
    lines = path.read_text().splitlines()
    # anchor 2's tree: 8 leaves (4 streams' heads at each anchor)
    path.write_text(lines[0] + "\n" + lines[1].replace('"size":8', '"size":9') + "\n")
    report = await journal_env.verify()
    assert report.problems[0].kind == "WITNESS" and report.anchors == 1


async def test_fenced_node_cannot_append(journal_env: JournalEnv) -> None:
    """A second process that takes node-1 over (after its lease expired) fences the first:
    the first one's writes are refused inside the transaction, nothing is written."""
    await _workload(journal_env)
    with pytest.raises(NodeLeaseHeld) as held:  # the lease is live: no takeover
        await journal_env.backend.open("node-1", clock=journal_env.clock)
    assert held.value.node == "node-1"
    journal_env.clock.advance(120)  # node-1 went quiet; its lease expired
    usurper = await journal_env.backend.open("node-1", clock=journal_env.clock)
    with pytest.raises(NodeFenced):
        await journal_env.records(journal_env.one, 1)
    await journal_env.records(usurper, 1)
    report = await journal_env.verify()
    assert report.ok, report.problems
    async with usurper.database.read() as conn:
        [node] = [n for n in await rows.nodes(conn) if n.node == "node-1"]
    assert (node.token, node.head_idx) == (2, 13)
