"""Joining a window's records from every worker: deliveries, rates and latencies."""

from __future__ import annotations

import math
from array import array
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from .loadgen import KEY_SHIFT

K = TypeVar("K", str, int)

MIN_PER_THIRD = 15  # messages: fewer and the growth test is noise


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


@dataclass
class Window:
    offered: float = 0.0  # deliveries/s asked for
    sent: int = 0
    acked: int = 0
    expected: int = 0
    delivered: int = 0
    seconds: float = 0.0  # the window's planned length
    late: float = 0.0  # worst lateness of a send against its schedule
    cpu: float = 0.0  # server CPU seconds over the window (with its drain)
    closed: int = 0
    skipped: int = 0  # gated sends not made: the previous one was not yet acknowledged
    receipts: int = 0  # cumulative receipts the devices sent during the window
    commits: int = 0  # database transactions committed meanwhile (PostgreSQL only)
    sessions: int = 0  # database sessions opened meanwhile (systems with ``cpu_parts``)
    # mean sessions of the database per state while the window sent (``db.sample_activity``)
    pg_activity: dict[str, float] = field(default_factory=dict)
    # where the machine's CPU went over the window (systems that ask for it): CPU seconds
    # per server node ("node-1", ...), "generators", "postgres", "redis", "machine" (every
    # core busy), and "wall" (seconds the reading spanned)
    cpu_parts: dict[str, float] = field(default_factory=dict)
    # where the primary node's sends spent their store time over the window (means,
    # seconds): "wait" for a batch, the batch's "begin", "read", "write", "commit"; and
    # "sends" per batch (``parse_send_stages``; medrelay only)
    store_stages: dict[str, float] = field(default_factory=dict)
    # the primary node's garbage collections over the window: generation -> (collections,
    # total pause in seconds) (``gc_pauses``; medrelay only)
    gc: dict[int, tuple[int, float]] = field(default_factory=dict)
    errors: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, sorted
    first_third_p50: float = math.nan  # median latency of the sends in the first third
    last_third_p50: float = math.nan  # ... and in the last third: growth means a backlog

    @property
    def rate(self) -> float:
        """Deliveries per second over the window (its planned length)."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    @property
    def growing(self) -> bool:
        """Latency grew across the window: the server fell behind the offered load."""
        a, b = self.first_third_p50, self.last_third_p50
        if math.isnan(a) or math.isnan(b):
            return False
        return b > max(3 * a, a + 0.050)

    @property
    def complete(self) -> bool:
        return self.expected > 0 and self.delivered >= self.expected and self.acked >= self.sent

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    def per_cpu(self) -> float:
        return self.delivered / self.cpu if self.cpu > 0 else math.nan

    def cores(self) -> dict[str, float]:
        """``cpu_parts`` as cores busy on average (CPU seconds / wall seconds), plus
        "nodes" (every server node) and "other" (the machine less everything named: the
        coordinator, the kernel's interrupt work, other users' work)."""
        wall = self.cpu_parts.get("wall", 0.0)
        if wall <= 0:
            return {}
        out = {k: v / wall for k, v in self.cpu_parts.items() if k != "wall"}
        out["nodes"] = sum(v for k, v in out.items() if k.startswith("node-"))
        named = out["nodes"] + sum(out.get(k, 0.0) for k in ("generators", "postgres", "redis"))
        out["other"] = max(0.0, out.get("machine", 0.0) - named)
        return out

    def describe(self) -> str:
        text = (
            f"offered {self.offered:8.0f}/s delivered {self.delivered}/{self.expected} "
            f"({self.rate:8.0f}/s) acked {self.acked}/{self.sent} "
            f"p50 {self.p(0.5) * 1e3:7.2f} p99 {self.p(0.99) * 1e3:7.2f} "
            f"p99.9 {self.p(0.999) * 1e3:7.2f} ms late {self.late * 1e3:5.0f} ms "
            f"cpu {self.cpu:5.2f}s errors {dict(self.errors)} closed {self.closed}"
        )
        c = self.cores()
        if c:
            nodes = " + ".join(f"{v:.2f}" for k, v in c.items() if k.startswith("node-"))
            text += (
                f"\n      cores busy: nodes {nodes}, generators {c['generators']:.2f}, "
                f"postgres {c['postgres']:.2f}, redis {c['redis']:.2f}, other "
                f"{c['other']:.2f}; machine {c['machine']:.2f}; database commits "
                f"{self.commits}, sessions opened {self.sessions}"
            )
        if self.store_stages:
            text += "\n      " + describe_stages(self.store_stages)
        if self.gc:
            parts = ", ".join(f"gen{g} {n} ({t * 1e3:.1f} ms)" for g, (n, t) in self.gc.items())
            text += f"\n      garbage collections (total pause): {parts}"
        a = self.pg_activity
        if a.get("samples"):
            text += (
                f"\n      database sessions (mean of {a['samples']:.0f} samples): waiting on a "
                f"lock {a['lock']:.2f}, active {a['active']:.2f}, in a transaction waiting "
                f"for the node {a['in transaction']:.2f}"
            )
        return text


STAGES = ("wait", "call", "begin", "read", "write", "commit")


def _sum_count(out: dict[K, tuple[float, float]], key: K, sample: Sample) -> None:
    """Fold a histogram's ``_sum`` or ``_count`` sample into ``out[key]`` = (sum, count)."""
    total, count = out.get(key, (0.0, 0.0))
    if sample.name.endswith("_sum"):
        out[key] = (sample.value, count)
    elif sample.name.endswith("_count"):
        out[key] = (total, sample.value)


