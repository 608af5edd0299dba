"""A lost device revoked by its user is cut off from every room at once, every room rotates
to an epoch it never receives, and it cannot connect again."""

from __future__ import annotations

import pytest
from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_protocol import codec
from medrelay_protocol.codes import CloseCode
from medrelay_protocol.envelope import Envelope, open_message
from medrelay_protocol.errors import DecryptionFailed
from medrelay_protocol.frames import Challenge

from .conftest import Harness
from .rawclient import close_code_after, collect_until, connect_ws, hello_for, recv_frame


async def _second_device(h: Harness, first: Client) -> Client:
    """The user's second phone: its own device keys, certified by the same identity key
    (shared through the user's encrypted key backup)."""
    keys = KeyStore.create(first.user, None)
    keys.identity = first.keys.identity

    async def token() -> str:
        return h.token(first.user)

    phone = Client(h.server.url, keys, token)
    h.clients.append(phone)
    await phone.start()
    return phone


async def test_revoked_device_is_cut_off_everywhere(harness: Harness) -> None:
    alice = await harness.client("alice")
    phone = await _second_device(harness, alice)
    bob = await harness.client("bob")
    rooms = []
    for _ in range(2):
        room = await alice.create_room()
        await alice.add(room, "bob")
        rooms.append(room)
    for room in rooms:
        await phone.wait_for_key(room)
    kept = {room: dict(phone.keys.room(room).epochs) for room in rooms}
    rotated = await alice.revoke_device(phone.keys.device_id)
    assert sorted(rotated) == sorted(rooms)
    record = await harness.store.get_device(phone.keys.device_id)
    assert record is not None and record.revoked
    for room in rooms:
        seq = await bob.send_text(room, "after the phone was lost")
        events = await harness.store.room_events(room, seq - 1, limit=1)
        env = Envelope.decode(events[0].payload)
        assert env.header.epoch > max(kept[room])
        bob_key = (await harness.store.get_device(bob.keys.device_id)).signing_key  # type: ignore[union-attr]
        for secret in kept[room].values():
            with pytest.raises(DecryptionFailed):
                open_message(env, sender_key=bob_key, epoch_secret=secret)
    await phone.close()
    ws = await connect_ws(harness.server.url, token=harness.token("alice"))
    challenge = await recv_frame(ws)
    assert isinstance(challenge, Challenge)
    await ws.send(codec.encode(hello_for(phone.keys, challenge.nonce)))
    code, _frames = await close_code_after(ws)
    assert code == CloseCode.DEVICE_REVOKED
    audit = await harness.store.audit_records()
    assert any(r.action == "device_revoke" and r.target == phone.keys.device_id for r in audit)


async def test_a_device_certified_later_gets_the_next_epoch(harness: Harness) -> None:
    """Bob adds a second phone after the room exists: the room goes pending, the next
    member to send rotates the epoch to exactly the certified devices, phone included."""
    alice, bob = await harness.client("alice"), await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    before = (await harness.store.room_state(room)).epoch  # type: ignore[union-attr]
    phone = await _second_device(harness, bob)
    state = await harness.store.room_state(room)
    assert state is not None and state.pending_rekey
    seq = await alice.send_text(room, "for both of bob's devices")
    state = await harness.store.room_state(room)
    assert state is not None and not state.pending_rekey and state.epoch == before + 1
    got = await collect_until(phone, "for both of bob's devices")
    assert got[-1].seq == seq and got[-1].problem is None


async def test_rotated_receiving_key_is_used_and_old_wraps_still_open(harness: Harness) -> None:
    alice, bob = await harness.client("alice"), await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")
    await bob.wait_for_key(room)
    old = bob.keys.receiving.public
    bob.keys.receiving_since -= 8 * 86400  # a week has passed
    await bob.close()
    bob2 = await harness.client("bob")  # connects: rotates and publishes a new bundle
    assert bob2.keys.receiving.public != old
    assert old in [k.public for k in bob2.keys.receiving_keys()]
    alice.logic.max_epoch_messages = 1  # rotate the room epoch after each message
    await alice.send_text(room, "first")
    await alice.send_text(room, "second, under an epoch wrapped to the new key")
    got = await collect_until(bob2, "second, under an epoch wrapped to the new key")
    texts = [m.body["text"] for m in got if m.kind == "message" and m.problem is None]
    assert texts[-2:] == ["first", "second, under an epoch wrapped to the new key"]
