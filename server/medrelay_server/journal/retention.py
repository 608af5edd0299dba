"""Retention: ciphertext expires on the room's schedule; the journal is kept far longer and
cut only at an anchored boundary.

* Envelopes: for each room, events older than its retention (``rooms.retention_seconds``,
  else ``RetentionSettings.envelope_seconds``) are deleted with their wraps, and so are the
  room's attachment blobs. Kept: roster events (the membership evidence; the roster chain
  lives in its own table too) and the room's newest rekey (without it current members could
  not read new messages). Each room's deletion is journaled, in the same transaction, as one
  ``retention_delete`` record (seq range and counts).
* Journal: records older than ``journal_seconds`` are deleted only up to the heads of the
  newest *witnessed* anchor made before that age. Each node's chain then starts at that
  head: ``journal_nodes.base_idx``/``base_hash`` record it, and ``audit verify`` accepts
  the base only because the witness holds exactly that head. A ``journal_cut`` record
  journals the cut itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clock import Clock
from ..settings import Settings
from ..store import blobs
from ..store import schema as t
from ..store.audit import write_audit
from ..store.base import AuditRecord
from ..store.rows import lock_room
from ..store.sql import SqlStore
from . import rows

log = logging.getLogger(__name__)
DAY = 86_400
PURGED_KINDS = ("message", "summon", "rekey")


@dataclass(frozen=True, slots=True)
class RetentionSettings:
    """``None`` keeps forever. The defaults are placeholders: a hospital sets its own
    (a chat is a transient channel; the clinical record belongs in the EHR)."""

    envelope_seconds: int | None = 90 * DAY
    journal_seconds: int | None = 7 * 365 * DAY


@dataclass(slots=True)
class PurgeReport:
    rooms: int = 0
    events: int = 0
    wraps: int = 0
    blobs: int = 0
    journal_records: int = 0
    cut_at_anchor: int | None = None


async def set_room_retention(store: SqlStore, room: str, seconds: int | None) -> None:
    async with store.database.write() as conn:
        await lock_room(conn, room)
        r = t.rooms.c
        await conn.execute(
            sa.update(t.rooms).where(r.room == room).values(retention_seconds=seconds)
        )


async def purge(store: SqlStore, now: int, settings: RetentionSettings) -> PurgeReport:
    report = PurgeReport()
    async with store.database.read() as conn:
        r = t.rooms.c
        rooms = (await conn.execute(sa.select(r.room, r.retention_seconds).order_by(r.room))).all()
    for room, seconds in rooms:
        keep = seconds if seconds is not None else settings.envelope_seconds
        if keep is not None:
            async with store.database.write() as conn:
                await _purge_room(conn, store, room, now - keep, now, report)
    if settings.journal_seconds is not None:
        async with store.database.write() as conn:
            await _cut_journal(conn, store, now - settings.journal_seconds, now, report)
    return report


async def _purge_room(
    conn: AsyncConnection, store: SqlStore, room: str, cutoff: int, now: int, report: PurgeReport
) -> None:
    await lock_room(conn, room)
    e, w = t.events.c, t.wraps.c
    newest_rekey = (
        sa.select(sa.func.max(e.seq)).where(e.room == room, e.kind == "rekey").scalar_subquery()
    )
    doomed = sa.and_(e.room == room, e.ts < cutoff, e.kind.in_(PURGED_KINDS), e.seq != newest_rekey)
    seqs = list((await conn.execute(sa.select(e.seq).where(doomed).order_by(e.seq))).scalars())
    wraps = 0
    if seqs:
        result = await conn.execute(sa.delete(t.wraps).where(w.room == room, w.seq.in_(seqs)))
        wraps = int(result.rowcount)
        await conn.execute(sa.delete(t.events).where(e.room == room, e.seq.in_(seqs)))
    gone = await blobs.delete_room_blobs_before(conn, room, cutoff)
    if not seqs and not gone:
        return
    record = AuditRecord(
        action="retention_delete",
        outcome="success",
        room=room,
        seq_from=seqs[0] if seqs else None,
        seq_to=seqs[-1] if seqs else None,
        detail=f"events={len(seqs)} wraps={wraps} blobs={gone} before={cutoff}",
        ts=now,
    )
    await write_audit(conn, store.writer, [record])
    report.rooms += 1
    report.events += len(seqs)
    report.wraps += wraps
    report.blobs += gone


async def _cut_journal(
    conn: AsyncConnection, store: SqlStore, cutoff: int, now: int, report: PurgeReport
) -> None:
    j = t.journal_anchors.c
    query = (
        sa.select(j.anchor_no)
        .where(j.ts <= cutoff, j.published_at.is_not(None))
        .order_by(j.anchor_no.desc())
        .limit(1)
    )
    anchor_no = (await conn.execute(query)).scalar_one_or_none()
    if anchor_no is None:
        return
    bases = {n.node: n.base_idx for n in await rows.nodes(conn)}
    a, n = t.audit.c, t.journal_nodes.c
    cut = 0
    for head in await rows.leaves_of(conn, anchor_no):
        if head.node not in bases or head.head_idx <= bases[head.node]:
            continue
        result = await conn.execute(
            sa.delete(t.audit).where(a.node == head.node, a.idx <= head.head_idx)
        )
        cut += int(result.rowcount)
        await conn.execute(
            sa.update(t.journal_nodes)
            .where(n.node == head.node)
            .values(base_idx=head.head_idx, base_hash=head.head_hash)
        )
    if not cut:
        return
    record = AuditRecord(
        action="journal_cut",
        outcome="success",
        detail=f"anchor #{anchor_no}: {cut} records older than {cutoff} deleted",
        ts=now,
    )
    await write_audit(conn, store.writer, [record])
    report.journal_records = cut
    report.cut_at_anchor = anchor_no


def retention_job(
    store: SqlStore, settings: Settings, clock: Clock
) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """The periodic purge for ``create_app(background=...)``: every
    ``settings.purge_interval_hours`` until stopped; failures are logged and retried."""
    days = settings.envelope_retention_days
    journal_days = settings.journal_retention_days
    retention = RetentionSettings(
        envelope_seconds=int(days * DAY) if days is not None else None,
        journal_seconds=int(journal_days * DAY) if journal_days is not None else None,
    )
    interval = settings.purge_interval_hours * 3600

    async def run(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                report = await purge(store, clock.now(), retention)
                if report.events or report.blobs or report.journal_records:
                    log.info("retention purge: %s", report)
            except Exception:
                log.exception("retention purge failed; retrying next period")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    return run
