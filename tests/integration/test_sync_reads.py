"""``sync`` checks the membership of every named room from the one read of the user's
current rooms it makes anyway, not with a read per named room (a reconnect storm is
thousands of syncs at once)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.frames import Error, Sync, Synced

from .conftest import Harness
from .rawclient import RawClient


async def test_sync_checks_named_rooms_in_the_one_read_of_the_users_rooms(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = await harness.client("alice")
    # a raw client: it sends nothing but what the test sends (no receipts)
    carol = await RawClient.open(
        harness.server.url, KeyStore.create("carol"), harness.token("carol")
    )
    try:
        rooms = [await alice.create_room() for _ in range(3)]
        for room in rooms[:2]:
            await alice.add(room, "carol")
        calls: Counter[str] = Counter()
        for name in ("member_role", "rooms_for_user"):
            original = getattr(harness.store, name)

            async def counted(*args: Any, _name: str = name, _f: Any = original) -> Any:
                if "carol" in args:  # alice's client reads too, at its own pace
                    calls[_name] += 1
                return await _f(*args)

            monkeypatch.setattr(harness.store, name, counted)
        synced = await carol.request(Sync(rid="s1", rooms={rooms[0]: 0, rooms[1]: 0}))
        assert isinstance(synced, Synced) and set(synced.heads) == set(rooms[:2])
        assert calls == Counter(rooms_for_user=1)
        for rid, named in (("s2", rooms[2]), ("s3", "no-such-room")):  # refused as before
            refused = await carol.request(Sync(rid=rid, rooms={rooms[0]: 0, named: 0}))
            assert isinstance(refused, Error) and refused.code == ErrorCode.FORBIDDEN
        assert calls == Counter(rooms_for_user=3)
    finally:
        await carol.close()
