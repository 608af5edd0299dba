"""Sign-in through a real server on loopback: institution ID tokens from a local OIDC
stand-in (two institutions) exchanged for medrelay tokens, the register gate for doctors,
rotating refresh tokens with theft detection, renewal over an open socket, back-channel
logout, the institutions listing and directory, and a ward tablet that posts but cannot read
history."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.epochs import build_rekey
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import Committed, CreateRoom, ListRooms, Ok, Reauth, ReauthRequired
from medrelay_protocol.roster import make_genesis, verify_entry
from medrelay_server.app import create_app
from medrelay_server.auth.errors import AuthError, AuthReason
from medrelay_server.auth.files import InsecureKeyFile
from medrelay_server.auth.tokens import MedrelayTokens
from medrelay_server.clock import SystemClock
from medrelay_server.fanout.memory import InMemoryBroker
from medrelay_server.institutions import (
    FileExternalSender,
    Institution,
    Institutions,
    PublicOnlyExternalSender,
)
from medrelay_server.register.importer import RegisterEntry
from medrelay_server.register.recheck import RegisterRechecker, commit_via
from medrelay_server.serve import Running, running
from medrelay_server.settings import Limits, Settings
from medrelay_server.signin import IdentityStack, build_identity
from medrelay_server.store.sql import SqlStore
from starlette.applications import Starlette

from ..integration.rawclient import RawClient
from .test_oidc_standin import Idp, IdpServer, serve_idps

REGISTER = [
    RegisterEntry("M15833", "CHAN Tai Man", "陳大文", "Cardiology"),
    RegisterEntry("M20001", "WONG Siu Ming", "黃小明", "Respiratory Medicine"),
    RegisterEntry("M30000", "LEE Ka Yan", None, "Paediatrics", status="lapsed"),
]


@dataclass
class Server:
    running: Running
    app: Starlette
    stack: IdentityStack
    store: SqlStore
    idps: IdpServer
    tmp: Path
    http: httpx.AsyncClient
    clients: list[Client] = field(default_factory=list)
    access: dict[str, str] = field(default_factory=dict)

    @property
    def qmh(self) -> Idp:
        return self.idps.idps["qmh"]

    @property
    def clinic(self) -> Idp:
        return self.idps.idps["clinic"]

    async def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return await self.http.post(f"{self.running.http}{path}", json=body)

    async def signin(self, idp: Idp, **claims: Any) -> dict[str, Any]:
        reply = await self.post("/auth/signin", {"id_token": idp.token(**claims)})
        assert reply.status_code == 200, reply.text
        grant: dict[str, Any] = reply.json()
        self.access[grant["user"]] = grant["access_token"]
        return grant

    async def refused(self, path: str, body: dict[str, Any]) -> tuple[int, str]:
        reply = await self.post(path, body)
        assert reply.status_code in (400, 401), reply.text
        return reply.status_code, reply.json().get("reason", "")

    async def client(self, grant: dict[str, Any]) -> Client:
        user = grant["user"]
        self.access.setdefault(user, grant["access_token"])
        keys = KeyStore.load_or_create(user, self.tmp / "keys" / user)

        async def token() -> str:
            return self.access[user]

        c = Client(self.running.url, keys, token, kind=grant["kind"])
        self.clients.append(c)
        await c.start()
        return c

    def rechecker(self) -> RegisterRechecker:
        return self.stack.rechecker(self.store, commit_via(self.app.state.gateway))

    def sender_key(self, institution: str) -> bytes:
        return self.stack.institutions[institution].sender.public_key


@contextlib.asynccontextmanager
async def serve(tmp: Path, *, limits: Limits | None = None) -> AsyncIterator[Server]:
    qmh, clinic = Idp("qmh", ""), Idp("clinic", "", alg="ES256")
    async with serve_idps(qmh, clinic) as idps, httpx.AsyncClient() as http:
        config = tmp / "institutions.json"
        entries = [idps.issuer_config("qmh"), idps.issuer_config("clinic")]
        config.write_text(json.dumps({"institution": entries}))
        settings = Settings(data_dir=tmp, port=0, limits=limits or Limits())
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
            settings, store=store, broker=InMemoryBroker(), clock=clock, identity=stack.tokens
        )
        app.router.routes.extend(stack.routes())
        async with running(app, settings) as server:
            await stack.idb.import_register(REGISTER, source="test", now=clock.now(), full=True)
            s = Server(server, app, stack, store, idps, tmp, http)
            try:
                yield s
            finally:
                for c in s.clients:
                    await c.close()
        await stack.close()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with serve(tmp_path) as s:
        yield s


async def create_room_with_sender(c: Client, external_sender: bytes | None) -> str:
    """``Client.create_room`` cannot name an external sender yet: the same steps through
    the protocol builders, with the institution's key in the genesis."""
    await c.wait_connected()
    logic, k = c.logic, c.keys
    assert logic.cert is not None
    room = os.urandom(12).hex()
    genesis = make_genesis(
        room,
        k.user,
        k.identity,
        k.device,
        logic.cert,
        external_sender=external_sender,
        history="joined",
        issued_at=int(time.time()),
    )
    state, _ = verify_entry(None, genesis)
    rekey = build_rekey(
        room=room,
        epoch_number=1,
        prev_epoch=None,
        roster_head=state.head,
        device_list_version=0,
        committer=k.device,
        recipients=await logic.recipients(state),
    )
    frame = CreateRoom(
        rid=logic.rid(), room=room, genesis=genesis, manifest=rekey.manifest, wraps=rekey.wraps
    )
    await logic.request(frame, Committed)
    logic._keep_epoch(room, 1, state.head, rekey.secret)
    rk = k.room(room)
    rk.pinned_length, rk.pinned_head = state.length, state.head
    logic.rosters[room] = state
    return room


