"""The consult scenario's stepped search (``bench.scenarios.consult``) against a fake system
whose capacity is known: a step passes when its offered load is at most the capacity. No
server runs; this checks the search's arithmetic (steps, bisections, half load)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from bench.scenarios import Plan, consult
from bench.stats import Window

ROOM = 10


@dataclass
class FakeSystem:
    capacity: float  # deliveries/s the fake sustains
    medrelay: bool = True
    label: str = "fake"
    offered: list[float] = field(default_factory=list)
    settled: int = 0

    def __post_init__(self) -> None:
        members = [f"d{i}" for i in range(30 * ROOM)]
        self.topo = SimpleNamespace(
            sets={"consult10": members},
            room_sets={"consult10": ["room0"]},
            receivers={"room0": ROOM},
        )

    def window(self, streams: list[Any], seconds: float, *, offered: float, **_: Any) -> Window:
        self.offered.append(offered)
        ok = offered <= self.capacity
        sent = max(1, round(offered / ROOM * seconds))
        w = Window(offered=offered, sent=sent, acked=sent, expected=sent * ROOM)
        w.seconds = seconds
        w.delivered = w.expected if ok else w.expected // 2
        w.latencies = [0.001] * 100
        w.first_third_p50 = w.last_third_p50 = 0.001
        return w

    def settle(self, seconds: float) -> None:
        self.settled += 1


def plan(refine: int) -> Plan:
    return Plan(
        step_seconds=1.0,
        latency_seconds=2.0,
        start_level=200,
        start_level_50=400,
        bare_start_level=16_000,
        factor=1.5,
        refine=refine,
        max_level=400_000,
        vitals_seconds=1.0,
        idle_connections=1,
        hold_seconds=1.0,
        removal_spacing=0.1,
        profile_seconds=1.0,
    )


@pytest.mark.parametrize("refine", [0, 1, 2, 3])
def test_each_bisection_narrows_the_bracket_around_the_capacity(refine: int) -> None:
    capacity = 5_000.0
    system = FakeSystem(capacity)
    res = consult(system, "consult10", plan(refine))  # type: ignore[arg-type]
    assert res.best is not None and res.half is not None
    best = res.best.offered
    assert best <= capacity
    # the x1.5 search brackets the capacity within one factor; each bisection halves the
    # bracket's logarithm
    failed = min(level for level in system.offered if level > capacity)
    assert failed / best <= 1.5 ** (0.5**refine) * (1 + 1e-9)
    steps = [w.offered for w in res.steps]
    assert len(steps) == len(set(steps))  # no level is tried twice
    assert res.half.offered == pytest.approx(best / 2)
    # every failed step lets the server settle before the next window
    assert system.settled == sum(1 for level in steps if level > capacity)


def test_a_capacity_below_the_first_step_is_searched_downwards() -> None:
    system = FakeSystem(100.0)
    res = consult(system, "consult10", plan(2))  # type: ignore[arg-type]
    assert res.best is not None
    assert res.best.offered <= 100.0
    failed = min(level for level in system.offered if level > 100.0)
    assert failed / res.best.offered <= math.sqrt(math.sqrt(1.5)) * (1 + 1e-9)
