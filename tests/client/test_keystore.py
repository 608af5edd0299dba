"""The key store: 0600 files written atomically, receiving keys rotated with a grace period."""

from __future__ import annotations

import stat
from pathlib import Path

from medrelay_client.keystore import KeyStore

WEEK, GRACE = 7 * 86400, 14 * 86400


def test_file_is_private_and_round_trips(tmp_path: Path) -> None:
    keys = KeyStore.load_or_create("alice", tmp_path / "alice")
    keys.room("r").epochs[1] = b"\x01" * 32
    keys.save()
    path = tmp_path / "alice" / "keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyStore.load_or_create("alice", tmp_path / "alice")
    assert again.device_id == keys.device_id
    assert again.room("r").epochs == {1: b"\x01" * 32}
    assert keys.device.private_bytes().hex() not in repr(again)


def test_receiving_key_rotates_weekly_and_old_keys_are_deleted_after_grace(
    tmp_path: Path,
) -> None:
    keys = KeyStore.load_or_create("bob", tmp_path / "bob")
    t0 = 1_800_000_000
    assert keys.rotate_receiving(t0, every=WEEK, grace=GRACE)  # no date yet: a fresh key
    first = keys.receiving.public
    assert not keys.rotate_receiving(t0 + WEEK - 1, every=WEEK, grace=GRACE)
    assert keys.rotate_receiving(t0 + WEEK, every=WEEK, grace=GRACE)
    assert keys.receiving.public != first
    assert [k.public for k in keys.receiving_keys()] == [keys.receiving.public, first]
    reloaded = KeyStore.load_or_create("bob", tmp_path / "bob")
    assert [k.public for k in reloaded.receiving_keys()][1] == first
    reloaded.rotate_receiving(t0 + WEEK + GRACE, every=WEEK, grace=GRACE)
    assert first not in [k.public for k in reloaded.receiving_keys()]
