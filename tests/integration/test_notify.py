"""PostgreSQL LISTEN/NOTIFY wakes delivery when the broker lost the publish (a crash between
commit and publish looks the same), without waiting for the slow poll."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from medrelay_server.settings import Limits
from sqlalchemy.ext.asyncio import create_async_engine

from .conftest import Harness, _harness
from .rawclient import collect_until, texts
from .test_gap_recovery import LossyBroker

PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@asynccontextmanager
async def pg_harness(tmp_path: Path, broker: LossyBroker) -> AsyncIterator[Harness]:
    schema = "notify_" + secrets.token_hex(6)
    gen = _harness(tmp_path, Limits(poll_interval=3600), broker, database_url=PG_URL, schema=schema)
    try:
        yield await anext(gen)
    finally:
        await gen.aclose()
        engine = create_async_engine(PG_URL)
        async with engine.begin() as conn:
            await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        await engine.dispose()


@pytest.mark.postgres
async def test_notify_delivers_when_every_publish_is_lost(tmp_path: Path) -> None:
    broker = LossyBroker()
    async with pg_harness(tmp_path, broker) as h:
        alice, bob = await h.client("alice"), await h.client("bob")
        room = await alice.create_room()
        await alice.add(room, "bob")
        await bob.wait_for_key(room)
        broker.dropping, broker.every = True, 1  # the broker carries nothing from now on
        sent = ["lactate 4.1", "repeat in 1 h"]
        for text in sent:
            await alice.send_text(room, text)
        got = await collect_until(bob, sent[-1], timeout=10)
        assert texts(got) == sent
        assert broker.count >= len(sent)
