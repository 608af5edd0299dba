"""Prometheus metrics, one registry per app (no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


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
        self.deliveries = Counter(
            "medrelay_deliveries_total", "Events queued to devices", registry=r
        )
        self.queue_depth = Gauge(
            "medrelay_outbound_queue_depth", "Frames waiting in outbound queues", registry=r
        )
        self.errors = Counter("medrelay_errors_total", "Errors sent, by code", ["code"], registry=r)
        self.closes = Counter("medrelay_closes_total", "Closes, by code", ["code"], registry=r)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
