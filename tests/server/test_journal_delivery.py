"""``DeliveryJournal``: contiguous seq ranges per (device, room) coalesce into one record;
flushes on size, on the (fake) clock's interval and on close; a failed flush loses nothing,
and an overflow while the store is down is journaled as a gap. No sleeps: flushes are
driven explicitly or awaited on the journal's ``flushed`` event."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from medrelay_server.clock import FakeClock
from medrelay_server.journal.delivery import DeliveryJournal, Recipient
from medrelay_server.store.base import AuditRecord, StoreUnavailable

T = 1_800_000_000


class Sink:
    def __init__(self) -> None:
        self.batches: list[list[AuditRecord]] = []
        self.receipts: list[list[tuple[str, str, int, int]]] = []
        self.seen: list[list[tuple[str, int]]] = []
        self.down = False

    async def journal(
        self,
        records: Sequence[AuditRecord],
        *,
        receipts: Sequence[tuple[str, str, int, int]] = (),
        seen: Sequence[tuple[str, int]] = (),
    ) -> None:
        if self.down:
            raise StoreUnavailable("database unavailable")
        self.batches.append(list(records))
        self.receipts.append(list(receipts))
        self.seen.append(list(seen))

    @property
    def records(self) -> list[AuditRecord]:
        return [r for b in self.batches for r in b]


def ranges(records: list[AuditRecord]) -> list[tuple[str, str | None, str | None, int, int]]:
    out = []
    for r in records:
        assert r.seq_from is not None and r.seq_to is not None
        out.append((r.action, r.device, r.room, r.seq_from, r.seq_to))
    return out


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T)


async def test_contiguous_writes_coalesce(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    for seq in (3, 4, 5):
        dj.record_written("bob", "bob-1", "r", seq, T + seq)
    dj.record_written("bob", "bob-1", "r", 9, T + 9)  # a gap: a new range
    dj.record_written("bob", "bob-2", "r", 3, T + 3)  # another device
    dj.record_written("bob", "bob-1", "s", 1, T + 1)  # another room
    assert await dj.flush() == 4
    assert sorted(ranges(sink.records)) == [
        ("deliver", "bob-1", "r", 3, 5),
        ("deliver", "bob-1", "r", 9, 9),
        ("deliver", "bob-1", "s", 1, 1),
        ("deliver", "bob-2", "r", 3, 3),
    ]
    [first] = [r for r in sink.records if r.seq_from == 3 and r.device == "bob-1"]
    assert (first.user, first.ts, first.ts_end, first.outcome) == ("bob", T + 3, T + 5, "success")
    assert await dj.flush() == 0


async def test_a_rooms_recipients_are_journaled_in_one_call(clock: FakeClock) -> None:
    """The live fan-out's call: one event to several devices; each device's range grows
    as it would one call at a time, and a device whose range breaks starts a new one."""
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    bob, carol, dave = (
        Recipient("bob", "bob-1"),
        Recipient("carol", "carol-1"),
        Recipient("dave", "d-1"),
    )
    dj.record_written_to([bob, carol], "r", 1, T + 1)
    dj.record_written_to([bob, carol, dave], "r", 2, T + 2)
    dj.record_written("carol", "carol-1", "r", 3, T + 3)  # a queued frame, written alone
    dj.record_written_to([bob, dave], "r", 4, T + 4)  # bob missed 3: a new range
    dj.record_written_to([], "r", 5, T + 5)  # nobody: nothing
    assert dj.pending == 5  # three open ranges, two closed (bob 1-2, dave 2)
    assert await dj.flush() == 5
    assert sorted(ranges(sink.records)) == [
        ("deliver", "bob-1", "r", 1, 2),
        ("deliver", "bob-1", "r", 4, 4),
        ("deliver", "carol-1", "r", 1, 3),
        ("deliver", "d-1", "r", 2, 2),
        ("deliver", "d-1", "r", 4, 4),
    ]
    [c] = [r for r in sink.records if r.device == "carol-1"]
    assert (c.user, c.ts, c.ts_end) == ("carol", T + 1, T + 3)


async def test_redelivery_is_a_new_range(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    for seq in (1, 2, 3, 2, 3):  # reconnect: 2 and 3 written again
        dj.record_written("bob", "bob-1", "r", seq, T)
    await dj.close()
    assert ranges(sink.records) == [
        ("deliver", "bob-1", "r", 1, 3),
        ("deliver", "bob-1", "r", 2, 3),
    ]


async def test_cumulative_acks(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    dj.record_acked("bob", "bob-1", "r", 4, T + 1, previous=2)
    dj.record_acked("bob", "bob-1", "r", 7, T + 2)
    dj.record_acked("bob", "bob-1", "r", 6, T + 3)  # never backwards
    dj.record_acked("carol", "carol-1", "r", 5, T + 4)  # nothing known before
    await dj.flush()
    dj.record_acked("bob", "bob-1", "r", 7, T + 5)  # already covered
    dj.record_acked("bob", "bob-1", "r", 9, T + 6)
    await dj.flush()
    assert ranges(sink.records) == [
        ("receipt", "bob-1", "r", 3, 7),
        ("receipt", "carol-1", "r", 5, 5),
        ("receipt", "bob-1", "r", 8, 9),
    ]
    assert (sink.records[0].ts, sink.records[0].ts_end) == (T + 1, T + 2)


async def test_due_on_size_and_on_interval(clock: FakeClock) -> None:
    dj = DeliveryJournal(Sink(), clock, max_records=3, interval=2.0)
    assert not dj.due()
    dj.record_written("a", "a-1", "r", 1, T)
    assert not dj.due()
    clock.advance(1.9)
    assert not dj.due()
    clock.advance(0.1)
    assert dj.due()
    await dj.flush()
    for room in ("x", "y"):
        dj.record_written("a", "a-1", room, 1, T)
    assert not dj.due()
    dj.record_written("a", "a-1", "z", 1, T)
    assert dj.due()


async def test_run_flushes_on_size_threshold(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock, max_records=2, interval=3600)
    task = asyncio.create_task(dj.run())
    dj.record_written("a", "a-1", "r", 1, T)
    dj.record_written("a", "a-1", "s", 1, T)
    await asyncio.wait_for(dj.flushed.wait(), timeout=5)
    assert len(sink.records) == 2
    dj.record_written("a", "a-1", "t", 7, T)
    await dj.close()
    await asyncio.wait_for(task, timeout=5)
    assert ranges(sink.records)[-1] == ("deliver", "a-1", "t", 7, 7)


async def test_failed_flush_keeps_records(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    dj.record_written("a", "a-1", "r", 1, T)
    dj.record_written("a", "a-1", "r", 2, T)
    sink.down = True
    with pytest.raises(StoreUnavailable):
        await dj.flush()
    dj.record_written("a", "a-1", "r", 3, T + 1)  # arrives while the store is down
    sink.down = False
    await dj.close()
    assert ranges(sink.records) == [("deliver", "a-1", "r", 1, 2), ("deliver", "a-1", "r", 3, 3)]


async def test_overflow_while_down_is_journaled(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock, max_buffered=3)
    sink.down = True
    for room in "abcde":
        dj.record_written("u", "u-1", room, 1, T)
        with pytest.raises(StoreUnavailable):
            await dj.flush()
    assert dj.pending == 3
    sink.down = False
    await dj.flush()
    gap, *kept = sink.records
    assert (gap.action, gap.outcome) == ("journal_gap", "failure")
    assert gap.detail is not None and gap.detail.startswith("2 ")
    assert [r.room for r in kept] == ["c", "d", "e"]


async def test_receipts_are_stored_with_the_flush_and_survive_a_failed_one(
    clock: FakeClock,
) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    dj.record_receipt("bob", "bob-1", "r", 4, T, previous=0)
    dj.record_receipt("bob", "bob-1", "r", 7, T + 1, previous=4)  # the newer one is kept
    dj.record_receipt("bob", "bob-2", "r", 2, T + 1, previous=0)
    sink.down = True
    with pytest.raises(StoreUnavailable):
        await dj.flush()
    dj.record_receipt("bob", "bob-2", "r", 3, T + 2, previous=2)  # arrives during the outage
    sink.down = False
    assert await dj.flush() == 3  # the failed batch's ranges, then the newer one
    assert sorted(sink.receipts[-1]) == [("r", "bob-1", 7, T + 1), ("r", "bob-2", 3, T + 2)]
    assert sorted(ranges(sink.records)) == [
        ("receipt", "bob-1", "r", 1, 7),
        ("receipt", "bob-2", "r", 1, 2),
        ("receipt", "bob-2", "r", 3, 3),
    ]
    flushes = len(sink.batches)
    assert await dj.flush() == 0 and len(sink.batches) == flushes  # nothing left to write


async def test_held_receipts_are_bounded(clock: FakeClock) -> None:
    sink = Sink()
    sink.down = True
    dj = DeliveryJournal(sink, clock, max_tracked=10, max_buffered=10)
    for i in range(50):
        dj.record_receipt("bob", f"dev-{i}", "r", 1, T, previous=0)
        with pytest.raises(StoreUnavailable):
            await dj.flush()
    assert dj.pending <= 20  # at most max_tracked receipts and max_buffered records held
    assert len(dj._receipts) == 10


async def test_seen_devices_and_plain_records_go_with_the_flush(clock: FakeClock) -> None:
    sink = Sink()
    dj = DeliveryJournal(sink, clock)
    dj.record_seen("bob-1", T + 5)
    dj.record_seen("bob-1", T + 3)  # an older time never wins
    dj.record(AuditRecord("authenticate", "success", user="bob", device="bob-1", ts=T))
    sink.down = True
    with pytest.raises(StoreUnavailable):
        await dj.flush()
    dj.record_seen("bob-2", T + 6)
    sink.down = False
    assert await dj.flush() == 1
    assert sorted(sink.seen[-1]) == [("bob-1", T + 5), ("bob-2", T + 6)]
    assert [r.action for r in sink.records] == ["authenticate"]