async def next_from(c: Client, sender: str, timeout: float = 10) -> Any:
    while True:
        m = await c.next_message(timeout)
        if m.sender_user == sender and m.kind in ("message", "summon"):
            return m


# sign-in -----------------------------------------------------------------------------------


async def test_doctor_signs_in_and_uses_the_gateway(server: Server) -> None:
    grant = await server.signin(server.qmh)
    assert (grant["user"], grant["institution"], grant["kind"]) == ("qmh:dr-chan", "qmh", "person")
    assert grant["token_type"] == "Bearer" and 0 < grant["expires_in"] <= 15 * 60
    assert grant["refresh_token"].startswith("mrrt1.")
    wong = await server.signin(server.clinic, sub="dr-wong", mchk_registration="m20001")
    chan_c, wong_c = await server.client(grant), await server.client(wong)
    room = await chan_c.create_room()
    await chan_c.add(room, wong["user"])
    await chan_c.send_text(room, "ECG attached shortly")
    assert (await next_from(wong_c, "qmh:dr-chan")).body["text"] == "ECG attached shortly"
    records = await server.store.audit_records()
    signins = [r for r in records if r.action == "authenticate" and r.detail == "signin"]
    assert {r.user for r in signins} == {"qmh:dr-chan", "clinic:dr-wong"}


async def test_the_register_gates_doctors_only(server: Server) -> None:
    cases = [
        ({"mchk_registration": None}, "not_registered"),
        ({"mchk_registration": "M99999"}, "not_registered"),
        ({"mchk_registration": "M30000", "sub": "dr-lee"}, "registration_inactive"),
    ]
    for claims, reason in cases:
        token = server.qmh.token(**claims)
        assert await server.refused("/auth/signin", {"id_token": token}) == (401, reason)
    nurse = await server.signin(server.qmh, sub="nurse-ho", role="nurse", mchk_registration=None)
    assert nurse["user"] == "qmh:nurse-ho"


