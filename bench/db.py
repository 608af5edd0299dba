"""Databases for the servers under test: a fresh PostgreSQL database per run, dropped after,
and the node-lease release a restart after ``kill -9`` needs (see ``release_leases``)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]

ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")


def _dsn_for(database: str) -> str:
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
    return name, _dsn_for(name).replace("postgresql://", "postgresql+asyncpg://", 1)


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def release_leases(*, sqlite_file: Path | None = None, pg_database: str | None = None) -> int:
    """Expire every journal node lease, as if its holder had released it.

    A node killed with ``kill -9`` keeps its lease (60 s) and ``medrelay serve`` refuses to
    start on the same node id until it expires (``NodeLeaseHeld``); the CLI does not yet pass
    ``--node-id`` to the store, so a replacement cannot take a new id either. The reconnect
    storm measures the clients, not that wait, so it releases the dead node's lease first
    (and the report says so). Returns the number of leases released."""
    sql = "UPDATE journal_nodes SET lease_until = 0, holder = NULL WHERE holder IS NOT NULL"
    if sqlite_file is not None:
        with sqlite3.connect(sqlite_file) as db:
            return db.execute(sql).rowcount
    assert pg_database is not None
    conn = await asyncpg.connect(_dsn_for(pg_database))
    try:
        status = await conn.execute(sql)
    finally:
        await conn.close()
    return int(status.split()[-1])


async def pg_commits(database: str) -> int:
    """Committed transactions so far in ``database`` (``pg_stat_database``; the statistics
    collector lags by up to half a second, so read it after a pause)."""
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        value = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = $1", database
        )
    finally:
        await conn.close()
    return int(value or 0)
