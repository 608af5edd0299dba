"""The scenarios. Each runs on one system and returns its figures; ``__main__`` puts the
medrelay and bare-relay figures of the same run side by side."""

from __future__ import annotations

import asyncio
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.frames import Commit as CommitFrame

from . import db
from .loadgen import call_all
from .mr import fetch_tokens
from .population import owner_client, quiet_client_noise
from .procs import thread_cpu
from .stats import Window, epoch_mismatches
from .system import System
from .topology import CONSULT_BODY, VITALS_BODY

P99_BOUND = 0.500  # a step whose p99 exceeds this is not "sustained"
MAX_LATE = 0.250  # a generator this far behind its schedule did not offer the load
MIN_LEVEL = 50.0  # deliveries/s: the search gives up below this
PER_SENDER = 4.0  # messages/s per sending device before more devices join in
SEND_CAP = 19.0  # messages/s per device: medrelay's default limit is 20/s (burst 40)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Plan:
    """Durations and sizes: ``--quick`` or the full run."""

    step_seconds: float
    latency_seconds: float
    start_level: float  # deliveries/s of medrelay's first step, rooms of 10
    start_level_50: float  # ... rooms of 50 (one send is fifty deliveries)
    bare_start_level: float  # the bare relay's
    factor: float
    refine: int  # bisections between the highest passing step and the failing one
    max_level: float
    vitals_seconds: float
    idle_connections: int
    hold_seconds: float
    removal_spacing: float
    profile_seconds: float
    max_drain: float = 2.0  # how long a step may take to deliver after its last send
    min_messages: int = 30  # a step lasts long enough to send this many (up to 4x its length)
    settle_seconds: float = 5.0  # after a failed step, wait up to this for the server to idle
    quiet: float = 0.5  # a window ends once nothing arrived for this long (and all acked)
    storm_limit: float = 120.0  # seconds the reconnect storm may take


# ---------------------------------------------------------------------------- consult
@dataclass
class ConsultResult:
    best: Window | None = None
    capped: bool = False
    half: Window | None = None
    steps: list[Window] = field(default_factory=list)
    why_stopped: str = ""


def passes(w: Window) -> tuple[bool, str]:
    if w.late > MAX_LATE:
        return False, f"generator {w.late * 1e3:.0f} ms behind"
    if not w.complete:
        return False, f"delivered {w.delivered}/{w.expected}, acked {w.acked}/{w.sent}"
    if w.p(0.99) > P99_BOUND:
        return False, f"p99 {w.p(0.99) * 1e3:.0f} ms"
    if w.growing:
        return False, (
            f"latency growing: median {w.first_third_p50 * 1e3:.0f} -> "
            f"{w.last_third_p50 * 1e3:.0f} ms"
        )
    return True, ""


