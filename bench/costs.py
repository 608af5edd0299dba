"""Server CPU per operation, by difference between windows that differ in one thing.

    python -m bench.costs [--databases sqlite postgres] [--seconds 5]

For each back-end: a window of sends into rooms of 10 without receipts (A), the same
sends/s into a room of 50 (B: only the fan-out grows), A again with every receiving device
sending a cumulative receipt each second (C), and idle connections opened (D). Server CPU is
read from /proc, minus the idle server's own CPU over the same time. Derived: CPU per send,
per extra delivery (fan-out), per receipt and per handshake. This is what to optimise: the
main table's deliveries per CPU-second is these costs put together.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import db
from .flame import summarise
from .procs import raise_nofile
from .scenarios import log
from .stats import Window
from .system import System
from .topology import CONSULT_BODY, Sizes, build


def idle_cpu_per_second(system: System, seconds: float = 2.0) -> float:
    assert system.server is not None
    c0 = system.server.cpu()
    time.sleep(seconds)
    return (system.server.cpu() - c0) / seconds


def window(system: System, set_name: str, messages: float, seconds: float) -> Window:
    members = system.topo.sets[set_name]
    active = members[: max(1, min(len(members), round(messages / 4)))]
    stream = {"members": active, "rate": messages / len(active), "body_size": CONSULT_BODY}
    commits = _commits(system)
    w = system.window([stream], seconds, quiet=0.5, max_drain=5.0)
    time.sleep(0.7)
    w.commits = _commits(system) - commits
    return w


def _py_spy(system: System, out: Path) -> subprocess.Popen[bytes] | None:
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists() or system.server is None:
        return None
    argv = [str(exe), "record", "--format", "raw", "--rate", "500", "--gil", "--nonblocking"]
    argv += ["-o", str(out), "--pid", str(system.server.pid)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def _commits(system: System) -> int:
    if system.pg_name is None:
        return 0
    return asyncio.run(db.pg_commits(system.pg_name))


def measure(
    system: System, seconds: float, messages: float, profile: Path | None = None
) -> list[tuple[str, str]]:
    for worker in system.workers:
        worker.call("set_receipts", interval=0.0)
    time.sleep(2.0)  # the connect's catch-up and its receipts are over
    idle = idle_cpu_per_second(system, 3.0)
    t0 = time.monotonic()
    spy = _py_spy(system, profile) if profile is not None else None
    a = window(system, "consult10", messages, seconds)
    a_cpu = a.cpu - idle * (time.monotonic() - t0)
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(15)
    t0 = time.monotonic()
    b = window(system, "consult50", messages, seconds)
    b_cpu = b.cpu - idle * (time.monotonic() - t0)
    for worker in system.workers:
        worker.call("set_receipts", interval=1.0)
    t0 = time.monotonic()
    c = window(system, "consult10", messages, seconds)
    c_cpu = c.cpu - idle * (time.monotonic() - t0)
    for worker in system.workers:
        worker.call("set_receipts", interval=0.0)
    receipts = c.receipts
    per_send = a_cpu / max(a.acked, 1)
    per_delivery = (b_cpu / max(b.acked, 1) - per_send) / 40  # 50 vs 10 deliveries a send
    per_receipt = (c_cpu - a_cpu * c.acked / max(a.acked, 1)) / max(receipts, 1)
    rows = [
        ("send into a room of 10 (store, journal, ack, 10 deliveries)", f"{per_send * 1e3:.2f} ms"),
        ("each further delivery of a send (fan-out)", f"{per_delivery * 1e6:.0f} µs"),
        (
            "send without its deliveries",
            f"{(per_send - 10 * per_delivery) * 1e3:.2f} ms",
        ),
        (f"cumulative receipt ({receipts} in window C)", f"{per_receipt * 1e3:.2f} ms"),
        ("idle server", f"{idle * 1e3:.0f} ms CPU per second"),
    ]
    if system.pg_name is not None:
        rows.append(("PostgreSQL transactions per send", f"{a.commits / max(a.acked, 1):.1f}"))
        extra = c.commits - a.commits * c.acked / max(a.acked, 1)
        rows.append(("PostgreSQL transactions per receipt", f"{extra / max(receipts, 1):.1f}"))
    for label, w in (("A", a), ("B", b), ("C", c)):
        log(f"    {system.label:22} {label} {w.describe()}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.costs", description=__doc__)
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--messages", type=float, default=20.0, help="sends per second")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the sends-only window (A) and summarise"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    raise_nofile()
    workdir = Path(tempfile.mkdtemp(prefix="medrelay-costs-"))
    if "postgres" in args.databases and not asyncio.run(db.pg_available()):
        args.databases = [d for d in args.databases if d != "postgres"]
    sizes = Sizes(3, 1, 0, 0, 0, 0)
    out: list[str] = []
    for database in args.databases:
        label = f"medrelay ({'PostgreSQL' if database == 'postgres' else 'SQLite'})"
        topo = build(sizes, medrelay=True, extra=False)
        system = System(label, "medrelay", topo, workdir, workers=2, database=database)
        try:
            system.bring_up()
            prof = workdir / f"sends-{database}.txt" if args.profile else None
            rows = measure(system, args.seconds, args.messages, prof)
            if prof is not None and prof.exists():
                out.append(
                    f"\n{label}: profile of window A (sends only)\n{summarise(prof, top=25)}"
                )
            assert system.server is not None
            c0 = system.server.cpu()
            held = system.workers[0].call(
                "hold", count=200, users=_users(system), concurrency=32, first_ip=2
            )
            per_conn = (system.server.cpu() - c0) / max(held["open"], 1)
            rows.append(
                ("open an authenticated connection (handshake)", f"{per_conn * 1e3:.2f} ms")
            )
        finally:
            system.stop()
        out.append(f"\n{label}, {args.messages:.0f} sends/s, {args.seconds:.0f} s windows")
        out += [f"  {value:>14}  {what}" for what, value in rows]
    if args.keep:
        out.append(f"\nkept: {workdir} (py-spy raw profiles: sends-<database>.txt)")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(out))


def _users(system: System) -> list[tuple[str, str]]:
    from .mr import fetch_tokens

    names = [(f"idle-{k}", "person") for k in range(25)]
    tokens = asyncio.run(fetch_tokens("127.0.0.1", system.port, names))
    return [(u, tokens[u]) for u, _ in names]


if __name__ == "__main__":
    main()
