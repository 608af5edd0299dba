"""Servers under test as subprocesses, and what /proc says about them (no psutil needed)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise this process's open-file limit as far as the hard limit allows (children
    inherit it). Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (``/proc/<pid>/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Server:
    """One server process: ``start`` waits until it accepts connections (and, for medrelay,
    until ``/healthz`` answers), ``kill9`` drops it like a crash."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log: Path,
        *,
        http: bool,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.log, self.http = name, argv, port, log, http
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait until ready; returns the seconds it took."""
        t0 = time.monotonic()
        self.started_at = t0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.proc.returncode}) during start-up; "
                    f"see {self.log}:\n{tail(self.log)}"
                )
            if self._ready():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log}")
            time.sleep(0.02)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                pass
        except OSError:
            return False
        if not self.http:
            return True
        try:
            url = f"http://127.0.0.1:{self.port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def kill9(self) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def medrelay_argv(
    port: int, data_dir: Path, database_url: str | None, extra: tuple[str, ...] = ()
) -> list[str]:
    exe = Path(sys.executable).with_name("medrelay")
    argv = [str(exe), "serve", "--dev-issuer", "--port", str(port), "--data-dir", str(data_dir)]
    if database_url:
        argv += ["--database-url", database_url]
    return argv + list(extra)


def baseline_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.baseline", "--port", str(port)]


def thread_cpu(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds: with SQLite, the other threads are
    aiosqlite's (one per pooled connection) and their time is SQLite's own work."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            t = cpu_seconds_path(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        if int(tid) == pid:
            main += t
        else:
            other += t
    return main, other


def cpu_seconds_path(path: str) -> float:
    with open(path) as fh:
        stat = fh.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# ------------------------------------------------------------------ where a machine's CPU goes
def machine_busy() -> float:
    """CPU seconds every core of the machine spent busy so far (``/proc/stat``: all but
    idle and iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLK_TCK


def tree_cpu(root: int) -> float:
    """CPU seconds so far of ``root``, of its children that exited (reaped: ``cutime`` +
    ``cstime``) and of its live children. For PostgreSQL's postmaster this is the whole
    server: every backend (also those a connection pool opened and closed meanwhile), the
    WAL writer, the checkpointer; every database on it."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        pid, ppid = int(entry), int(f[1])
        if pid == root:
            total += sum(int(x) for x in f[11:15]) / CLK_TCK  # utime stime cutime cstime
        elif ppid == root:
            total += (int(f[11]) + int(f[12])) / CLK_TCK
    return total


def find_redis(port: int) -> int | None:
    """The pid of the ``redis-server`` listening on ``port`` (its process title names it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "redis-server" in cmd and f":{port}" in cmd:
            return int(entry)
    return None
