"""Prometheus metrics, one registry per app (no global state)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .heap import PAUSE_BUCKETS

if TYPE_CHECKING:
    from .store.group import BatchTimes

# seconds: a send's durable store is a group commit of a few round trips plus a WAL flush
STORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# a single round trip to the database, or a few
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # up to store.group.MAX_BATCH


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("medrelay_connections", "Open authenticated sockets", registry=r)
        self.frames_in = Counter("medrelay_frames_in_total", "Frames received", registry=r)
        self.frames_out = Counter(
            "medrelay_frames_out_total", "Frames queued to sockets", registry=r
        )
        self.sends = Counter("medrelay_sends_total", "Envelopes stored", registry=r)
        self.send_store_seconds = Histogram(
            "medrelay_send_store_seconds",
            "From a send's checks passing to its commit (group commit wait included)",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.send_wait_seconds = Histogram(
            "medrelay_send_wait_seconds",
            "From a send's append to the start of its group-commit batch",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        self.send_batch_seconds = Histogram(
            "medrelay_send_batch_seconds",
            "A group-commit batch's stages: call (the one-trip calls, stored or missed);"
            " then, run the usual way, begin (connection, BEGIN), read (room locks,"
            " senders' roles), write (events, last seqs, audit rows), commit (COMMIT)",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.send_batches = Counter(
            "medrelay_send_batches_total",
            "Group-commit batches by path: one_trip (stored by one call), later_call (earlier"
            " calls found rooms moved on, a later one stored it), full (the usual five"
            " round trips), after_miss (calls whose predictions missed, then full)",
            ["path"],
            registry=r,
        )
        for path in ("one_trip", "later_call", "full", "after_miss"):  # shown from the start, at 0
            self.send_batches.labels(path=path)
        self.send_batch_misses = Counter(
            "medrelay_send_batch_misses_total",
            "One-trip calls that stored nothing, by the prediction they found wrong: room (a"
            " room's last seq, epoch or pending flag), role, retried (a send already stored),"
            " head (this node's journal head)",
            ["prediction"],
            registry=r,
        )
        for prediction in ("room", "role", "retried", "head"):
            self.send_batch_misses.labels(prediction=prediction)
        self.send_batch_sends = Histogram(
            "medrelay_send_batch_sends",
            "Sends per group-commit batch",
            buckets=BATCH_SIZES,
            registry=r,
        )
        self.deliveries = Counter(
            "medrelay_deliveries_total", "Events queued to devices", registry=r
        )
        self.gap_reads = Counter(
            "medrelay_gap_reads_total",
            "Store reads that filled a room's gap in delivery, by what showed it: broker (an"
            " event arrived before an earlier one, which did not come within 50 ms), notify"
            " (a database notification the broker had not matched), reconnect (the broker"
            " connection came back), poll (the slow poll)",
            ["reason"],
            registry=r,
        )
        for reason in ("broker", "notify", "reconnect", "poll"):
            self.gap_reads.labels(reason=reason)
        self.queue_depth = Gauge(
            "medrelay_outbound_queue_depth", "Frames waiting in outbound queues", registry=r
        )
        self.errors = Counter("medrelay_errors_total", "Errors sent, by code", ["code"], registry=r)
        self.closes = Counter("medrelay_closes_total", "Closes, by code", ["code"], registry=r)
        self.gc_pauses = Histogram(
            "medrelay_gc_pause_seconds",
            "Event-loop pauses for the cyclic garbage collector, by generation",
            ["generation"],
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.gc_frozen = Gauge(
            "medrelay_gc_frozen_objects",
            "Start-up objects moved out of the collector's reach (gc.freeze)",
            registry=r,
        )

    def observe_send_batch(self, times: BatchTimes) -> None:
        for wait in times.waits:
            self.send_wait_seconds.observe(wait)
        self.send_batch_sends.observe(len(times.waits))
        self.send_batches.labels(path=times.path).inc()
        for miss in times.misses:
            self.send_batch_misses.labels(prediction=miss).inc()
        stage = self.send_batch_seconds.labels
        if times.path != "full":
            stage(stage="call").observe(times.call)
        if times.path in ("one_trip", "later_call"):
            return
        stage(stage="begin").observe(times.begin)
        stage(stage="read").observe(times.read)
        stage(stage="write").observe(times.write)
        stage(stage="commit").observe(times.commit)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
