"""A room change checks the signatures of the member devices it has not seen before, not
every member's certificate and bundle again (``medrelay_protocol.verified``), on the server
and in the client that builds the rekey. A device revoked in the directory after its
outcome was kept is no longer a recipient (the roster's revocations, issue times and roles
with kept outcomes: ``tests/protocol/test_roster.py``; expiry:
``tests/protocol/test_verified_devices.py``)."""

from __future__ import annotations

from .conftest import Harness
from .test_device_revocation import _second_device


async def test_a_change_checks_only_the_devices_not_seen_before(harness: Harness) -> None:
    alice = await harness.client("alice")
    for user in ("bob", "carol", "dave"):
        await harness.client(user)
    room = await alice.create_room()
    await alice.add(room, "bob")
    await alice.add(room, "carol")
    server, client = harness.gateway.devices_checked, alice.logic.devices_checked
    before = (server.checks, client.checks)
    await alice.add(room, "dave")
    # dave's certificate and bundle only; alice's, bob's and carol's were kept
    assert (server.checks - before[0], client.checks - before[1]) == (2, 2)
    before = (server.checks, client.checks)
    await alice.remove(room, "carol")
    assert (server.checks, client.checks) == before
    assert sorted(await harness.store.members(room)) == ["alice", "bob", "dave"]


async def test_a_device_revoked_in_the_directory_is_left_out_without_new_checks(
    harness: Harness,
) -> None:
    alice = await harness.client("alice")
    phone = await _second_device(harness, alice)
    await harness.client("bob")
    room = await alice.create_room()
    await alice.add(room, "bob")  # alice's phone's certificate and bundle are kept
    await phone.wait_for_key(room)
    checks = harness.gateway.devices_checked.checks
    assert await alice.revoke_device(phone.keys.device_id) == [room]
    # the rekey wrapped to alice's and bob's devices only: the server refuses any other
    # set (RECIPIENTS_MISMATCH), and it checked no signature again to know that
    assert harness.gateway.devices_checked.checks == checks
    state = await harness.store.room_state(room)
    assert state is not None and not state.pending_rekey
    record = await harness.store.get_device(phone.keys.device_id)
    assert record is not None and record.revoked
