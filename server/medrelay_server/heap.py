"""The garbage collector's pauses: timed, and kept off the start-up heap.

CPython's cyclic collector stops the event loop while it runs. A full (generation 2)
collection walks every tracked object, and right after start-up that is about 100,000
objects of imported code (SQLAlchemy, the server's modules) that will never be garbage: one
such collection costs 50-70 ms of a stopped loop on the bench machine, and under load one
runs every few seconds, so it shows as a single slow window in the send-to-deliver p99
(``docs/performance.md``, "Fourth round").

:meth:`HeapWatch.freeze_startup` collects once and then ``gc.freeze()``s what survived:
those objects move to the permanent generation, which no collection walks, and later
collections only walk what the server allocated while running. It is a process-wide
step, so only the process's entry point asks for it (``medrelay serve``: ``create_app``'s
``freeze_heap``); an app built in a test process does not freeze its host.

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
        """Collect what start-up left behind, then freeze the rest; returns how many
        objects are now frozen."""
        gc.collect()
        gc.freeze()
        count = gc.get_freeze_count()
        self._frozen.set(count)
        return count
