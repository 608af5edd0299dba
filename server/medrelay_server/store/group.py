"""Group commit: the sends a process receives concurrently share one transaction.

Every chained write takes this node's journal row lock and holds it until its commit is on
disk, so one node's sends commit one after another; batching them makes that one commit
(one WAL flush, one chain-head update) per batch instead of per send (ARCHITECTURE §6).

The batch's audit records are chained together at its end (one node-row lock, one insert,
one head update), in the order of the sends. Each send in a batch is still checked on its
own inside the transaction (room lock, membership, idempotency, epoch): a refusal
(``RequestError``) is raised by those checks before the send writes anything, so it fails
alone and the others go on. Nobody is answered before the commit: a failed commit fails
every send of the batch (the clients retry; sends are idempotent). If a batch fails for any
other reason, its sends are retried one transaction each, so one send's database error
never fails its neighbours.

On PostgreSQL a batch whose rooms and senders this node knows is first tried in one call
(:mod:`.onetrip`): it stores the batch if the node's predictions hold and stores nothing if
not. A call that found a room moved on by another node answers the rooms' state and the
batch is called again from it (up to ``onetrip.CALLS`` calls); any other miss runs the
batch the usual way. Batches of any size (up to ``max_batch``) take
that call: the bound of four sends it once had hid a cached plan that scanned all of
``events`` (``engine``: plan_cache_mode).

Batches lock their rooms in room order, as every other multi-room writer does, so batches
(on one node or several) cannot deadlock. A connection has one send in flight at a time, so
its sends keep their order; sends of different connections that arrive together may be
stored in either order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medrelay_protocol.errors import RequestError

from . import messages
from .audit import ChainWriter
from .base import AppendResult
from .engine import Database
from .onetrip import NOT_TRIED, OneTrip

log = logging.getLogger(__name__)

_Item = tuple[dict[str, Any], "asyncio.Future[AppendResult]", float]

MAX_BATCH = 256
"""Sends per batch at most. With one batch in flight, a node stores at most this many sends
per batch call: at 64 that was the node's ceiling in rooms of 10 on PostgreSQL (batches
full at 63-64 sends, about 20 ms a call, so about 3,200 sends/s, while the node's loop
still had time to spare; a backlog then grew without end). At 256, a backlog after a
burst goes in one or two calls (``docs/performance.md``, "Fourteenth round"). The
statements take the batch as arrays, so their size does not change the number of
parameters; the largest batch carries 256 envelopes of at most 70 KiB."""

MAX_FANOUT = 3_200
"""Local deliveries per batch at most, where the app says how many a send's room has on
this node (:attr:`GroupCommitter.fanout`). A batch's sends are answered together, and
their events go out in one pass of the event loop: 256 sends into rooms of 50 would be
12,800 frames in one pass (about 90 ms here) while every other frame waits. The bound is
what 64 sends into rooms of 50 made, the most a batch made before the bound of 256;
sends into rooms of 10 still go 256 at a time. A batch always takes at least one send."""


@dataclass(frozen=True, slots=True)
class BatchTimes:
    """Where one committed batch's time went, in seconds: ``waits`` is each send's time
    from its append to the start of its batch (a batch in flight holds it back); then the
    batch's stages: ``begin`` (a pooled connection and BEGIN), ``read`` (the room locks and
    the senders' roles), ``write`` (events, last seqs and audit rows) and ``commit``
    (COMMIT, with its WAL flush)."""

    waits: tuple[float, ...]
    begin: float
    read: float
    write: float
    commit: float
    path: str = "full"
    """``one_trip`` (stored by one call: only ``call`` counts, the four stages are 0),
    ``later_call`` (earlier calls found rooms moved on and answered their state, a later
    one stored the batch; only ``call`` counts), ``full`` (the usual way, not tried in
    one call) or ``after_miss`` (tried in calls, a prediction missed, then the usual
    way)."""
    call: float = 0.0
    """The one-trip calls' time, stored or missed."""
    misses: tuple[str, ...] = ()
    """Which prediction each missed call found wrong: ``room`` (a room's last seq, epoch or
    pending flag), ``role``, ``retried`` (a send already stored) or ``head`` (the journal
    head)."""


BatchObserver = Callable[[BatchTimes], None]


