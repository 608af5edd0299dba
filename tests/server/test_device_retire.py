"""The device lifecycle job (``medrelay_server.devices_admin``) on SQLite and PostgreSQL, with
a fake clock: devices unseen for the period are retired like a revocation (directory flag,
rooms pending a rekey, journaled), connected devices never are, revoking is idempotent
across nodes, and live connections of a device revoked elsewhere are closed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import sqlalchemy as sa
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.clock import FakeClock
from medrelay_server.devices_admin import (
    LifecycleTimes,
    check_live,
    retire_job,
    retire_unseen,
    revoke_device,
)
from medrelay_server.gateway.connection import Connection
from medrelay_server.settings import Settings
from medrelay_server.store.base import AuditRecord, DeviceRecord
from medrelay_server.store.lifecycle import REVOKED_CHANNEL
from medrelay_server.store.sql import SqlStore

from ..polling import until

if TYPE_CHECKING:
    from .conftest import StoreBackend

START = 1_800_000_000
DAY = 86_400
PERIOD = 30 * DAY
DEADLINE = 10.0


class Live:
    """This node's live connections: real ``Connection`` objects whose socket is a recorder."""

    def __init__(self) -> None:
        self.conns: list[Connection] = []
        self.closed: dict[str, int] = {}
        self.changed = asyncio.Event()

    def connect(self, user: str, device: str) -> Connection:
        async def send(_data: bytes) -> None:
            return None

        async def close(code: int, _reason: str) -> None:
            self.closed[device] = code
            self.changed.set()

        conn = Connection(user, device, b"k" * 32, "person", send, close, 8, START + DAY)
        self.conns.append(conn)
        return conn

    def all(self) -> Iterable[Connection]:
        return tuple(c for c in self.conns if not c.closed)

    async def wait_closed(self, device: str) -> int:
        async with asyncio.timeout(DEADLINE):
            while device not in self.closed:
                self.changed.clear()
                await self.changed.wait()
        return self.closed[device]


def device(user: str, n: int = 1, *, created: int = START) -> DeviceRecord:
    return DeviceRecord(user, f"{user}-{n}", b"k" * 32, b"cert", b"bundle", "phone", False, created)


async def room_of(store: SqlStore, room: str, owner: str) -> None:
    await store.create_room(
        room,
        genesis=b"genesis",
        head=b"head",
        owner=owner,
        sender_device=f"{owner}-1",
        manifest=b"manifest",
        wraps={f"{owner}-1": b"wrap"},
        now=START,
        audit=[AuditRecord("room_create", "success", user=owner)],
    )


async def actions(store: SqlStore, action: str) -> list[AuditRecord]:
    return [r for r in await store.audit_records() if r.action == action]


async def test_unseen_device_is_retired_like_a_revocation(store: SqlStore) -> None:
    clock = FakeClock(START)
    await store.put_device(device("alice"))
    await store.put_device(device("bob"))
    await room_of(store, "ward-7", "alice")
    before = await store.room_state("ward-7")
    assert before is not None and not before.pending_rekey
    clock.advance(PERIOD - 10)
    await store.touch_device("bob-1", clock.now())  # bob used it recently
    clock.advance(20)

    retired = await retire_unseen(store, now=clock.now(), after_seconds=PERIOD)

    assert [(r.device, r.user, r.rooms) for r in retired] == [("alice-1", "alice", ("ward-7",))]
    alice, bob = await store.get_device("alice-1"), await store.get_device("bob-1")
    assert alice is not None and alice.revoked
    assert bob is not None and not bob.revoked
    after = await store.room_state("ward-7")
    assert after is not None and after.pending_rekey
    assert after.device_list_version == before.device_list_version + 1
    (record,) = await actions(store, "device_retire")
    assert record.target == "alice-1" and record.user is None and record.ts == clock.now()
    assert record.detail is not None and "unseen for 30 days" in record.detail
    assert await retire_unseen(store, now=clock.now(), after_seconds=PERIOD) == []
    assert len(await actions(store, "device_retire")) == 1