def parse_send_stages(text: str) -> dict[str, tuple[float, float]]:
    """From a node's ``/metrics``: (sum, count) of each send's wait for its group-commit
    batch ("wait"), of each batch stage ("call": the one-trip call; "begin" to "commit":
    the batches run the usual way), of sends per batch ("sends"), and (batches stored in
    one trip, all batches) as "one_trip", so that its mean is the one-trip share, and
    likewise "later_call" (stored by a later call after earlier ones found rooms moved) and
    "miss_room", "miss_role", ... (calls that missed on that prediction, per batch) and
    "gap_broker", "gap_notify", "gap_reconnect", "gap_poll" (delivery's gap reads per
    send)."""
    out: dict[str, tuple[float, float]] = {}
    paths: dict[str, float] = {}
    misses: dict[str, float] = {}
    gaps: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "medrelay_send_batches":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    paths[sample.labels.get("path", "")] = sample.value
            continue
        if family.name == "medrelay_gap_reads":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    gaps[sample.labels.get("reason", "")] = sample.value
            continue
        if family.name == "medrelay_send_batch_misses":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    misses[sample.labels.get("prediction", "")] = sample.value
            continue
        if family.name not in (
            "medrelay_send_wait_seconds",
            "medrelay_send_batch_seconds",
            "medrelay_send_batch_sends",
        ):
            continue
        for sample in family.samples:
            if family.name == "medrelay_send_wait_seconds":
                key = "wait"
            elif family.name == "medrelay_send_batch_sends":
                key = "sends"
            else:
                key = sample.labels.get("stage", "")
            _sum_count(out, key, sample)
    if paths:
        out["one_trip"] = (paths.get("one_trip", 0.0), sum(paths.values()))
        out["later_call"] = (paths.get("later_call", 0.0), sum(paths.values()))
        for prediction, count in misses.items():  # missed calls per batch
            out["miss_" + prediction] = (count, sum(paths.values()))
    sends = out.get("wait", (0.0, 0.0))[1]
    for reason, count in gaps.items():  # gap reads per send stored on this node
        out["gap_" + reason] = (count, sends)
    return out


def stage_means(
    before: Mapping[str, tuple[float, float]], after: Mapping[str, tuple[float, float]]
) -> dict[str, float]:
    """Each stage's mean over what was observed between two readings."""
    means: dict[str, float] = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        if count > count0:
            means[key] = (total - total0) / (count - count0)
    return means