async def test_bad_id_tokens_are_refused_over_http(server: Server) -> None:
    for token, reason in [
        (server.qmh.token(aud="other"), "audience_wrong"),
        (server.qmh.unsigned_token(), "alg_none"),
        (server.qmh.hs256_with_public_key(), "hs_rs_confusion"),
        (server.clinic.token(iss=server.qmh.issuer, alg="ES256"), "alg_not_allowed"),
    ]:
        assert await server.refused("/auth/signin", {"id_token": token}) == (401, reason)
    expired = await server.post("/auth/signin", {"id_token": server.qmh.token(exp=1)})
    assert expired.status_code == 401
    assert expired.json() == {
        "error": "token_expired",
        "code": int(ErrorCode.TOKEN_EXPIRED),
        "reason": "expired",
    }
    assert (await server.post("/auth/signin", {"nonsense": 1})).status_code == 400
    huge = await server.http.post(f"{server.running.http}/auth/signin", content=b"x" * 20000)
    assert huge.status_code == 400
    failures = [r for r in await server.store.audit_records() if r.outcome == "failure"]
    assert any(r.detail == "signin: hs_rs_confusion" for r in failures)


async def test_an_id_token_is_exchanged_once(server: Server) -> None:
    token = server.qmh.token()
    assert (await server.post("/auth/signin", {"id_token": token})).status_code == 200
    assert await server.refused("/auth/signin", {"id_token": token}) == (401, "replayed")


# refresh, renewal over the socket, logout -----------------------------------------------------


async def test_refresh_rotates_and_a_reused_token_revokes_the_session(server: Server) -> None:
    first = await server.signin(server.qmh)
    reply = await server.post("/auth/refresh", {"refresh_token": first["refresh_token"]})
    second = reply.json()
    assert reply.status_code == 200 and second["user"] == "qmh:dr-chan"
    assert second["refresh_token"] != first["refresh_token"]
    tokens = server.stack.tokens
    assert tokens.verify(second["access_token"], int(time.time())).user == "qmh:dr-chan"
    # the spent token again: someone copied it. Both copies are dead now.
    reused = {"refresh_token": first["refresh_token"]}
    assert await server.refused("/auth/refresh", reused) == (401, "refresh_reused")
    latest = {"refresh_token": second["refresh_token"]}
    assert await server.refused("/auth/refresh", latest) == (401, "session_revoked")
    with pytest.raises(AuthError) as info:
        tokens.verify(second["access_token"], int(time.time()))
    assert info.value.reason is AuthReason.SESSION_REVOKED
    assert await server.refused("/auth/refresh", {"refresh_token": "mrrt1.x.y"}) == (
        401,
        "refresh_invalid",
    )


async def test_reauth_over_an_open_socket_with_a_refreshed_token(tmp_path: Path) -> None:
    async with serve(tmp_path, limits=Limits(reauth_grace_seconds=5.0)) as server:
        server.stack.tokens.access_ttl = 1
        grant = await server.signin(server.qmh)
        keys = KeyStore.create(grant["user"])
        raw = await RawClient.open(server.running.url, keys, grant["access_token"])
        try:
            while not isinstance(await raw.recv(timeout=10), ReauthRequired):
                pass
            server.stack.tokens.access_ttl = 900
            reply = await server.post("/auth/refresh", {"refresh_token": grant["refresh_token"]})
            renewed = reply.json()["access_token"]
            other = (await server.signin(server.qmh, sub="nurse-ho", role="nurse"))["access_token"]
            wrong = await raw.request(Reauth(rid="other", token=other))
            assert getattr(wrong, "code", None) == ErrorCode.AUTH_FAILED
            assert isinstance(await raw.request(Reauth(rid="re", token=renewed)), Ok)
            assert type(await raw.request(ListRooms(rid="after"))).__name__ == "Rooms"
        finally:
            await raw.close()