async def test_a_connected_device_is_never_retired(store: SqlStore) -> None:
    """Touched at open and then connected for longer than the period: the pass touches this
    node's live devices first, so it is not taken for unseen."""
    clock = FakeClock(START)
    live = Live()
    await store.put_device(device("carol"))
    await store.touch_device("carol-1", clock.now())  # what the endpoint does at open
    live.connect("carol", "carol-1")
    for _ in range(3):
        clock.advance(PERIOD)
        retired = await retire_unseen(
            store, now=clock.now(), after_seconds=PERIOD, connections=live.all
        )
        assert retired == []
    record = await store.get_device("carol-1")
    assert record is not None and not record.revoked and record.last_seen == clock.now()
    assert live.closed == {}


async def test_a_device_seen_meanwhile_is_not_retired(store: SqlStore) -> None:
    """The decision is re-checked under the row lock: a device that connected after it was
    listed as unseen stays."""
    clock = FakeClock(START)
    await store.put_device(device("dan"))
    clock.advance(PERIOD + 1)
    (unseen,) = await store.unseen_devices(clock.now() - PERIOD, limit=10)
    await store.touch_device(unseen.device_id, clock.now())  # connects on another node
    done = await revoke_device(
        store,
        unseen.device_id,
        now=clock.now(),
        reason="unseen",
        actor=None,
        action="device_retire",
        unseen_before=clock.now() - PERIOD,
    )
    assert done is None
    record = await store.get_device("dan-1")
    assert record is not None and not record.revoked


async def test_retiring_on_two_nodes_at_once_revokes_once(store_backend: StoreBackend) -> None:
    one, two = await store_backend.open("node-1"), await store_backend.open("node-2")
    for n in range(5):
        await one.put_device(device("erin", n))
    await room_of(one, "ward-9", "erin")
    before = await one.room_state("ward-9")
    now = START + PERIOD + 1
    a, b = await asyncio.gather(
        retire_unseen(one, now=now, after_seconds=PERIOD, batch=2),
        retire_unseen(two, now=now, after_seconds=PERIOD, batch=2),
    )
    assert sorted(r.device for r in (*a, *b)) == [f"erin-{n}" for n in range(5)]
    assert len(await actions(one, "device_retire")) == 5
    after = await one.room_state("ward-9")
    assert before is not None and after is not None
    assert after.device_list_version == before.device_list_version + 5


async def test_admin_revocation_cuts_off_and_is_journaled(store_backend: StoreBackend) -> None:
    """An administrator revokes on one node; the other node's live connection of the device
    is closed at its next check of live connections against the directory."""
    one, two = await store_backend.open("node-1"), await store_backend.open("node-2")
    clock = FakeClock(START)
    await one.put_device(device("fay"))
    await one.put_device(device("fay", 2))
    here, there = Live(), Live()
    here.connect("fay", "fay-1")
    there.connect("fay", "fay-1")
    there.connect("fay", "fay-2")

    done = await revoke_device(
        one, "fay-1", now=clock.now(), reason="phone lost on ward 7", connections=here.all
    )

    assert done is not None and done.user == "fay"
    (mine,) = here.conns
    assert mine.closed and mine.close_code == CloseCode.DEVICE_REVOKED  # this node: at once
    assert await here.wait_closed("fay-1") == CloseCode.DEVICE_REVOKED
    assert await check_live(two, there.all) == 1
    assert await there.wait_closed("fay-1") == CloseCode.DEVICE_REVOKED
    assert "fay-2" not in there.closed
    (record,) = await actions(one, "device_revoke")
    assert (record.user, record.target) == ("admin", "fay-1")
    assert record.detail is not None and record.detail.endswith("phone lost on ward 7")
    again = await revoke_device(one, "fay-1", now=clock.now(), reason="again")
    assert again is None and len(await actions(one, "device_revoke")) == 1
    with pytest.raises(RequestError) as info:
        await revoke_device(one, "no-such-device", now=clock.now(), reason="typo")
    assert info.value.code == ErrorCode.NOT_FOUND


