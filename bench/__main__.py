"""``python -m bench [--quick] [--scenarios ...]``: medrelay beside a bare relay, same run.

Starts the servers under test as subprocesses on loopback (medrelay on SQLite and on a fresh
PostgreSQL database, and the bare ``websockets`` relay of ``bench/baseline.py``), sets up
users and rooms (untimed), drives them from separate load-generator processes, and prints
one table: medrelay's figure, the bare relay's figure from the same run, and their ratio.
See docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import db, scenarios
from .flame import summarise
from .procs import raise_nofile
from .report import Table
from .scenarios import Plan, log
from .system import System
from .topology import Sizes, build

ALL = ("consult", "vitals", "revocation", "storm", "connections")
OPT_IN = ("cluster",)  # not in the default run: it would take the full run past 15 minutes
CLUSTER_ROOMS = {True: 10, False: 30}  # rooms of 10 for ``cluster``: quick, full (30: the
# population can offer 57,000 deliveries/s; with 20 rooms its 37,970 capped two nodes)

QUICK = (
    Sizes(
        consult10_rooms=2,
        consult50_rooms=1,
        wards=2,
        tablets_per_ward=10,
        clinicians_per_ward=2,
        removals=4,
    ),
    Plan(
        step_seconds=0.4,
        latency_seconds=0.8,
        start_level=1000,
        start_level_50=4000,
        bare_start_level=32_000,
        factor=2.0,
        refine=0,
        max_level=160_000,
        vitals_seconds=1.0,
        idle_connections=300,
        hold_seconds=0.5,
        removal_spacing=0.1,
        profile_seconds=2.0,
        max_drain=1.5,
        min_messages=15,
        settle_seconds=1.5,
        quiet=0.25,
        storm_limit=30.0,
    ),
)
FULL = (
    Sizes(
        consult10_rooms=60,  # can offer 114,000 deliveries/s: 30 rooms' 57,000 capped medrelay
        consult50_rooms=3,
        wards=100,
        tablets_per_ward=20,
        clinicians_per_ward=3,
        removals=60,
    ),
    Plan(
        step_seconds=3.0,
        latency_seconds=5.0,
        start_level=200,
        start_level_50=400,
        bare_start_level=16_000,
        factor=1.5,
        refine=2,
        max_level=400_000,
        vitals_seconds=10.0,
        idle_connections=15_000,
        hold_seconds=5.0,
        removal_spacing=0.2,
        profile_seconds=6.0,
    ),
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="small and short: under a minute (rooms of 50 on the primary database only)",
    )
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=ALL + OPT_IN,
        default=list(ALL),
        metavar="NAME",
        help=f"any of {', '.join(ALL + OPT_IN)} (default: all but {', '.join(OPT_IN)}); "
        "cluster: one medrelay node against two over Redis (PostgreSQL)",
    )
    p.add_argument(
        "--databases",
        nargs="+",
        choices=("sqlite", "postgres"),
        default=["sqlite", "postgres"],
        help="medrelay journaling back-ends for the consult rooms (default: both)",
    )
    p.add_argument(
        "--primary",
        choices=("sqlite", "postgres"),
        default="postgres",
        help="back-end for vitals, revocation, storm and connections (default: postgres)",
    )
    p.add_argument(
        "--redis-url",
        default=db.REDIS_URL,
        help="broker for the cluster scenario (default $BENCH_REDIS or %(default)s)",
    )
    p.add_argument("--workers", type=int, default=2, help="load-generator processes per system")
    p.add_argument(
        "--receipt-interval",
        type=float,
        default=1.0,
        help="seconds between a device's cumulative receipts per room (0: none; default 1)",
    )
    p.add_argument("--connections", type=int, help="idle connections to hold")
    p.add_argument("--profile", action="store_true", help="py-spy the primary medrelay server")
    p.add_argument("--json", type=Path, help="also write every figure here")
    p.add_argument("--keep", action="store_true", help="keep the work directory (server logs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t_begin = time.monotonic()
    sizes, plan = QUICK if args.quick else FULL
    if args.connections:
        plan.idle_connections = args.connections
    nofile = raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="medrelay-bench-"))
    want = set(args.scenarios)
    databases = list(dict.fromkeys(args.databases))
    pg_ok = asyncio.run(db.pg_available())
    if "postgres" in databases or args.primary == "postgres":
        if not pg_ok:
            log(f"PostgreSQL not reachable at {db.ADMIN_DSN}: medrelay runs on SQLite only")
            databases = [d for d in databases if d != "postgres"] or ["sqlite"]
            args.primary = "sqlite"
    if args.primary not in databases:
        databases.append(args.primary)
    extra = bool(want - {"consult", "cluster"})
    log(f"bench: {'quick' if args.quick else 'full'} run, open-file limit {nofile}, in {workdir}")

    systems: list[System] = []
    if want - {"cluster"}:
        systems.append(
            System(
                "bare relay",
                "baseline",
                build(sizes, medrelay=False, consult="consult" in want, extra=extra),
                workdir,
                workers=args.workers,
            )
        )
        for d in databases:
            label = f"medrelay ({'PostgreSQL' if d == 'postgres' else 'SQLite'})"
            primary = d == args.primary
            # quick: rooms of 50 on the primary database only (building a room of 50 member
            # by member, signed change and rekey each, is most of the quick run's set-up)
            mine = sizes if primary or not args.quick else replace(sizes, consult50_rooms=0)
            topo = build(mine, medrelay=True, consult="consult" in want, extra=extra and primary)
            systems.append(
                System(
                    label,
                    "medrelay",
                    topo,
                    workdir,
                    workers=args.workers,
                    database=d,
                    receipt_interval=args.receipt_interval,
                )
            )
        base = systems[0]
        primary_sys = next(s for s in systems[1:] if s.database == args.primary)
    cluster_systems = cluster_pair(args, workdir, pg_ok) if "cluster" in want else []
    every = systems + cluster_systems
    table = Table()
    figures: dict[str, object] = {"quick": args.quick, "sizes": asdict(sizes), "plan": asdict(plan)}
    try:
        for s in every:
            took = s.start()
            pids = ", ".join(str(x.pid) for x in s.servers)
            log(f"  {s.label}: started in {took:.2f} s (pid {pids})")
        for s in every:
            s.spawn_workers()
        asyncio.run(populate_all(every))
        for s in every:
            if s.setup_timing:
                t = ", ".join(f"{k} {v:.1f} s" for k, v in s.setup_timing.items())
                log(
                    f"  {s.label}: set up {len(s.topo.members)} devices: {t} "
                    f"(server CPU {s.setup_cpu:.1f} s)"
                )
        for s, ids in [(s, s.send_setup()) for s in every]:
            s.gather(ids)
        for s, ids in [(s, s.send_connect()) for s in every]:
            c = s.connected(s.gather(ids))
            fails = c["failures"] or ""
            log(f"  {s.label}: {c['up']} devices connected in {c['seconds']:.1f} s {fails}")
        log(f"  set-up done at {time.monotonic() - t_begin:.0f} s")
        consult_best: dict[str, float] = {}
        if "consult" in want:
            for set_name, label, p99_target in (  # the p99 targets at half load
                ("consult10", "consult, rooms of 10", 0.010),
                ("consult50", "consult, rooms of 50", 0.020),
            ):
                log(f"  {label}")
                b = scenarios.consult(base, set_name, plan)
                for s in systems[1:]:
                    if not s.topo.room_sets.get(set_name):
                        log(f"    {s.label:22} {set_name}: not in the quick run (see --help)")
                        continue
                    m = scenarios.consult(s, set_name, plan)
                    table.consult(label, s.label, m, b, p99_target)
                    if m.best is not None:
                        consult_best[f"{s.label}/{set_name}"] = m.best.rate
                    figures[f"{label} / {s.label}"] = consult_figures(m)
                figures[f"{label} / bare relay"] = consult_figures(b)
            if args.profile:
                level = consult_best.get(f"{primary_sys.label}/consult10", 2000) * 0.8
                out = workdir / "profile-consult10.txt"
                got = scenarios.profile(primary_sys, "consult10", level, plan, out)
                if got is not None:
                    summary = summarise(got, top=30)
                    (workdir / "profile-summary.txt").write_text(summary)
                    log(summary)
                    figures["profile"] = str(got)
        if "vitals" in want:
            log(f"  ({time.monotonic() - t_begin:.0f} s)")
            log("  bedside vitals")
            vb = scenarios.vitals(base, plan)
            vm = scenarios.vitals(primary_sys, plan)
            table.vitals(primary_sys.label, len(primary_sys.topo.sets["tablets"]), vm, vb)
            figures["vitals"] = {"medrelay": vm.describe(), "bare": vb.describe()}
        if "revocation" in want:
            log(f"  ({time.monotonic() - t_begin:.0f} s)")
            log("  revocation under load")
            bg = consult_best.get(f"{primary_sys.label}/consult10", 4000) / 2
            rb = scenarios.revocation(base, plan, bg)
            rm = scenarios.revocation(primary_sys, plan, bg)
            table.revocation(primary_sys.label, rm, rb, bg)
            figures["revocation"] = {"medrelay": asdict_safe(rm), "bare": asdict_safe(rb)}
        if "storm" in want:
            log(f"  ({time.monotonic() - t_begin:.0f} s)")
            log("  reconnect storm")
            sb = scenarios.storm(base, plan.storm_limit)
            sm = scenarios.storm(primary_sys, plan.storm_limit)
            table.storm(primary_sys.label, sm, sb)
            figures["storm"] = {"medrelay": asdict(sm), "bare": asdict(sb)}
        if "connections" in want:
            log(f"  ({time.monotonic() - t_begin:.0f} s)")
            log("  idle connections")
            for s in (base, primary_sys):
                call_close(s)
            n = plan.idle_connections
            cb = scenarios.connections(base, plan, n)
            cm = scenarios.connections(primary_sys, plan, n)
            table.connections(primary_sys.label, n, cm, cb)
            figures["connections"] = {"medrelay": asdict(cm), "bare": asdict(cb)}
        if cluster_systems:
            log(f"  ({time.monotonic() - t_begin:.0f} s)")
            log("  cluster: one node, then two nodes over Redis (rooms of 10, PostgreSQL)")
            one, two = cluster_systems
            # quick: 1 s steps (a 0.4 s burst hides in the queues at these rates), and at
            # least one refinement, so that the ratio is not a power of two
            cplan = replace(
                plan, refine=max(plan.refine, 1), step_seconds=max(plan.step_seconds, 1.0)
            )
            cr = scenarios.cluster(one, two, cplan)
            table.cluster(CLUSTER_ROOMS[args.quick], cr)
            figures["cluster"] = {
                "one node": consult_figures(cr.one),
                "two nodes": consult_figures(cr.two),
            }
    finally:
        for s in every:
            s.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.monotonic() - t_begin
    print(table.render(f"{'quick' if args.quick else 'full'} run, {elapsed:.0f} s"))
    if args.json:
        figures["elapsed"] = elapsed
        figures["table"] = table.rows_as_dicts()
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return 0


def cluster_pair(args: argparse.Namespace, workdir: Path, pg_ok: bool) -> list[System]:
    """The ``cluster`` scenario's systems: one medrelay node, and two nodes of one deployment,
    each on a fresh PostgreSQL database and the same Redis broker. Room and user names carry
    a per-run, per-system prefix: medrelay's broker topics are named after them, and both
    systems (and anything else on that Redis) share one pub/sub namespace."""
    if not pg_ok or not db.redis_available(args.redis_url):
        log(f"cluster: needs PostgreSQL ({db.ADMIN_DSN}) and Redis ({args.redis_url}); skipped")
        return []
    sizes = Sizes(
        consult10_rooms=CLUSTER_ROOMS[args.quick],
        consult50_rooms=0,
        wards=0,
        tablets_per_ward=0,
        clinicians_per_ward=0,
        removals=0,
    )
    tag = os.urandom(3).hex()
    out = []
    for nodes in (1, 2):
        topo = build(sizes, medrelay=True, extra=False, prefix=f"k{tag}n{nodes}-")
        out.append(
            System(
                f"medrelay {nodes} node{'s' if nodes > 1 else ''} (PostgreSQL, Redis)",
                "medrelay",
                topo,
                workdir,
                workers=args.workers,
                database="postgres",
                receipt_interval=args.receipt_interval,
                nodes=nodes,
                broker_url=args.redis_url,
                breakdown=True,
            )
        )
    return out


async def populate_all(systems: list[System]) -> None:
    """Set-up is untimed, so the systems are set up concurrently."""
    await asyncio.gather(*(s.populate() for s in systems))


def call_close(s: System) -> None:
    from .loadgen import call_all

    call_all(s.workers, "close_all")


def consult_figures(r: scenarios.ConsultResult) -> dict[str, object]:
    return {
        "best": r.best.describe() if r.best else None,
        "half": r.half.describe() if r.half else None,
        "capped": r.capped,
        "stopped": r.why_stopped,
        "steps": [w.describe() for w in r.steps],
    }


def asdict_safe(r: scenarios.RevocationResult) -> dict[str, object]:
    return {
        "removals": r.removals,
        "leaks": r.leaks,
        "cutoff_p50_ms": scenarios.pct(r.cutoffs, 0.5) * 1e3,
        "cutoff_p99_ms": scenarios.pct(r.cutoffs, 0.99) * 1e3,
        "commit_p50_ms": scenarios.pct(r.commit_seconds, 0.5) * 1e3
        if r.commit_seconds
        else math.nan,
    }


if __name__ == "__main__":
    sys.exit(main())
