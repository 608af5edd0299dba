"""The garbage collector's pauses: timed, and kept off the start-up heap.

CPython's cyclic collector stops the event loop while it runs. A full (generation 2)
collection walks every tracked object, and right after start-up that is about 100,000
objects of imported code (SQLAlchemy, the server's modules) that will never be garbage: one
such collection costs 50-70 ms of a stopped loop on the bench machine, and under load one
runs every few seconds, so it shows as a single slow window in the send-to-deliver p99
(``docs/performance.md``, "Fourth round").

:meth:`HeapWatch.freeze_startup` collects once and then ``gc.freeze()``s what survived:
those objects move to the permanent generation, which no collection walks, and later
collections only walk what the server allocated while running.

That is not enough on its own. A loaded node's running heap is about 190 objects per
connection (the coroutines of each connection's read path, queues, events): 86,000 with
450 connections, and a full collection over it still took 45-80 ms here, every 10-50 s
under load, because with CPython's default thresholds (700, 10, 10) a young collection
runs every 700 allocations and promotes whatever is in flight at that moment (a send's
futures and frames, waiting on a database round trip), so the old generation fills with
objects that die soon after. :data:`THRESHOLDS` lets a young collection wait for 10,000
allocations, by which time most of a send's objects have died by reference counting, and
asks for a full collection only after 5,000 young ones. The send path makes little cyclic
garbage (in the bench's load windows no young collection took over 10 ms), so the longer
wait holds little memory. Room and membership changes do make cycles: a young collection
after a burst of room set-up freed 9,000 objects in 10 ms.

Both are process-wide steps, so only the process's entry point asks for them (``medrelay
serve``: ``create_app``'s ``freeze_heap``); an app built in a test process leaves its host's
collector alone.

The pauses themselves are on ``/metrics`` as ``medrelay_gc_pause_seconds`` (by generation),
with the number of frozen objects in ``medrelay_gc_frozen_objects``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from prometheus_client import Gauge, Histogram

# seconds: a young collection is tens of microseconds; a full one over the start-up heap
# was 50-70 ms
PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
# young collection every 10,000 net allocations; a middle one every 50 young ones; a full
# one every 100 middle ones (and, as always, only once the old generation grew by a quarter)
THRESHOLDS = (10_000, 50, 100)


class HeapWatch:
    """Times each collection into ``pauses`` while installed (``install``/``remove``)."""

    def __init__(self, pauses: Histogram, frozen: Gauge) -> None:
        self._pauses = {g: pauses.labels(generation=str(g)) for g in (0, 1, 2)}
        self._frozen = frozen
        self._started = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        child = self._pauses.get(info.get("generation", 2))
        if child is not None and self._started:
            child.observe(time.perf_counter() - self._started)
        self._started = 0.0

    def install(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def remove(self) -> None:
        while self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def freeze_startup(self) -> int:
        """Collect what start-up left behind, freeze the rest and set :data:`THRESHOLDS`;
        returns how many objects are now frozen."""
        gc.collect()
        gc.freeze()
        gc.set_threshold(*THRESHOLDS)
        count = gc.get_freeze_count()
        self._frozen.set(count)
        return count