async def test_backchannel_logout_ends_sessions_and_removes_from_rooms(server: Server) -> None:
    chan = await server.signin(server.qmh)
    wong = await server.signin(server.clinic, sub="dr-wong", mchk_registration="M20001")
    chan_c, wong_c = await server.client(chan), await server.client(wong)
    room = await create_room_with_sender(chan_c, server.sender_key("qmh"))
    await chan_c.add(room, wong["user"])
    url = f"{server.running.http}/auth/backchannel-logout"
    bad = await server.http.post(url, data={"logout_token": server.clinic.token(sub="dr-wong")})
    assert bad.status_code == 400 and bad.json()["reason"] == "wrong_token_type"
    logout = server.clinic.logout_token(sub="dr-wong")
    ok = await server.http.post(url, data={"logout_token": logout})
    assert ok.status_code == 200 and ok.headers["cache-control"] == "no-store"
    refresh = {"refresh_token": wong["refresh_token"]}
    assert await server.refused("/auth/refresh", refresh) == (401, "session_revoked")
    report = await server.rechecker().run_once(int(time.time()))
    assert [(u, r) for u, r, _ in report.removed] == [("clinic:dr-wong", room)]
    assert await server.store.member_role(room, "clinic:dr-wong") is None
    assert wong_c is not None
    # a logout is not a lapse: the doctor may sign in again (and be added again)
    again = await server.signin(server.clinic, sub="dr-wong", mchk_registration="M20001")
    assert again["user"] == "clinic:dr-wong"


# listing and directory ----------------------------------------------------------------------


async def test_institutions_and_directory(server: Server) -> None:
    listing = (await server.http.get(f"{server.running.http}/institutions")).json()
    by_id = {i["id"]: i for i in listing["institutions"]}
    assert set(by_id) == {"qmh", "clinic"}
    assert bytes.fromhex(by_id["qmh"]["external_sender"]) == server.sender_key("qmh")
    key_file = server.tmp / "institutions" / "qmh" / "external_sender.key"
    assert key_file.stat().st_mode & 0o777 == 0o600

    chan = await server.signin(server.qmh)
    await server.signin(server.clinic, sub="dr-wong", mchk_registration="M20001")
    auth = {"Authorization": f"Bearer {chan['access_token']}"}
    url = f"{server.running.http}/directory"
    found = (await server.http.get(url, params={"q": "wong"}, headers=auth)).json()["results"]
    assert [(r["registration_no"], r["accounts"]) for r in found] == [
        ("M20001", [{"user": "clinic:dr-wong", "institution": "clinic"}])
    ]
    cardio = await server.http.get(url, params={"specialty": "cardio"}, headers=auth)
    assert [r["name_zh"] for r in cardio.json()["results"]] == ["陳大文"]
    at_qmh = await server.http.get(url, params={"institution": "qmh"}, headers=auth)
    assert [r["registration_no"] for r in at_qmh.json()["results"]] == ["M15833"]
    lapsed = await server.http.get(url, params={"q": "LEE"}, headers=auth)
    assert lapsed.json()["results"] == []
    assert (await server.http.get(url, params={"q": "%"}, headers=auth)).status_code == 400
    assert (await server.http.get(url, params={"q": "wong"})).status_code == 401


# tablets ------------------------------------------------------------------------------------


async def test_ward_tablet_posts_vitals_and_is_forbidden_history(server: Server) -> None:
    user, credential = await server.stack.sessions.enroll_tablet(
        institution="qmh", ward="7B", now=int(time.time())
    )
    assert user.startswith("tablet:qmh:7B:")
    reply = await server.post("/auth/signin", {"enrollment": credential})
    tablet = reply.json()
    assert reply.status_code == 200 and (tablet["user"], tablet["kind"]) == (user, "tablet")
    bad = credential[:-2] + ("AA" if not credential.endswith("AA") else "BB")
    assert await server.refused("/auth/signin", {"enrollment": bad}) == (401, "enrollment_invalid")

    chan = await server.signin(server.qmh)
    chan_c, tablet_c = await server.client(chan), await server.client(tablet)
    room = await create_room_with_sender(chan_c, server.sender_key("qmh"))
    await chan_c.add(room, user, role="device")
    vitals = {"type": "vitals", "observations": [{"code": "8867-4", "value": 112}]}
    seq = await tablet_c.send_body(room, vitals)
    got = await next_from(chan_c, user)
    assert (got.seq, got.body) == (seq, vitals)
    with pytest.raises(RequestError) as info:
        await tablet_c.history(room)
    assert info.value.code == ErrorCode.FORBIDDEN
    auth = {"Authorization": f"Bearer {tablet['access_token']}"}
    directory = await server.http.get(
        f"{server.running.http}/directory", params={"q": "chan"}, headers=auth
    )
    assert directory.status_code == 403

    await server.stack.sessions.deprovision(user, reason="tablet lost", now=int(time.time()))
    assert await server.refused("/auth/signin", {"enrollment": credential}) == (
        401,
        "account_disabled",
    )
    report = await server.rechecker().run_once(int(time.time()))
    assert [(u, r) for u, r, _ in report.removed] == [(user, room)]


