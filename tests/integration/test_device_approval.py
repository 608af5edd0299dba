"""A new device is approved from an existing one through a comparison code, gets the
identity key from the user's encrypted key backup, and can then approve the next device
after the first one is gone. Real server on port 0, real WebSocket clients."""

from __future__ import annotations

import dataclasses
import time

import pytest
from medrelay_client.client import Client
from medrelay_client.enrolment import DeviceEnrolment
from medrelay_client.keystore import KeyStore, NoIdentity
from medrelay_protocol import codec
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.crypto import SigningKey, fingerprint
from medrelay_protocol.enrolment import CodeMismatch, approval_code
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import (
    Approvals,
    ApprovalStatus,
    ApproveDevice,
    Challenge,
    Error,
    ListApprovals,
    RequestApproval,
)
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate

from .conftest import Harness
from .rawclient import RawClient, close_code_after, collect_until, connect_ws, hello_for, recv_frame


def _enrolment(h: Harness, user: str) -> DeviceEnrolment:
    keys = KeyStore.create(user, None, with_identity=False)

    async def token() -> str:
        return h.token(user)

    return DeviceEnrolment(h.server.url, keys, token)


async def _started(h: Harness, keys: KeyStore) -> Client:
    async def token() -> str:
        return h.token(keys.user)

    client = Client(h.server.url, keys, token)
    h.clients.append(client)
    await client.start()
    return client


async def _approve(h: Harness, approver: Client) -> Client:
    """A new device of the approver's user, approved through the code comparison."""
    new = _enrolment(h, approver.user)
    status = await new.request()
    assert status.state == "pending"
    pending = await approver.wait_for_device_request()
    assert pending.request == status.request
    assert pending.device == new.keys.device_id
    await approver.approve_device(pending.request, new.code)  # the user typed B's code
    await new.wait_approved()
    await new.close()
    return await _started(h, new.keys)


async def test_approve_second_then_third_after_first_is_revoked(harness: Harness) -> None:
    first = await harness.client("alice")
    bob = await harness.client("bob")
    room = await first.create_room()
    await first.add(room, "bob")

    second = await _approve(harness, first)
    assert second.keys.identity.public == first.keys.identity.public
    assert second.keys.backup_key == first.keys.backup_key is not None
    seq = await bob.send_text(room, "to both of alice's phones")
    got = await collect_until(second, "to both of alice's phones")
    assert got[-1].seq == seq and got[-1].problem is None

    # the first phone is lost: revoked from the second one
    await second.revoke_device(first.keys.device_id)
    record = await harness.store.get_device(first.keys.device_id)
    assert record is not None and record.revoked
    await first.close()

    third = await _approve(harness, second)
    assert third.keys.identity.public == first.keys.identity.public
    prints = {c.fingerprint for c in (first, second, third)}
    assert prints == {fingerprint("alice", first.keys.identity.public)}
    await bob.send_text(room, "after the first phone was lost")
    got = await collect_until(third, "after the first phone was lost")
    assert got[-1].problem is None

    # the revoked phone cannot connect again
    ws = await connect_ws(harness.server.url, token=harness.token("alice"))
    challenge = await recv_frame(ws)
    assert isinstance(challenge, Challenge)
    await ws.send(codec.encode(hello_for(first.keys, challenge.nonce)))
    code, _ = await close_code_after(ws)
    assert code == CloseCode.DEVICE_REVOKED
    actions = [r.action for r in await harness.store.audit_records()]
    assert actions.count("device_approve") == 2 and "device_request" in actions


async def test_wrong_code_issues_no_certificate(harness: Harness) -> None:
    first = await harness.client("alice")
    new = _enrolment(harness, "alice")
    status = await new.request()
    pending = await first.wait_for_device_request()
    wrong = approval_code("alice", SigningKey.generate().public)
    with pytest.raises(CodeMismatch):
        await first.approve_device(pending.request, wrong)
    record = await harness.store.get_request(status.request)
    assert record is not None and not record.approved
    assert await harness.store.get_device(new.keys.device_id) is None
    assert not new.keys.has_identity
    with pytest.raises(NoIdentity):
        _ = new.keys.identity
    await new.close()


async def test_a_substituted_device_key_gives_another_code(harness: Harness) -> None:
    """The server (or a thief with the user's token) puts its own device key into the
    request: the code the user reads off the real new device does not match it."""
    first = await harness.client("alice")
    real = _enrolment(harness, "alice")
    await real.request()
    pending = await first.wait_for_device_request()
    # what a malicious server would deliver: its own device key and bundle, same request id
    fake = SigningKey.generate()
    fake_bundle = DeviceBundle.issue(fake, real.keys.receiving.public, int(time.time()) + 3600)
    first.device_requests[pending.request] = dataclasses.replace(
        pending,
        device=DeviceCertificate.issue(
            first.keys.identity, "alice", fake.public, "person", 1
        ).device_id,
        device_key=fake.public,
        bundle=fake_bundle.raw,
    )
    with pytest.raises(CodeMismatch):
        await first.approve_device(pending.request, real.code)
    record = await harness.store.get_request(pending.request)
    assert record is not None and not record.approved

    # and a request really made by another key (a stolen token with the thief's device)
    thief = KeyStore.create("alice", None, with_identity=False)
    raw = await RawClient.open(harness.server.url, thief, harness.token("alice"), register=False)
    bundle = DeviceBundle.issue(thief.device, thief.receiving.public, int(time.time()) + 3600)
    status = await raw.request(
        RequestApproval(rid="q", device_key=thief.device.public, bundle=bundle.raw)
    )
    assert isinstance(status, ApprovalStatus)
    await first.list_device_requests()
    with pytest.raises(CodeMismatch):
        await first.approve_device(status.request, real.code)
    assert await harness.store.get_device(thief.device_id) is None
    await raw.close()
    await real.close()


