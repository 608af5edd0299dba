"""PostgreSQL: a send batch planned from what the node remembers is stored in one call
(``store/onetrip.py``, ``medrelay_send_batch_or_state``), and any prediction that no longer
holds (room moved on, role changed, send already stored, journal head moved or taken over)
stores nothing. A room moved on by another node is answered with its state and the batch
is called again; any other miss runs the batch the usual way, with the same outcome as
without the one-trip path."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_server.clock import FakeClock
from medrelay_server.journal.verify import verify
from medrelay_server.store.base import AuditRecord, MembershipChange, NodeFenced
from medrelay_server.store.group import BatchTimes
from medrelay_server.store.onetrip import CALLS
from medrelay_server.store.sql import SqlStore

from ..polling import until
from .conftest import PG_URL, StoreBackend, _drop_schema
from .test_send_locks import DSN, held_removal, waiting_on_a_lock
from .test_store_contract import NOW, ROOM, change, new_room, refused, send

pytestmark = pytest.mark.postgres


class Env:
    def __init__(self, backend: StoreBackend, raw: asyncpg.Connection) -> None:
        self.backend = backend
        self.raw = raw
        self.clock = FakeClock()
        self.paths: dict[str, list[str]] = {}
        self.misses: dict[str, list[tuple[str, ...]]] = {}

    async def open(self, node: str = "node-1", **kw: Any) -> SqlStore:
        store = await self.backend.open(node, clock=self.clock, **kw)
        paths = self.paths.setdefault(node, [])
        misses = self.misses.setdefault(node, [])

        def observe(times: BatchTimes) -> None:
            paths.append(times.path)
            misses.append(times.misses)

        store.observe_send_batches(observe)
        return store


async def _env() -> AsyncIterator[Env]:
    schema = "test_" + secrets.token_hex(8)
    backend = StoreBackend("postgres", PG_URL, schema)
    raw = await asyncpg.connect(DSN, server_settings={"search_path": schema})
    try:
        yield Env(backend, raw)
    finally:
        await raw.close()
        await backend.close_all()
        await _drop_schema(schema)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async for e in _env():
        yield e


@pytest.fixture
async def other() -> AsyncIterator[Env]:
    async for e in _env():
        yield e


async def _workload(store: SqlStore) -> None:
    """Sends one after another and in concurrent batches, two rooms, a retry, refusals."""
    await new_room(store)
    await new_room(store, "room-2")
    for i in range(5):
        await send(store, mid=b"%016d" % i)
    calls = [send(store, mid=b"%016d" % (10 + i), room=(ROOM, "room-2")[i % 2]) for i in range(12)]
    await asyncio.gather(*calls)
    await send(store, mid=b"%016d" % 3)  # a retry of a stored send
    await refused(ErrorCode.STALE_EPOCH, send(store, mid=b"x" * 16, epoch=7))
    await refused(ErrorCode.FORBIDDEN, send(store, "mallory", mid=b"y" * 16))
    for i in range(3):
        await send(store, mid=b"%016d" % (30 + i), room="room-2")


async def _stored(raw: asyncpg.Connection) -> tuple[list[Any], list[Any], list[Any]]:
    events = await raw.fetch("SELECT * FROM events ORDER BY room, seq")
    audit = await raw.fetch("SELECT * FROM audit ORDER BY id")
    nodes = await raw.fetch("SELECT node, token, head_idx, head_hash FROM journal_nodes")
    return [tuple(r) for r in events], [tuple(r) for r in audit], [tuple(r) for r in nodes]


async def test_the_same_rows_as_without_it(env: Env, other: Env) -> None:
    """The same workload with and without the one-trip path stores the same events, the
    same audit rows (hashes included) and the same journal head; most batches took one
    trip, and every miss was run the usual way."""
    await _workload(await env.open())
    await _workload(await other.open(one_trip_sends=False))
    assert await _stored(env.raw) == await _stored(other.raw)
    assert set(other.paths["node-1"]) == {"full"}
    paths = env.paths["node-1"]
    # the first batch in each room reads it; the retry misses; a batch that would be
    # refused (stale epoch) or names an unknown sender (mallory) reads
    assert (
        paths
        == ["full", *["one_trip"] * 4, "full", "after_miss", "full", "full"] + ["one_trip"] * 3
    ), paths
    assert (await verify(env.backend._opened[0].database, [], b"")).ok


async def test_a_room_moved_by_another_node_is_stored_by_a_second_call(env: Env) -> None:
    """The first call finds the room moved on by node-2 and answers its state; the batch
    is planned again from it and stored by the second call, not the usual way."""
    one = await env.open("node-1")
    two = await env.open("node-2")
    await new_room(one)
    assert (await send(one, mid=b"a" * 16)).event.seq == 3
    assert (await send(one, mid=b"b" * 16)).event.seq == 4
    assert (await send(two, mid=b"c" * 16)).event.seq == 5
    assert (await send(one, mid=b"d" * 16)).event.seq == 6
    assert (await send(one, mid=b"e" * 16)).event.seq == 7
    assert env.paths["node-1"] == ["full", "one_trip", "later_call", "one_trip"]
    assert env.misses["node-1"] == [(), (), ("room",), ()]
    assert (await verify(one.database, [], b"")).ok
    assert (await verify(two.database, [], b"")).ok


async def test_a_call_answers_the_state_of_moved_rooms(env: Env) -> None:
    """``medrelay_send_batch_or_state`` (migration 0011) answers 1 with every room's last
    seq, epoch and pending flag in the order given, when any one moved; a room that does
    not exist leaves the state out; other answers carry none."""
    store = await env.open()
    await new_room(store)
    await new_room(store, "room-2")
    await env.raw.execute("UPDATE rooms SET epoch = 3, pending_rekey = true WHERE room = 'room-2'")
    rooms = sorted([ROOM, "room-2"], reverse=True)  # not the order the locks are taken in
    seq = {
        r: await env.raw.fetchval("SELECT last_seq FROM rooms WHERE room = $1", r) for r in rooms
    }
    seqs = [seq[r] for r in rooms]
    head = ("node-1", 1, 0, b"", 1, b"", 0)
    call = (
        "SELECT o_code, o_last, o_epochs, o_pending FROM medrelay_send_batch_or_state("
        + ", ".join(f"${i + 1}" for i in range(18))
        + ")"
    )

    async def answer(rooms: list[str], last: list[int]) -> tuple[Any, ...]:
        n = len(rooms)
        args = [rooms, last, [1] * n, [False] * n, last, [], [], [], [], "ch", *head, []]
        return tuple(await env.raw.fetchrow(call, *args))

    moved = [seq[r] + (r == ROOM) for r in rooms]
    epochs = [1 if r == ROOM else 3 for r in rooms]
    pending = [r != ROOM for r in rooms]
    assert await answer(rooms, moved) == (1, seqs, epochs, pending)
    assert await answer([ROOM, "no-such-room"], [seq[ROOM], 1]) == (1, [seq[ROOM]], [1], [False])
    # the room as predicted, and a journal head that is not node-1's: that check's answer
    assert await answer([ROOM], [seq[ROOM]]) == (4, None, None, None)


async def test_a_removal_by_another_node_is_refused_by_the_second_call(env: Env) -> None:
    """I2 on the second call: node-2 removes bob (the room's seq moves, a rekey is
    pending, the epoch stays). node-1's first call finds the room moved and is answered its
    state; planned again, bob's urgent send passes the pending flag, and the second call
    finds bob's role gone: nothing is stored, and the usual way refuses it."""
    one = await env.open("node-1")
    two = await env.open("node-2")
    await new_room(one)
    await change(one, 2, MembershipChange(add={"bob": "member"}))
    await send(one, "bob", mid=b"a" * 16)  # node-1 learns the room and bob's role
    await change(two, 3, MembershipChange(remove=["bob"]), pending=True)
    events = await env.raw.fetchval("SELECT count(*) FROM events")
    await refused(ErrorCode.FORBIDDEN, send(one, "bob", mid=b"b" * 16, allow_pending=True))
    assert env.paths["node-1"][-1] == "after_miss"
    assert env.misses["node-1"][-1] == ("room", "role")
    assert await env.raw.fetchval("SELECT count(*) FROM events") == events
    assert (await verify(one.database, [], b"")).ok


