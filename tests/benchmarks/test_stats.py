"""Joining the load generators' records (``bench.stats.join``) and the per-span view of a
window's latency (``bench.stats.timeline``), on records built by hand in the workers' own
format: message keys and send times, arrival keys and times."""

from __future__ import annotations

import math
from array import array
from typing import Any

from bench.loadgen import KEY_SHIFT
from bench.stats import join, timeline

ROOM = 3  # room index of every message here; three devices receive each


def _records(sends: dict[int, float], arrivals: list[tuple[int, float]]) -> dict[str, Any]:
    return {
        "sent": len(sends),
        "acked": len(sends),
        "send_k": array("q", sends.keys()).tobytes(),
        "send_t": array("d", sends.values()).tobytes(),
        "arr_k": array("q", (k for k, _ in arrivals)).tobytes(),
        "arr_t": array("d", (t for _, t in arrivals)).tobytes(),
        "errors": {},
        "late": 0.0,
        "closed": 0,
        "first": min(sends.values(), default=0.0),
        "last": max(sends.values(), default=0.0),
    }


def _key(i: int) -> int:
    return (ROOM << KEY_SHIFT) | i


def _window() -> list[dict[str, Any]]:
    """Two workers. Messages are sent every 0.1 s from t=100 for 2 s; each reaches three
    devices (spread over the two workers) 2 ms after it was sent, except those sent at
    100.5 and 100.6, which take 40 ms: one slow episode in the window's second half-second.
    One arrival belongs to no message of the window (a late one from an earlier window)."""
    sends = {_key(i): 100.0 + i / 10 for i in range(20)}
    arrivals: list[tuple[int, float]] = []
    for i, (k, t) in enumerate(sends.items()):
        delay = 0.040 if i in (5, 6) else 0.002
        arrivals += [(k, t + delay)] * 3
    half = {k: sends[k] for k in list(sends)[::2]}
    other = {k: sends[k] for k in list(sends)[1::2]}
    stray = [(_key(999), 99.0)]
    return [
        _records(half, arrivals[: len(arrivals) // 2] + stray),
        _records(other, arrivals[len(arrivals) // 2 :]),
    ]


def test_join_counts_every_arrival_of_the_windows_messages() -> None:
    w = join(_window(), {ROOM: 3})
    assert (w.sent, w.acked, w.expected, w.delivered) == (20, 20, 60, 60)
    assert w.complete
    assert math.isclose(w.p(0.5), 0.002, abs_tol=1e-9)
    assert math.isclose(w.p(1.0), 0.040, abs_tol=1e-9)


def test_the_timeline_puts_the_slow_episode_in_its_span() -> None:
    spans = timeline(_window(), 0.5)
    assert [n for n, _, _ in spans] == [15, 15, 15, 15]
    p99s = [round(p99, 6) for _, _, p99 in spans]
    assert p99s == [0.002, 0.040, 0.002, 0.002]
    # six of the span's fifteen deliveries were slow: its median is not
    assert [round(p50, 6) for _, p50, _ in spans] == [0.002] * 4


def test_a_span_without_sends_is_empty_not_an_error() -> None:
    records = [_records({_key(0): 10.0, _key(1): 11.0}, [(_key(0), 10.001), (_key(1), 11.001)])]
    spans = timeline(records, 0.25)
    assert len(spans) == 5
    assert spans[0][0] == 1 and spans[-1][0] == 1
    assert all(n == 0 and math.isnan(p99) for n, _, p99 in spans[1:-1])
    assert timeline(records, 0.0) == []
    assert timeline([_records({}, [])], 0.5) == []
