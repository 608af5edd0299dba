"""Attachments through a real gateway: a multi-MiB image travels encrypted in chunks, is
downloaded and decrypted byte-identical by another member, and its chunks are refused to a
non-member and to a member removed from the room (I2)."""

from __future__ import annotations

import os
from typing import Any

import pytest
from medrelay_client.client import Client, Message
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import BlobChunk, BlobGet, Error

from .conftest import Harness, three_in_a_room
from .rawclient import RawClient, next_of_kind

IMAGE = 5 * 1024 * 1024


async def _file_message(client: Client) -> Message:
    while True:
        m = await next_of_kind(client, timeout=30)
        if isinstance(m.body, dict) and m.body.get("type") == "file":
            return m


async def _chunk(client: Client, blob: bytes, index: int) -> BlobChunk:
    reply: BlobChunk = await client.request(
        BlobGet(rid=client.rid(), blob=blob, index=index), BlobChunk
    )
    return reply


async def _forbidden(client: Client, blob: bytes, index: int) -> None:
    with pytest.raises(RequestError) as refused:
        await _chunk(client, blob, index)
    assert refused.value.code == ErrorCode.FORBIDDEN, (index, refused.value)


async def test_image_round_trip_and_refusals(harness: Harness) -> None:
    alice, bob, carol, room = await three_in_a_room(harness)
    mallory = await harness.client("mallory")  # connected, not a member

    image = os.urandom(IMAGE)
    seq = await alice.send_file(room, image, name="chest-xray.png", mime="image/png")

    m = await _file_message(bob)
    assert m.seq == seq and m.problem is None
    body: dict[str, Any] = m.body
    assert (body["name"], body["mime"], body["size"]) == ("chest-xray.png", "image/png", IMAGE)
    assert body["chunks"] > 1
    assert await bob.download(body) == image

    blob, chunks = body["blob"], int(body["chunks"])
    indexes = sorted({0, chunks // 2, chunks - 1})

    # control: carol, still a member, may fetch chunks
    await _file_message(carol)
    for i in indexes:
        assert (await _chunk(carol, blob, i)).data

    # a non-member gets FORBIDDEN for every chunk, existing or not (no probing)
    for i in [*indexes, chunks + 5]:
        await _forbidden(mallory, blob, i)
    # the same over a raw socket
    raw = await RawClient.open(harness.server.url, mallory.keys, harness.token("mallory"))
    try:
        reply = await raw.request(BlobGet(rid="g0", blob=blob, index=0))
        assert isinstance(reply, Error) and reply.code == ErrorCode.FORBIDDEN
        assert reply.rid == "g0"
    finally:
        await raw.close()

    # a removed member is refused from the instant the removal commits
    await alice.remove(room, "carol")
    for i in indexes:
        await _forbidden(carol, blob, i)

    # members still can
    assert await bob.download(body) == image

    # and the database holds only ciphertext
    db = harness.tmp / "medrelay.sqlite3"
    stored = db.read_bytes()
    wal = db.with_name(db.name + "-wal")
    if wal.exists():
        stored += wal.read_bytes()
    for start in (0, IMAGE // 2, IMAGE - 64):
        assert image[start : start + 64] not in stored
