"""The stream generation every handshake reads (``SqlStore.generation``): on PostgreSQL the
database's id and its timeline in one statement; where the timeline may not be read, the
id alone, and later calls no longer try the timeline."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import sqlalchemy as sa
from medrelay_server.store import schema as t
from medrelay_server.store import sql

from .test_one_trip import Env, _env

pytestmark = pytest.mark.postgres


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in _env():
        yield e


async def _expected(raw: asyncpg.Connection) -> tuple[str, int]:
    value = await raw.fetchval("SELECT value FROM meta WHERE key = 'generation'")
    timeline = await raw.fetchval("SELECT timeline_id FROM pg_control_checkpoint()")
    return str(value), int(timeline)


async def test_the_id_and_the_timeline_in_one_read(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, raw = await env.open(), env.raw
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


async def test_without_the_timeline_the_id_alone(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused timeline read (here: a function that is not there, as a role without the
    privilege is refused) leaves the id alone, and later calls read only the id."""
    store, raw = await env.open(), env.raw
    refused = sa.select(t.meta.c.value, sa.func.medrelay_no_such_function()).where(
        t.meta.c.key == "generation"
    )
    monkeypatch.setattr(sql, "_GENERATION_AND_TIMELINE", refused)
    value, _ = await _expected(raw)
    assert await store.generation() == value
    assert store._timeline_readable is False
    monkeypatch.setattr(sql, "_GENERATION_AND_TIMELINE", None)  # never executed again
    assert await store.generation() == value
