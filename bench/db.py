"""Databases for the servers under test: a fresh PostgreSQL database per run, dropped after."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def dsn_for(database: str) -> str:
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def pg_available() -> bool:
    try:
        conn = await asyncpg.connect(ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def create_database() -> tuple[str, str]:
    """Create ``bench_<random>``; returns (name, SQLAlchemy URL for ``--database-url``)."""
    name = f"bench_{os.urandom(6).hex()}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, dsn_for(name).replace("postgresql://", "postgresql+asyncpg://", 1)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def room_epochs(database: str) -> dict[str, int]:
    """Every room's current epoch in the bench database ``database``."""
    conn = await asyncpg.connect(dsn_for(database))
    try:
        rows = await conn.fetch("SELECT room, epoch FROM rooms")
    finally:
        await conn.close()
    return {str(room): int(epoch) for room, epoch in rows}


async def pg_commits(database: str) -> int:
    """Committed transactions so far in ``database`` (see :func:`pg_counters`)."""
    return (await pg_counters(database))[0]


async def _postmaster_pid() -> int | None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        # read while the backend lives (it exits when this connection closes)
        stat = await asyncio.to_thread(Path(f"/proc/{backend}/stat").read_text)
    except OSError:
        return None  # not on this machine
    finally:
        await conn.close()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def postmaster_pid() -> int | None:
    """The PostgreSQL server's main process (the parent of a backend of ours), if it runs
    on this machine."""
    return asyncio.run(_postmaster_pid())


async def pg_counters(database: str) -> tuple[int, int]:
    """(transactions committed, sessions opened) so far in ``database``
    (``pg_stat_database``; backends report their counts up to a second late)."""
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit, sessions FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)


async def sample_activity(
    database: str, start: float, until: float, interval: float = 0.05
) -> dict[str, float]:
    """Sample ``pg_stat_activity`` for ``database`` every ``interval`` s from ``start`` until
    ``until`` (monotonic); returns the mean number of its sessions per state: ``lock`` (waiting on a
    row or transaction lock), ``active`` (running a statement, or waiting on anything but a
    lock: I/O, WAL), ``in transaction`` (a transaction open, waiting for its client: the
    medrelay node), and ``samples``."""
    import time

    sums = {"lock": 0, "active": 0, "in transaction": 0}
    samples = 0
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        while time.monotonic() < until:
            rows = await conn.fetch(
                "SELECT state, wait_event_type FROM pg_stat_activity "
                "WHERE datname = $1 AND state <> 'idle' AND pid <> pg_backend_pid()",
                database,
            )
            samples += 1
            for state, wait in rows:
                if wait == "Lock":
                    sums["lock"] += 1
                elif state == "active":
                    sums["active"] += 1
                else:
                    sums["in transaction"] += 1
            await asyncio.sleep(interval)
    finally:
        await conn.close()
    out = {k: v / samples for k, v in sums.items()} if samples else {}
    out["samples"] = float(samples)
    return out


REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")


def redis_available(url: str) -> bool:
    """Whether a Redis answers ``PING`` at ``url`` (``redis://host:port/db``)."""
    import socket

    hostport = url.split("://", 1)[-1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False
