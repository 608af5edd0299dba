"""The server-side device lifecycle with a real server on port 0 and real clients, on SQLite
and on PostgreSQL: a device unseen for the retirement period is retired (its rooms pending,
the next send rotates the epoch without it, it cannot connect again) while a connected one
is kept; an administrator's revocation from the CLI's function, run with a store of its own
as the CLI process would, cuts off a live connection and is journaled."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import sqlalchemy as sa
from medrelay_client.keystore import KeyStore
from medrelay_protocol import codec
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.epochs import RekeyManifest
from medrelay_protocol.frames import Challenge, Error
from medrelay_server.clock import SystemClock
from medrelay_server.devices_admin import (
    LifecycleTimes,
    admin_revoke,
    retire_job,
    retire_unseen,
)
from medrelay_server.gateway.connection import Connection
from medrelay_server.settings import Settings
from medrelay_server.store.lifecycle import REVOKED_CHANNEL

from ..polling import until
from .conftest import Harness
from .rawclient import TIMEOUT, RawClient, close_code_after, connect_ws, hello_for, recv_frame

PERIOD = 30 * 86_400


def live(h: Harness) -> Iterable[Connection]:
    return h.gateway.registry.all()


async def until_gone(h: Harness, device: str) -> None:
    """Wait until the server has finished with the device's last connection."""

    async def gone() -> bool:
        return not any(c.device == device for c in live(h))

    await until(gone, timeout=TIMEOUT)


async def refused_at_handshake(h: Harness, keys: KeyStore) -> tuple[int | None, list[int]]:
    ws = await connect_ws(h.server.url, token=h.token(keys.user))
    challenge = await recv_frame(ws)
    assert isinstance(challenge, Challenge)
    await ws.send(codec.encode(hello_for(keys, challenge.nonce)))
    code, frames = await close_code_after(ws)
    return code, [f.code for f in frames if isinstance(f, Error)]


async def rekey_after(h: Harness, room: str, seq: int) -> RekeyManifest:
    """The rekey manifest committed after ``seq`` (verified under its committer's key)."""
    for ev in await h.store.room_events(room, seq, limit=50):
        if ev.kind == "rekey":
            committer = await h.store.get_device(ev.sender_device)
            assert committer is not None
            return RekeyManifest.verify(ev.payload, committer.signing_key)
    raise AssertionError("no rekey")


async def test_unseen_device_is_retired_and_a_connected_one_kept(node: Harness) -> None:
    h = node
    alice, bob = await h.client("alice"), await h.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    mine, his = alice.keys.device_id, bob.keys.device_id
    await bob.close()  # bob's phone stays in a drawer
    await until_gone(h, his)

    async def touched_at_close() -> bool:
        record = await h.store.get_device(his)
        return record is not None and record.last_seen is not None

    await until(touched_at_close, timeout=TIMEOUT)
    state = await h.store.room_state(room)
    assert state is not None and not state.pending_rekey
    last = state.last_seq

    # a whole period later; alice has been connected all along
    now = SystemClock().now() + PERIOD + 60
    retired = await retire_unseen(
        h.store, now=now, after_seconds=PERIOD, connections=lambda: live(h)
    )

    assert [(r.device, r.user, r.rooms) for r in retired] == [(his, "bob", (room,))]
    kept, gone = await h.store.get_device(mine), await h.store.get_device(his)
    assert kept is not None and not kept.revoked and kept.last_seen == now
    assert gone is not None and gone.revoked
    state = await h.store.room_state(room)
    assert state is not None and state.pending_rekey
    audit = [r for r in await h.store.audit_records() if r.action == "device_retire"]
    assert [r.target for r in audit] == [his]
    assert audit[0].detail is not None and "unseen for 30 days" in audit[0].detail

    await alice.send_text(room, "bob's old phone must not read this")
    state = await h.store.room_state(room)
    assert state is not None and not state.pending_rekey
    manifest = await rekey_after(h, room, last)
    assert set(manifest.recipients) == {mine}  # bob has no device left to wrap to

    bob_keys = KeyStore.load_or_create("bob", h.tmp / "keys" / "bob")
    code, errors = await refused_at_handshake(h, bob_keys)
    assert code == CloseCode.DEVICE_REVOKED and errors == [ErrorCode.FORBIDDEN]