async def test_the_job_retires_and_touches_on_its_own(store: SqlStore) -> None:
    """The background job: a pass every quarter period (the first one interval after start)
    retires the unseen device and keeps the connected one, and stops on its event."""
    clock = FakeClock(START)
    live = Live()
    await store.put_device(device("gus"))
    await store.put_device(device("hal"))
    live.connect("hal", "hal-1")
    clock.advance(PERIOD + 1)
    settings = Settings(device_retire_after_seconds=PERIOD)
    assert LifecycleTimes.of(settings) == LifecycleTimes(PERIOD, 30.0, 3600.0)
    fast = LifecycleTimes(PERIOD, check_every=0.05, touch_every=0.1)  # passes in real time
    stop = asyncio.Event()
    job = retire_job(store, settings, clock, connections=live.all, times=fast)
    task = asyncio.create_task(job(stop))

    async def gus_retired() -> bool:
        record = await store.get_device("gus-1")
        return record is not None and record.revoked

    await until(gus_retired, timeout=DEADLINE)
    stop.set()
    async with asyncio.timeout(DEADLINE):
        await task
    hal = await store.get_device("hal-1")
    assert hal is not None and not hal.revoked and hal.last_seen == clock.now()


async def test_the_job_closes_connections_of_devices_revoked_elsewhere(
    store_backend: StoreBackend,
) -> None:
    """The periodic check of live connections against the directory (the bound when no
    notification arrives) closes a device another node revoked."""
    one, two = await store_backend.open("node-1"), await store_backend.open("node-2")
    clock = FakeClock(START)
    await one.put_device(device("ivy"))
    live = Live()
    live.connect("ivy", "ivy-1")
    settings = Settings(device_retire_after_seconds=0, device_check_interval_seconds=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(retire_job(one, settings, clock, connections=live.all)(stop))
    try:
        await revoke_device(two, "ivy-1", now=clock.now(), reason="stolen")
        assert await live.wait_closed("ivy-1") == CloseCode.DEVICE_REVOKED
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await task


@pytest.mark.postgres
@pytest.mark.parametrize("store_backend", ["postgres"], indirect=True)
async def test_notify_reaches_the_job_at_once(store_backend: StoreBackend) -> None:
    """On PostgreSQL the revocation's NOTIFY closes the connection on another node without
    waiting for the periodic check (set to an hour here)."""
    one, two = await store_backend.open("node-1"), await store_backend.open("node-2")
    clock = FakeClock(START)
    await one.put_device(device("jon"))
    live = Live()
    live.connect("jon", "jon-1")
    listeners = await _listeners(one)
    settings = Settings(device_retire_after_seconds=0, device_check_interval_seconds=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(retire_job(one, settings, clock, connections=live.all)(stop))
    try:

        async def listening() -> bool:
            return await _listeners(one) > listeners

        await until(listening, timeout=DEADLINE)
        await revoke_device(two, "jon-1", now=clock.now(), reason="stolen")
        assert await live.wait_closed("jon-1") == CloseCode.DEVICE_REVOKED
    finally:
        stop.set()
        async with asyncio.timeout(DEADLINE):
            await task


async def _listeners(store: SqlStore) -> int:
    """Sessions of this database that listen on the revocation channel."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query ILIKE :listen"
    )
    async with store.database.read() as conn:
        found = await conn.execute(query, {"listen": f"LISTEN%{REVOKED_CHANNEL}%"})
        return int(found.scalar_one())


def test_cli_revoke_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``medrelay admin revoke-device`` on the embedded SQLite database: revoked, journaled;
    a second run says so; an unknown device is an error."""
    from medrelay_server.cli import main

    url = f"sqlite+aiosqlite:///{tmp_path / 'medrelay.sqlite3'}"

    async def prepare() -> None:
        store = SqlStore(url, node_id="node-1")
        await store.open()
        try:
            await store.put_device(device("kim"))
            await room_of(store, "ward-3", "kim")
        finally:
            await store.close()

    async def journaled() -> list[AuditRecord]:
        store = SqlStore(url, node_id=None)
        await store.open()
        try:
            return await actions(store, "device_revoke")
        finally:
            await store.close()

    asyncio.run(prepare())
    base = ["admin", "revoke-device", "--data-dir", str(tmp_path)]
    assert main([*base, "--device", "kim-1", "--reason", "lost in the car park"]) == 0
    assert "revoked; 1 rooms pending a rekey" in capsys.readouterr().out
    assert main([*base, "--device", "kim-1"]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert main([*base, "--device", "nobody-1"]) == 1
    assert "no such device" in capsys.readouterr().err
    (record,) = asyncio.run(journaled())
    assert (record.user, record.target) == ("admin", "kim-1")
    assert record.detail is not None and record.detail.endswith("lost in the car park")
