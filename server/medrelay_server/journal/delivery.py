"""Batched journaling of deliveries and receipts (ARCHITECTURE §7).

A gateway writes thousands of frames a second; one audit record per (frame, device) would
double the database's write load. :class:`DeliveryJournal` coalesces instead: per
(device, room), the seqs written to the device's socket form ranges, and each contiguous
range becomes one ``deliver`` record (``seq_from``..``seq_to``, ``ts`` the first write,
``ts_end`` the last); cumulative acknowledgements become ``receipt`` records whose
``seq_to`` is the device's new cumulative receipt (``seq_from`` the first seq it newly
covers, when known). So "when did device D get seq s" is answered to within a flush.

Records are flushed, in one transaction, when ``max_records`` are pending, when the oldest
pending one is ``interval`` seconds old (by the injected clock: ``run()`` checks, tests call
``flush()``), and on ``close()``, so a clean shutdown loses nothing. A failed flush keeps
its records for the next one; past ``max_buffered`` (the database down for long) the oldest
are dropped and counted, and the next successful flush journals a ``journal_gap`` record
saying how many, so a loss is never silent.

``record_written`` and ``record_acked`` are synchronous and O(1): call them where the frame
is queued or written and where the receipt is handled, without awaiting anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from ..clock import Clock
from ..store.base import AuditRecord

log = logging.getLogger(__name__)

DELIVER = "deliver"
RECEIPT = "receipt"


Receipt = tuple[str, str, int, int]
"""A device's cumulative receipt to store: (room, device, seq, ts)."""


class JournalSink(Protocol):
    async def journal(
        self,
        records: Sequence[AuditRecord],
        *,
        receipts: Sequence[Receipt] = (),
        seen: Sequence[tuple[str, int]] = (),
    ) -> None: ...


@dataclass(slots=True)
class _Range:
    user: str
    seq_from: int
    seq_to: int
    ts: int
    ts_end: int

    def record(self, action: str, device: str, room: str) -> AuditRecord:
        return AuditRecord(
            action=action,
            outcome="success",
            user=self.user,
            device=device,
            room=room,
            seq_from=self.seq_from,
            seq_to=self.seq_to,
            ts=self.ts,
            ts_end=self.ts_end if self.ts_end != self.ts else None,
        )


_Key = tuple[str, str, str]  # (action, device, room)


class Written(Protocol):
    """Who a frame was written to (a gateway connection, or a :class:`Recipient`)."""

    @property
    def user(self) -> str: ...

    @property
    def device(self) -> str: ...


class Recipient(NamedTuple):
    user: str
    device: str


