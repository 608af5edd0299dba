"""Group commit: concurrent sends share transactions, each still checked on its own; a
refusal fails only its own send; every stored send has its chained audit record."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.journal.verify import verify
from medrelay_server.store.base import AuditRecord
from medrelay_server.store.group import MAX_BATCH, MAX_FANOUT, BatchTimes
from medrelay_server.store.sql import JOURNAL_SLICE, SqlStore

from .test_store_contract import NOW, ROOM, new_room, send

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


def _in_flight_counter(store: SqlStore) -> tuple[list[int], asyncio.Event]:
    """Wrap the committer's batch runner to record the most batches in flight at once;
    the event is set whenever a batch starts."""
    group = store._group
    assert group is not None
    run = group._run
    state = [0, 0]  # now, most
    started = asyncio.Event()

    async def counted(batch: list[Any]) -> None:
        state[0] += 1
        state[1] = max(state[1], state[0])
        started.set()
        try:
            await run(batch)
        finally:
            state[0] -= 1

    group._run = counted  # type: ignore[method-assign]
    return state, started


async def test_batches_in_flight_together_chain_in_order(store_backend: StoreBackend) -> None:
    """With two batches allowed in flight on PostgreSQL (sends arriving during a batch's
    round trips start the next batch), the later one chains after the earlier one's
    planned tail and its head update waits for that commit. With journal flushes (another
    writer of the same chain) in between, every send is stored once, seqs are contiguous
    per room, and the chain verifies. SQLite keeps one batch at a time."""
    store = await store_backend.open(batches_in_flight=2)
    rooms = (ROOM, "room-2", "room-3")
    for room in rooms:
        await new_room(store, room)
    state, started = _in_flight_counter(store)
    waves: list[asyncio.Future[list[Any]]] = []
    for wave in range(6):
        started.clear()
        calls: list[Any] = [
            send(store, mid=b"%08d%08d" % (wave, i), room=rooms[i % 3]) for i in range(30)
        ]
        if wave % 2:
            calls.insert(7, store.journal([AuditRecord("deliver", "success", user="bob", ts=NOW)]))
        waves.append(asyncio.gather(*calls))
        await started.wait()  # the next wave arrives while this one's batch is in flight
    await asyncio.gather(*waves)
    assert state[1] == (1 if store.database.is_sqlite else 2)
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 180
    for room in rooms:
        room_state = await store.room_state(room)
        assert room_state is not None and room_state.last_seq == 2 + 60
    assert (await verify(store.database, [], b"")).ok


async def test_one_batch_in_flight_by_default(store_backend: StoreBackend) -> None:
    """Sends arriving while a batch is in flight wait for its commit and go together in
    the next batch (a second batch in flight waited for the first one's room locks and
    slowed every round trip; ``docs/performance.md``, "Sixth round")."""
    store = await store_backend.open()
    await new_room(store)
    state, started = _in_flight_counter(store)
    waves: list[asyncio.Future[list[Any]]] = []
    for wave in range(4):
        started.clear()
        calls = [send(store, mid=b"%08d%08d" % (wave, i)) for i in range(10)]
        waves.append(asyncio.gather(*calls))
        await started.wait()
    results = [r for wave_results in await asyncio.gather(*waves) for r in wave_results]
    assert state[1] == 1
    assert sorted(r.event.seq for r in results) == list(range(3, 43))


@pytest.mark.parametrize(
    ("fanout", "expected"),
    [(None, [256, 256, 88]), (10, [256, 256, 88]), (50, [64] * 9 + [24]), (5_000, [1] * 600)],
)
async def test_a_backlog_goes_in_batches_as_large_as_the_bounds_allow(
    store_backend: StoreBackend, fanout: int | None, expected: list[int]
) -> None:
    """Sends that queued behind one another are stored in as few batches as the bounds
    allow: at most ``MAX_BATCH`` (256) sends, and, with the app's count of a room's local
    deliveries, fewer once they reach ``MAX_FANOUT`` (3,200): 256 into rooms of 10 (or
    without the count), 64 into rooms of 50, one at a time into a room larger than the
    bound. Every send is answered, in order of its room's seqs."""
    store = await store_backend.open()
    await new_room(store)
    group = store._group
    assert group is not None
    sizes: list[int] = []
    group.observer = lambda times: sizes.append(len(times.waits))
    asked: list[str] = []
    if fanout is not None:

        def local_fanout(room: str) -> int:
            asked.append(room)
            return fanout

        store.bound_send_batches(local_fanout)
    results = await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(600)))
    assert sorted(r.event.seq for r in results) == list(range(3, 603))
    assert (MAX_BATCH, MAX_FANOUT) == (256, 3_200)
    assert sizes == expected
    assert set(asked) == (set() if fanout is None else {ROOM})
    assert (await verify(store.database, [], b"")).ok


async def test_batches_in_flight_must_be_positive(store_backend: StoreBackend) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await store_backend.open(batches_in_flight=0)


