"""Group commit: concurrent sends share transactions, each still checked on its own; a
refusal fails only its own send; every stored send has its chained audit record."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.journal.verify import verify
from medrelay_server.store.sql import SqlStore

from .test_store_contract import ROOM, new_room, send

if TYPE_CHECKING:
    from .conftest import StoreBackend


async def test_batch_with_refusals(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    await new_room(store)
    await new_room(store, "room-2")
    calls = []
    for i in range(60):
        if i % 10 == 3:
            calls.append(send(store, "mallory", mid=b"%016d" % i))  # not a member
        elif i % 10 == 7:
            calls.append(send(store, mid=b"%016d" % i, epoch=9))  # stale epoch
        else:
            calls.append(send(store, mid=b"%016d" % i, room=(ROOM, "room-2")[i % 2]))
    calls.append(send(store, mid=b"%016d" % 0))  # a retry of the first send
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, RequestError)]
    assert (
        sorted(o.code for o in refused) == [ErrorCode.FORBIDDEN] * 6 + [ErrorCode.STALE_EPOCH] * 6
    )
    stored = [o for o in outcomes if not isinstance(o, BaseException)]
    assert len(stored) == 49 and sum(o.duplicate for o in stored) == 1
    for room in (ROOM, "room-2"):
        seqs = sorted(o.event.seq for o in stored if o.event.room == room and not o.duplicate)
        assert seqs == list(range(3, 3 + len(seqs)))
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 49
    assert (await verify(store.database, [], b"")).ok


async def test_same_results_without_group_commit(store_backend: StoreBackend) -> None:
    store = await store_backend.open(group_commit=False)
    await new_room(store)
    results = await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(20)))
    assert sorted(r.event.seq for r in results) == list(range(3, 23))
    with pytest.raises(RequestError):
        await send(store, "mallory")


async def test_a_failing_send_does_not_fail_its_batch(store_backend: StoreBackend) -> None:
    """A database error in one send (here: a room row that vanished mid-way is simulated by
    an envelope the database refuses) fails that send alone: the batch is retried one
    transaction per send."""
    store: SqlStore = await store_backend.open()
    await new_room(store)
    good = [send(store, mid=b"%016d" % i) for i in range(5)]
    bad = send(store, mid=b"x" * 16, envelope=None)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(not isinstance(o, BaseException) for o in outcomes[:5])
    assert isinstance(outcomes[5], Exception) and not isinstance(outcomes[5], RequestError)
    assert (await verify(store.database, [], b"")).ok


async def test_a_wrong_remembered_head_falls_back_to_the_locked_row(
    store_backend: StoreBackend,
) -> None:
    """The writer remembers the head it last chained to and, on PostgreSQL, advances it
    with a conditional update; a hint that no longer matches the row (a transaction that
    rolled back after chaining, an id taken over) must fall back to locking and reading the
    row, never fork the chain."""
    store = await store_backend.open()
    await new_room(store)
    await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(5)))
    store.writer._head = (10_000, b"\x01" * 32)  # as if a chained batch had rolled back
    await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(5, 10)))
    await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(10, 15)))
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 15
    assert (await verify(store.database, [], b"")).ok
