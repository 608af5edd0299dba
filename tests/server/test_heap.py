"""The collector's pauses (``heap.HeapWatch``): timed by generation while installed, not
after removal; ``freeze_startup`` moves the live heap out of the collector's reach. The
served process doing it on start-up is checked in ``tests/multinode/test_heap_served.py``."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from medrelay_server.heap import THRESHOLDS, HeapWatch
from medrelay_server.metrics import Metrics


def _count(metrics: Metrics, generation: int) -> float:
    value = metrics.registry.get_sample_value(
        "medrelay_gc_pause_seconds_count", {"generation": str(generation)}
    )
    return value or 0.0


@pytest.fixture
def watch() -> Iterator[tuple[Metrics, HeapWatch]]:
    """Automatic collections are off meanwhile (one could run between the test's reads),
    so only the test's own ``gc.collect`` calls are counted."""
    metrics = Metrics()
    heap = HeapWatch(metrics.gc_pauses, metrics.gc_frozen)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield metrics, heap
    finally:
        heap.remove()
        if enabled:
            gc.enable()


def test_each_collection_is_timed_under_its_generation(
    watch: tuple[Metrics, HeapWatch],
) -> None:
    metrics, heap = watch
    heap.install()
    heap.install()  # installing twice does not count twice
    before = {g: _count(metrics, g) for g in (0, 1, 2)}
    gc.collect(0)
    gc.collect(2)
    assert _count(metrics, 0) == before[0] + 1
    assert _count(metrics, 2) == before[2] + 1
    total = metrics.registry.get_sample_value("medrelay_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0


def test_nothing_is_timed_after_removal(watch: tuple[Metrics, HeapWatch]) -> None:
    metrics, heap = watch
    heap.install()
    heap.remove()
    assert heap._on_gc not in gc.callbacks
    gc.collect(0)
    assert _count(metrics, 0) == 0


def test_freeze_startup_freezes_the_live_heap(watch: tuple[Metrics, HeapWatch]) -> None:
    metrics, heap = watch
    assert gc.get_freeze_count() == 0  # nothing else in the test process froze its host
    before = gc.get_threshold()
    assert before != THRESHOLDS
    try:
        frozen = heap.freeze_startup()
        # the test process's imported code alone is tens of thousands of objects
        assert frozen == gc.get_freeze_count() > 10_000
        assert metrics.registry.get_sample_value("medrelay_gc_frozen_objects") == frozen
        assert gc.get_threshold() == THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
