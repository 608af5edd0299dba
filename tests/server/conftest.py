"""Store fixtures: every store test runs against SQLite in ``tmp_path`` and against the real
PostgreSQL on 127.0.0.1:5432 in a fresh schema that is dropped afterwards.

PostgreSQL tests are marked ``postgres``; when the server is unreachable they fail (they
never skip): CI starts the services, and on a development machine they are running.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from medrelay_server.clock import FakeClock
from medrelay_server.journal.anchoring import AnchorService
from medrelay_server.journal.signer import FileKeySigner
from medrelay_server.journal.verify import Report, verify
from medrelay_server.journal.witness import FileWitness
from medrelay_server.store.audit import write_audit
from medrelay_server.store.base import AuditRecord
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

    async def open(self, node_id: str | None = None, **kw: Any) -> SqlStore:
        """A store as one more gateway process would open it: its own node id (node-1,
        node-2, ... unless given), so its journal is its own writer stream."""
        node = node_id or f"node-{len(self._opened) + 1}"
        store = SqlStore(self.url, schema=self.schema, node_id=node, **kw)
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


# journal -----------------------------------------------------------------------------------

JOURNAL_NOW = 1_800_000_000


class JournalEnv:
    """Two gateway nodes on one database, the embedded signer and a file witness, and the
    anchor service of node-1: what ``audit verify`` checks, minus the gateway."""

    def __init__(
        self,
        backend: StoreBackend,
        one: SqlStore,
        two: SqlStore,
        clock: FakeClock,
        signer: FileKeySigner,
        witness: FileWitness,
    ) -> None:
        self.backend = backend
        self.one, self.two = one, two
        self.clock = clock
        self.signer = signer
        self.witness = witness
        self.anchors = AnchorService(one, signer, [witness], clock)

    async def verify(self) -> Report:
        return await verify(self.one.database, self.witness.anchors(), self.signer.public_key())

    async def records(self, store: SqlStore, n: int, action: str = "history_read") -> None:
        """``n`` records on the node's own stream, one transaction each (as the server's
        own writes chain them; the delivery journal has a stream of its own)."""
        for _ in range(n):
            self.clock.advance(1)
            record = AuditRecord(action, "success", user="alice", room="r", ts=self.clock.now())
            async with store.database.write() as conn:
                await write_audit(conn, store.writer, [record])


@pytest.fixture
async def journal_env(store_backend: StoreBackend, tmp_path: Path) -> JournalEnv:
    clock = FakeClock(JOURNAL_NOW)
    one = await store_backend.open("node-1", clock=clock)
    two = await store_backend.open("node-2", clock=clock)
    signer = FileKeySigner(tmp_path / "data" / "anchor-signer")
    witness = FileWitness(tmp_path / "data.witness" / "anchors.jsonl", signer.public_key())
    return JournalEnv(store_backend, one, two, clock, signer, witness)