class DeliveryJournal:
    def __init__(
        self,
        sink: JournalSink,
        clock: Clock,
        *,
        max_records: int = 500,
        interval: float = 1.0,
        max_buffered: int = 100_000,
        max_tracked: int = 100_000,
    ) -> None:
        self._sink = sink
        self._clock = clock
        self._max_records = max_records
        self._interval_ms = int(interval * 1000)
        self._max_buffered = max_buffered
        self._max_tracked = max_tracked
        self._open: dict[_Key, _Range] = {}
        self._closed: list[AuditRecord] = []
        self._acked: dict[tuple[str, str], int] = {}
        self._receipts: dict[tuple[str, str], tuple[int, int]] = {}
        self._seen: dict[str, int] = {}
        self._oldest_ms: int | None = None
        self._lost = 0
        self._wake = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._closing = False
        self.flushed = asyncio.Event()
        """Set after every successful flush (tests and shutdown wait on it)."""

    @property
    def pending(self) -> int:
        return len(self._open) + len(self._closed) + len(self._receipts) + len(self._seen)

    def record(self, record: AuditRecord) -> None:
        """Any other record that may wait for the next flush (a successful sign-in)."""
        self._closed.append(record)
        self._added()

    def record_seen(self, device: str, ts: int) -> None:
        """A connection of ``device`` opened or closed at ``ts``: its last-seen time is
        stored with the next flush (advisory: it only decides retirement, in days)."""
        self._seen[device] = max(ts, self._seen.get(device, ts))
        self._added()

    def record_receipt(
        self, user: str, device: str, room: str, seq: int, ts: int, *, previous: int
    ) -> None:
        """``device`` acknowledged everything up to ``seq`` (more than ``previous``, its
        stored receipt as the caller knows it): journaled like :meth:`record_acked`, and
        the stored receipt moved forward in the same flush. A receipt is advisory (it only
        spares re-delivery), so storing it within a flush interval is enough."""
        key = (room, device)
        held = self._receipts.get(key)
        if held is None or seq > held[0]:
            self._receipts[key] = (seq, ts)
        self.record_acked(user, device, room, seq, ts, previous=previous)
        self._added()

    def record_written(self, user: str, device: str, room: str, seq: int, ts: int) -> None:
        """Seq ``seq`` of ``room`` was written to ``device``'s socket at ``ts``."""
        self.record_written_to((Recipient(user, device),), room, seq, ts)

    def record_written_to(
        self, recipients: Iterable[Written], room: str, seq: int, ts: int
    ) -> None:
        """Seq ``seq`` of ``room`` was written to each recipient's socket at ``ts`` (the live
        fan-out journals a room's recipients of an event in one call)."""
        opened = self._open
        added = False
        for who in recipients:
            device, user = who.device, who.user
            key = (DELIVER, device, room)
            r = opened.get(key)
            if r is not None and seq == r.seq_to + 1 and r.user == user:
                r.seq_to = seq
                r.ts_end = ts
                continue
            if r is not None:
                self._closed.append(r.record(DELIVER, device, room))
            opened[key] = _Range(user, seq, seq, ts, ts)
            added = True
        if added:
            self._added()

    def record_acked(
        self, user: str, device: str, room: str, seq: int, ts: int, *, previous: int | None = None
    ) -> None:
        """``device`` acknowledged everything up to ``seq`` (cumulative) at ``ts``;
        ``previous``, when the caller knows it, is the receipt it had before."""
        tracked = (device, room)
        last = self._acked.get(tracked, previous)
        if last is not None and seq <= last:
            return
        self._track(tracked, seq)
        key = (RECEIPT, device, room)
        r = self._open.get(key)
        if r is not None and r.user == user:
            r.seq_to, r.ts_end = seq, ts
            return
        if r is not None:
            self._closed.append(r.record(RECEIPT, device, room))
        start = seq if last is None else last + 1
        self._open[key] = _Range(user, start, seq, ts, ts)
        self._added()

    def due(self) -> bool:
        if self.pending >= self._max_records or self._lost:
            return True
        return self._oldest_ms is not None and (
            self._clock.now_ms() - self._oldest_ms >= self._interval_ms
        )

    async def flush(self) -> int:
        """Write everything pending in one transaction; returns how many records. On a
        store failure the records stay pending and the error propagates."""
        async with self._flush_lock:
            batch = list(self._closed)
            batch += [r.record(a, d, room) for (a, d, room), r in self._open.items()]
            lost = self._lost
            if lost:
                batch.insert(0, _gap_record(lost, self._clock.now()))
            receipts, seen = self._receipts, self._seen
            if not batch and not receipts and not seen:
                return 0
            opened, closed = self._open, self._closed
            self._open, self._closed, self._oldest_ms, self._lost = {}, [], None, 0
            self._receipts, self._seen = {}, {}
            stored = [(room, device, seq, ts) for (room, device), (seq, ts) in receipts.items()]
            try:
                await self._sink.journal(batch, receipts=stored, seen=sorted(seen.items()))
            except BaseException:
                self._restore_receipts(receipts, seen)
                self._restore(opened, closed, lost)
                raise
            self.flushed.set()
            return len(batch)

    async def run(self) -> None:
        """Flush whenever due: woken by the size threshold, else checking every tenth of
        the interval. Ends (after a final flush) when :meth:`close` is called."""
        tick = max(self._interval_ms / 10_000, 0.01)
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=tick)
            self._wake.clear()
            if self.due():
                try:
                    await self.flush()
                except Exception:
                    log.exception("delivery journal flush failed; %d pending", self.pending)

    async def close(self) -> None:
        """Stop ``run`` and flush what is pending (raises if the store is unavailable)."""
        self._closing = True
        self._wake.set()
        await self.flush()

    def _added(self) -> None:
        if self._oldest_ms is None:
            self._oldest_ms = self._clock.now_ms()
        if self.pending >= self._max_records:
            self._wake.set()

    def _track(self, key: tuple[str, str], seq: int) -> None:
        self._acked.pop(key, None)
        self._acked[key] = seq
        if len(self._acked) > self._max_tracked:
            del self._acked[next(iter(self._acked))]

    def _restore_receipts(
        self, failed: dict[tuple[str, str], tuple[int, int]], seen: dict[str, int]
    ) -> None:
        """Receipts are cumulative: a newer one that arrived meanwhile supersedes; at most
        one is held per (room, device), and past ``max_tracked`` the oldest are forgotten
        (a forgotten receipt only means a re-delivery the client drops)."""
        for key, held in failed.items():
            newer = self._receipts.get(key)
            if newer is None or newer[0] < held[0]:
                self._receipts[key] = held
        while len(self._receipts) > self._max_tracked:
            del self._receipts[next(iter(self._receipts))]
        for device, ts in seen.items():
            self._seen[device] = max(ts, self._seen.get(device, ts))
        while len(self._seen) > self._max_tracked:
            del self._seen[next(iter(self._seen))]

    def _restore(self, opened: dict[_Key, _Range], closed: list[AuditRecord], lost: int) -> None:
        """Put a failed batch back, as closed records, in front of what arrived meanwhile;
        past ``max_buffered`` the oldest go (counted in ``_lost``)."""
        closed = closed + [r.record(*key) for key, r in opened.items()]
        self._closed = closed + self._closed
        self._lost += lost
        excess = self.pending - self._max_buffered
        if excess > 0:
            del self._closed[:excess]
            self._lost += excess
        if self._oldest_ms is None and self.pending:
            self._oldest_ms = self._clock.now_ms()


def _gap_record(lost: int, now: int) -> AuditRecord:
    return AuditRecord(
        action="journal_gap",
        outcome="failure",
        detail=f"{lost} delivery/receipt records dropped while the store was unavailable",
        ts=now,
    )