def parse_gc_pauses(text: str) -> dict[int, tuple[float, float]]:
    """From a node's ``/metrics``: (total pause in seconds, collections) of the garbage
    collector, by generation (``medrelay_gc_pause_seconds``, ``heap.py``)."""
    out: dict[int, tuple[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "medrelay_gc_pause_seconds":
            continue
        for sample in family.samples:
            _sum_count(out, int(sample.labels.get("generation", "-1")), sample)
    return out


def gc_pauses(
    before: Mapping[int, tuple[float, float]], after: Mapping[int, tuple[float, float]]
) -> dict[int, tuple[int, float]]:
    """Per generation, the collections between two readings and their total pause (s)."""
    out: dict[int, tuple[int, float]] = {}
    for generation, (total, count) in sorted(after.items()):
        total0, count0 = before.get(generation, (0.0, 0.0))
        out[generation] = (int(count - count0), total - total0)
    return out


def describe_stages(stages: Mapping[str, float]) -> str:
    parts = " / ".join(f"{stages.get(k, math.nan) * 1e3:.1f}" for k in STAGES)
    return (
        f"send store, mean ms: wait / call / begin / read / write / commit {parts}; "
        f"{stages.get('sends', math.nan):.1f} sends per batch, "
        f"{stages.get('one_trip', math.nan):.0%} in one trip, "
        f"{stages.get('later_call', math.nan):.0%} by a later call"
        + "".join(
            f", {key[5:]} misses {value:.0%}"
            for key, value in sorted(stages.items())
            if key.startswith("miss_") and value
        )
        + "".join(
            f", {key[4:]} gap reads per send {value:.2f}"
            for key, value in sorted(stages.items())
            if key.startswith("gap_") and value
        )
    )


def _send_times(results: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """Send time by message key, from every worker's records."""
    send_at: dict[int, float] = {}
    for r in results:
        keys = array("q")
        keys.frombytes(r["send_k"])
        times = array("d")
        times.frombytes(r["send_t"])
        send_at.update(zip(keys, times, strict=True))
    return send_at


def _deliveries(
    results: Sequence[Mapping[str, Any]], send_at: Mapping[int, float]
) -> Iterator[tuple[float, float]]:
    """(send time, latency) of every arrival of a message sent in the window."""
    for r in results:
        keys = array("q")
        keys.frombytes(r["arr_k"])
        times = array("d")
        times.frombytes(r["arr_t"])
        get = send_at.get
        for k, t in zip(keys, times, strict=True):
            sent = get(k)
            if sent is not None:
                yield sent, t - sent


def join(results: Sequence[Mapping[str, Any]], receivers: Mapping[int, int]) -> Window:
    """``receivers``: room index -> devices that should get each message of that room."""
    w = Window()
    send_at = _send_times(results)
    first, last = math.inf, 0.0
    for r in results:
        w.sent += r["sent"]
        w.acked += r["acked"]
        w.errors.update({int(k): v for k, v in r["errors"].items()})
        w.late = max(w.late, r["late"])
        w.closed += r["closed"]
        w.receipts += r.get("receipts", 0)
        if r["first"]:
            first = min(first, r["first"])
        last = max(last, r["last"])
    w.seconds = last - first if last > first else 0.0
    w.expected = sum(receivers.get(k >> KEY_SHIFT, 0) for k in send_at)
    lat: list[float] = []
    thirds: list[list[float]] = [[], [], []]
    span = (last - first) / 3 if last > first else 0.0
    sends_per_third = [0, 0, 0]
    if span:
        for s in send_at.values():
            sends_per_third[min(2, int((s - first) / span))] += 1
    for sent, latency in _deliveries(results, send_at):
        lat.append(latency)
        if span:
            thirds[min(2, int((sent - first) / span))].append(latency)
    lat.sort()
    w.latencies = lat
    w.delivered = len(lat)
    for part in thirds:
        part.sort()
    if min(sends_per_third) >= MIN_PER_THIRD:
        w.first_third_p50 = percentile(thirds[0], 0.5)
        w.last_third_p50 = percentile(thirds[2], 0.5)
    return w


Spans = list[tuple[int, float, float]]
"""A window's (deliveries, p50, p99) per span of its sends (:func:`timeline`)."""


def timeline(results: Sequence[Mapping[str, Any]], step: float) -> Spans:
    """The window's deliveries by when their message was sent, in spans of ``step``
    seconds from the first send: (deliveries, p50, p99) per span (seconds; a span with
    no sends is (0, nan, nan)). Shows whether a window's tail is spread over it or comes
    in episodes (one slow second, the start after a heavier window)."""
    send_at = _send_times(results)
    if not send_at or step <= 0:
        return []
    first = min(send_at.values())
    spans: list[list[float]] = [[] for _ in range(int((max(send_at.values()) - first) / step) + 1)]
    for sent, latency in _deliveries(results, send_at):
        spans[int((sent - first) / step)].append(latency)
    out: Spans = []
    for part in spans:
        part.sort()
        out.append((len(part), percentile(part, 0.5), percentile(part, 0.99)))
    return out


def epoch_mismatches(
    server: Mapping[str, int], rooms: Sequence[str], generators: Sequence[Sequence[int]]
) -> list[str]:
    """Rooms where a load generator's epoch (``generators[g][i]`` for room ``rooms[i]``, as
    its ``state`` reports them) is not the server's, one line each: which side to suspect
    when sends come back ``STALE_EPOCH``."""
    out: list[str] = []
    for i, room in enumerate(rooms):
        current = server.get(room)
        held = [epochs[i] if i < len(epochs) else None for epochs in generators]
        if current is not None and any(e != current for e in held):
            shown = ", ".join(f"generator {g + 1}: {e}" for g, e in enumerate(held))
            out.append(f"{room}: server {current}; {shown}")
    return out