async def test_a_device_is_touched_when_its_connection_opens(node: Harness) -> None:
    h = node
    keys = KeyStore.load_or_create("carol", h.tmp / "keys" / "carol")
    first = await RawClient.open(h.server.url, keys, h.token("carol"))
    await first.close()
    await until_gone(h, keys.device_id)
    await h.store.touch_device(keys.device_id, 1)  # as if last seen long ago
    opened_at = SystemClock().now()
    second = await RawClient.open(h.server.url, keys, h.token("carol"), register=False)
    await h.gateway.journal.flush()  # last seen is stored with the journal's next flush
    record = await h.store.get_device(keys.device_id)
    assert record is not None and record.last_seen is not None
    assert record.last_seen >= opened_at
    await second.close()


async def test_admin_revocation_from_the_cli_cuts_off_a_live_connection(node: Harness) -> None:
    """The CLI runs in another process: it opens the database with a store of its own. The
    node hears of it by PostgreSQL NOTIFY (the periodic check is set to an hour there) or, on
    SQLite, at its periodic check of live connections against the directory."""
    h = node
    postgres = h.store.database.is_sqlite is False
    check = 3600.0 if postgres else 0.1
    settings = Settings(device_check_interval_seconds=check)
    times = LifecycleTimes(retire_after=0, check_every=check, touch_every=3600.0)
    listeners = await _listeners(h) if postgres else 0
    stop = asyncio.Event()
    job = retire_job(h.store, settings, SystemClock(), connections=lambda: live(h), times=times)
    task = asyncio.create_task(job(stop))
    try:
        if postgres:

            async def listening() -> bool:
                return await _listeners(h) > listeners

            await until(listening, timeout=TIMEOUT)
        alice = await h.client("alice")
        phone_keys = KeyStore.load_or_create("bob", h.tmp / "keys" / "bob")
        phone = await RawClient.open(h.server.url, phone_keys, h.token("bob"))
        room = await alice.create_room()
        await alice.add(room, "bob")

        done = await admin_revoke(
            h.store.database.engine.url.render_as_string(hide_password=False),
            phone_keys.device_id,
            reason="phone reported lost to IT, ticket 4411",
            now=SystemClock().now(),
            schema=h.store.database.schema,
            node_id="admin",
        )

        assert done is not None and done.rooms == (room,)
        code, _frames = await phone.closed_with()
        assert code == CloseCode.DEVICE_REVOKED
    finally:
        stop.set()
        async with asyncio.timeout(TIMEOUT):
            await task
    (record,) = [r for r in await h.store.audit_records() if r.action == "device_revoke"]
    assert (record.user, record.target) == ("admin", phone_keys.device_id)
    assert record.detail is not None and record.detail.endswith("ticket 4411")
    state = await h.store.room_state(room)
    assert state is not None and state.pending_rekey
    await alice.send_text(room, "after the phone was lost")
    manifest = await rekey_after(h, room, state.last_seq)
    assert phone_keys.device_id not in manifest.recipients
    code, errors = await refused_at_handshake(h, phone_keys)
    assert code == CloseCode.DEVICE_REVOKED and errors == [ErrorCode.FORBIDDEN]


async def _listeners(h: Harness) -> int:
    """PostgreSQL sessions listening on the revocation channel."""
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND query ILIKE :listen"
    )
    async with h.store.database.read() as conn:
        found = await conn.execute(query, {"listen": f"LISTEN%{REVOKED_CHANNEL}%"})
        return int(found.scalar_one())
