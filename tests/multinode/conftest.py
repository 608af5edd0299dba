"""Multi-node fixtures: gateway processes started by ``scripts/cluster.Cluster`` on loopback,
sharing real Redis and a real PostgreSQL database of their own, and real clients.

Each test gets a fresh PostgreSQL schema in the ``test`` database on 127.0.0.1:5432
(``medrelay serve --database-schema``), dropped afterwards, so nothing is left behind even
after a node was SIGKILLed holding its journal lease. Tests that need to stop Redis or
PostgreSQL start their own on another port (``procs.py``). Nothing skips: a missing service
fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from medrelay_client.client import Client, Message
from medrelay_client.devtoken import dev_token
from medrelay_client.keystore import KeyStore

from scripts.cluster import Cluster

REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "multinode: starts gateway processes (scripts/cluster)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.multinode)


def cluster_command() -> tuple[str, ...] | None:
    """``MEDRELAY_CLUSTER_COMMAND`` (shlex) runs nodes with another entry point."""
    import shlex

    value = os.environ.get("MEDRELAY_CLUSTER_COMMAND")
    return tuple(shlex.split(value)) if value else None


PG_TEST_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Database:
    url: str
    schema: str | None = None


async def _drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def new_schema() -> str:
    return "mn_" + secrets.token_hex(6)


@contextlib.asynccontextmanager
async def fresh_schema_async() -> AsyncIterator[Database]:
    schema = new_schema()
    try:
        yield Database(PG_TEST_URL, schema)
    finally:
        await _drop_schema(schema)


@pytest.fixture
def database() -> Iterator[Database]:
    schema = new_schema()
    try:
        yield Database(PG_TEST_URL, schema)
    finally:
        asyncio.run(_drop_schema(schema))


def start_cluster(
    n: int, *, broker_url: str, database: Database, workdir: Path
) -> contextlib.AbstractContextManager[Cluster]:
    return Cluster(
        n,
        broker_url=broker_url,
        database_url=database.url,
        database_schema=database.schema,
        workdir=workdir,
        command=cluster_command(),
    )


@pytest.fixture
def cluster(database: Database, tmp_path: Path) -> Iterator[Cluster]:
    with start_cluster(
        2, broker_url=REDIS_URL, database=database, workdir=tmp_path / "cluster"
    ) as c:
        yield c


class Inbox:
    """Everything one client surfaces, collected by a background task, in arrival order."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.got: list[Message] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for m in self.client.messages():
            self.got.append(m)
            async with self._changed:
                self._changed.notify_all()

    def seqs(self, room: str, kind: str | None = "message") -> list[int]:
        return [m.seq for m in self.got if m.room == room and (kind is None or m.kind == kind)]

    def texts(self, room: str) -> list[str]:
        return [
            str(m.body.get("text"))
            for m in self.got
            if m.room == room and m.kind == "message" and isinstance(m.body, dict)
        ]

    async def wait_seqs(self, room: str, seqs: set[int], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: seqs <= set(self.seqs(room, None)))


@dataclass
class People:
    """Clients by user name, each pointed at a node; ``inbox`` collects what each sees."""

    tmp: Path
    clients: dict[str, Client] = field(default_factory=dict)
    inboxes: dict[str, Inbox] = field(default_factory=dict)

    async def join(self, user: str, url: str, *, start: bool = True) -> Client:
        keys = KeyStore.load_or_create(user, self.tmp / "keys" / user)

        async def token() -> str:
            return await dev_token(client.url, user)  # each node has its own dev key

        client = Client(url, keys, token)
        self.clients[user] = client
        if start:
            await client.start()
            self.inboxes[user] = Inbox(client)
        return client

    async def close(self) -> None:
        for inbox in self.inboxes.values():
            inbox.task.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()), return_exceptions=True)


@pytest.fixture
async def people(tmp_path: Path) -> AsyncIterator[People]:
    p = People(tmp_path)
    try:
        yield p
    finally:
        await p.close()
