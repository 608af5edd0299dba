"""Store contract of device approvals and key backups, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_server.store.sql import SqlStore

NOW = 1_800_000_000
TTL = 600


async def _request(store: SqlStore, rid: str, device: str, now: int = NOW, limit: int = 2):  # type: ignore[no-untyped-def]
    return await store.request_approval(
        request_id=rid,
        user="alice",
        device_id=device,
        device_key=device.encode().ljust(32, b"k"),
        bundle=b"bundle",
        now=now,
        ttl=TTL,
        max_pending=limit,
    )


async def _refused(code: ErrorCode, coro) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestError) as info:
        await coro
    assert info.value.code == code


async def test_requests_bounded_expiring_and_approved_once(store: SqlStore) -> None:
    await _refused(ErrorCode.FORBIDDEN, _request(store, "r0", "d0"))  # no identity pinned
    await store.put_identity("alice", b"i" * 32, NOW, b"attestation")
    assert await store.get_attestation("alice") == b"attestation"
    first = await _request(store, "r1", "d1")
    assert (first.id, first.expires_at, first.approved) == ("r1", NOW + TTL, False)
    assert (await _request(store, "other-id", "d1")).id == "r1"  # same device: same request
    await _request(store, "r2", "d2")
    await _refused(ErrorCode.TOO_MANY_REQUESTS, _request(store, "r3", "d3"))
    assert [r.id for r in await store.pending_requests("alice", NOW)] == ["r1", "r2"]
    kw = {"certificate": b"c", "backup_share": b"s", "approver": "dA"}
    await _refused(
        ErrorCode.UNKNOWN_REQUEST,
        store.approve_request(user="bob", request_id="r1", now=NOW, **kw),  # type: ignore[arg-type]
    )
    await _refused(
        ErrorCode.UNKNOWN_REQUEST,
        store.approve_request(user="alice", request_id="nope", now=NOW, **kw),  # type: ignore[arg-type]
    )
    done = await store.approve_request(user="alice", request_id="r1", now=NOW, **kw)  # type: ignore[arg-type]
    assert done.approved and done.certificate == b"c"
    await _refused(
        ErrorCode.ALREADY_EXISTS,
        store.approve_request(user="alice", request_id="r1", now=NOW, **kw),  # type: ignore[arg-type]
    )
    assert (await _request(store, "x", "d1")).approved  # the device asking again gets it
    await _request(store, "r3", "d3")  # an approved request no longer counts
    await _refused(
        ErrorCode.REQUEST_EXPIRED,
        store.approve_request(user="alice", request_id="r2", now=NOW + TTL, **kw),  # type: ignore[arg-type]
    )
    assert await store.pending_requests("alice", NOW + TTL) == []
    # long expired requests are forgotten when the user next asks
    await _request(store, "r9", "d9", now=NOW + 2 * TTL)
    assert await store.get_request("r2") is None and await store.get_request("r9") is not None


async def test_backup_compare_and_set(store: SqlStore) -> None:
    assert await store.get_backup("alice") is None
    await _refused(
        ErrorCode.BACKUP_CONFLICT,
        store.put_backup("alice", version=2, blob=b"a", device="d", now=NOW),
    )
    await store.put_backup("alice", version=1, blob=b"a", device="d", now=NOW)
    await _refused(
        ErrorCode.BACKUP_CONFLICT,
        store.put_backup("alice", version=1, blob=b"b", device="e", now=NOW),
    )
    await store.put_backup("alice", version=2, blob=b"b", device="e", now=NOW)
    assert await store.get_backup("alice") == (2, b"b")
    assert await store.get_backup("bob") is None
