"""Start a local N-node medrelay cluster on loopback: N ``medrelay serve`` processes sharing one
PostgreSQL database and one Redis, each on its own port.

From a shell::

    .venv/bin/python scripts/cluster.py -n 3                  # fresh database, Redis :6379
    .venv/bin/python scripts/cluster.py -n 2 --database-url postgresql+asyncpg://...

It waits for every node's ``/readyz``, prints the URLs and runs until Ctrl-C, then stops the
nodes (SIGTERM, SIGKILL after a grace period) and drops the fresh database it made.

From Python (the multi-node tests)::

    with Cluster(2, broker_url=..., database_url=..., workdir=tmp) as cluster:
        cluster.urls          # ["ws://127.0.0.1:PORT/ws", ...]
        cluster.kill(1)       # SIGKILL node 1 (its port is kept)
        cluster.start(1)      # start it again on the same port, wait for /readyz

Every node gets ``--dev-issuer``: development tokens, never on a real network. Each node's
issuer has its own key, so fetch a token from the node you connect to (``/dev/token``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """One gateway process; its port survives kill/start so clients can come back to it."""

    def __init__(self, index: int, port: int, workdir: Path) -> None:
        self.index = index
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def node_id(self) -> str:
        """``node-i``, also after a SIGKILL: the restarted process (same data directory)
        takes over the lease the killed one left (``medrelay_server.nodeinstance``)."""
        return f"node-{self.index}"

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster:
    """N gateway processes on loopback; a context manager (``with Cluster(...) as c``)."""

    def __init__(
        self,
        n: int,
        *,
        broker_url: str = DEFAULT_REDIS,
        database_url: str,
        database_schema: str | None = None,
        workdir: Path | None = None,
        python: str = sys.executable,
        command: tuple[str, ...] | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        """``command`` runs a node (default: this interpreter's ``-m medrelay_server.cli``;
        an installed ``("/opt/medrelay/bin/medrelay",)`` works the same); ``serve`` and the
        flags are appended."""
        if n < 1:
            raise ValueError("a cluster has at least one node")
        self.broker_url = broker_url
        self.database_url = database_url
        self.database_schema = database_schema
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="medrelay-cluster-")
        self.workdir = workdir or Path(self._tmp.name)  # type: ignore[union-attr]
        self.command = command or (python, "-m", "medrelay_server.cli")
        self.extra_args = extra_args
        self.env = {**os.environ, **(env or {})}
        self.nodes = [Node(i, free_port(), self.workdir / f"node-{i}") for i in range(n)]

    # context manager -----------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self.wait_ready(node.index)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for i in range(len(self.nodes)):
            self.stop(i)
        if self._tmp is not None:
            self._tmp.cleanup()

    # the API the tests use -------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def url(self, i: int) -> str:
        return self.nodes[i].url

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``: no goodbye to clients, no flush, exactly like a crash."""
        node = self.nodes[i]
        if node.alive:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def stop(self, i: int, grace: float = STOP_GRACE) -> None:
        """SIGTERM node ``i`` (a clean shutdown), SIGKILL if it is not gone after ``grace``."""
        node = self.nodes[i]
        if node.proc is None:
            return
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
            try:
                node.proc.wait(grace)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait()

    def start(self, i: int) -> None:
        """(Re)start node ``i`` on its port and wait until it is ready."""
        node = self.nodes[i]
        if node.alive:
            return
        self._spawn(node)
        self.wait_ready(i)

    def ready(self, i: int) -> dict[str, str] | None:
        """The node's ``/readyz`` checks when it answers 200, else ``None``."""
        try:
            with urllib.request.urlopen(self.nodes[i].http + "/readyz", timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def wait_ready(self, i: int, timeout: float = READY_TIMEOUT) -> None:
        node = self.nodes[i]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(
                    f"{node.node_id} exited with {node.proc.returncode}; "
                    f"see {node.workdir / 'node.log'}:\n{self.log_tail(i)}"
                )
            if self.ready(i) is not None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"{node.node_id} not ready after {timeout}s:\n{self.log_tail(i)}")

    def log_tail(self, i: int, lines: int = 30) -> str:
        path = self.nodes[i].workdir / "node.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, node: Node) -> None:
        node.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            *self.command, "serve",
            "--host", "127.0.0.1",
            "--port", str(node.port),
            "--node-id", node.node_id,
            "--broker-url", self.broker_url,
            "--database-url", self.database_url,
            "--data-dir", str(node.workdir / "data"),
            "--dev-issuer",
            # one development key for all nodes: a token works on whichever node a client
            # fails over to
            "--dev-key-file", str(node.workdir.parent / "dev-issuer.key"),
            # one anchoring signer per deployment (the first node stands in for it here)
            "--anchor-interval-seconds", "60" if node is self.nodes[0] else "0",
            *(("--database-schema", self.database_schema) if self.database_schema else ()),
            *self.extra_args,
        ]  # fmt: skip
        with open(node.workdir / "node.log", "ab") as log:
            node.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )


# ------------------------------------------------------------------ fresh databases


async def create_database(admin_url: str = DEFAULT_PG_ADMIN, prefix: str = "medrelay_") -> str:
    """Create an empty database named ``prefix`` + random hex; return its name."""
    import asyncpg

    name = prefix + secrets.token_hex(6)
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str, admin_url: str = DEFAULT_PG_ADMIN) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def asyncpg_url(admin_url: str, database: str) -> str:
    """The SQLAlchemy URL of ``database`` on the server of ``admin_url``."""
    base = admin_url.split("://", 1)[1].rsplit("/", 1)[0]
    return f"postgresql+asyncpg://{base}/{database}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--nodes", type=int, default=2)
    parser.add_argument("--broker-url", default=DEFAULT_REDIS)
    parser.add_argument("--database-url", help="default: a fresh database, dropped on exit")
    parser.add_argument("--database-schema", help="PostgreSQL schema (created if missing)")
    parser.add_argument("--pg-admin-url", default=DEFAULT_PG_ADMIN)
    parser.add_argument("--workdir", type=Path, help="logs and data (default: a temp dir)")
    args = parser.parse_args(argv)

    fresh = None
    database_url = args.database_url
    if database_url is None:
        fresh = asyncio.run(create_database(args.pg_admin_url, "medrelay_cluster_"))
        database_url = asyncpg_url(args.pg_admin_url, fresh)
    try:
        with Cluster(
            args.nodes,
            broker_url=args.broker_url,
            database_url=database_url,
            database_schema=args.database_schema,
            workdir=args.workdir,
        ) as cluster:
            print(f"database {database_url}\nbroker   {args.broker_url}")
            for node in cluster.nodes:
                print(f"{node.node_id}  {node.url}  (ready: {node.http}/readyz)")
            print(f"logs in {cluster.workdir}; Ctrl-C stops the cluster", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        if fresh is not None:
            asyncio.run(drop_database(fresh, args.pg_admin_url))
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
