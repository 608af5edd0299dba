"""The PostgreSQL connection pool keeps ``pool_size`` sessions open across bursts
(``store/engine.py``): a burst that fits the pool reuses its sessions, where SQLAlchemy's
default of 5 would open and close one backend per extra connection each time (the overloaded
nodes of ``docs/performance.md`` "Fifth round" opened 90-110 sessions a window)."""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest
import sqlalchemy as sa
from medrelay_server.settings import POOL_OVERFLOW
from medrelay_server.store.engine import Database

from .conftest import PG_URL
from .test_send_locks import DSN

pytestmark = pytest.mark.postgres


async def _burst(db: Database, n: int) -> set[int]:
    """``n`` read transactions open at once; the backend pid of each."""
    together = asyncio.Barrier(n)

    async def one() -> int:
        async with db.read() as conn:
            pid = int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
            await together.wait()  # every connection is checked out at the same time
            return pid

    async with asyncio.timeout(30):
        return set(await asyncio.gather(*(one() for _ in range(n))))


async def test_a_burst_that_fits_the_pool_reuses_its_sessions() -> None:
    db = Database(PG_URL, pool_size=8)
    try:
        first = await _burst(db, 8)
        assert len(first) == 8
        assert await _burst(db, 8) == first
    finally:
        await db.dispose()


async def test_after_a_burst_one_warm_session_serves_one_at_a_time() -> None:
    """The pool hands out the session returned last: transactions one after another keep
    to one warm backend instead of taking the burst's sessions in turn (each one cold the
    first few times: its catalog caches and statement plans are built on first use)."""
    db = Database(PG_URL, pool_size=8)
    try:
        assert len(await _burst(db, 8)) == 8
        pids = set()
        for _ in range(8):
            async with db.read() as conn:
                pids.add(int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()))
        assert len(pids) == 1
    finally:
        await db.dispose()


async def test_connections_beyond_the_pool_are_closed_after_the_burst() -> None:
    db = Database(PG_URL, pool_size=2)
    try:
        first = await _burst(db, 2 + POOL_OVERFLOW)
        second = await _burst(db, 2 + POOL_OVERFLOW)
        # the two kept sessions come back; the overflow ones were new backends each time
        assert len(first & second) == 2
    finally:
        await db.dispose()


def test_a_pool_needs_a_connection() -> None:
    with pytest.raises(ValueError):
        Database(PG_URL, pool_size=0)


async def test_reads_run_without_a_transaction_and_writes_on_the_same_session_keep_theirs() -> None:
    """Reads are in autocommit on PostgreSQL (no BEGIN and COMMIT round trips); the session
    goes back to the pool as it came, so a write on it is still one transaction."""
    db = Database(PG_URL, pool_size=1)
    table = "test_reads_" + str(id(db))
    try:
        async with db.read() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            await conn.execute(sa.text("SELECT 1"))
            assert not raw.is_in_transaction()
            pid = int((await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
        async with db.write() as conn:
            await conn.execute(sa.text(f"CREATE TABLE {table} (x int)"))
        with pytest.raises(RuntimeError):
            async with db.write() as conn:
                assert (await conn.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one() == pid
                raw = (await conn.get_raw_connection()).driver_connection
                await conn.execute(sa.text(f"INSERT INTO {table} VALUES (1)"))
                assert raw.is_in_transaction()
                raise RuntimeError("roll back")
        async with db.read() as conn:
            assert (await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one() == 0
    finally:
        async with db.write() as conn:
            await conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
        await db.dispose()


async def test_sessions_run_read_committed_whatever_the_databases_default() -> None:
    """The locking and the autocommit reads are built on READ COMMITTED; a role (or
    database) whose default an operator set to REPEATABLE READ does not change that."""
    role = f"medrelay_rr_{os.getpid()}"
    admin = await asyncpg.connect(DSN)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(
            f"ALTER ROLE {role} SET default_transaction_isolation = 'repeatable read'"
        )
        raw = await asyncpg.connect(DSN.replace("postgres@", f"{role}@"))
        try:  # the role's default holds for a session that does not set its own
            assert await raw.fetchval("SHOW transaction_isolation") == "repeatable read"
        finally:
            await raw.close()
        db = Database(PG_URL.replace("postgres@", f"{role}@"))
        try:
            async with db.read() as conn:
                level = (await conn.execute(sa.text("SHOW transaction_isolation"))).scalar()
                assert level == "read committed"
            async with db.write() as conn:
                level = (await conn.execute(sa.text("SHOW transaction_isolation"))).scalar()
                assert level == "read committed"
        finally:
            await db.dispose()
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
