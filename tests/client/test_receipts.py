"""Receipts the client sends after a burst of deliveries."""

from __future__ import annotations

from typing import Any

from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_protocol.frames import Receipt


class _Session:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    async def send_only(self, frame: Any) -> None:
        self.sent.append(frame)


def _client() -> Client:
    keys = KeyStore.create("dave")
    return Client(url="ws://127.0.0.1:1/ws", keys=keys, token_provider=lambda: "unused")


async def test_a_room_forgotten_within_the_burst_gets_no_receipt_and_stays_forgotten() -> None:
    """The burst held an event of the room and then this user's removal (which forgot the
    room): the receipt for the event is dropped and the room is not recreated, empty, in
    the key store (found by test_removal_during_traffic_cuts_off_exactly_at_L)."""
    client = _client()
    client.keys.room("r1").current = 3
    client.keys.room("r2").current = 1
    client._unreceipted = {"r1": 7, "r2": 4}
    client.keys.forget_room("r1")
    session = _Session()
    await client._flush_receipts(session)  # type: ignore[arg-type]
    assert "r1" not in client.keys.rooms
    assert session.sent == [Receipt(room="r2", seq=4)]
    assert client._unreceipted == {}
