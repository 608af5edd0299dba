"""The user's encrypted key backup: opaque to the server, size-bounded, compare-and-set on
its version, only for the user's registered devices."""

from __future__ import annotations

from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.enrolment import MAX_BACKUP, open_backup
from medrelay_protocol.frames import Backup, Error, GetBackup, Ok, PutBackup

from .conftest import Harness
from .rawclient import RawClient


async def test_backup_is_opaque_and_compare_and_set(harness: Harness) -> None:
    alice = await harness.client("alice")
    version = await alice.ensure_backup()
    assert version == 1
    stored = await harness.store.get_backup("alice")
    assert stored is not None and stored[0] == 1
    seed = alice.keys.identity.private_bytes()
    assert seed not in stored[1] and alice.keys.backup_key not in stored[1]
    assert alice.keys.backup_key is not None
    opened = open_backup(alice.keys.backup_key, user_id="alice", version=1, blob=stored[1])
    assert opened.identity_seed == seed and "redacted" in repr(opened)
    assert await alice.ensure_backup() == 1  # already there: nothing written

    raw = await RawClient.open(harness.server.url, alice.keys, harness.token("alice"))
    for version in (1, 3):  # blind overwrite of version 1, or a skipped version
        reply = await raw.request(PutBackup(rid=f"p{version}", version=version, blob=b"x" * 64))
        assert isinstance(reply, Error) and reply.code == ErrorCode.BACKUP_CONFLICT
    reply = await raw.request(PutBackup(rid="big", version=2, blob=b"x" * (MAX_BACKUP + 1)))
    assert isinstance(reply, Error) and reply.code == ErrorCode.QUOTA_EXCEEDED
    reply = await raw.request(PutBackup(rid="ok", version=2, blob=b"y" * MAX_BACKUP))
    assert isinstance(reply, Ok)
    got = await raw.request(GetBackup(rid="g"))
    assert isinstance(got, Backup) and got.version == 2 and got.blob == b"y" * MAX_BACKUP
    # a backup this device cannot open (another device replaced it): sealed again, v3
    assert await alice.ensure_backup() == 3
    await raw.close()


async def test_backup_is_per_user_and_needs_a_registered_device(harness: Harness) -> None:
    alice = await harness.client("alice")
    await alice.ensure_backup()
    bob = await harness.client("bob")
    reply = await bob.request(GetBackup(rid=bob.rid()), Backup)
    assert reply.version == 0 and reply.blob is None
    stranger = KeyStore.create("alice", None, with_identity=False)
    raw = await RawClient.open(harness.server.url, stranger, harness.token("alice"), register=False)
    for frame in (GetBackup(rid="g"), PutBackup(rid="p", version=2, blob=b"z")):
        reply = await raw.request(frame)
        assert isinstance(reply, Error) and reply.code == ErrorCode.UNKNOWN_DEVICE
    await raw.close()
