"""PostgreSQL: a send batch reads its senders' roles *after* its room locks are granted, in
a statement of its own (``store/messages.py``, ``_PG_LOCK`` then ``_PG_READ``). A removal
that commits while a send waits for the room's lock therefore refuses that send (I2): the
read must not use a snapshot taken before the lock was granted, as one statement doing both
would (under READ COMMITTED a statement's snapshot is taken when it starts). A variant that
read the roles in the locking statement was accepted here, and so failed this test. The
removal is a raw transaction that holds the room's lock and ends the member's interval, as
the store's own commit does."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_server.store.base import AppendResult
from medrelay_server.store.sql import SqlStore

from ..polling import until
from .conftest import PG_URL, StoreBackend, _drop_schema
from .test_store_contract import ROOM, new_room, refused, send

pytestmark = pytest.mark.postgres

DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def pg() -> AsyncIterator[tuple[SqlStore, asyncpg.Connection]]:
    schema = "test_" + secrets.token_hex(8)
    backend = StoreBackend("postgres", PG_URL, schema)
    raw = await asyncpg.connect(DSN, server_settings={"search_path": schema})
    try:
        store = await backend.open()
        await new_room(store)
        await raw.execute(
            "INSERT INTO memberships (room, user_id, from_seq, to_seq, role)"
            " VALUES ($1, 'bob', 1, NULL, 'member')",
            ROOM,
        )
        yield store, raw
    finally:
        await raw.close()
        await backend.close_all()
        await _drop_schema(schema)


async def held_removal(raw: asyncpg.Connection) -> asyncpg.transaction.Transaction:
    tx = raw.transaction()
    await tx.start()
    await raw.execute("SELECT 1 FROM rooms WHERE room = $1 FOR UPDATE", ROOM)
    await raw.execute(
        "UPDATE memberships SET to_seq = (SELECT last_seq FROM rooms WHERE room = $1)"
        " WHERE room = $1 AND user_id = 'bob' AND to_seq IS NULL",
        ROOM,
    )
    return tx


async def waiting_on_a_lock(query: str = "%FROM rooms WHERE room = ANY%FOR UPDATE%") -> None:
    """Until a session whose statement is LIKE ``query`` waits for a lock."""
    watcher = await asyncpg.connect(DSN)
    try:

        async def waiting() -> bool:
            n = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND datname = 'test'"
                " AND query LIKE $1",
                query,
            )
            return bool(n)

        await until(waiting)
    finally:
        await watcher.close()


async def _send_behind_a_removal(
    store: SqlStore, raw: asyncpg.Connection
) -> tuple[asyncpg.transaction.Transaction, asyncio.Task[AppendResult]]:
    """bob's send, started while a removal of bob holds the room's lock, and waiting for it."""
    removal = await held_removal(raw)
    sending = asyncio.create_task(send(store, "bob"))
    await waiting_on_a_lock()
    return removal, sending


async def test_a_send_waiting_for_a_removal_is_refused(
    pg: tuple[SqlStore, asyncpg.Connection],
) -> None:
    removal, sending = await _send_behind_a_removal(*pg)
    await removal.commit()
    await asyncio.wait_for(refused(ErrorCode.FORBIDDEN, sending), 10)


async def test_a_send_waiting_for_a_rolled_back_removal_is_stored(
    pg: tuple[SqlStore, asyncpg.Connection],
) -> None:
    removal, sending = await _send_behind_a_removal(*pg)
    await removal.rollback()
    result = await asyncio.wait_for(sending, 10)
    assert result.event.sender_user == "bob" and not result.duplicate
