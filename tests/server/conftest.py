"""Store fixtures: every store test runs against SQLite in ``tmp_path`` and against the real
PostgreSQL on 127.0.0.1:5432 in a fresh schema that is dropped afterwards.

PostgreSQL tests are marked ``postgres``; when the server is unreachable they fail (they
never skip): CI starts the services, and on a development machine they are running.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from medrelay_server.store.sql import SqlStore
from sqlalchemy.ext.asyncio import create_async_engine

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


class StoreBackend:
    """One database (a SQLite file or a PostgreSQL schema) that any number of ``SqlStore``
    instances can open, as separate server processes would."""

    def __init__(self, name: str, url: str, schema: str | None) -> None:
        self.name = name
        self.url = url
        self.schema = schema
        self._opened: list[SqlStore] = []

    async def open(self) -> SqlStore:
        store = SqlStore(self.url, schema=self.schema)
        self._opened.append(store)
        await store.open()
        return store

    async def close_all(self) -> None:
        for store in self._opened:
            await store.close()


async def _drop_schema(schema: str) -> None:
    engine = create_async_engine(PG_URL)
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreBackend]:
    if request.param == "sqlite":
        backend = StoreBackend("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'store.db'}", None)
        try:
            yield backend
        finally:
            await backend.close_all()
        return
    schema = "test_" + secrets.token_hex(8)
    backend = StoreBackend("postgres", PG_URL, schema)
    try:
        yield backend
    finally:
        await backend.close_all()
        await _drop_schema(schema)


@pytest.fixture
async def store(store_backend: StoreBackend) -> SqlStore:
    return await store_backend.open()
