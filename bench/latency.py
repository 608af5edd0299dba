"""Send-to-deliver latency at fixed send rates, and where each send's store time went.

    python -m bench.latency [--database postgres] [--room-size 10] [--rates 5 20 600]
        [--rooms 30] [--receipt-interval 1.0] [--nodes 2 [--redis URL]]

One medrelay node and the bare relay, each with the same rooms (three of 10 and one of 50,
or ``--rooms`` of the chosen size), get the same schedule: one window per rate (sends/s into
the rooms of the chosen size; each send is ten or fifty deliveries). Per window: p50 / p99
/ p99.9 send-to-deliver for both, and medrelay's store stages from its ``/metrics`` (a
send's mean wait for a group-commit batch, then the batch's begin, read, write and commit;
``docs/operations.md`` section 8), where the machine's cores went, and the database's
sessions sampled every 10 ms (how many waited on a lock). The main bench measures latency at half
of each system's own maximum; this one compares them at the same load, from an idle node
upwards, so a floor (what one send costs alone) shows apart from queueing. Receipts are off
unless ``--receipt-interval`` gives each receiving device's seconds between cumulative
receipts, as the consult scenario sends them (the bare relay has none): the delivery
journal then stores receipts in its flushes too. ``--nodes 2`` runs medrelay as two nodes of
one deployment over Redis (PostgreSQL), each room's devices split between them, as the
``cluster`` scenario does; the cores line then shows each node's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from . import db
from .costs import window
from .procs import raise_nofile
from .stats import Spans, Window, describe_stages, timeline
from .system import System
from .topology import Sizes, build


def _ms(w: Window) -> str:
    return " / ".join(f"{w.p(q) * 1e3:.1f}" for q in (0.5, 0.99, 0.999))


def _run(
    system: System,
    rooms: str,
    rates: list[float],
    seconds: float,
    receipts: float,
    step: float = 0.0,
) -> list[tuple[Window, Spans]]:
    """One window per rate; with ``step``, also each window's p50 and p99 by span of
    ``step`` seconds of its sends (``stats.timeline``)."""
    try:
        system.bring_up()
        for worker in system.workers:
            worker.call("set_receipts", interval=receipts if system.kind == "medrelay" else 0.0)
        system.settle()  # until the connect's catch-up is over (the server idle)
        # unreported: a node's first sends after its start run on cold database sessions
        window(system, rooms, rates[0], min(seconds, 3.0))
        out = []
        for rate in rates:
            w = window(system, rooms, rate, seconds)
            out.append((w, timeline(system.last_results, step) if step else []))
        return out
    finally:
        system.stop()


def _spans(spans: Spans) -> str:
    return " ".join(f"{p99 * 1e3:.0f}" if n else "-" for n, _p50, p99 in spans)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument("--room-size", type=int, choices=(10, 50), default=10)
    parser.add_argument(
        "--rates", nargs="+", type=float, help="sends/s (default: 5 20 600; rooms of 50: 5 20 350)"
    )
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument(
        "--rooms", type=int, help="rooms of the chosen size (default: 3 of 10, 1 of 50)"
    )
    parser.add_argument(
        "--receipt-interval",
        type=float,
        default=0.0,
        help="seconds between a receiving device's cumulative receipts per room (0: none)",
    )
    parser.add_argument(
        "--nodes", type=int, choices=(1, 2), default=1, help="medrelay nodes (2: over Redis)"
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0"),
        help="the broker of two nodes (default $BENCH_REDIS or %(default)s)",
    )
    parser.add_argument(
        "--timeline",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="also print each window's p99 (ms) by span of this many seconds of its sends,"
        " for both systems: is the tail spread over the window, or a few episodes?",
    )
    args = parser.parse_args()
    raise_nofile()
    rooms = f"consult{args.room_size}"
    rates = args.rates or [5.0, 20.0, 600.0 if args.room_size == 10 else 350.0]
    if args.database == "postgres" and not asyncio.run(db.pg_available()):
        parser.error("PostgreSQL is not available on 127.0.0.1:5432")
    if args.nodes > 1 and (args.database != "postgres" or not db.redis_available(args.redis)):
        parser.error(f"two nodes need PostgreSQL and Redis ({args.redis})")
    workdir = Path(tempfile.mkdtemp(prefix="medrelay-latency-"))
    sizes = Sizes(3, 1, 0, 0, 0, 0)
    if args.rooms is not None:
        sizes = (
            Sizes(args.rooms, 1, 0, 0, 0, 0)
            if args.room_size == 10
            else Sizes(3, args.rooms, 0, 0, 0, 0)
        )
    name = "PostgreSQL" if args.database == "postgres" else "SQLite"
    try:
        bare = System(
            "bare relay", "baseline", build(sizes, medrelay=False, extra=False), workdir, workers=2
        )
        b = _run(bare, rooms, rates, args.seconds, 0.0, args.timeline)
        label = f"medrelay ({name})" if args.nodes == 1 else f"medrelay (2 nodes, {name})"
        # two nodes: names carry a per-run prefix (broker topics are named after them)
        prefix = f"l{os.urandom(3).hex()}-" if args.nodes > 1 else ""
        topo = build(sizes, medrelay=True, extra=False, prefix=prefix)
        medrelay = System(
            label, "medrelay", topo, workdir, workers=2, database=args.database,
            breakdown=True, activity_interval=0.01, nodes=args.nodes,
            broker_url=args.redis if args.nodes > 1 else None,
        )  # fmt: skip
        m = _run(medrelay, rooms, rates, args.seconds, args.receipt_interval, args.timeline)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"rooms of {args.room_size}, send-to-deliver p50 / p99 / p99.9 ms; "
        f"{args.seconds:.0f} s windows; medrelay receipts every {args.receipt_interval:g} s"
    )
    print(f"{'sends/s':>8}  {label:>24}  {'bare relay':>22}")
    for rate, (mw, m_spans), (bw, b_spans) in zip(rates, m, b, strict=True):
        print(f"{rate:8.0f}  {_ms(mw):>24}  {_ms(bw):>22}")
        if args.timeline:
            head = f"p99 ms per {args.timeline:g} s of sends:"
            print(f"{'':8}  {head} medrelay   {_spans(m_spans)}")
            print(f"{'':8}  {'':{len(head)}} bare relay {_spans(b_spans)}")
        if mw.store_stages:
            print(f"{'':8}  {describe_stages(mw.store_stages)}")
        for line in mw.describe().splitlines()[1:]:  # cores busy, database sessions
            if not line.strip().startswith("send store"):
                print(f"{'':8}  {line.strip()}")
        if not (mw.complete and bw.complete):
            print(f"{'':8}  (not every message delivered: medrelay {mw.describe()})")


if __name__ == "__main__":
    main()