async def test_a_device_connecting_later_sees_pending_requests(harness: Harness) -> None:
    first = await harness.client("alice")
    await first.close()
    new = _enrolment(harness, "alice")
    status = await new.request()
    await new.close()  # the new device goes away before it is approved
    again = await _started(harness, first.keys)
    pending = await again.list_device_requests()
    assert list(pending) == [status.request]
    await again.approve_device(status.request, new.code.replace(" ", "-"))
    # asking again (a device that missed the push) returns the approval itself
    repeat = await new.request()
    assert repeat.request == status.request and repeat.state == "approved"
    await new.wait_approved()
    assert new.keys.identity.public == first.keys.identity.public
    await new.close()


async def test_requests_are_bounded_and_typed(harness: Harness) -> None:
    first = await harness.client("alice")
    limit = harness.gateway.max_pending_approvals
    raws = []
    for i in range(limit + 1):
        keys = KeyStore.create("alice", None, with_identity=False)
        raw = await RawClient.open(harness.server.url, keys, harness.token("alice"), register=False)
        raws.append(raw)
        bundle = DeviceBundle.issue(keys.device, keys.receiving.public, int(time.time()) + 3600)
        reply = await raw.request(
            RequestApproval(rid=f"q{i}", device_key=keys.device.public, bundle=bundle.raw)
        )
        if i < limit:
            assert isinstance(reply, ApprovalStatus) and reply.state == "pending"
        else:
            assert isinstance(reply, Error) and reply.code == ErrorCode.TOO_MANY_REQUESTS
    listed = await raws[0].request(ListApprovals(rid="l"))
    assert isinstance(listed, Error) and listed.code == ErrorCode.UNKNOWN_DEVICE
    approvals = await first.list_device_requests()
    assert len(approvals) == limit

    # another device's key in the request, a registered device asking, a bad bundle
    keys = KeyStore.create("alice", None, with_identity=False)
    raw = await RawClient.open(harness.server.url, keys, harness.token("alice"), register=False)
    raws.append(raw)
    other = SigningKey.generate()
    bundle = DeviceBundle.issue(keys.device, keys.receiving.public, int(time.time()) + 3600)
    reply = await raw.request(RequestApproval(rid="x", device_key=other.public, bundle=bundle.raw))
    assert isinstance(reply, Error) and reply.code == ErrorCode.FORBIDDEN
    forged = DeviceBundle.issue(other, keys.receiving.public, int(time.time()) + 3600)
    reply = await raw.request(
        RequestApproval(rid="y", device_key=keys.device.public, bundle=forged.raw)
    )
    assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_SIGNATURE
    with pytest.raises(RequestError) as info:
        await first.request(
            RequestApproval(
                rid=first.rid(),
                device_key=first.keys.device.public,
                bundle=DeviceBundle.issue(
                    first.keys.device, first.keys.receiving.public, int(time.time()) + 3600
                ).raw,
            ),
            ApprovalStatus,
        )
    assert info.value.code == ErrorCode.ALREADY_EXISTS

    # unknown request ids, and another user's request
    share = bytes(104)
    cert = DeviceCertificate.issue(first.keys.identity, "alice", other.public, "person", 1)
    for bad in ("nope", "0" * 16):
        with pytest.raises(RequestError) as info:
            await first.request(
                ApproveDevice(
                    rid=first.rid(), request=bad, certificate=cert.raw, backup_share=share
                ),
                Approvals,
            )
        assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    bob = await harness.client("bob")
    some = next(iter(approvals))
    with pytest.raises(RequestError) as info:
        await bob.request(
            ApproveDevice(rid=bob.rid(), request=some, certificate=cert.raw, backup_share=share),
            Approvals,
        )
    assert info.value.code == ErrorCode.UNKNOWN_REQUEST
    # a certificate for another key than the request's
    with pytest.raises(RequestError) as info:
        await first.request(
            ApproveDevice(rid=first.rid(), request=some, certificate=cert.raw, backup_share=share),
            Approvals,
        )
    assert info.value.code == ErrorCode.FORBIDDEN
    for raw in raws:
        await raw.close()


class _Later:
    """The gateway's clock, moved forward (requests expire; tokens stay valid)."""

    def __init__(self, offset: int) -> None:
        self.offset = offset

    def now(self) -> int:
        return int(time.time()) + self.offset

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset * 1000


async def test_an_expired_request_cannot_be_approved(harness: Harness) -> None:
    first = await harness.client("alice")
    new = _enrolment(harness, "alice")
    status = await new.request()
    pending = await first.wait_for_device_request()
    gw = harness.gateway
    clock = gw.clock
    gw.clock = _Later(gw.approval_ttl + 1)
    try:
        with pytest.raises(RequestError) as info:
            await first.approve_device(pending.request, new.code)
        assert info.value.code == ErrorCode.REQUEST_EXPIRED
        assert await first.list_device_requests() == {}  # no longer offered ...
        fresh = await new.request()  # ... and asking again makes a new request
        assert fresh.request != status.request and fresh.state == "pending"
    finally:
        gw.clock = clock
    await new.close()
