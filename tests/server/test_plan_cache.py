"""PostgreSQL: a send's statements are planned for the tables as they are, not as they were.

A prepared statement (asyncpg's, or one inside the PL/pgSQL ``medrelay_send_batch``) switches
to a cached generic plan after five executions, and that plan keeps the table sizes of the
moment it was made until an ANALYZE. A node started on a young database planned its sends
while ``events`` held a few rows, as a sequential scan, and kept scanning the whole table on
every batch as it grew (the one-trip "collapse" of ``docs/performance.md``, seventh and
eighth rounds). The store's sessions run with ``plan_cache_mode = force_custom_plan``;
``medrelay_send_batch`` keeps generic plans made with sequential scans priced out
(migration 0009), which this test fails without.

The check reads the plans themselves: each store session loads ``auto_explain`` and gets
its plans (nested statements included) as log messages.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from medrelay_server.store.sql import SqlStore
from sqlalchemy import event

from .conftest import PG_URL, _drop_schema
from .test_send_locks import DSN
from .test_store_contract import new_room, send

pytestmark = pytest.mark.postgres

GROWTH = 20_000  # events and memberships (and a tenth as many rooms) added behind the
# cached plans' back (no ANALYZE)


class Plans:
    """Every plan the store's sessions log, in order."""

    def __init__(self) -> None:
        self.logged: list[str] = []

    def on_connect(self, dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for statement in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET client_min_messages = log",
        ):
            cursor.execute(statement)
        cursor.close()
        dbapi_connection.driver_connection.add_log_listener(self._log)

    def _log(self, _conn: Any, message: Any) -> None:
        self.logged.append(str(message.message))


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = "test_" + secrets.token_hex(8)
    try:
        yield name
    finally:
        await _drop_schema(name)


@pytest.mark.parametrize("one_trip", [True, False], ids=["one_trip", "usual_way"])
async def test_sends_on_a_grown_table_use_its_indexes(schema: str, one_trip: bool) -> None:
    plans = Plans()
    store = SqlStore(PG_URL, schema=schema, node_id="node-1", one_trip_sends=one_trip)
    event.listen(store._db.engine.sync_engine, "connect", plans.on_connect)
    await store.open()
    try:
        await new_room(store)
        await new_room(store, "room-2")
        for i in range(8):  # past the five custom plans
            await send(store, mid=b"%016d" % i)
        raw = await asyncpg.connect(DSN, server_settings={"search_path": schema})
        try:
            await raw.execute(
                "INSERT INTO rooms SELECT 'grown-' || i, 0, '\\x00', 1, 1, false, 1, 0, NULL"
                " FROM generate_series(1, $1::int) AS i",
                GROWTH // 10,
            )
            await raw.execute(
                "INSERT INTO memberships SELECT 'grown-' || (i % $2::int + 1), 'user-' || i,"
                " 0, NULL, 'member' FROM generate_series(1, $1::int) AS i",
                GROWTH,
                GROWTH // 10,
            )
            await raw.execute(
                "INSERT INTO events (room, seq, kind, sender_device, sender_user, ts, payload,"
                " mid) SELECT 'room-2', 1000 + i, 'message', 'bob-1', 'bob', 0, '\\x00',"
                " int8send(i) FROM generate_series(1, $1::int) AS i",
                GROWTH,
            )
        finally:
            await raw.close()
        plans.logged.clear()
        await send(store, mid=b"x" * 16)
    finally:
        await store.close()
    dedup = [p for p in plans.logged if "events e" in p and "JOIN unnest" in p]
    assert dedup, "the send's check for an already stored send was not planned"
    for plan in dedup:
        assert "uq_events_idempotency" in plan, plan
    for plan in plans.logged:
        for table in ("events", "memberships", "rooms"):
            assert f"Seq Scan on {table}" not in plan, plan