async def test_after_four_missed_calls_the_usual_way(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A room that moves on before every call (here: the answered state is not taken in)
    is called ``CALLS`` times, then stored the usual way."""
    one = await env.open("node-1")
    two = await env.open("node-2")
    await new_room(one)
    await send(one, mid=b"a" * 16)
    await send(two, mid=b"b" * 16)
    assert one._one_trip is not None
    monkeypatch.setattr(one._one_trip.predictions, "restate", lambda states: None)
    stored = await send(one, mid=b"c" * 16)
    assert stored.event.seq == 5
    assert env.paths["node-1"][-1] == "after_miss"
    assert env.misses["node-1"][-1] == ("room",) * CALLS


async def _room_with_bob(env: Env) -> SqlStore:
    """node-1's store, and the room with bob added as a member straight in the table."""
    store = await env.open()
    await new_room(store)
    await env.raw.execute(
        "INSERT INTO memberships (room, user_id, from_seq, to_seq, role)"
        " VALUES ($1, 'bob', 1, NULL, 'member')",
        ROOM,
    )
    return store


async def test_a_removed_sender_misses_and_is_refused(env: Env) -> None:
    """The removal here ends bob's interval without moving the room's last seq, so it is
    the role check that misses (a removal through the store moves the seq as well)."""
    store = await _room_with_bob(env)
    await send(store, "bob", mid=b"a" * 16)
    await send(store, "bob", mid=b"b" * 16)
    await env.raw.execute(
        "UPDATE memberships SET to_seq = 4 WHERE room = $1 AND user_id = 'bob'", ROOM
    )
    await refused(ErrorCode.FORBIDDEN, send(store, "bob", mid=b"c" * 16))
    assert env.paths["node-1"] == ["full", "one_trip", "after_miss"]
    assert await env.raw.fetchval("SELECT last_seq FROM rooms WHERE room = $1", ROOM) == 4


async def test_a_retried_send_misses_and_gets_its_first_ack(env: Env) -> None:
    store = await env.open()
    await new_room(store)
    first = await send(store, mid=b"a" * 16)
    await send(store, mid=b"b" * 16)
    again = await send(store, mid=b"a" * 16)
    assert again.duplicate and again.event.seq == first.event.seq
    assert env.paths["node-1"] == ["full", "one_trip", "after_miss"]
    assert await env.raw.fetchval("SELECT count(*) FROM events WHERE kind = 'message'") == 2


async def test_a_rekey_pending_misses_and_is_refused(env: Env) -> None:
    store = await env.open()
    await new_room(store)
    await send(store, mid=b"a" * 16)
    await send(store, mid=b"b" * 16)
    await env.raw.execute("UPDATE rooms SET pending_rekey = true WHERE room = $1", ROOM)
    await refused(ErrorCode.REKEY_REQUIRED, send(store, mid=b"c" * 16))
    assert env.paths["node-1"] == ["full", "one_trip", "after_miss"]


async def test_a_node_taken_over_stores_nothing(env: Env) -> None:
    store = await env.open(lease_seconds=60)
    await new_room(store)
    await send(store, mid=b"a" * 16)
    await send(store, mid=b"b" * 16)
    env.clock.advance(120)  # node-1's lease expired and another process took the id
    usurper = await env.backend.open("node-1", clock=env.clock)
    with pytest.raises(NodeFenced):
        await send(store, mid=b"c" * 16)
    assert env.paths["node-1"] == ["full", "one_trip"]  # the fenced batch was not committed
    assert await env.raw.fetchval("SELECT last_seq FROM rooms WHERE room = $1", ROOM) == 4
    await send(usurper, mid=b"c" * 16)
    assert (await verify(usurper.database, [], b"")).ok


async def test_a_journal_write_between_batches_keeps_one_trip(env: Env) -> None:
    """The delivery journal writes a stream of its own, so a flush between two batches
    leaves the head the node's writer remembers, and the next batch still takes one trip."""
    store = await env.open()
    await new_room(store)
    await send(store, mid=b"a" * 16)
    await store.journal([AuditRecord("signin", "ok", user="alice", ts=NOW)])
    await send(store, mid=b"b" * 16)
    assert env.paths["node-1"] == ["full", "one_trip"]
    assert await _actions(env, "node-1/deliveries") == ["signin"]
    assert (await verify(store.database, [], b"")).ok


async def _chained_store(env: Env, monkeypatch: pytest.MonkeyPatch) -> tuple[SqlStore, list[bool]]:
    """A store that knows its room and head (one send), and a list that records each time
    its writer locks and reads the node row instead of chaining after the head it knows."""
    store = await env.open()
    await new_room(store)
    await send(store, mid=b"a" * 16)
    relocked: list[bool] = []
    locked_read = store.writer._fenced_row

    async def counted(conn: Any) -> Any:
        relocked.append(True)
        return await locked_read(conn)

    monkeypatch.setattr(store.writer, "_fenced_row", counted)
    return store, relocked


async def _hold_next_index(env: Env, node: str) -> asyncpg.transaction.Transaction:
    """An uncommitted audit row at the index the next chained write of ``node``'s stream
    will take: that write locks the stream's row and then waits in its insert until this
    transaction ends."""
    head = await env.raw.fetchval("SELECT head_idx FROM journal_nodes WHERE node = $1", node)
    blocker = env.raw.transaction()
    await blocker.start()
    await env.raw.execute(
        "INSERT INTO audit (ts, action, outcome, node, idx) VALUES (0, 'x', 'x', $1, $2)",
        node,
        head + 1,
    )
    return blocker


def _flush(store: SqlStore) -> asyncio.Task[None]:
    """A delivery journal flush: a receipt stored and journaled."""
    record = AuditRecord("receipt", "ok", user="alice", room=ROOM, seq_to=2, ts=NOW)
    return asyncio.create_task(store.journal([record], receipts=[(ROOM, "alice-1", 2, NOW)]))


async def _actions(env: Env, node: str) -> list[str]:
    rows = await env.raw.fetch("SELECT action FROM audit WHERE node = $1 ORDER BY idx", node)
    return [r["action"] for r in rows]


async def test_a_journal_flush_in_flight_does_not_hold_a_send(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery journal flush holds its own stream's row until it commits; a send batch
    meanwhile takes one trip on the node's row and is acknowledged. (Before, both chained
    on the node's row: every send waited behind the flush's hundreds of records, which
    was the tail of the consult scenario's latency.)"""
    store, relocked = await _chained_store(env, monkeypatch)
    blocker = await _hold_next_index(env, "node-1/deliveries")
    flushing = _flush(store)
    await waiting_on_a_lock("%UPDATE journal_nodes%")  # the flush, in its insert
    sent = await asyncio.wait_for(send(store, mid=b"b" * 16), 10)
    assert sent.event.seq == 4 and not flushing.done()
    assert env.paths["node-1"] == ["full", "one_trip"] and relocked == []
    await blocker.rollback()
    await asyncio.wait_for(flushing, 10)
    assert (await _actions(env, "node-1"))[-2:] == ["send", "send"]
    assert await _actions(env, "node-1/deliveries") == ["receipt"]
    assert (await verify(store.database, [], b"")).ok


async def test_a_send_waiting_for_a_removal_in_one_trip_is_refused(env: Env) -> None:
    """I2 on the one-trip path: the call waits for the room lock a removal holds, and the
    removal's commit refuses the send (its checks run after the lock, each with a new
    snapshot)."""
    store = await _room_with_bob(env)
    await send(store, "bob", mid=b"a" * 16)
    removal = await held_removal(env.raw)
    sending = asyncio.create_task(send(store, "bob", mid=b"b" * 16))
    await waiting_on_a_lock("%medrelay_send_batch%")
    await removal.commit()
    await asyncio.wait_for(refused(ErrorCode.FORBIDDEN, sending), 10)
    assert env.paths["node-1"] == ["full", "after_miss"]
    assert env.misses["node-1"][1] == ("role",)  # the removal ended bob's membership


async def test_another_nodes_notify_moves_the_prediction_on(env: Env) -> None:
    """Hearing another node's commit in a room (NOTIFY) moves the predicted seq on, so the
    next batch there is stored in one call instead of missing first."""
    one = await env.open("node-1")
    two = await env.open("node-2")
    await new_room(one)
    await send(one, mid=b"a" * 16)
    heard: list[tuple[str, int]] = []
    stop = asyncio.Event()
    listening = asyncio.create_task(one.listen(lambda room, seq: heard.append((room, seq)), stop))
    sent = [0]

    async def heard_own_send() -> bool:  # until the listener is up
        sent[0] += 1
        seq = (await send(one, mid=b"w%015d" % sent[0])).event.seq
        return (ROOM, seq) in heard or await _heard(heard, (ROOM, seq))

    try:
        await until(heard_own_send)
        own = len(env.paths["node-1"])
        await send(one, mid=b"b" * 16)
        seq = (await send(two, mid=b"c" * 16)).event.seq
        await until(lambda: _heard(heard, (ROOM, seq)))
        await send(one, mid=b"d" * 16)
    finally:
        stop.set()
        await listening
    # node-2's commit was heard before node-1's next batch was planned
    assert env.paths["node-1"][own:] == ["one_trip", "one_trip"]
    assert (await verify(one.database, [], b"")).ok


async def _heard(heard: list[tuple[str, int]], what: tuple[str, int]) -> bool:
    try:
        await until(lambda: _now(what in heard), timeout=0.5)
    except TimeoutError:
        return False
    return True


async def _now(value: bool) -> bool:
    return value


async def test_a_batch_of_many_sends_takes_one_trip(env: Env) -> None:
    """Sends queueing on a busy node make large batches; they take one trip as small ones
    do, in their order of arrival."""
    store = await env.open()
    await new_room(store)
    await send(store, mid=b"a" * 16)
    many = [send(store, mid=b"m%015d" % i) for i in range(20)]
    results = await asyncio.gather(*many)
    assert [r.event.seq for r in results] == list(range(4, 24))
    assert env.paths["node-1"][0] == "full"
    assert set(env.paths["node-1"][1:]) == {"one_trip"}


async def test_the_previous_releases_call_still_answers_during_a_rolling_upgrade(
    env: Env,
) -> None:
    """Migration 0010 adds the call that takes rows beside the 46-parameter one, which
    nodes of the previous release still call until they are upgraded (migrations are
    additive, docs/operations.md section 7). Both check their predictions the same way."""
    store = await env.open()
    await new_room(store)
    head = ("node-1", 1, 0, b"", 1, b"", 0)
    missing = (["no-such-room"], [1], [1], [False], [2], [], [], [])
    old = [*missing, *([] for _ in range(8)), "ch", *head, *([] for _ in range(22))]
    new = [*missing, [], "ch", *head, []]
    for args in (old, new):
        call = "SELECT medrelay_send_batch(" + ", ".join(f"${i + 1}" for i in range(len(args)))
        assert await env.raw.fetchval(call + ")", *args) == 1  # the room's state missed
    assert (
        await env.raw.fetchval(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE p.proname = 'medrelay_send_batch' AND n.nspname = current_schema()"
        )
        == 2
    )
