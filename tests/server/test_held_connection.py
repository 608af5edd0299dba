"""PostgreSQL: the one-trip call's connection is kept between uses (``store/held.py``), and
a connection whose state a use left unknown is never used again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
from medrelay_server.store.base import StoreUnavailable
from medrelay_server.store.engine import Database, raw_errors
from medrelay_server.store.held import HeldConnection

from .conftest import PG_URL
from .test_send_locks import DSN

pytestmark = pytest.mark.postgres


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    database = Database(PG_URL)
    try:
        yield database
    finally:
        await database.dispose()


async def _pid(held: HeldConnection) -> int:
    async with held.statement() as pg:
        pid: int = pg.get_server_pid()
        assert await pg.fetchval("SELECT pg_backend_pid()") == pid
        return pid


async def test_uses_share_one_connection_which_close_gives_back(db: Database) -> None:
    held = HeldConnection(db)
    pids = {await _pid(held) for _ in range(5)}
    assert len(pids) == 1 and held.taken == 1 and held.held
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await held.close()
    assert not held.held and db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_a_use_that_raises_drops_the_connection(db: Database) -> None:
    held = HeldConnection(db)
    first = await _pid(held)
    with pytest.raises(asyncpg.PostgresError):
        async with held.statement() as pg:
            await pg.fetchval("SELECT 1/0")
    assert not held.held
    assert await _pid(held) != first and held.taken == 2
    await held.close()


async def test_a_use_left_in_a_transaction_drops_the_connection(db: Database) -> None:
    held = HeldConnection(db)
    first = await _pid(held)
    async with held.statement() as pg:
        await pg.execute("BEGIN")
    assert not held.held
    second = await _pid(held)
    assert second != first and held.taken == 2
    await held.close()


async def test_a_cancelled_use_drops_the_connection(db: Database) -> None:
    held = HeldConnection(db)
    first = await _pid(held)
    started = asyncio.Event()

    async def slow() -> None:
        async with held.statement() as pg:
            started.set()
            await pg.fetchval("SELECT pg_sleep(30)")

    task = asyncio.create_task(slow())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not held.held
    assert await _pid(held) != first
    await held.close()


async def test_a_second_use_at_once_takes_its_own_connection(db: Database) -> None:
    held = HeldConnection(db)
    first = await _pid(held)
    async with held.statement() as pg:
        assert pg.get_server_pid() == first
        inner = await _pid(held)  # the held one is busy: one from the pool, given back
    assert inner != first and held.taken == 1
    assert await _pid(held) == first
    assert db.engine.pool.checkedout() == 1  # type: ignore[attr-defined]
    await held.close()


async def test_a_terminated_backend_is_unavailable_once_then_replaced(db: Database) -> None:
    held = HeldConnection(db)
    first = await _pid(held)
    admin = await asyncpg.connect(DSN)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
    finally:
        await admin.close()
    with pytest.raises(StoreUnavailable):
        async with held.statement() as pg, raw_errors():
            await pg.fetchval("SELECT 1")
    assert not held.held
    assert await _pid(held) != first and held.taken == 2
    await held.close()


async def test_closed_during_a_use_it_gives_the_connection_back_when_the_use_ends(
    db: Database,
) -> None:
    held = HeldConnection(db)
    async with held.statement() as pg:
        await held.close()  # store shutdown while a batch's call is in flight
        assert held.held and await pg.fetchval("SELECT 1") == 1  # still this use's
    assert not held.held and db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await _pid(held)  # after close: a connection from the pool for this use only
    assert not held.held and held.taken == 1
    assert db.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