def consult(system: System, set_name: str, plan: Plan) -> ConsultResult:
    """Open-loop stepped load: raise the offered deliveries/s by ``factor`` until a step
    fails (not every message delivered, or p99 unbounded), bisect ``plan.refine`` times
    (geometrically) between the last pass and the fail, then measure latency at half the
    best load."""
    members = system.topo.sets[set_name]
    size = system.topo.receivers[system.topo.room_sets[set_name][0]]
    res = ConsultResult()
    best_level = 0.0
    levels: dict[float, Window] = {}

    rooms = len(members) // size
    # senders one per room first, then a second per room, ...: at low load fewer senders
    # each send several times (a schedule whose period exceeds the window is mostly empty)
    # (rotated by room, so that the senders alternate between load-generator processes)
    ordered = [members[r * size + (p + r) % size] for p in range(size) for r in range(rooms)]

    def step(level: float, seconds: float) -> tuple[Window | None, bool, str]:
        messages = level / size
        active = ordered[: max(1, min(len(ordered), math.ceil(messages / PER_SENDER)))]
        per_sender = messages / len(active)
        if system.medrelay and per_sender > SEND_CAP:
            return None, False, "send-rate cap"
        # enough messages for a percentile, within reason
        seconds = min(4 * seconds, max(seconds, plan.min_messages / (level / size)))
        stream = {"members": active, "rate": per_sender, "body_size": CONSULT_BODY}
        w = system.window(
            [stream], seconds, offered=level, max_drain=plan.max_drain, quiet=plan.quiet
        )
        levels[level] = w
        ok, why = passes(w)
        log(f"    {system.label:22} {set_name:9} {'pass' if ok else 'FAIL'} {w.describe()} {why}")
        return w, ok, why

    level = plan.bare_start_level
    if system.medrelay:
        level = plan.start_level if size < 50 else plan.start_level_50
    # the most the population can offer without a device passing medrelay's send limit: a
    # search that would step past it tries it once, so a capped figure is as high as it
    # can be (and reported as "at least")
    cap_level = len(ordered) * SEND_CAP * size * 0.999 if system.medrelay else math.inf
    fail_level = 0.0
    while level <= plan.max_level:
        if best_level < cap_level < level and not fail_level:
            level = cap_level
        w, ok, why = step(level, plan.step_seconds)
        if w is None:
            res.capped, res.why_stopped = True, why
            break
        if ok and level == cap_level:
            res.steps.append(w)
            res.best, best_level = w, level
            res.capped, res.why_stopped = True, "send-rate cap"
            break
        res.steps.append(w)
        if not ok:
            fail_level, res.why_stopped = level, why
            system.settle(plan.settle_seconds)
            if res.best is None and level / plan.factor >= MIN_LEVEL:
                level /= plan.factor  # the first step failed: search downwards
                continue
            break
        res.best, best_level = w, level
        if fail_level:
            break  # came down from a failure: this is the highest passing step
        level *= plan.factor
    for _ in range(plan.refine if res.best is not None and fail_level else 0):
        mid = math.sqrt(best_level * fail_level)
        w, ok, why = step(mid, plan.step_seconds)
        if w is None:
            break
        res.steps.append(w)
        if ok:
            res.best, best_level = w, mid
        else:
            fail_level = mid
            system.settle(plan.settle_seconds)
    if res.best is not None:
        earlier = levels.get(best_level / 2)
        if earlier is not None and plan.refine == 0:
            res.half = earlier  # quick: the step below the best was at half load already
        else:
            w, _, _ = step(best_level / 2, plan.latency_seconds)
            res.half = w
    return res


# ---------------------------------------------------------------------------- cluster
@dataclass
class ClusterResult:
    one: ConsultResult
    two: ConsultResult


def cluster(one: System, two: System, plan: Plan) -> ClusterResult:
    """The consult search (rooms of 10) on one medrelay node and then on two nodes of one
    deployment (same PostgreSQL, same Redis; each room's devices split between the nodes,
    senders on both). The one-node system is stopped before the two-node search so that its
    idle server does not share the cores."""
    log(f"    {one.label}")
    r1 = consult(one, "consult10", plan)
    one.stop()
    log(f"    {two.label}")
    r2 = consult(two, "consult10", plan)
    for label, r in (("one node", r1), ("two nodes", r2)):
        if r.best is not None:
            log(f"    {label}: best {r.best.describe()}")
    return ClusterResult(r1, r2)


# ---------------------------------------------------------------------------- vitals
def vitals(system: System, plan: Plan) -> Window:
    """Every tablet sends one small envelope per second into its ward room, with at most
    one reading in flight (gated: a tablet whose last reading is not yet acknowledged skips
    this one, as the client library's ``send_body`` awaits its ack)."""
    tablets = system.topo.sets["tablets"]
    stream = {"members": tablets, "rate": 1.0, "body_size": VITALS_BODY, "gated": True}
    per_ward = {r: system.topo.receivers.get(r, 0) for r in system.topo.room_sets["wards"]}
    offered = len(tablets) * sum(per_ward.values()) / max(len(per_ward), 1)
    w = system.window(
        [stream], plan.vitals_seconds, offered=offered, max_drain=5.0, quiet=plan.quiet
    )
    skipped = sum(r.get("skipped", 0) for r in system.last_results)
    w.skipped = skipped
    log(f"    {system.label:22} vitals    {w.describe()} skipped {skipped}")
    if w.errors.get(ErrorCode.STALE_EPOCH) and system.pg_name is not None:
        # no ward is rekeyed in the run: say whose epoch differs (the server's or a
        # generator's)
        server = asyncio.run(db.room_epochs(system.pg_name))
        generators = [s["epochs"] for s in call_all(system.workers, "state")]
        names = [room.name for room in system.topo.rooms]
        for line in epoch_mismatches(server, names, generators):
            log(f"      epoch differs: {line}")
    system.settle(30.0)
    return w