class GroupCommitter:
    """``depth``: how many batches may be in flight at once (default 1). With 2, a send that
    arrives while a batch waits on its round trips starts the next batch at once instead of
    waiting for that batch's commit; the two meet in PostgreSQL where they share a room
    (row locks, taken in room order) and at the node's chain head (the later batch chains
    after the earlier one's planned tail, ``ChainWriter.take_known_head``, and its head
    update waits for that commit). On one node under load that bought nothing: the later
    batch mostly waited for the earlier one's room locks, every round trip's answer waited
    longer for the busy event loop, and sends waited longer in all (``docs/performance.md``,
    "Sixth round"). SQLite keeps one batch in flight whatever ``depth`` says."""

    def __init__(
        self,
        db: Database,
        writer: ChainWriter,
        *,
        max_batch: int = MAX_BATCH,
        max_fanout: int = MAX_FANOUT,
        depth: int | None = None,
        one_trip: OneTrip | None = None,
    ) -> None:
        self._db = db
        self._writer = writer
        self._one_trip = one_trip
        self._max_batch = max_batch
        self._max_fanout = max_fanout
        if depth is not None and depth < 1:
            raise ValueError("depth must be at least 1")
        # SQLite: always one (its writes queue on one lock, and a second batch would wait there)
        self._depth = 1 if db.is_sqlite or depth is None else depth
        self._queue: list[_Item] = []
        self._drainers: set[asyncio.Task[None]] = set()
        self.observer: BatchObserver | None = None
        """Called with each committed batch's :class:`BatchTimes` (the app's metrics)."""
        self.fanout: Callable[[str], int] | None = None
        """A room's local deliveries per event (the app's delivery hubs), for
        ``max_fanout``; without it only ``max_batch`` bounds a batch."""

    async def append(self, **kw: Any) -> AppendResult:
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append((kw, future, time.monotonic()))
        if len(self._drainers) < self._depth:
            self._drainers.add(asyncio.create_task(self._drain()))
        return await future

    def heard(self, room: str, seq: int) -> None:
        """A node committed ``room`` up to ``seq`` (PostgreSQL NOTIFY)."""
        if self._one_trip is not None:
            self._one_trip.predictions.heard(room, seq)

    async def close(self) -> None:
        if self._drainers:
            await asyncio.gather(*self._drainers, return_exceptions=True)

    async def _drain(self) -> None:
        try:
            await self._drain_queue()
        finally:  # at once, not in a done callback: a send appended before that callback
            # ran would find the set full and wait for a drainer that had already ended
            self._drainers.discard(asyncio.current_task())

    async def _drain_queue(self) -> None:
        while self._queue:
            batch = self._take()
            batch = [item for item in batch if not item[1].cancelled()]
            if not batch:
                continue
            try:
                await self._run(sorted(batch, key=lambda item: str(item[0]["room"])))
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch, exc)
                    continue
                for item in batch:
                    try:
                        await self._run([item])
                    except Exception as single:
                        _fail([item], single)

    def _take(self) -> list[_Item]:
        """The next batch: up to ``max_batch`` sends, fewer once their rooms' local
        deliveries reach ``max_fanout`` (at least one send)."""
        count = min(len(self._queue), self._max_batch)
        fanout = self.fanout
        if fanout is not None:
            deliveries = 0
            for n, (kw, _, _) in enumerate(self._queue[:count], 1):
                deliveries += fanout(str(kw["room"]))
                if deliveries >= self._max_fanout:
                    count = n
                    break
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        outcomes: list[AppendResult | RequestError] = []
        clock = time.monotonic
        started = clock()
        items = [kw for kw, _, _ in batch]
        trip = NOT_TRIED
        if self._one_trip is not None:
            trip = await self._one_trip.run(items, clock)
        if trip.outcomes is not None:
            self._answer(batch, list(trip.outcomes))
            path = "one_trip" if trip.calls == 1 else "later_call"
            times = BatchTimes((), 0, 0, 0, 0, path, trip.seconds, trip.misses)
            self._observe(batch, started, times)
            return
        tried = clock()
        async with self._db.batch_write() as (conn, pg), self._writer.deferred(conn, pg=pg):
            begun = clock()
            sends = messages.SendBatch(conn, self._writer, pg=pg)
            outcomes = await sends.append_many(items)
            read = clock()
            await sends.finish()
            written = clock()
        committed = clock()
        if self._one_trip is not None:
            self._one_trip.predictions.learn(sends.state, sends.roles)
        self._answer(batch, outcomes)
        times = BatchTimes(
            waits=(),
            begin=begun - tried,
            read=read - begun,
            write=written - read,
            commit=committed - written,
            path="after_miss" if trip.misses else "full",
            call=trip.seconds,
            misses=trip.misses,
        )
        self._observe(batch, started, times)

    @staticmethod
    def _answer(batch: list[_Item], outcomes: list[AppendResult | RequestError]) -> None:
        for (_, future, _), outcome in zip(batch, outcomes, strict=True):
            if future.done():
                continue
            if isinstance(outcome, RequestError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    def _observe(self, batch: list[_Item], started: float, times: BatchTimes) -> None:
        if self.observer is None:
            return
        times = dataclasses.replace(
            times, waits=tuple(started - appended for _, _, appended in batch)
        )
        try:  # after the results: the batch is committed and answered, whatever this does
            self.observer(times)
        except Exception:
            log.exception("send batch observer failed")


def _fail(batch: list[_Item], exc: Exception) -> None:
    for _, future, _ in batch:
        if not future.done():
            future.set_exception(exc)
