"""A real server on a loopback port 0 (SQLite file + in-process broker) and real clients."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_server.app import create_app
from medrelay_server.auth.dev import DevIssuer
from medrelay_server.clock import SystemClock
from medrelay_server.fanout.base import Broker
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.gateway.context import Gateway
from medrelay_server.serve import Running, running
from medrelay_server.settings import Limits, Settings
from medrelay_server.store.sql import SqlStore

from ..server.conftest import PG_URL, _drop_schema


@dataclass
class Harness:
    server: Running
    issuer: DevIssuer
    store: SqlStore
    tmp: Path
    clients: list[Client] = field(default_factory=list)

    @property
    def gateway(self) -> Gateway:
        """The running app's gateway (for server-side actions such as institution removals)."""
        gw: Gateway = self.server.server.config.app.state.gateway
        return gw

    def token(self, user: str, kind: str = "person") -> str:
        return self.issuer.issue(user, SystemClock().now(), kind=kind)

    async def client(self, user: str, *, start: bool = True, kind: str = "person") -> Client:
        keys = KeyStore.load_or_create(user, self.tmp / "keys" / user)

        async def token() -> str:
            return self.token(user, kind)

        c = Client(self.server.url, keys, token, kind=kind)
        self.clients.append(c)
        if start:
            await c.start()
        return c


async def three_in_a_room(h: Harness) -> tuple[Client, Client, Client, str]:
    """alice, bob and carol connected, in alice's room, with carol holding its key."""
    alice = await h.client("alice")
    bob = await h.client("bob")
    carol = await h.client("carol")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await alice.add(room, "carol")
    await carol.wait_for_key(room)
    return alice, bob, carol, room


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async for h in _harness(tmp_path, Limits()):
        yield h


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def node(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """A real server on SQLite, and on PostgreSQL in a schema of its own."""
    if request.param == "sqlite":
        async for h in _harness(tmp_path, Limits()):
            yield h
        return
    schema = "node_" + secrets.token_hex(6)
    try:
        async for h in _harness(tmp_path, Limits(), database_url=PG_URL, schema=schema):
            yield h
    finally:
        await _drop_schema(schema)


async def _harness(
    tmp_path: Path,
    limits: Limits,
    broker: Broker | None = None,
    *,
    database_url: str | None = None,
    schema: str | None = None,
) -> AsyncIterator[Harness]:
    """A real server on port 0. Default store: a SQLite file in ``tmp_path``; with
    ``database_url`` (and ``schema``) PostgreSQL."""
    settings = Settings(
        data_dir=tmp_path, port=0, dev_issuer=True, limits=limits, database_url=database_url
    )
    issuer = DevIssuer()
    store = SqlStore(settings.resolved_database_url(), schema=schema)
    app = create_app(
        settings,
        store=store,
        broker=broker or InMemoryBroker(),
        clock=SystemClock(),
        identity=issuer,
    )
    async with running(app, settings) as server:
        h = Harness(server, issuer, store, tmp_path)
        try:
            yield h
        finally:
            for c in h.clients:
                await c.close()
