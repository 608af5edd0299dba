"""A system under test: one server process, its populated topology, and the load-generator
processes that act as its devices."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from medrelay_client.keystore import KeyStore

from . import db
from .loadgen import WorkerHandle, call_all
from .population import populate
from .procs import Server, baseline_argv, free_port, medrelay_argv
from .stats import Window, join
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
    ) -> None:
        self.label, self.kind, self.topo, self.database = label, kind, topo, database
        self.workdir = workdir
        self.port = free_port()
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
        self.node_no = 1
        self.receipt_interval = receipt_interval
        self.setup_cpu = 0.0

    @property
    def medrelay(self) -> bool:
        return self.kind == "medrelay"

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> float:
        if self.medrelay and self.database == "postgres" and self.db_url is None:
            self.pg_name, self.db_url = asyncio.run(db.create_database())
        self.server = self._server()
        return self.server.start()

    def _server(self) -> Server:
        log = self.data_dir / "server.log"
        if self.medrelay:
            argv = medrelay_argv(self.port, self.data_dir, self.db_url)
            env = {"MEDRELAY_NODE_ID": f"node-{self.node_no}"}
            return Server(self.label, argv, self.port, log, http=True, env=env)
        return Server(self.label, baseline_argv(self.port), self.port, log, http=False)

    def restart(self) -> float:
        """Start again after ``kill9`` (a replacement process on the same port and data)."""
        assert self.server is not None
        if self.medrelay:
            if self.database == "postgres":
                asyncio.run(db.release_leases(pg_database=self.pg_name))
            else:
                asyncio.run(db.release_leases(sqlite_file=self.data_dir / "medrelay.sqlite3"))
            self.node_no += 1
            self.server.env["MEDRELAY_NODE_ID"] = f"node-{self.node_no}"
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
                    port=self.port,
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
        if self.server is not None:
            self.server.stop()
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
        start_at = time.monotonic() + 0.1
        cpu0 = self.server.cpu()
        ids = [
            worker.send(
                "run", start_at=start_at, duration=duration, quiet=quiet, max_drain=max_drain
            )
            for worker in self.workers
        ]
        if during is not None:
            during(start_at)
        results = [worker.recv(i) for worker, i in zip(self.workers, ids, strict=True)]
        cpu1 = self.server.cpu()
        win = join(results, self.topo.receivers)
        win.seconds = duration
        win.cpu = cpu1 - cpu0
        win.offered = offered
        self.last_results = results
        return win

    def settle(self, limit: float = 5.0) -> None:
        """Wait until the server is idle (a failed step may leave a backlog), then reconnect
        any device the server dropped (slow consumer) so the next window starts whole."""
        assert self.server is not None
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            c0 = self.server.cpu()
            time.sleep(0.2)
            if self.server.cpu() - c0 < 0.03:
                break
        states = call_all(self.workers, "state")
        if any(s["closed"] for s in states):
            self.connect()
