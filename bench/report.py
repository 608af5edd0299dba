"""The one table: per scenario and figure, medrelay, the bare relay (same run), the ratio."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .scenarios import (
    ClusterResult,
    ConnectionsResult,
    ConsultResult,
    RevocationResult,
    StormResult,
    passes,
    pct,
)
from .stats import STAGES, Window


@dataclass
class Row:
    scenario: str
    metric: str
    medrelay: str
    bare: str
    ratio: str


def num(x: float, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(m: float | None, b: float | None) -> str:
    if m is None or b is None or not b or math.isnan(m) or math.isnan(b):
        return "n/a"
    r = m / b
    return f"{r:.2g}" if 0 < abs(r) < 0.1 else f"{r:.2f}"


def lat3(w: Window | None) -> str:
    if w is None or not w.latencies:
        return "n/a"
    return " / ".join(f"{w.p(q) * 1e3:.1f}" for q in (0.5, 0.99, 0.999))


def within(r: ConsultResult, p99_target: float) -> Window | None:
    """The search's highest passing step (by delivered rate) whose p99 met ``p99_target``
    seconds (the half-load window is not a step of the search)."""
    ok = [w for w in r.steps if w.latencies and w.p(0.99) <= p99_target and passes(w)[0]]
    return max(ok, key=lambda w: w.rate, default=None)


class Table:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, scenario: str, metric: str, m: str, b: str, r: str) -> None:
        self.rows.append(Row(scenario, metric, m, b, r))

    def consult(
        self, label: str, system: str, m: ConsultResult, b: ConsultResult, p99_target: float
    ) -> None:
        scen = f"{label}, {system.removeprefix('medrelay ')}"
        self._search_rows(scen, m, b, "deliveries per server CPU-second (at max)")
        # the maximum is a step that passes with the node saturated (p99 up to 500 ms), so
        # its half can keep the node most of the way busy: where the latency target holds
        mw, bw = within(m, p99_target), within(b, p99_target)
        self.add(
            scen,
            f"highest step with p99 ≤ {p99_target * 1e3:.0f} ms: deliveries/s (p99 ms)",
            f"{num(mw.rate)} ({mw.p(0.99) * 1e3:.1f})" if mw else "none",
            f"{num(bw.rate)} ({bw.p(0.99) * 1e3:.1f})" if bw else "none",
            ratio(mw.rate, bw.rate) if mw and bw else "",
        )

    def _search_rows(self, scen: str, m: ConsultResult, b: ConsultResult, cpu_label: str) -> None:
        """The three rows of a stepped search: maximum, per server CPU-second, latency."""
        mr = m.best.rate if m.best else math.nan
        br = b.best.rate if b.best else math.nan
        self.add(
            scen,
            "max sustained deliveries/s",
            ("≥ " if m.capped else "") + num(mr),
            ("≥ " if b.capped else "") + num(br),
            ratio(mr, br),
        )
        mc = m.best.per_cpu() if m.best else math.nan
        bc = b.best.per_cpu() if b.best else math.nan
        self.add(scen, cpu_label, num(mc), num(bc), ratio(mc, bc))
        m99 = m.half.p(0.99) if m.half and m.half.latencies else math.nan
        b99 = b.half.p(0.99) if b.half and b.half.latencies else math.nan
        self.add(
            scen,
            "p50 / p99 / p99.9 ms at half load (ratio: p99)",
            lat3(m.half),
            lat3(b.half),
            ratio(m99, b99),
        )
        stages = m.half.store_stages if m.half else {}
        if stages:
            self.add(
                scen,
                "at half load, mean ms: a send's wait for its batch / the one-trip call / "
                "then, batches run the usual way: begin / read / write / commit "
                "(sends per batch, share stored by the first call / by a later call)",
                " / ".join(f"{stages.get(k, math.nan) * 1e3:.1f}" for k in STAGES)
                + f" ({stages.get('sends', math.nan):.1f},"
                f" {stages.get('one_trip', math.nan):.0%}"
                f" / {stages.get('later_call', math.nan):.0%})",
                "",
                "",
            )

    def cluster(self, rooms: int, r: ClusterResult) -> None:
        """Two medrelay nodes over Redis against one: the two-node figure stands in the
        medrelay column, the one-node figure in the baseline column, the ratio is two/one."""
        scen = (
            f"cluster, {rooms} rooms of 10, (PostgreSQL + Redis): 2 nodes; "
            "baseline column: 1 node (ratio 2/1)"
        )
        two, one = r.two, r.one
        self._search_rows(
            scen, two, one, "deliveries per server CPU-second (at max; 2 nodes: both nodes' CPU)"
        )

        def busy(w: Window | None) -> str:
            c = w.cores() if w is not None else {}
            if not c:
                return "n/a"
            return " / ".join(
                f"{c[k]:.2f}"
                for k in ("nodes", "generators", "postgres", "redis", "other", "machine")
            )

        self.add(
            scen,
            "cores busy at max: server nodes / generators / PostgreSQL (all) / Redis / other "
            "/ machine",
            busy(two.best),
            busy(one.best),
            "",
        )

        def sessions(w: Window | None) -> str:
            a = w.pg_activity if w is not None else {}
            if not a.get("samples"):
                return "n/a"
            return " / ".join(f"{a[k]:.2f}" for k in ("lock", "active", "in transaction"))

        self.add(
            scen,
            "database sessions at max (mean): waiting on a lock / active / waiting for the node",
            sessions(two.best),
            sessions(one.best),
            "",
        )

    def vitals(self, system: str, tablets: int, m: Window, b: Window) -> None:
        scen = f"bedside vitals, {tablets:,} tablets at 1/s, {system.removeprefix('medrelay ')}"
        self.add(
            scen,
            "readings acknowledged / sent (+ skipped: previous one unacknowledged)",
            f"{m.acked:,} / {m.sent:,} (+{m.skipped:,})",
            f"{b.sent:,} / {b.sent:,}",
            ratio(m.acked / max(m.sent + m.skipped, 1), 1.0),
        )
        self.add(
            scen,
            "delivered / expected",
            f"{m.delivered:,} / {m.expected:,}",
            f"{b.delivered:,} / {b.expected:,}",
            ratio(m.delivered / max(m.expected, 1), b.delivered / max(b.expected, 1)),
        )
        mu = m.cpu / m.delivered * 1e6 if m.delivered else math.nan
        bu = b.cpu / b.delivered * 1e6 if b.delivered else math.nan
        self.add(scen, "server CPU µs per delivered message", num(mu, 1), num(bu, 1), ratio(mu, bu))
        mp = m.p(0.99) * 1e3
        bp = b.p(0.99) * 1e3
        self.add(scen, "p99 send-to-deliver ms", num(mp, 1), num(bp, 1), ratio(mp, bp))

    def revocation(
        self, system: str, m: RevocationResult, b: RevocationResult, background: float
    ) -> None:
        scen = (
            f"revocation, {m.removals} removals, {background:,.0f} deliveries/s around, "
            f"{system.removeprefix('medrelay ')}"
        )

        def pair(values: list[float]) -> str:
            return f"{pct(values, 0.5) * 1e3:.1f} / {pct(values, 0.99) * 1e3:.1f}"

        self.add(
            scen,
            "cut-off: removed device's last event after the commit left, p50 / p99 ms",
            pair(m.from_commit),
            pair(b.from_commit),
            ratio(pct(m.from_commit, 0.99), pct(b.from_commit, 0.99)),
        )
        self.add(
            scen,
            "cut-off: ... after the commit's ack reached the remover, p50 / p99 ms",
            pair(m.cutoffs),
            pair(b.cutoffs),
            ratio(pct(m.cutoffs, 0.99), pct(b.cutoffs, 0.99)),
        )
        self.add(
            scen,
            "commit sent -> ack, p50 / p99 ms",
            pair(m.commit_seconds),
            pair(b.commit_seconds),
            ratio(pct(m.commit_seconds, 0.99), pct(b.commit_seconds, 0.99)),
        )
        self.add(
            scen,
            "removed devices that got their removal event in the window; events after it",
            f"{m.saw_removal} / {m.removals}; {m.leaks}",
            "n/a",
            "",
        )

    def storm(self, system: str, m: StormResult, b: StormResult) -> None:
        scen = f"reconnect storm, {m.clients:,} clients, {system.removeprefix('medrelay ')}"
        self.add(
            scen,
            "resumed / clients",
            f"{m.resumed:,} / {m.clients:,}",
            f"{b.resumed:,} / {b.clients:,}",
            "",
        )
        self.add(
            scen,
            "kill -9 -> server accepting, s",
            num(m.restart_seconds, 2),
            num(b.restart_seconds, 2),
            ratio(m.restart_seconds, b.restart_seconds),
        )
        self.add(
            scen,
            "server accepting -> all resumed (median), s",
            f"{num(m.all_after_ready, 2)} ({num(m.p50_after_ready, 2)})",
            f"{num(b.all_after_ready, 2)} ({num(b.p50_after_ready, 2)})",
            ratio(m.all_after_ready, b.all_after_ready),
        )
        self.add(
            scen,
            "kill -9 -> all resumed, s",
            num(m.all_after_kill, 2),
            num(b.all_after_kill, 2),
            ratio(m.all_after_kill, b.all_after_kill),
        )

    def connections(
        self, system: str, target: int, m: ConnectionsResult, b: ConnectionsResult
    ) -> None:
        scen = f"idle connections, {target:,} asked, {system.removeprefix('medrelay ')}"
        self.add(scen, "held (authenticated)", f"{m.held:,}", f"{b.held:,}", ratio(m.held, b.held))
        self.add(
            scen,
            "server memory KiB per connection",
            num(m.kib_per_conn, 1),
            num(b.kib_per_conn, 1),
            ratio(m.kib_per_conn, b.kib_per_conn),
        )
        self.add(
            scen,
            "server CPU ms per connection opened",
            num(m.cpu_ms_per_conn, 2),
            num(b.cpu_ms_per_conn, 2),
            ratio(m.cpu_ms_per_conn, b.cpu_ms_per_conn),
        )
        mr = m.opened / m.seconds if m.seconds else math.nan
        br = b.opened / b.seconds if b.seconds else math.nan
        self.add(scen, "connections opened per second", num(mr), num(br), ratio(mr, br))

    def render(self, title: str) -> str:
        head = ("scenario", "figure", "medrelay", "bare relay", "ratio")
        rows = [head] + [(r.scenario, r.metric, r.medrelay, r.bare, r.ratio) for r in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = [f"\n## medrelay beside a bare relay ({title})\n"]
        for n, row in enumerate(rows):
            cells = [
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("| " + " | ".join(cells) + " |")
            if n == 0:
                lines.append(
                    "|"
                    + "|".join(
                        "-" * (w + 1) + ":" if i >= 2 else "-" * (w + 2)
                        for i, w in enumerate(widths)
                    )
                    + "|"
                )
        return "\n".join(lines)

    def rows_as_dicts(self) -> list[dict[str, str]]:
        return [r.__dict__ for r in self.rows]
