"""A stolen token alone cannot act as the user: the thief's own device is not certified by
the user's identity key, so it can neither register nor touch any room (I5)."""

from __future__ import annotations

import os

from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.frames import Error, History, ListRooms, RegisterDevice, Send, Sync
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate

from .conftest import Harness
from .rawclient import RawClient


async def test_stolen_token_with_a_new_device_is_refused(harness: Harness) -> None:
    alice = await harness.client("alice")
    room = await alice.create_room()
    await alice.send_text(room, "confidential")
    thief = KeyStore.create("alice")  # same user name, the thief's own keys
    raw = await RawClient.open(harness.server.url, thief, harness.token("alice"), register=False)
    try:
        for frame in (
            Sync(rid="s", rooms={room: 0}),
            History(rid="h", room=room, before=0, limit=10),
            ListRooms(rid="l"),
            Send(rid="x", room=room, mid=os.urandom(16), envelope=b"\x90"),
        ):
            reply = await raw.request(frame)
            assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_DEVICE
        cert = DeviceCertificate.issue(thief.identity, "alice", thief.device.public, "person", 1)
        bundle = DeviceBundle.issue(thief.device, thief.receiving.public, 2**40)
        register = RegisterDevice(
            rid="r", identity_key=thief.identity.public, certificate=cert.raw, bundle=bundle.raw
        )
        reply = await raw.request(register)
        assert isinstance(reply, Error) and reply.code == ErrorCode.ALREADY_EXISTS
        after = await raw.request(ListRooms(rid="l2"))
        assert isinstance(after, Error) and after.code == ErrorCode.UNKNOWN_DEVICE
    finally:
        await raw.close()
    assert room in await alice.rooms()  # the genuine device is unaffected