# ---------------------------------------------------------------------------- revocation
@dataclass
class RevocationResult:
    cutoffs: list[float] = field(default_factory=list)  # seconds after the commit's ack
    from_commit: list[float] = field(default_factory=list)  # commit sent -> last event
    leaks: int = 0  # events after the removal delivered to the removed member
    saw_removal: int = 0  # removed devices that received their own removal event in time
    removals: int = 0
    commit_seconds: list[float] = field(default_factory=list)  # commit sent -> ack
    background: Window | None = None


def revocation(system: System, plan: Plan, background_level: float) -> RevocationResult:
    """Remove members one after another from a busy room while consult rooms carry
    ``background_level`` deliveries/s; for each removal, how long after the commit's ack
    the removed device still received anything, and whether it received anything after
    the removal's seq."""
    topo = system.topo
    removable = topo.sets["removable"]
    steady = topo.sets["steady"]
    consult = topo.sets.get("consult10", [])
    size = topo.receivers[topo.room_sets["consult10"][0]] if consult else 1
    room_size = len(steady) + len(removable) + 1
    # the busy room carries about half the background's deliveries (at least 2 messages/s)
    steady_rate = min(10.0, max(2.0, background_level / 2 / room_size) / len(steady))
    streams: list[dict[str, Any]] = [
        {"members": steady, "rate": steady_rate, "body_size": CONSULT_BODY, "live": True}
    ]
    if consult and background_level > 0:
        per_sender = min(SEND_CAP, background_level / size / len(consult))
        streams.append({"members": consult, "rate": per_sender, "body_size": CONSULT_BODY})
    # a removal (roster fetch, verification, rekey, commit) takes a few hundred ms on top of
    # the spacing; removals stop 1.5 s before the window closes so each cut-off is seen
    duration = 1.0 + len(removable) * (plan.removal_spacing + 0.35) + 1.5
    last_start = duration - 1.5
    acks: dict[int, tuple[float, int, float]] = {}  # member -> (t_ack, seq of removal, t_req)

    def during_medrelay(start_at: float) -> None:
        async def go() -> None:
            quiet_client_noise()
            ident = topo.idents[topo.revoker]
            keys = system.keystores[topo.revoker]
            client = await owner_client(
                f"ws://127.0.0.1:{system.port}/ws", ident, system.tokens[topo.revoker], keys
            )
            request = client.logic._request
            sent: list[float] = []

            async def timed(frame: Any, expect: Any) -> Any:
                if isinstance(frame, CommitFrame):
                    sent.append(time.monotonic())  # the commit itself leaves now
                return await request(frame, expect)

            client.logic._request = timed
            try:
                await asyncio.sleep(max(0.0, start_at + 0.7 - time.monotonic()))
                for g in removable:
                    if time.monotonic() > start_at + last_start:
                        break
                    seq = await client.remove("revocation", topo.members[g].name)
                    acks[g] = (time.monotonic(), seq, sent[-1])
                    await asyncio.sleep(plan.removal_spacing)
            finally:
                await client.close()

        asyncio.run(go())

    def during_bare(start_at: float) -> None:
        kicker = topo.sets["kicker"][0]
        worker, local = system.where(kicker)
        time.sleep(max(0.0, start_at + 0.7 - time.monotonic()))
        for g in removable:
            if time.monotonic() > start_at + last_start:
                break
            r = worker.call("kick", by=local, target=topo.members[g].name)
            acks[g] = (r["t_ack"], 0, r["t_req"])
            time.sleep(plan.removal_spacing)

    during = during_medrelay if system.medrelay else during_bare
    w = system.window(
        streams, duration, max_drain=5.0, quiet=plan.quiet, during=during, offered=background_level
    )
    res = RevocationResult(background=w, removals=len(acks))
    room = topo.room_sets["revocation"][0]
    arrivals: dict[int, list[tuple[int, float]]] = {}
    for wid, r in enumerate(system.last_results):
        for local, rix, seq, t in r["watched"]:
            if rix == room:
                arrivals.setdefault(local * system.n_workers + wid, []).append((seq, t))
    for g, (t_ack, seq_removed, t_req) in acks.items():
        got = arrivals.get(g, [])
        last_t = max((t for _, t in got), default=t_ack)
        res.cutoffs.append(max(0.0, last_t - t_ack))
        res.from_commit.append(max(0.0, last_t - t_req))
        res.commit_seconds.append(t_ack - t_req)
        if system.medrelay:
            res.leaks += sum(1 for s, _ in got if s > seq_removed)
            res.saw_removal += any(s == seq_removed for s, _ in got)
    cut = sorted(res.cutoffs)
    fc = sorted(res.from_commit)
    log(
        f"    {system.label:22} revocation {res.removals} removals, cut-off after ack "
        f"p50 {pct(cut, 0.5) * 1e3:.1f} p99 {pct(cut, 0.99) * 1e3:.1f} ms, after the commit "
        f"was sent p50 {pct(fc, 0.5) * 1e3:.1f} p99 {pct(fc, 0.99) * 1e3:.1f} ms, "
        f"leaks {res.leaks}, removal event seen {res.saw_removal}/{res.removals}; "
        f"background {w.describe()}"
    )
    return res


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    k = min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))
    return sorted(values)[k]