# keys and access tokens (no server) ---------------------------------------------------------


def test_key_files_are_created_private_and_refused_when_not(tmp_path: Path) -> None:
    path = tmp_path / "institutions" / "qmh" / "external_sender.key"
    first = FileExternalSender.load_or_create(path)
    assert FileExternalSender.load_or_create(path).public_key == first.public_key
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.read_text().strip() not in repr(first)
    path.chmod(0o640)
    with pytest.raises(InsecureKeyFile):
        FileExternalSender.load_or_create(path)
    public = PublicOnlyExternalSender(first.public_key)
    with pytest.raises(ValueError, match="share"):
        Institutions([Institution(_config("a"), first), Institution(_config("b"), public)])


def _config(ident: str) -> Any:
    from medrelay_server.auth.issuers import IssuerConfig

    return IssuerConfig(ident, ident, f"https://{ident}", "m", ("RS256",), jwks={"keys": []})


def test_access_tokens(tmp_path: Path) -> None:
    tokens = MedrelayTokens.from_file(tmp_path / "token_keys.json")
    other_node = MedrelayTokens.from_file(tmp_path / "token_keys.json")
    stranger = MedrelayTokens.from_file(tmp_path / "elsewhere.json")
    t = 1_800_000_000
    access = tokens.issue(user="qmh:chan", institution="qmh", kind="person", sid="s1", now=t)
    principal = other_node.verify(access.token, t + 10)
    assert (principal.user, principal.institution, principal.kind) == ("qmh:chan", "qmh", "person")
    assert principal.expires_at == t + 900 == access.expires_at
    private = json.loads((tmp_path / "token_keys.json").read_text())["keys"][0]["d"]
    assert private not in repr(tokens) and "redacted" in repr(tokens)

    def reason(token: str, at: int = t) -> AuthReason:
        with pytest.raises(AuthError) as info:
            other_node.verify(token, at)
        return info.value.reason

    assert reason(access.token, t + 900 + 31) is AuthReason.EXPIRED
    assert reason(access.token, t - 60) is AuthReason.NOT_YET_VALID
    foreign = stranger.issue(user="qmh:chan", institution="qmh", kind="person", sid="s", now=t)
    assert reason(foreign.token) is AuthReason.UNKNOWN_KEY
    idp = Idp("qmh", "https://q")
    assert reason(idp.token()) is AuthReason.WRONG_TOKEN_TYPE
    assert reason(idp.unsigned_token()) is AuthReason.WRONG_TOKEN_TYPE
    header, body, sig = access.token.split(".")
    assert reason(f"{header}.{body}x.{sig}") in (AuthReason.BAD_SIGNATURE, AuthReason.MALFORMED)
    assert reason("mrdev1.abc.def") is AuthReason.MALFORMED
    other_node.revoke("s1", until=t + 900)
    assert reason(access.token, t + 10) is AuthReason.SESSION_REVOKED
    other_node.forget_expired_revocations(t + 899)
    assert reason(access.token, t + 10) is AuthReason.SESSION_REVOKED
    other_node.forget_expired_revocations(t + 901)  # its tokens have all expired by then
    assert other_node.verify(access.token, t + 10).user == "qmh:chan"