async def test_a_batch_planned_after_a_failed_one_falls_back(
    store_backend: StoreBackend,
) -> None:
    """The batch in flight fails (a send the database refuses fails the whole batch, which
    is then retried one send at a time), so the tail the next batch planned after is never
    stored: that batch's conditional head update does not match and it chains after the
    locked row instead. Nothing forks."""
    store = await store_backend.open(batches_in_flight=2)
    await new_room(store)
    await send(store, mid=b"a" * 16)
    calls: list[Any] = []
    for i in range(30):
        if i == 5:
            calls.append(send(store, mid=b"x" * 16, envelope=None))  # type: ignore[arg-type]
        calls.append(send(store, mid=b"%016d" % i))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and not isinstance(failed[0], RequestError)
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 31
    assert (await verify(store.database, [], b"")).ok


async def test_a_stale_planned_tail_falls_back(store_backend: StoreBackend) -> None:
    """A planned tail left behind (as by a batch whose statement failed before it could be
    settled) makes the next batch's head update miss: it falls back to the locked row, and
    plans from the stored head again afterwards."""
    store = await store_backend.open()
    await new_room(store)
    await send(store, mid=b"a" * 16)
    store.writer._planned = (10_000, b"\x02" * 32)
    await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(8)))
    assert store.writer._planned is None
    await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(8, 16)))
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 17
    assert (await verify(store.database, [], b"")).ok


async def test_sends_one_after_another_each_find_a_drainer(store_backend: StoreBackend) -> None:
    """Each send awaited before the next: the next is appended as soon as the previous one's
    result is set, before its drainer has finished ending. It must still start a batch
    (a drainer removed from the set by a done callback, which runs later, left it waiting
    forever)."""
    store = await store_backend.open()
    await new_room(store)
    async with asyncio.timeout(20):
        for i in range(5):
            result = await send(store, mid=b"%016d" % i)
            assert result.event.seq == 3 + i


async def test_committed_batches_report_their_times(store_backend: StoreBackend) -> None:
    """Every committed batch reports each send's wait and the batch's stages once; a batch
    whose transaction failed is not reported (its sends are retried, and each retry that
    commits is)."""
    store: SqlStore = await store_backend.open()
    await new_room(store)
    seen: list[BatchTimes] = []
    store.observe_send_batches(seen.append)
    outcomes = await asyncio.gather(
        *(send(store, mid=b"%016d" % i) for i in range(20)),
        send(store, "mallory", mid=b"r" * 16),  # refused inside a committed batch
        return_exceptions=True,
    )
    assert sum(isinstance(o, RequestError) for o in outcomes) == 1
    assert sum(len(t.waits) for t in seen) == 21
    for t in seen:
        stages = (t.begin, t.read, t.write, t.commit)
        assert all(0 <= s < 60 for s in (*stages, *t.waits))
    seen.clear()
    good = [send(store, mid=b"g%015d" % i) for i in range(4)]
    bad = send(store, mid=b"x" * 16, envelope=None)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(*good, bad, return_exceptions=True)
    assert isinstance(outcomes[4], Exception)
    # the failed batch (all five) is not reported; the four good sends are, as they are
    # retried and stored one transaction each
    assert sum(len(t.waits) for t in seen) == 4


async def test_an_observer_that_fails_does_not_fail_the_sends(
    store_backend: StoreBackend, caplog: pytest.LogCaptureFixture
) -> None:
    store: SqlStore = await store_backend.open()
    await new_room(store)

    def broken(times: BatchTimes) -> None:
        raise RuntimeError("observer broke")

    store.observe_send_batches(broken)
    results = await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(6)))
    assert sorted(r.event.seq for r in results) == list(range(3, 9))
    assert not any(r.duplicate for r in results)  # answered once, never retried
    assert "send batch observer failed" in caplog.text
    sends = [r for r in await store.audit_records() if r.action == "send"]
    assert len(sends) == 6


@pytest.mark.parametrize("with_receipts", [True, False])
async def test_a_large_flush_is_stored_in_slices_on_one_chain(
    store_backend: StoreBackend, monkeypatch: pytest.MonkeyPatch, with_receipts: bool
) -> None:
    """A delivery journal flush hashes and encodes its records on the event loop, so it
    stores them ``JOURNAL_SLICE`` at a time (each slice its own statement, one transaction):
    every record lands, in order, on the node's delivery stream, and the chain verifies,
    whether or not receipts began the transaction."""
    store = await store_backend.open()
    await new_room(store)
    slices: list[int] = []
    append = store.delivery_writer.append

    async def counting(conn: Any, records: Any, **kw: Any) -> None:
        slices.append(len(records))
        await append(conn, records, **kw)

    monkeypatch.setattr(store.delivery_writer, "append", counting)
    n = 2 * JOURNAL_SLICE + 7
    records = [
        AuditRecord("deliver", "success", user="bob", device=f"dev-{i}", room=ROOM, ts=NOW + i)
        for i in range(n)
    ]
    receipts = [(ROOM, "dev-0", 1, NOW)] if with_receipts else []
    await store.journal(records, receipts=receipts)
    assert slices == [JOURNAL_SLICE, JOURNAL_SLICE, 7]
    stored = [r for r in await store.audit_records() if r.action == "deliver"]
    assert [r.device for r in stored] == [f"dev-{i}" for i in range(n)]
    # a send and a second flush after it still chain on their own streams
    await send(store, mid=b"%016d" % 1)
    await store.journal(records[:3])
    report = await verify(store.database, [], b"")
    assert report.ok, report.problems