# ---------------------------------------------------------------------------- connections
@dataclass
class ConnectionsResult:
    opened: int = 0
    held: int = 0
    seconds: float = 0.0
    kib_per_conn: float = math.nan
    cpu_ms_per_conn: float = math.nan  # server CPU per connection opened (handshake)
    failures: dict[str, int] = field(default_factory=dict)


def connections(system: System, plan: Plan, count: int) -> ConnectionsResult:
    """Open ``count`` idle connections (medrelay: authenticated, one device each, eight
    devices per user), hold them, and read the server's RSS before and after."""
    assert system.server is not None
    users: list[tuple[str, str]] = []
    if system.medrelay:
        names = [(f"idle-{k}", "person") for k in range(max(1, count // 8))]
        tokens = asyncio.run(fetch_tokens("127.0.0.1", system.port, names))
        users = [(u, tokens[u]) for u, _ in names]
    time.sleep(0.3)
    rss0 = system.server.rss_kib()
    cpu0 = system.server.cpu()
    per = [
        count // system.n_workers + (1 if i < count % system.n_workers else 0)
        for i in range(system.n_workers)
    ]
    ids = [
        w.send("hold", count=per[i], users=users, first_ip=2 + 8 * i, concurrency=64)
        for i, w in enumerate(system.workers)
    ]
    results = [w.recv(i) for w, i in zip(system.workers, ids, strict=True)]
    cpu1 = system.server.cpu()
    res = ConnectionsResult()
    res.opened = sum(r["open"] for r in results)
    res.seconds = max(r["seconds"] for r in results)
    for r in results:
        for k, v in r["failures"].items():
            res.failures[k] = res.failures.get(k, 0) + v
    time.sleep(plan.hold_seconds)
    rss1 = system.server.rss_kib()
    res.held = sum(r["open"] for r in call_all(system.workers, "idle_check"))
    if res.held:
        res.kib_per_conn = (rss1 - rss0) / res.held
    if res.opened:
        res.cpu_ms_per_conn = (cpu1 - cpu0) / res.opened * 1e3
    call_all(system.workers, "drop_idle")
    log(
        f"    {system.label:22} connections {res.held}/{count} held, opened in "
        f"{res.seconds:.1f} s ({res.opened / max(res.seconds, 1e-9):.0f}/s), "
        f"{res.kib_per_conn:.1f} KiB each (RSS {rss0 / 1024:.0f} -> {rss1 / 1024:.0f} MiB), "
        f"{res.cpu_ms_per_conn:.2f} ms server CPU each "
        f"{res.failures or ''}"
    )
    return res


# ---------------------------------------------------------------------------- storm
@dataclass
class StormResult:
    clients: int = 0
    resumed: int = 0
    restart_seconds: float = 0.0  # kill -> server accepting again
    all_after_kill: float = math.nan
    all_after_ready: float = math.nan
    p50_after_ready: float = math.nan


def storm(system: System, limit: float = 60.0) -> StormResult:
    """``kill -9`` the server, start it again, and time until every client has resumed
    (reconnected with jittered backoff, re-authenticated, medrelay: synced)."""
    assert system.server is not None
    call_all(system.workers, "arm_storm")
    t_kill = time.monotonic()
    system.server.kill9()
    system.restart()
    t_ready = time.monotonic()
    results = call_all(system.workers, "storm_wait", timeout=limit + 60, limit=limit)
    times = sorted(t for r in results for t in r["resumed"])
    failures: dict[str, int] = {}
    for r in results:
        for k, v in r["failures"].items():
            failures[k] = failures.get(k, 0) + v
    res = StormResult(
        clients=sum(r["total"] for r in results),
        resumed=len(times),
        restart_seconds=t_ready - t_kill,
    )
    if times:
        res.all_after_kill = times[-1] - t_kill
        res.all_after_ready = times[-1] - t_ready
        res.p50_after_ready = statistics.median(times) - t_ready
    log(
        f"    {system.label:22} storm {res.resumed}/{res.clients} resumed; restart "
        f"{res.restart_seconds:.2f} s; all resumed {res.all_after_kill:.2f} s after the kill "
        f"({res.all_after_ready:.2f} s after ready, median {res.p50_after_ready:.2f} s) "
        f"{failures or ''}"
    )
    return res


# ---------------------------------------------------------------------------- profile
def profile(system: System, set_name: str, level: float, plan: Plan, out: Path) -> Path | None:
    """py-spy (if installed) on the server during a window at ``level`` deliveries/s.

    ``--gil`` samples only the thread holding the GIL: the profile is where the server's
    Python time goes. SQLite's own work runs in aiosqlite's threads without the GIL; the
    log line gives the split of the process's CPU between the event-loop thread and the
    others (from /proc)."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists() or system.server is None:
        log("    (py-spy not installed: .venv/bin/pip install py-spy)")
        return None
    members = system.topo.sets[set_name]
    size = system.topo.receivers[system.topo.room_sets[set_name][0]]
    per_sender = min(SEND_CAP, level / size / len(members))
    proc = subprocess.Popen(
        [
            str(spy),
            "record",
            "--format",
            "raw",
            "--rate",
            "200",
            "--gil",
            "--nonblocking",
            "-o",
            str(out),
            "--pid",
            str(system.server.pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    stream = {"members": members, "rate": per_sender, "body_size": CONSULT_BODY}
    t0 = thread_cpu(system.server.pid)
    w = system.window([stream], plan.profile_seconds, offered=level)
    t1 = thread_cpu(system.server.pid)
    proc.send_signal(2)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    main, other = t1[0] - t0[0], t1[1] - t0[1]
    log(
        f"    {system.label:22} profiled  {w.describe()}\n"
        f"      server CPU: event-loop thread {main:.2f} s, other threads {other:.2f} s "
        f"(threads that ended meanwhile are not counted); "
        f"{w.cpu / max(w.delivered, 1) * 1e6:.0f} µs per delivery, "
        f"{w.cpu / max(w.acked, 1) * 1e3:.2f} ms per send"
    )
    return out if out.exists() else None
