"""The store contract (``medrelay_server.store.base``), run against every implementation:
SQLite in a temporary file and PostgreSQL in a fresh schema (see ``conftest.py``)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.store import rooms
from medrelay_server.store.base import (
    AppendResult,
    AuditRecord,
    Commit,
    DeviceRecord,
    MembershipChange,
    StoreUnavailable,
)
from medrelay_server.store.schema import metadata
from medrelay_server.store.sql import SqlStore
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from .conftest import StoreBackend

ROOM = "room-1"
NOW = 1_700_000_000


async def refused(code: ErrorCode, call: Awaitable[object]) -> None:
    with pytest.raises(RequestError) as info:
        await call
    assert info.value.code == code


async def new_room(store: SqlStore, room: str = ROOM, owner: str = "alice") -> None:
    await store.create_room(
        room,
        genesis=b"genesis",
        head=b"head-1",
        owner=owner,
        sender_device=f"{owner}-1",
        manifest=b"manifest-1",
        wraps={f"{owner}-1": b"wrap-" + owner.encode()},
        now=NOW,
        audit=[AuditRecord("room.create", "ok", user=owner)],
    )


async def send(
    store: SqlStore,
    user: str = "alice",
    mid: bytes = b"m" * 16,
    *,
    room: str = ROOM,
    envelope: bytes = b"ciphertext",
    epoch: int = 1,
    allow_pending: bool = False,
    kind: str = "message",
) -> AppendResult:
    return await store.append_message(
        room,
        user=user,
        device=f"{user}-1",
        mid=mid,
        envelope=envelope,
        kind=kind,
        epoch=epoch,
        allow_pending=allow_pending,
        now=NOW + 1,
        audit=[AuditRecord("send", "ok", user=user, mid=mid)],
    )


async def change(
    store: SqlStore,
    n: int,
    membership: MembershipChange | None = None,
    *,
    sender: str = "alice",
    rekey: dict[str, bytes] | None = None,
    pending: bool = False,
    room: str = ROOM,
) -> list[int]:
    """Commit roster entry ``n`` (head ``head-n`` on top of ``head-(n-1)``), optionally with a
    rekey to epoch ``n``; returns the seqs of the stored events."""
    state = await store.room_state(room)
    assert state is not None
    events = await store.commit(
        Commit(
            room=room,
            expected_head=state.roster_head,
            expected_epoch=state.epoch,
            sender_user=sender,
            sender_device=f"{sender}-1",
            entry=b"entry-%d" % n,
            new_head=b"head-%d" % n,
            membership=membership,
            manifest=None if rekey is None else b"manifest-%d" % n,
            wraps=rekey or {},
            new_epoch=None if rekey is None else state.epoch + 1,
            pending_rekey=pending,
        ),
        now=NOW + n,
        audit=[AuditRecord("roster.commit", "ok", user=sender)],
    )
    return [e.seq for e in events]


async def seqs_seen(store: SqlStore, user: str, after: int = 0) -> list[int]:
    events = await store.events_after(ROOM, after, user=user, device=f"{user}-1", limit=1000)
    return [e.seq for e in events]


def device(user: str, n: int = 1, *, key: bytes = b"k" * 32, revoked: bool = False) -> DeviceRecord:
    return DeviceRecord(user, f"{user}-{n}", key, b"cert", b"bundle", "phone", revoked, NOW)


# rooms ----------------------------------------------------------------------------------


async def test_ping(store: SqlStore) -> None:
    await store.ping()


async def test_open_twice_and_second_instance(store_backend: StoreBackend) -> None:
    first = await store_backend.open()
    await first.open()
    await new_room(first)
    second = await store_backend.open()
    assert (await second.room_state(ROOM)) == (await first.room_state(ROOM))


async def test_create_room(store: SqlStore) -> None:
    await new_room(store)
    state = await store.room_state(ROOM)
    assert state is not None
    assert (state.last_seq, state.roster_head, state.roster_length) == (2, b"head-1", 1)
    assert (state.epoch, state.pending_rekey, state.created_at) == (1, False, NOW)
    assert await store.roster_entries(ROOM) == [b"genesis"]
    assert await store.members(ROOM) == {"alice": "owner"}
    assert await store.member_role(ROOM, "alice") == "owner"
    assert await store.member_role(ROOM, "bob") is None
    assert [(s.room, role) for s, role in await store.rooms_for_user("alice")] == [(ROOM, "owner")]
    events = await store.events_after(ROOM, 0, user="alice", device="alice-1", limit=10)
    assert [(e.seq, e.kind, e.payload, e.wrap) for e in events] == [
        (1, "roster", b"genesis", None),
        (2, "rekey", b"manifest-1", b"wrap-alice"),
    ]
    [record] = await store.audit_records(room=ROOM)
    assert (record.action, record.seq_from, record.seq_to, record.ts) == ("room.create", 1, 2, NOW)
    assert await store.room_state("nope") is None


async def test_create_room_twice(store: SqlStore) -> None:
    await new_room(store)
    await refused(ErrorCode.ALREADY_EXISTS, new_room(store, owner="bob"))
    assert await store.members(ROOM) == {"alice": "owner"}


# appends --------------------------------------------------------------------------------


async def test_append_assigns_next_seq(store: SqlStore) -> None:
    await new_room(store)
    first = await send(store, mid=b"a" * 16)
    second = await send(store, mid=b"b" * 16, kind="summon")
    assert (first.event.seq, first.duplicate, second.event.seq) == (3, False, 4)
    assert (first.event.sender_user, first.event.mid, first.event.ts) == (
        "alice",
        b"a" * 16,
        NOW + 1,
    )
    state = await store.room_state(ROOM)
    assert state is not None and state.last_seq == 4
    assert [r.seq_from for r in await store.audit_records(room=ROOM)] == [1, 3, 4]


async def test_concurrent_appends_have_no_gaps(store: SqlStore) -> None:
    await new_room(store)
    results = await asyncio.gather(*(send(store, mid=b"%016d" % i) for i in range(50)))
    assert sorted(r.event.seq for r in results) == list(range(3, 53))
    assert await seqs_seen(store, "alice") == list(range(1, 53))


async def test_concurrent_appends_from_two_instances(store_backend: StoreBackend) -> None:
    one, two = await store_backend.open(), await store_backend.open()
    await new_room(one)
    results = await asyncio.gather(*(send((one, two)[i % 2], mid=b"%016d" % i) for i in range(40)))
    assert sorted(r.event.seq for r in results) == list(range(3, 43))


async def test_idempotent_retry(store: SqlStore) -> None:
    await new_room(store)
    first = await send(store)
    again = await send(store)
    assert again.duplicate and again.event.seq == first.event.seq
    assert again.event.payload == first.event.payload
    state = await store.room_state(ROOM)
    assert state is not None and state.last_seq == 3
    assert [r.seq_from for r in await store.audit_records(room=ROOM)] == [1, 3, 3]


async def test_retry_with_other_bytes_is_refused(store: SqlStore) -> None:
    await new_room(store)
    await send(store)
    await refused(ErrorCode.IDEMPOTENCY_MISMATCH, send(store, envelope=b"different"))


async def test_retry_after_epoch_moved_returns_original(store: SqlStore) -> None:
    await new_room(store)
    first = await send(store)
    await change(store, 2, rekey={"alice-1": b"w"})
    again = await send(store)
    assert again.duplicate and again.event.seq == first.event.seq


async def test_posting_needs_membership_and_role(store: SqlStore) -> None:
    await new_room(store)
    await refused(ErrorCode.FORBIDDEN, send(store, "mallory"))
    await change(store, 2, MembershipChange(add={"olga": "observer"}))
    await refused(ErrorCode.FORBIDDEN, send(store, "olga"))
    await refused(ErrorCode.INVALID_FIELD, send(store, kind="rekey"))
    await refused(ErrorCode.FORBIDDEN, send(store, room="nope"))  # unknown rooms look forbidden


async def test_removed_member_may_not_post(store: SqlStore) -> None:
    await new_room(store)
    await change(store, 2, MembershipChange(add={"bob": "member"}))
    await send(store, "bob", mid=b"1" * 16)
    await change(store, 3, MembershipChange(remove=["bob"]), rekey={"alice-1": b"w"})
    await refused(ErrorCode.FORBIDDEN, send(store, "bob", mid=b"2" * 16, epoch=2))
    await refused(ErrorCode.FORBIDDEN, send(store, "bob", mid=b"1" * 16))


async def test_stale_epoch(store: SqlStore) -> None:
    await new_room(store)
    await change(store, 2, rekey={"alice-1": b"w"})
    await refused(ErrorCode.STALE_EPOCH, send(store, epoch=1))
    assert (await send(store, epoch=2)).event.seq == 5


async def test_pending_rekey(store: SqlStore) -> None:
    await new_room(store)
    await change(store, 2, MembershipChange(add={"bob": "member"}))
    await change(store, 3, MembershipChange(remove=["bob"]), sender="bob", pending=True)
    await refused(ErrorCode.REKEY_REQUIRED, send(store, mid=b"1" * 16))
    assert (await send(store, mid=b"2" * 16, allow_pending=True)).event.seq == 5
    await change(store, 4, MembershipChange(roles={"alice": "owner"}))
    state = await store.room_state(ROOM)
    assert state is not None and state.pending_rekey  # a change without a rekey keeps it
    await change(store, 5, rekey={"alice-1": b"w"})
    state = await store.room_state(ROOM)
    assert state is not None and not state.pending_rekey and state.epoch == 2
    assert (await send(store, mid=b"3" * 16, epoch=2)).event.seq == 9


# commits --------------------------------------------------------------------------------


async def test_commit_with_rekey(store: SqlStore) -> None:
    await new_room(store)
    wraps = {"alice-1": b"wrap-a", "bob-1": b"wrap-b1", "bob-2": b"wrap-b2"}
    assert await change(store, 2, MembershipChange(add={"bob": "member"}), rekey=wraps) == [3, 4]
    state = await store.room_state(ROOM)
    assert state is not None
    assert (state.last_seq, state.roster_head, state.roster_length, state.epoch) == (
        4,
        b"head-2",
        2,
        2,
    )
    assert await store.roster_entries(ROOM) == [b"genesis", b"entry-2"]
    assert await store.members(ROOM) == {"alice": "owner", "bob": "member"}
    for dev, wrap in [("bob-1", b"wrap-b1"), ("bob-2", b"wrap-b2"), ("bob-9", None)]:
        events = await store.events_after(ROOM, 0, user="bob", device=dev, limit=10)
        assert [(e.seq, e.kind, e.wrap) for e in events] == [
            (3, "roster", None),
            (4, "rekey", wrap),
        ]
    [record] = [r for r in await store.audit_records() if r.action == "roster.commit"]
    assert (record.room, record.seq_from, record.seq_to) == (ROOM, 3, 4)


async def test_commit_compare_and_set(store: SqlStore) -> None:
    await new_room(store)
    stale = Commit(ROOM, b"head-1", 1, "alice", "alice-1", entry=b"e", new_head=b"head-x")
    await change(store, 2)
    await refused(ErrorCode.ROSTER_CONFLICT, store.commit(stale, now=NOW, audit=[]))
    epoch_stale = Commit(ROOM, b"head-2", 0, "alice", "alice-1", entry=b"e", new_head=b"head-x")
    await refused(ErrorCode.STALE_EPOCH, store.commit(epoch_stale, now=NOW, audit=[]))
    missing = Commit("nope", b"head-1", 1, "alice", "alice-1", entry=b"e", new_head=b"x")
    await refused(ErrorCode.NOT_FOUND, store.commit(missing, now=NOW, audit=[]))
    assert await store.roster_entries(ROOM) == [b"genesis", b"entry-2"]


async def test_concurrent_commits_exactly_one_wins(store: SqlStore) -> None:
    await new_room(store)
    await change(store, 2, MembershipChange(add={"bob": "member"}))
    commits = [
        Commit(ROOM, b"head-2", 1, u, f"{u}-1", entry=u.encode(), new_head=b"head-" + u.encode())
        for u in ("alice", "bob")
    ]
    results = await asyncio.gather(
        *(store.commit(c, now=NOW, audit=[]) for c in commits), return_exceptions=True
    )
    wins = [r for r in results if isinstance(r, list)]
    losses = [r for r in results if isinstance(r, RequestError)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].code == ErrorCode.ROSTER_CONFLICT
    assert len(await store.roster_entries(ROOM)) == 3


async def test_commit_sender_rules(store: SqlStore) -> None:
    await new_room(store)
    await refused(ErrorCode.FORBIDDEN, change(store, 2, sender="mallory"))
    # a summoned doctor adds herself (standing authorisation) and commits the epoch herself
    await change(store, 2, MembershipChange(add={"sue": "member"}), sender="sue", rekey={})
    await change(store, 3, MembershipChange(add={"tab": "device"}))
    await refused(ErrorCode.FORBIDDEN, change(store, 4, sender="tab", rekey={"tab-1": b"w"}))
    await change(store, 4, MembershipChange(remove=["tab"]), sender="tab", pending=True)
    assert await store.members(ROOM) == {"alice": "owner", "sue": "member"}


async def test_commit_device_list_version(store: SqlStore) -> None:
    await new_room(store)
    await store.put_device(device("alice", 2))
    state = await store.room_state(ROOM)
    assert state is not None
    commit = Commit(
        ROOM, b"head-1", 1, "alice", "alice-1", manifest=b"m", new_epoch=2, wraps={"alice-1": b"w"}
    )
    stale = dataclasses.replace(commit, device_list_version=state.device_list_version - 1)
    await refused(ErrorCode.RECIPIENTS_MISMATCH, store.commit(stale, now=NOW, audit=[]))
    fresh = dataclasses.replace(commit, device_list_version=state.device_list_version)
    assert [e.kind for e in await store.commit(fresh, now=NOW, audit=[])] == ["rekey"]


async def test_commit_shape_is_checked(store: SqlStore) -> None:
    await new_room(store)
    empty = Commit(ROOM, b"head-1", 1, "alice", "alice-1")
    await refused(ErrorCode.INVALID_FIELD, store.commit(empty, now=NOW, audit=[]))
    headless = Commit(ROOM, b"head-1", 1, "alice", "alice-1", entry=b"e")
    await refused(ErrorCode.INVALID_FIELD, store.commit(headless, now=NOW, audit=[]))
    await refused(ErrorCode.NOT_FOUND, change(store, 2, MembershipChange(remove=["nobody"])))
    await refused(ErrorCode.INVALID_FIELD, change(store, 2, MembershipChange(add={"x": "king"})))
    assert await store.roster_entries(ROOM) == [b"genesis"]


# membership intervals -------------------------------------------------------------------


async def test_removed_then_readded_sees_nothing_from_the_gap(store: SqlStore) -> None:
    await new_room(store)
    assert await change(store, 2, MembershipChange(add={"bob": "member"})) == [3]
    await send(store, mid=b"1" * 16)  # 4
    assert await change(store, 3, MembershipChange(remove=["bob"])) == [5]
    await send(store, mid=b"2" * 16)  # 6: while bob is out
    assert await change(store, 4, MembershipChange(add={"bob": "member"})) == [7]
    await send(store, mid=b"3" * 16)  # 8
    assert await seqs_seen(store, "bob") == [3, 4, 5, 7, 8]
    assert await seqs_seen(store, "bob", after=4) == [5, 7, 8]
    assert [await store.visible(ROOM, s, "bob") for s in range(1, 9)] == [
        False, False, True, True, True, False, True, True,
    ]  # fmt: skip
    assert await seqs_seen(store, "alice") == list(range(1, 9))


async def test_history_grant(store: SqlStore) -> None:
    await new_room(store)
    await send(store, mid=b"1" * 16)  # 3
    await send(store, mid=b"2" * 16)  # 4
    await send(store, mid=b"3" * 16)  # 5
    grant = MembershipChange(add={"sue": "member"}, history_from_seq={"sue": 4})
    assert await change(store, 2, grant) == [6]
    assert await seqs_seen(store, "sue") == [4, 5, 6]
    assert not await store.visible(ROOM, 3, "sue")
    assert await store.visible(ROOM, 4, "sue")
    tablet = MembershipChange(add={"tab": "device"}, history_from_seq={"tab": 1})
    await refused(ErrorCode.FORBIDDEN, change(store, 3, tablet))


async def test_events_before(store: SqlStore) -> None:
    await new_room(store)
    await change(store, 2, MembershipChange(add={"bob": "member"}))  # 3
    for i in range(5):
        await send(store, mid=b"%016d" % i)  # 4..8

    async def before(seq: int, limit: int) -> list[int]:
        events = await store.events_before(ROOM, seq, user="bob", device="bob-1", limit=limit)
        return [e.seq for e in events]

    assert await before(0, 3) == [6, 7, 8]
    assert await before(6, 10) == [3, 4, 5]
    assert await before(3, 10) == []
    events = await store.events_after(ROOM, 0, user="alice", device="alice-1", limit=2)
    assert [e.seq for e in events] == [1, 2]


async def test_tablets_receive_only_roster_and_rekey(store: SqlStore) -> None:
    await new_room(store)
    assert await change(store, 2, MembershipChange(add={"tab": "device"})) == [3]
    await send(store, mid=b"1" * 16)  # 4
    await send(store, "tab", mid=b"2" * 16, kind="summon")  # 5
    assert await change(store, 3, rekey={"alice-1": b"a", "tab-1": b"t"}) == [6, 7]
    assert await seqs_seen(store, "tab") == [3, 6, 7]
    events = await store.events_before(ROOM, 0, user="tab", device="tab-1", limit=10)
    assert [(e.seq, e.wrap) for e in events] == [(3, None), (6, None), (7, b"t")]
    assert await change(store, 4, MembershipChange(roles={"tab": "member"})) == [8]
    await send(store, mid=b"3" * 16, epoch=2)  # 9
    assert await seqs_seen(store, "tab") == [3, 6, 7, 8, 9]
    assert await seqs_seen(store, "alice") == list(range(1, 10))


async def test_room_events_are_unfiltered(store: SqlStore) -> None:
    await new_room(store)
    await send(store)
    events = await store.room_events(ROOM, 1, limit=10)
    assert [(e.seq, e.wrap) for e in events] == [(2, None), (3, None)]


# receipts, identities, devices ----------------------------------------------------------


async def test_receipts_never_go_backwards(store: SqlStore) -> None:
    assert await store.receipt_of(ROOM, "alice-1") == 0
    assert await store.record_receipt(ROOM, "alice-1", 5, NOW) == 5
    assert await store.record_receipt(ROOM, "alice-1", 3, NOW) == 5
    results = await asyncio.gather(
        *(store.record_receipt(ROOM, "bob-1", s, NOW) for s in range(1, 30))
    )
    assert max(results) == 29 and await store.receipt_of(ROOM, "bob-1") == 29
    assert await store.receipt_of(ROOM, "alice-1") == 5


async def test_receipts_stored_with_journal_records_never_go_backwards(store: SqlStore) -> None:
    await store.record_receipt(ROOM, "alice-1", 5, NOW)
    record = AuditRecord("receipt", "success", user="bob", device="bob-1", room=ROOM, ts=NOW)
    batch = [
        (ROOM, "alice-1", 3, NOW + 1),
        (ROOM, "bob-1", 8, NOW + 1),
        ("room-2", "bob-1", 2, NOW),
    ]
    await store.journal([record], receipts=batch)
    assert await store.receipt_of(ROOM, "alice-1") == 5  # kept: it is larger
    assert await store.receipt_of(ROOM, "bob-1") == 8
    assert await store.receipt_of("room-2", "bob-1") == 2
    assert [r.action for r in await store.audit_records(room=ROOM)][-1] == "receipt"
    await store.journal([], receipts=[(ROOM, "bob-1", 9, NOW + 2)])
    assert await store.receipt_of(ROOM, "bob-1") == 9


async def test_identity_pinning(store: SqlStore) -> None:
    assert await store.get_identity("alice") is None
    await store.put_identity("alice", b"i" * 32, NOW)
    await store.put_identity("alice", b"i" * 32, NOW + 1)
    await refused(ErrorCode.ALREADY_EXISTS, store.put_identity("alice", b"j" * 32, NOW))
    assert await store.get_identity("alice") == b"i" * 32


async def test_device_lists_read_devices_and_identities_together(store: SqlStore) -> None:
    """``GetDevices`` is one read whatever the number of users: each user's devices, and
    the pinned identity key with its attestation for those who have one."""
    await store.put_identity("alice", b"i" * 32, NOW, attestation=b"att-a")
    await store.put_identity("bob", b"j" * 32, NOW)
    await store.put_device(device("alice"))
    await store.put_device(device("alice", 2))
    await store.put_device(device("carol"))
    records, identities = await store.device_lists(["alice", "bob", "carol", "dave"])
    assert [(r.user, r.device_id) for r in records] == [
        ("alice", "alice-1"),
        ("alice", "alice-2"),
        ("carol", "carol-1"),
    ]
    assert identities == {"alice": (b"i" * 32, b"att-a"), "bob": (b"j" * 32, None)}
    assert await store.device_lists([]) == ([], {})


async def test_devices_and_device_list_version(store: SqlStore) -> None:
    await new_room(store)
    await new_room(store, "room-2", owner="bob")
    await change(store, 2, MembershipChange(add={"bob": "member"}))
    await change(store, 3, MembershipChange(remove=["bob"]))

    async def versions() -> tuple[int, int]:
        one, two = await store.room_state(ROOM), await store.room_state("room-2")
        assert one is not None and two is not None
        return one.device_list_version, two.device_list_version

    start = await versions()
    await store.put_device(device("bob"))
    assert await versions() == (start[0], start[1] + 1)  # bob is no longer in room-1
    refreshed = DeviceRecord("bob", "bob-1", b"k" * 32, b"cert-2", b"bundle-2", "phone")
    await store.put_device(refreshed)
    assert await versions() == (start[0], start[1] + 1)
    assert await store.get_device("bob-1") == DeviceRecord(
        "bob", "bob-1", b"k" * 32, b"cert-2", b"bundle-2", "phone", False, NOW
    )
    await refused(ErrorCode.ALREADY_EXISTS, store.put_device(device("bob", key=b"x" * 32)))
    stolen_id = DeviceRecord("alice", "bob-1", b"k" * 32, b"cert", b"bundle", "phone")
    await refused(ErrorCode.ALREADY_EXISTS, store.put_device(stolen_id))
    await store.put_device(device("alice"))
    assert await versions() == (start[0] + 1, start[1] + 1)
    await store.put_device(device("bob", revoked=True))
    await store.put_device(device("bob"))  # revocation is permanent
    assert await versions() == (start[0] + 1, start[1] + 2)
    listed = await store.devices_for(["alice", "bob", "carol"])
    assert [(d.device_id, d.revoked) for d in listed] == [("alice-1", False), ("bob-1", True)]
    assert await store.get_device("nope") is None and await store.devices_for([]) == []


async def test_unseen_devices_by_last_seen_or_creation(store: SqlStore) -> None:
    await store.put_device(device("alice"))  # created at NOW, never seen
    await store.put_device(device("bob"))
    await store.put_device(device("carol"))
    await store.touch_device("bob-1", NOW + 100)
    await store.put_device(device("carol", revoked=True))
    assert [d.device_id for d in await store.unseen_devices(NOW + 1, limit=10)] == ["alice-1"]
    later = await store.unseen_devices(NOW + 101, limit=10)
    assert [(d.device_id, d.last_seen) for d in later] == [("alice-1", None), ("bob-1", NOW + 100)]
    assert len(await store.unseen_devices(NOW + 101, limit=1)) == 1
    await store.touch_device("nope", NOW)  # an unknown device is not an error


# attachments ----------------------------------------------------------------------------


async def put(
    store: SqlStore,
    index: int,
    data: bytes,
    final: bool = False,
    *,
    blob: bytes = b"blob-1",
    room: str = ROOM,
    user: str = "alice",
    max_blob: int = 100,
    max_room: int = 150,
) -> None:
    await store.put_chunk(
        room, blob, index, data, final,
        user=user, now=NOW, max_blob_bytes=max_blob, max_room_bytes=max_room,
    )  # fmt: skip


async def test_blob_upload_in_order_and_resume(store: SqlStore) -> None:
    await new_room(store)
    assert await store.blob_status(b"blob-1") is None
    await put(store, 0, b"a" * 10)
    await refused(ErrorCode.INVALID_FIELD, put(store, 2, b"c"))
    await put(store, 0, b"a" * 10)  # resumed: identical bytes accepted
    await refused(ErrorCode.INVALID_FIELD, put(store, 0, b"z" * 10))
    assert await store.blob_status(b"blob-1") == (ROOM, 1, False)
    await put(store, 1, b"b" * 10, final=True)
    await put(store, 1, b"b" * 10, final=True)
    await refused(ErrorCode.INVALID_FIELD, put(store, 2, b"c"))
    assert await store.blob_status(b"blob-1") == (ROOM, 2, True)
    assert await store.get_chunk(b"blob-1", 0) == (ROOM, b"a" * 10, False)
    assert await store.get_chunk(b"blob-1", 1) == (ROOM, b"b" * 10, True)
    assert await store.get_chunk(b"blob-1", 2) is None


async def test_blob_limits_and_binding(store: SqlStore) -> None:
    await new_room(store)
    await new_room(store, "room-2")
    await put(store, 0, b"a" * 60)
    await refused(ErrorCode.QUOTA_EXCEEDED, put(store, 1, b"b" * 41))  # blob > 100
    await put(store, 1, b"b" * 40)
    await refused(ErrorCode.QUOTA_EXCEEDED, put(store, 0, b"c" * 51, blob=b"blob-2"))  # room > 150
    await put(store, 0, b"c" * 50, blob=b"blob-2")
    await refused(ErrorCode.FORBIDDEN, put(store, 2, b"d", room="room-2"))
    await refused(ErrorCode.FORBIDDEN, put(store, 0, b"d", blob=b"blob-3", user="mallory"))
    await refused(ErrorCode.NOT_FOUND, put(store, 0, b"d", blob=b"blob-3", room="nope"))
    await put(store, 0, b"d" * 100, blob=b"blob-3", room="room-2")
    assert await store.delete_room_blobs_before(ROOM, NOW) == 0
    assert await store.delete_room_blobs_before(ROOM, NOW + 1) == 2
    assert await store.get_chunk(b"blob-1", 0) is None
    assert await store.blob_status(b"blob-3") == ("room-2", 1, False)
    await put(store, 0, b"e" * 100, blob=b"blob-4")


# journal, schema, availability ----------------------------------------------------------


async def test_journal(store: SqlStore) -> None:
    records = [
        AuditRecord("auth", "ok", user="alice", device="alice-1", source="10.0.0.1", ts=NOW),
        AuditRecord("deliver", "ok", device="bob-1", room=ROOM, seq_from=3, seq_to=9, ts=NOW),
    ]
    await store.journal(records)
    assert await store.audit_records() == records
    assert await store.audit_records(room=ROOM) == records[1:]


async def test_migrations_match_schema_module(store: SqlStore) -> None:
    # other packages' tables live on the store's MetaData once their schema module loads
    importlib.import_module("medrelay_server.register.schema")

    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, metadata))

    async with store._db.read() as conn:
        assert await conn.run_sync(diff) == []


async def test_unreachable_postgres_is_unavailable() -> None:
    store = SqlStore("postgresql+asyncpg://postgres@127.0.0.1:1/test", schema="x")
    try:
        with pytest.raises(StoreUnavailable):
            await store.open()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.room_state(ROOM)
    finally:
        await store.close()


async def test_last_seqs_and_current_rooms_read_many_names_at_once(store: SqlStore) -> None:
    """The slow poll's reads (``Delivery.resync`` and ``resync_users``): one read for every
    subscribed room and every connected user, however many (names go in chunks)."""
    await new_room(store)
    await new_room(store, "room-2", owner="bob")
    await change(store, 2, MembershipChange(add={"bob": "member", "carol": "member"}))
    await change(store, 3, MembershipChange(remove=["carol"]), rekey={"alice-1": b"w"})
    await send(store, "bob", room="room-2")
    unknown = [f"nobody-{i}" for i in range(2 * rooms.IN_CHUNK + 1)]
    last = await store.last_seqs([*unknown[:700], ROOM, "room-2", *unknown[700:]])
    state, state2 = await store.room_state(ROOM), await store.room_state("room-2")
    assert state is not None and state2 is not None
    assert last == {ROOM: state.last_seq, "room-2": state2.last_seq}
    current = await store.current_rooms([*unknown, "alice", "bob", "carol"])
    assert current == {"alice": {ROOM}, "bob": {ROOM, "room-2"}}  # carol was removed
    assert await store.last_seqs([]) == {} and await store.current_rooms([]) == {}
