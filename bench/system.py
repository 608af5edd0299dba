"""A system under test: its server process(es), its populated topology, and the
load-generator processes that act as its devices.

A medrelay system may have several nodes (``nodes=2``, ``broker_url``): separate
``medrelay serve`` processes on one PostgreSQL database and one Redis, as
``scripts/cluster.py`` starts them. Load-generator ``w`` then connects its devices to node
``w % nodes``; devices are dealt to generators round-robin, so a room's members (consecutive
indexes) are split evenly across the nodes. Server CPU is the sum over the nodes."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import Any

from medrelay_client.keystore import KeyStore

from . import db
from .loadgen import WorkerHandle, call_all
from .population import populate
from .procs import (
    Server,
    baseline_argv,
    cpu_seconds,
    find_redis,
    free_port,
    machine_busy,
    medrelay_argv,
    tree_cpu,
)
from .stats import Window, gc_pauses, join, parse_gc_pauses, parse_send_stages, stage_means
from .topology import Topology


class System:
    def __init__(
        self,
        label: str,
        kind: str,
        topo: Topology,
        workdir: Path,
        *,
        workers: int,
        database: str = "sqlite",
        receipt_interval: float = 1.0,
        nodes: int = 1,
        broker_url: str | None = None,
        breakdown: bool = False,
        activity_interval: float = 0.05,
    ) -> None:
        self.label, self.kind, self.topo, self.database = label, kind, topo, database
        self.workdir = workdir
        self.nodes, self.broker_url = nodes, broker_url
        self.breakdown = breakdown  # record where the machine's CPU goes in each window
        self.activity_interval = activity_interval  # and sample the database's sessions
        self.ports = [free_port() for _ in range(nodes)]
        self.port = self.ports[0]
        self.servers: list[Server] = []
        self._pg_root: int | None = None  # PostgreSQL's postmaster (0: not on this machine)
        self._redis_pid: int | None = None
        self.last_activity: dict[str, float] = {}
        self.pg_name: str | None = None
        self.db_url: str | None = None
        self.data_dir = workdir / label.replace(" ", "-").replace("(", "").replace(")", "")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server: Server | None = None
        self.n_workers = workers
        self.workers: list[WorkerHandle] = []
        self.tokens: dict[str, str] = {}
        self.keystores: dict[str, KeyStore] = {}
        self.setup_timing: dict[str, float] = {}
        self.receipt_interval = receipt_interval
        self.setup_cpu = 0.0

    @property
    def medrelay(self) -> bool:
        return self.kind == "medrelay"

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> float:
        """Start the server (every node of it); returns the seconds it took."""
        if self.medrelay and self.database == "postgres" and self.db_url is None:
            self.pg_name, self.db_url = asyncio.run(db.create_database())
        t0 = time.monotonic()
        for i in range(self.nodes):
            server = self._server(i)
            self.servers.append(server)  # listed first: ``stop`` ends it even if start fails
            if i == 0:
                self.server = server
            server.start()
        return time.monotonic() - t0

    def _server(self, i: int = 0) -> Server:
        if not self.medrelay:
            log = self.data_dir / "server.log"
            return Server(self.label, baseline_argv(self.port), self.port, log, http=False)
        if self.nodes == 1 and self.broker_url is None:
            log = self.data_dir / "server.log"
            argv = medrelay_argv(self.port, self.data_dir, self.db_url)
            env = {"MEDRELAY_NODE_ID": "node-1"}
            return Server(self.label, argv, self.port, log, http=True, env=env)
        # one node of a deployment (scripts/cluster.py): its own data directory and node id,
        # one shared broker and development issuer key (a token works on every node), one
        # anchoring signer and one retention purge (the first node)
        data = self.data_dir / f"node-{i + 1}"
        data.mkdir(parents=True, exist_ok=True)
        extra: list[str] = ["--dev-key-file", str(self.data_dir / "dev-issuer.key")]
        if self.broker_url:
            extra += ["--broker-url", self.broker_url]
        if i > 0:
            extra += ["--anchor-interval-seconds", "0", "--purge-interval-hours", "0"]
        argv = medrelay_argv(self.ports[i], data, self.db_url, tuple(extra))
        env = {"MEDRELAY_NODE_ID": f"node-{i + 1}"}
        name = f"{self.label} node {i + 1}"
        return Server(name, argv, self.ports[i], data / "server.log", http=True, env=env)

    def cpu(self) -> float:
        """CPU seconds of every node of the server so far."""
        return sum(s.cpu() for s in self.servers)

    def worker_port(self, w: int) -> int:
        """The node load-generator ``w`` connects its devices to."""
        return self.ports[w % self.nodes]

    def restart(self) -> float:
        """Start again after ``kill9``: the same command, port, data and node id, as a
        supervisor would (the new process takes over the lease the killed one left)."""
        assert self.server is not None
        return self.server.start()

    async def populate(self) -> None:
        """Set-up (untimed): register devices, create rooms, add members."""
        if not self.medrelay:
            return
        t0 = time.monotonic()
        self.tokens, rooms, self.setup_timing = await populate(
            "127.0.0.1", self.port, self.topo.idents, self.topo.plans, self.keystores
        )
        for spec in self.topo.rooms:
            ready = rooms[spec.name]
            spec.epoch, spec.head = ready.epoch, ready.head
        self.setup_timing["total"] = time.monotonic() - t0
        assert self.server is not None
        self.setup_cpu = self.server.cpu()

    def spawn_workers(self) -> None:
        """Start the load-generator processes (before set-up: their start overlaps it)."""
        self.workers = [WorkerHandle(i) for i in range(self.n_workers)]

    def send_setup(self) -> list[int]:
        """Hand each worker its share of the devices (after set-up: tokens, epochs)."""
        ids = []
        for w, worker in enumerate(self.workers):
            mine = self.topo.members[w :: self.n_workers]
            ids.append(
                worker.send(
                    "setup",
                    system=self.kind,
                    port=self.worker_port(w),
                    rooms=self.topo.rooms,
                    members=mine,
                    tokens={m.name: self.tokens[m.name] for m in mine if m.name in self.tokens},
                    receipt_interval=self.receipt_interval,
                )
            )
        return ids

    def send_connect(self) -> list[int]:
        return [w.send("connect") for w in self.workers]

    def gather(self, ids: list[int], timeout: float = 600.0) -> list[dict[str, Any]]:
        return [w.recv(i, timeout) for w, i in zip(self.workers, ids, strict=True)]

    def connect(self) -> dict[str, Any]:
        return self.connected(self.gather(self.send_connect()))

    def bring_up(self) -> dict[str, Any]:
        """One system on its own (the helpers' way; the main bench sets several up at
        once): load generators, server, devices and rooms, every device connected."""
        self.spawn_workers()
        self.start()
        asyncio.run(self.populate())
        self.gather(self.send_setup())
        return self.connect()

    @staticmethod
    def connected(results: list[dict[str, Any]]) -> dict[str, Any]:
        up = sum(r["up"] for r in results)
        failures: dict[str, int] = {}
        for r in results:
            for k, v in r["failures"].items():
                failures[k] = failures.get(k, 0) + v
        return {"up": up, "failures": failures, "seconds": max(r["seconds"] for r in results)}

    def stop(self) -> None:
        for w in self.workers:
            w.close()
        self.workers = []
        for server in self.servers:
            server.stop()
        if self.pg_name is not None:
            try:
                asyncio.run(db.drop_database(self.pg_name))
            except Exception as exc:  # the report still stands; say what was left behind
                print(f"  (could not drop database {self.pg_name}: {exc})")
            self.pg_name = None

    # ----------------------------------------------------------------- member addressing
    def split(self, members: list[int]) -> list[list[int]]:
        """Global member indexes -> per-worker local indexes."""
        out: list[list[int]] = [[] for _ in self.workers]
        for g in members:
            out[g % self.n_workers].append(g // self.n_workers)
        return out

    def where(self, member: int) -> tuple[WorkerHandle, int]:
        return self.workers[member % self.n_workers], member // self.n_workers

    # ----------------------------------------------------------------- a timed window
    def window(
        self,
        streams: list[dict[str, Any]],
        duration: float,
        *,
        offered: float = 0.0,
        quiet: float = 0.2,
        max_drain: float = 3.0,
        during: Any = None,
    ) -> Window:
        """``streams``: ``{"members": [global index, ...], "rate", "body_size", "live"}``.
        ``during(start_at)`` runs in the coordinator while the window is open."""
        assert self.server is not None
        ids = []
        for w, worker in enumerate(self.workers):
            local = []
            for s in streams:
                part = self.split(s["members"])[w]
                if part:
                    local.append({**s, "members": part})
            ids.append(worker.send("prepare", streams=local, duration=duration))
        for worker, i in zip(self.workers, ids, strict=True):
            worker.recv(i)
        self.last_activity = {}
        parts0 = self._cpu_parts() if self.breakdown else {}
        counters0 = self._pg_counters() if self.breakdown else (0, 0)
        stages0, gc0 = self._node_metrics()
        start_at = time.monotonic() + 0.1
        cpu0 = self.cpu()
        ids = [
            worker.send(
                "run", start_at=start_at, duration=duration, quiet=quiet, max_drain=max_drain
            )
            for worker in self.workers
        ]
        if during is not None:
            during(start_at)
        elif self.breakdown and self.pg_name is not None:
            # the coordinator is idle while the window runs: watch the database's sessions
            until = start_at + duration
            self.last_activity = asyncio.run(
                db.sample_activity(self.pg_name, start_at, until, self.activity_interval)
            )
        results = [worker.recv(i) for worker, i in zip(self.workers, ids, strict=True)]
        cpu1 = self.cpu()
        win = join(results, self.topo.receivers)
        win.seconds = duration
        win.cpu = cpu1 - cpu0
        if parts0:
            parts1 = self._cpu_parts()
            win.cpu_parts = {k: parts1[k] - parts0[k] for k in parts0}
            counters1 = self._pg_counters()
            win.commits = counters1[0] - counters0[0]
            win.sessions = counters1[1] - counters0[1]
            win.pg_activity = self.last_activity if during is None else {}
        stages1, gc1 = self._node_metrics()
        if stages0 and stages1:
            win.store_stages = stage_means(stages0, stages1)
        if gc0 and gc1:
            win.gc = gc_pauses(gc0, gc1)
        win.offered = offered
        self.last_results = results
        return win

    def _node_metrics(
        self,
    ) -> tuple[dict[str, tuple[float, float]], dict[int, tuple[float, float]]]:
        """The primary medrelay node's send-store histograms (``metrics.py``): stage ->
        (sum, count); and its collector's pauses: generation -> (sum, count). Empty for the
        bare relay, or if the node does not answer."""
        if not self.medrelay or self.server is None:
            return {}, {}
        url = f"http://127.0.0.1:{self.server.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}, {}
        return parse_send_stages(text), parse_gc_pauses(text)

    def settle(self, limit: float = 5.0) -> None:
        """Wait until the server is idle (a failed step may leave a backlog), then reconnect
        any device the server dropped (slow consumer) so the next window starts whole."""
        assert self.server is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            c0 = self.cpu()
            time.sleep(0.2)
            if self.cpu() - c0 < 0.03 * self.nodes:
                break
        states = call_all(self.workers, "state")
        if any(s["closed"] for s in states):
            self.connect()

    def _cpu_parts(self) -> dict[str, float]:
        """CPU seconds so far per node, load generators, the PostgreSQL server (all of it),
        Redis, the whole machine; and the monotonic clock (``wall``)."""
        parts = {f"node-{i + 1}": s.cpu() for i, s in enumerate(self.servers)}
        parts["generators"] = sum(cpu_seconds(w.proc.pid) for w in self.workers if w.proc.pid)
        if self._pg_root is None and self.pg_name is not None:
            self._pg_root = db.postmaster_pid() or 0
        parts["postgres"] = tree_cpu(self._pg_root) if self._pg_root else 0.0
        if self._redis_pid is None and self.broker_url:
            hostport = self.broker_url.split("://", 1)[-1].split("/", 1)[0]
            port = int(hostport.rsplit(":", 1)[1]) if ":" in hostport else 6379
            self._redis_pid = find_redis(port) or 0
        parts["redis"] = 0.0
        if self._redis_pid:
            try:
                parts["redis"] = cpu_seconds(self._redis_pid)
            except OSError:
                self._redis_pid = 0
        parts["machine"] = machine_busy()
        parts["wall"] = time.monotonic()
        return parts

    def _pg_counters(self) -> tuple[int, int]:
        if self.pg_name is None:
            return 0, 0
        return asyncio.run(db.pg_counters(self.pg_name))
