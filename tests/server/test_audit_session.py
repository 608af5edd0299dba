"""A scripted session at the store level (sends, deliveries through ``DeliveryJournal``, a
removal, a history read, an attachment), on SQLite and PostgreSQL: ``who_saw`` names
exactly the devices that received each message and when, the journal has a record for
every (device, seq) delivered, and the FHIR export of the session validates as an R4
AuditEvent Bundle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from medrelay_server.clock import FakeClock
from medrelay_server.journal import fhir, queries
from medrelay_server.journal.delivery import DeliveryJournal
from medrelay_server.store.base import AuditRecord, Commit, MembershipChange
from medrelay_server.store.sql import SqlStore

from .test_store_contract import ROOM

if TYPE_CHECKING:
    from .conftest import StoreBackend

T = 1_800_000_000
DEVICES = {"alice-1": "alice", "alice-2": "alice", "bob-1": "bob", "carol-1": "carol"}


class Session:
    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.clock = FakeClock(T)
        self.journal = DeliveryJournal(store, self.clock, max_records=1000)
        self.received: dict[str, dict[int, int]] = {d: {} for d in DEVICES}  # seq -> time
        self.last = dict.fromkeys(DEVICES, 0)

    def tick(self) -> int:
        self.clock.advance(1)
        return self.clock.now()

    async def deliver(self, device: str) -> None:
        """What the gateway does for a connected device: replay/live events through the
        membership filter, write each to the socket, journal the write."""
        user = DEVICES[device]
        events = await self.store.events_after(
            ROOM, self.last[device], user=user, device=device, limit=100
        )
        for ev in events:
            now = self.tick()
            self.received[device][ev.seq] = now
            self.journal.record_written(user, device, ROOM, ev.seq, now)
            self.last[device] = ev.seq

    async def send(self, user: str, mid: bytes, epoch: int) -> int:
        now = self.tick()
        result = await self.store.append_message(
            ROOM,
            user=user,
            device=f"{user}-1",
            mid=mid,
            envelope=b"ciphertext",
            kind="message",
            epoch=epoch,
            allow_pending=False,
            now=now,
            audit=[AuditRecord("message", "success", user=user, device=f"{user}-1", mid=mid)],
        )
        return result.event.seq

    async def commit(
        self, n: int, change: MembershipChange, target: str, rekey: bool = False
    ) -> None:
        state = await self.store.room_state(ROOM)
        assert state is not None
        wraps = {d: b"wrap" for d, u in DEVICES.items() if u != target} if rekey else {}
        await self.store.commit(
            Commit(
                ROOM,
                state.roster_head,
                state.epoch,
                "alice",
                "alice-1",
                entry=b"entry-%d" % n,
                new_head=b"head-%d" % n,
                membership=change,
                manifest=b"manifest" if rekey else None,
                wraps=wraps,
                new_epoch=state.epoch + 1 if rekey else None,
            ),
            now=self.tick(),
            audit=[
                AuditRecord(
                    "membership_change", "success", user="alice", device="alice-1", target=target
                )
            ],
        )


async def _script(store: SqlStore) -> Session:
    s = Session(store)
    await store.create_room(
        ROOM,
        genesis=b"genesis",
        head=b"head-1",
        owner="alice",
        sender_device="alice-1",
        manifest=b"manifest-1",
        wraps={"alice-1": b"w", "alice-2": b"w"},
        now=s.tick(),
        audit=[AuditRecord("room_create", "success", user="alice", device="alice-1")],
    )
    await s.commit(2, MembershipChange(add={"bob": "member"}), "bob")  # seq 3
    assert await s.send("alice", b"1" * 16, 1) == 4
    assert await s.send("bob", b"2" * 16, 1) == 5
    for device in ("alice-1", "alice-2", "bob-1"):
        await s.deliver(device)
    s.journal.record_acked("bob", "bob-1", ROOM, 5, s.tick(), previous=0)
    await s.commit(3, MembershipChange(remove=["bob"]), "bob", rekey=True)  # seqs 6, 7
    assert await s.send("alice", b"3" * 16, 2) == 8
    for device in ("alice-1", "bob-1"):  # alice-2 is offline
        await s.deliver(device)
    await s.commit(
        4, MembershipChange(add={"carol": "member"}, history_from_seq={"carol": 4}), "carol"
    )
    history = await store.events_before(ROOM, 9, user="carol", device="carol-1", limit=50)
    await store.journal(
        [
            AuditRecord(
                "history_read",
                "success",
                user="carol",
                device="carol-1",
                room=ROOM,
                seq_from=history[0].seq,
                seq_to=history[-1].seq,
                ts=s.tick(),
            )
        ]
    )
    await store.put_chunk(
        ROOM,
        b"blob",
        0,
        b"chunk",
        True,
        user="alice",
        now=s.tick(),
        max_blob_bytes=99,
        max_room_bytes=99,
    )
    await store.journal(
        [AuditRecord("attachment_upload", "success", user="alice", room=ROOM, ts=s.clock.now())]
    )
    s.last["carol-1"] = history[-1].seq  # the client resumes live after its history page
    await s.deliver("carol-1")
    await s.deliver("alice-2")  # back online: gets 6..9
    await s.journal.close()
    return s


async def test_who_saw_matches_what_devices_received(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    s = await _script(store)
    assert 8 not in s.received["bob-1"] and 6 in s.received["bob-1"]  # cut at the removal
    async with store.database.read() as conn:
        for seq in range(1, 10):
            sightings = await queries.who_saw(conn, ROOM, seq)
            delivered = {x.device: x for x in sightings if x.via == "deliver"}
            expected = {d: got[seq] for d, got in s.received.items() if seq in got}
            assert set(delivered) == set(expected), seq
            for device, when in expected.items():
                x = delivered[device]
                assert x.delivered_at is not None and x.delivered_by is not None
                assert x.delivered_at <= when <= x.delivered_by, (seq, device)
        # carol was given 4..8 as history: she "saw" them by history read, not delivery
        [carol] = [x for x in await queries.who_saw(conn, ROOM, 5) if x.device == "carol-1"]
        assert (carol.via, carol.user) == ("history_read", "carol")
        [bob] = [x for x in await queries.who_saw(conn, ROOM, 5) if x.device == "bob-1"]
        assert bob.acknowledged_at is not None and bob.acknowledged_at > (bob.delivered_at or 0)
        assert await queries.seq_of_mid(conn, ROOM, b"3" * 16) == 8
        assert await queries.seq_of_mid(conn, ROOM, b"9" * 16) is None
        records = await queries.trail(conn, room=ROOM)
    # one record may cover a range; together they cover exactly what was received
    covered = set()
    for e in records:
        r = e.record
        if r.action == "deliver":
            assert r.seq_from is not None and r.seq_to is not None and r.device is not None
            covered |= {(r.device, q) for q in range(r.seq_from, r.seq_to + 1)}
    assert covered == {(d, q) for d, got in s.received.items() for q in got}
    # alice-1 went offline after seq 8
    assert sum(len(got) for got in s.received.values()) == 8 + 9 + 4 + 1
    deliveries = [e for e in records if e.record.action == "deliver"]
    assert len(deliveries) < len(covered)  # batched


async def test_trail_filters(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    s = await _script(store)
    async with store.database.read() as conn:
        bob = await queries.trail(conn, user="bob")
        later = await queries.trail(conn, since=T + 20)
        early = await queries.trail(conn, until=T + 3)
    actions = [e.record.action for e in bob]
    assert actions.count("membership_change") == 2  # added and removed (as target)
    assert {"message", "deliver", "receipt"} <= set(actions)
    assert all(e.record.ts >= T + 20 for e in later) and later
    assert [e.record.action for e in early] == ["room_create", "membership_change"]
    assert s.clock.now() > T + 20


async def test_fhir_export_validates(store_backend: StoreBackend) -> None:
    store = await store_backend.open()
    await _script(store)
    async with store.database.read() as conn:
        entries = await queries.trail(conn)
    doc = fhir.bundle(entries, now=T + 100)
    bundle = Bundle.model_validate(doc)
    assert bundle.type == "collection" and len(bundle.entry or []) == len(entries)
    events = [e.resource for e in bundle.entry or []]
    assert all(isinstance(ev, AuditEvent) for ev in events)
    by_action = {
        ev.subtype[0].code: ev for ev in events if isinstance(ev, AuditEvent) and ev.subtype
    }
    deliver = by_action["deliver"]
    assert isinstance(deliver, AuditEvent)
    assert (deliver.type.code, deliver.action, deliver.outcome) == ("110106", "R", "0")
    assert deliver.source.type is not None and deliver.source.type[0].code == "4"
    assert by_action["membership_change"].type.code == "110136"
    assert by_action["history_read"].type.code == "110112"
    assert by_action["attachment_upload"].type.code == "110107"
    assert by_action["message"].action == "C"
    assert "ciphertext" not in bundle.model_dump_json()
