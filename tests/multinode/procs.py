"""Throw-away Redis and PostgreSQL servers of a test's own, on free loopback ports, so a
fault test can stop, kill and restart them without touching the shared services."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (Redis needs both)."""
    import random

    for _ in range(200):
        port = random.randint(20000, 45000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def wait_port(port: int, timeout: float = START_TIMEOUT, *, proc: subprocess.Popen[bytes]) -> None:
    """Poll until something accepts on ``port`` (a process start has no event to wait on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class RedisServer:
    """``redis-server`` on its own port, no persistence; ``kill``/``start`` keep the port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        self._extra = extra or getattr(self, "_extra", ())
        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                *self._extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        wait_port(self.port, proc=self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def wait_cluster_ok(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``CLUSTER INFO`` until this node says ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), "cluster", "info"],
                capture_output=True,
                timeout=5,
            ).stdout
            if b"cluster_state:ok" in out:
                return
            time.sleep(0.05)
        raise TimeoutError(f"redis cluster node :{self.port} not ok after {timeout}s")

    def restart(self) -> None:
        self.kill()
        self.start()


def redis_cluster(workdir: Path, shards: int = 3) -> list[RedisServer]:
    """A Redis Cluster of ``shards`` primaries (no replicas) on free loopback ports."""
    servers = [RedisServer(workdir / f"shard-{i}", free_cluster_port()) for i in range(shards)]
    try:
        _create_cluster(servers)
    except BaseException:
        for s in servers:
            s.kill()
        raise
    return servers


def _create_cluster(servers: list[RedisServer]) -> None:
    for s in servers:
        s.start("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
    subprocess.run(
        [
            shutil.which("redis-cli") or "redis-cli",
            "--cluster", "create",
            *(f"127.0.0.1:{s.port}" for s in servers),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip


class PostgresServer:
    """A PostgreSQL cluster of its own (``initdb`` in a temporary directory, trust auth,
    loopback only), run as the ``postgres`` OS user when the tests run as root."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not PG_BIN_DIRS:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql")
        self.bin = PG_BIN_DIRS[0]
        self.port = port or free_port()
        self.workdir = workdir
        self.data = workdir / "pgdata"
        self.logfile = workdir / "postgres.log"
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(self.bin / argv[0]), *argv[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, timeout=60)

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"\nport = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nfsync = off\nsynchronous_commit = on\n"
                "max_connections = 200\n"
            )

    def start(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30", "start"
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)
