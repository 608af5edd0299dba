"""A node restarted after a crash takes over the journal lease its dead predecessor left,
at once; a live second process for the same node and data directory is refused; another
instance (another data directory, so another holder id) still waits for the lease."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from medrelay_server.journal.verify import verify
from medrelay_server.nodeinstance import NodeInstance, NodeInUse
from medrelay_server.store.base import AuditRecord, NodeFenced, NodeLeaseHeld

from .test_store_contract import NOW, new_room, send

if TYPE_CHECKING:
    from .conftest import StoreBackend


def test_claim_is_exclusive_and_keeps_its_holder(tmp_path: Path) -> None:
    first = NodeInstance.claim(tmp_path, "node-1")
    with pytest.raises(NodeInUse):
        NodeInstance.claim(tmp_path, "node-1")
    other = NodeInstance.claim(tmp_path, "node-2")  # another node id: its own claim
    assert other.holder != first.holder
    holder = first.holder
    first.close()  # as the kernel does when the process dies
    again = NodeInstance.claim(tmp_path, "node-1")
    assert again.holder == holder
    assert stat.S_IMODE(os.stat(again.path).st_mode) == 0o600
    assert holder not in repr(again)
    again.close()
    other.close()


def test_a_damaged_holder_file_gets_a_new_holder(tmp_path: Path) -> None:
    (tmp_path / "node-n1.lock").write_bytes(b"\xff not hex")
    claim = NodeInstance.claim(tmp_path, "n1")
    assert claim.path == tmp_path / "node-n1.lock"
    assert len(claim.holder) == 32 and int(claim.holder, 16) >= 0
    claim.close()


def test_ids_that_are_not_file_names_get_claims_of_their_own(tmp_path: Path) -> None:
    claims = [NodeInstance.claim(tmp_path, n) for n in ("a/b", "a_b", "a:b", "..")]
    assert len({c.path for c in claims}) == len({c.holder for c in claims}) == 4
    assert all(c.path.parent == tmp_path for c in claims)
    for c in claims:
        c.close()


async def test_restart_after_a_crash_takes_the_lease_over(
    store_backend: StoreBackend, tmp_path: Path
) -> None:
    claim = NodeInstance.claim(tmp_path, "node-1")
    crashed = await store_backend.open("node-1", instance_holder=claim.holder)
    await new_room(crashed)
    await send(crashed, mid=b"%016d" % 1)
    claim.close()  # kill -9: no lease release, the lock goes with the process

    # another machine's process (its own holder id) must still wait for the lease
    with pytest.raises(NodeLeaseHeld):
        await store_backend.open("node-1", instance_holder="ab" * 16)

    claim = NodeInstance.claim(tmp_path, "node-1")
    restarted = await store_backend.open("node-1", instance_holder=claim.holder)
    assert restarted.writer.token == (crashed.writer.token or 0) + 1
    # the delivery journal's stream is taken over with it
    assert restarted.delivery_writer.token == (crashed.delivery_writer.token or 0) + 1
    await send(restarted, mid=b"%016d" % 2)
    await restarted.journal([AuditRecord("deliver", "success", user="alice", ts=NOW)])
    with pytest.raises(NodeFenced):  # had the old process survived, it would be fenced
        await send(crashed, mid=b"%016d" % 3)
    with pytest.raises(NodeFenced):
        await crashed.journal([AuditRecord("deliver", "success", user="alice", ts=NOW)])
    assert (await verify(restarted.database, [], b"")).ok
    claim.close()
