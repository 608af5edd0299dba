"""The stream generation every handshake reads (``SqlStore.generation``): on PostgreSQL the
database's id and its timeline in one statement; where the timeline may not be read, the
id alone, and later calls no longer try the timeline."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from medrelay_server.store import schema as t
from medrelay_server.store import sql
from medrelay_server.store.sql import SqlStore

from .conftest import PG_URL, StoreBackend, _drop_schema
from .test_send_locks import DSN

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pg() -> AsyncIterator[tuple[SqlStore, asyncpg.Connection]]:
    schema = "gen_" + secrets.token_hex(6)
    backend = StoreBackend("postgres", PG_URL, schema)
    raw = await asyncpg.connect(DSN, server_settings={"search_path": schema})
    try:
        yield await backend.open(), raw
    finally:
        await raw.close()
        await backend.close_all()
        await _drop_schema(schema)


async def _expected(raw: asyncpg.Connection) -> tuple[str, int]:
    value = await raw.fetchval("SELECT value FROM meta WHERE key = 'generation'")
    timeline = await raw.fetchval("SELECT timeline_id FROM pg_control_checkpoint()")
    return str(value), int(timeline)


async def test_the_id_and_the_timeline_in_one_read(
    pg: tuple[SqlStore, asyncpg.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, raw = pg
    reads = [0]
    read = store.database.read

    def counted() -> object:
        reads[0] += 1
        return read()

    monkeypatch.setattr(store.database, "read", counted)
    value, timeline = await _expected(raw)
    assert await store.generation() == f"{value}.{timeline}"
    assert reads[0] == 1
    # a new generation (a restored backup) is seen at the next read
    new = await store.new_generation()
    assert await store.generation() == f"{new}.{timeline}"


async def test_without_the_timeline_the_id_alone(
    pg: tuple[SqlStore, asyncpg.Connection], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused timeline read (here: a function that is not there, as a role without the
    privilege is refused) leaves the id alone, and later calls read only the id."""
    store, raw = pg
    refused = sa.select(t.meta.c.value, sa.func.medrelay_no_such_function()).where(
        t.meta.c.key == "generation"
    )
    monkeypatch.setattr(sql, "_GENERATION_AND_TIMELINE", refused)
    value, _ = await _expected(raw)
    assert await store.generation() == value
    assert store._timeline_readable is False
    monkeypatch.setattr(sql, "_GENERATION_AND_TIMELINE", None)  # never executed again
    assert await store.generation() == value
