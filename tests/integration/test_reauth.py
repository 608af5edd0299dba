"""Token expiry mid-session: ``reauth_required``, then either a renewed token over the open
socket, or a close with 4005 once the grace period ends."""

from __future__ import annotations

import time
from pathlib import Path

from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.frames import Error, ListRooms, Ok, Reauth, ReauthRequired, Rooms
from medrelay_server.settings import Limits

from .rawclient import RawClient
from .test_gateway_bad_input import harness_with

GRACE = Limits(reauth_grace_seconds=2.0)


async def _expiring(h_url: str, issuer: object, keys: KeyStore) -> RawClient:
    # expires within 3 s (whole seconds), leaving the handshake time to finish first
    token = issuer.issue(keys.user, int(time.time()), ttl=3)  # type: ignore[attr-defined]
    return await RawClient.open(h_url, keys, token)


async def _wait_reauth_required(raw: RawClient) -> ReauthRequired:
    while True:
        frame = await raw.recv(timeout=10)
        if isinstance(frame, ReauthRequired):
            return frame


async def test_renewed_token_keeps_the_session(tmp_path: Path) -> None:
    async with harness_with(tmp_path, GRACE) as h:
        keys = KeyStore.create("alice")
        raw = await _expiring(h.server.url, h.issuer, keys)
        try:
            notice = await _wait_reauth_required(raw)
            assert notice.deadline >= int(time.time())
            refused = await raw.request(ListRooms(rid="during"))
            assert isinstance(refused, Error) and refused.code == ErrorCode.REAUTH_REQUIRED
            ok = await raw.request(Reauth(rid="re", token=h.token("alice")))
            assert isinstance(ok, Ok)
            assert isinstance(await raw.request(ListRooms(rid="after")), Rooms)
        finally:
            await raw.close()


async def test_token_for_another_user_does_not_renew(tmp_path: Path) -> None:
    async with harness_with(tmp_path, GRACE) as h:
        raw = await _expiring(h.server.url, h.issuer, KeyStore.create("alice"))
        try:
            await _wait_reauth_required(raw)
            reply = await raw.request(Reauth(rid="re", token=h.token("mallory")))
            assert isinstance(reply, Error) and reply.code == ErrorCode.AUTH_FAILED
        finally:
            await raw.close()


async def test_unrenewed_token_closes_4005(tmp_path: Path) -> None:
    async with harness_with(tmp_path, GRACE) as h:
        raw = await _expiring(h.server.url, h.issuer, KeyStore.create("alice"))
        await _wait_reauth_required(raw)
        code, frames = await raw.closed_with(timeout=10)
        assert code == CloseCode.REAUTH_TIMEOUT
        assert any(isinstance(f, Error) and f.code == ErrorCode.TOKEN_EXPIRED for f in frames)
