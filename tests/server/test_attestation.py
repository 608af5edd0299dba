"""The institution attests a user's first identity key at sign-in; the server pins an
identity key only with a valid attestation and serves it; clients check it against the
institution key they pinned. Real server (full sign-in stack) on port 0, real clients."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from medrelay_client.client import Client
from medrelay_client.enrolment import verify_attestation
from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.enrolment import IdentityAttestation
from medrelay_protocol.errors import BadSignature
from medrelay_protocol.frames import Devices, Error, GetDevices, Ok, RegisterDevice
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate
from medrelay_server.app import create_app
from medrelay_server.clock import SystemClock
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.serve import running
from medrelay_server.settings import Settings
from medrelay_server.signin import build_identity
from medrelay_server.store.sql import SqlStore

from ..integration.conftest import Harness
from ..integration.rawclient import RawClient
from .test_oidc_standin import Idp, serve_idps
from .test_signin import REGISTER


@contextlib.asynccontextmanager
async def full_stack(tmp: Path) -> AsyncIterator[tuple[str, str, Idp, httpx.AsyncClient]]:
    """Production wiring: ``create_app(..., signin=stack)``. Yields (ws url, http url, the
    qmh identity provider, an HTTP client)."""
    qmh = Idp("qmh", "")
    async with serve_idps(qmh) as idps, httpx.AsyncClient() as http:
        config = tmp / "institutions.json"
        config.write_text(json.dumps({"institution": [idps.issuer_config("qmh")]}))
        settings = Settings(data_dir=tmp, port=0)
        store = SqlStore(settings.resolved_database_url())
        clock = SystemClock()
        stack = build_identity(
            institutions_file=config,
            data_dir=tmp,
            database_url=settings.resolved_database_url(),
            store=store,
            clock=clock,
        )
        app = create_app(
            settings,
            store=store,
            broker=InMemoryBroker(),
            clock=clock,
            identity=stack.tokens,
            signin=stack,
        )
        async with running(app, settings) as server:
            await stack.idb.import_register(REGISTER, source="test", now=clock.now(), full=True)
            yield server.url, server.http, idps.idps["qmh"], http


async def _signin(http: httpx.AsyncClient, base: str, idp: Idp, **body: Any) -> dict[str, Any]:
    reply = await http.post(
        f"{base}/auth/signin", json={"id_token": idp.token(jti=os.urandom(8).hex()), **body}
    )
    assert reply.status_code == 200, reply.text
    grant: dict[str, Any] = reply.json()
    return grant


async def _institution_keys(http: httpx.AsyncClient, base: str) -> dict[str, bytes]:
    listing = (await http.get(f"{base}/institutions")).json()["institutions"]
    return {i["id"]: bytes.fromhex(i["attestation_key"]) for i in listing}


def _register(keys: KeyStore, attestation: bytes | None) -> RegisterDevice:
    cert = DeviceCertificate.issue(keys.identity, keys.user, keys.device.public, "person", 1)
    bundle = DeviceBundle.issue(keys.device, keys.receiving.public, 2**40)
    return RegisterDevice(
        rid="reg",
        identity_key=keys.identity.public,
        certificate=cert.raw,
        bundle=bundle.raw,
        attestation=attestation,
    )


async def test_first_device_is_attested_at_signin(tmp_path: Path) -> None:
    async with full_stack(tmp_path) as (url, base, qmh, http):
        pinned = await _institution_keys(http, base)
        keys = KeyStore.create("qmh:dr-chan", None)
        # no attestation: refused, nothing pinned
        grant = await _signin(http, base, qmh)
        assert "attestation" not in grant
        raw = await RawClient.open(url, keys, grant["access_token"], register=False)
        reply = await raw.request(_register(keys, None))
        assert isinstance(reply, Error) and reply.code == ErrorCode.ATTESTATION_REQUIRED
        # an attestation of another key, or forged by someone else: refused
        other = KeyStore.create("qmh:dr-chan", None)
        grant = await _signin(http, base, qmh, identity_key=other.identity.public.hex())
        reply = await raw.request(_register(keys, bytes.fromhex(grant["attestation"])))
        assert isinstance(reply, Error) and reply.code == ErrorCode.FORBIDDEN
        forged = IdentityAttestation.issue(
            SigningKey.generate(),
            user_id="qmh:dr-chan",
            identity_key=keys.identity.public,
            institution="qmh",
            issued_at=1,
        )
        reply = await raw.request(_register(keys, forged.raw))
        assert isinstance(reply, Error) and reply.code == ErrorCode.BAD_SIGNATURE
        # the institution's attestation of this key: pinned, and served beside the key
        grant = await _signin(http, base, qmh, identity_key=keys.identity.public.hex())
        attestation = bytes.fromhex(grant["attestation"])
        att = verify_attestation(attestation, "qmh:dr-chan", keys.identity.public, pinned)
        assert (att.institution, att.identity_key) == ("qmh", keys.identity.public)
        assert isinstance(await raw.request(_register(keys, attestation)), Ok)
        devices = await raw.request(GetDevices(rid="d", users=("qmh:dr-chan",)))
        assert isinstance(devices, Devices)
        record = devices.users[0]
        assert record.identity_key == keys.identity.public and record.attestation == attestation
        # a changed identity key for the pinned user: no attestation, registration refused
        grant = await _signin(http, base, qmh, identity_key=other.identity.public.hex())
        assert "attestation" not in grant
        raw2 = await RawClient.open(url, other, grant["access_token"], register=False)
        reply = await raw2.request(_register(other, attestation))
        assert isinstance(reply, Error) and reply.code == ErrorCode.ALREADY_EXISTS
        # the same key again (a reinstall that kept its keys) is attested again
        again = await _signin(http, base, qmh, identity_key=keys.identity.public.hex())
        assert "attestation" in again
        bad = await http.post(
            f"{base}/auth/signin", json={"id_token": qmh.token(), "identity_key": "zz"}
        )
        assert bad.status_code == 400
        await raw.close()
        await raw2.close()


async def test_the_python_client_registers_with_its_attestation(tmp_path: Path) -> None:
    async with full_stack(tmp_path) as (url, base, qmh, http):
        keys = KeyStore.create("qmh:dr-chan", None)
        grant = await _signin(http, base, qmh, identity_key=keys.identity.public.hex())
        keys.attestation = bytes.fromhex(grant["attestation"])

        async def token() -> str:
            return str(grant["access_token"])

        client = Client(url, keys, token)
        await client.start()
        try:
            room = await client.create_room()
            assert room in await client.rooms()
        finally:
            await client.close()


async def test_dev_issuer_attests_with_its_own_key(harness: Harness) -> None:
    alice = await harness.client("alice")
    async with httpx.AsyncClient() as http:
        keys = await _institution_keys(http, harness.server.http)
    assert set(keys) == {"dev"}
    reply = await alice.request(GetDevices(rid=alice.rid(), users=("alice",)), Devices)
    att = verify_attestation(reply.users[0].attestation, "alice", alice.keys.identity.public, keys)
    assert att.institution == "dev"
    with pytest.raises(BadSignature):
        verify_attestation(reply.users[0].attestation, "alice", b"\0" * 32, keys)
    with pytest.raises(BadSignature):
        verify_attestation(reply.users[0].attestation, "alice", alice.keys.identity.public, {})
    # a client that pinned the institution keys adds only attested identity keys
    await harness.client("bob")
    alice.logic.institution_keys = keys
    room = await alice.create_room()
    await alice.add(room, "bob")
    await harness.client("carol")
    alice.logic.institution_keys = {"dev": SigningKey.generate().public}  # not dev's key
    with pytest.raises(BadSignature):
        await alice.add(room, "carol")
    # a second "first device" with another identity key for alice is refused
    other = KeyStore.create("alice", None)
    raw = await RawClient.open(harness.server.url, other, harness.token("alice"), register=False)
    reply2 = await raw.request(_register(other, None))
    assert isinstance(reply2, Error) and reply2.code == ErrorCode.ALREADY_EXISTS
    await raw.close()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    from medrelay_server.settings import Limits

    from ..integration.conftest import _harness

    async for h in _harness(tmp_path, Limits()):
        yield h
