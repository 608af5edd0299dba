"""A local OpenID Connect provider stand-in: real RSA / EC keys (joserfc), a real HTTP JWKS
endpoint on 127.0.0.1 (port 0), ID and logout tokens minted on demand, key rotation, and
hostile tokens (``alg: none``, HS256 keyed with the RSA public key) built by hand the way an
attacker would. Imported by the other identity tests; its own tests check the stand-in."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey, Key, RSAKey
from medrelay_server.serve import running
from medrelay_server.settings import Settings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

AUDIENCE = "medrelay"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Idp:
    """One institution's identity provider."""

    name: str
    issuer: str
    alg: str = "RS256"
    keys: list[Key] = field(default_factory=list)
    down: bool = False
    fetches: int = 0

    def __post_init__(self) -> None:
        if not self.keys:
            self.rotate()

    def new_key(self, kid: str | None = None) -> Key:
        kid = kid or f"{self.name}-{len(self.keys) + 1}"
        if self.alg.startswith("RS"):
            return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig"})
        return ECKey.generate_key("P-256", parameters={"kid": kid, "use": "sig"})

    def rotate(self, *, keep_old: bool = True) -> Key:
        """Publish a new key and sign with it from now on."""
        key = self.new_key()
        self.keys = [key, *self.keys] if keep_old else [key]
        return key

    @property
    def key(self) -> Key:
        return self.keys[0]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.as_dict(private=False) for k in self.keys]}

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "dr-chan",
            "iat": now,
            "exp": now + 300,
            "name": "CHAN Tai Man",
            "role": "doctor",
            "mchk_registration": "M15833",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        *,
        key: Key | None = None,
        alg: str | None = None,
        kid: str | None = "auto",
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.key
        hdr: dict[str, Any] = {"alg": alg or self.alg}
        if kid == "auto":
            hdr["kid"] = key.kid
        elif kid is not None:
            hdr["kid"] = kid
        hdr.update(header or {})
        return jwt.encode(hdr, self.claims(**claims), key, algorithms=[hdr["alg"]])

    def logout_token(self, *, sub: str | None = "dr-chan", sid: str | None = None) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 120,
            "jti": f"logout-{now}-{sub}-{sid}",
            "events": {"http://schemas.openid.net/event/backchannel-logout": {}},
        }
        if sub is not None:
            claims["sub"] = sub
        if sid is not None:
            claims["sid"] = sid
        header = {"alg": self.alg, "kid": self.key.kid, "typ": "logout+jwt"}
        return jwt.encode(header, claims, self.key, algorithms=[self.alg])

    # hostile tokens, built as an attacker would (joserfc refuses to make them) -------------
    def unsigned_token(self, alg: str = "none", **claims: Any) -> str:
        header = b64(json.dumps({"alg": alg, "kid": self.key.kid}).encode())
        body = b64(json.dumps(self.claims(**claims)).encode())
        return f"{header}.{body}."

    def hs256_with_public_key(self, **claims: Any) -> str:
        """The HS/RS confusion attack: HMAC keyed with the issuer's public key (PEM)."""
        assert isinstance(self.key, RSAKey)
        secret = self.key.as_pem(private=False)
        header = b64(json.dumps({"alg": "HS256", "kid": self.key.kid}).encode())
        body = b64(json.dumps(self.claims(**claims)).encode())
        mac = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
        return f"{header}.{body}.{b64(mac)}"


@dataclass
class IdpServer:
    url: str
    idps: dict[str, Idp]

    def jwks_url(self, name: str) -> str:
        return f"{self.url}/{name}/jwks"

    def issuer_config(self, name: str, inst_id: str | None = None, **extra: Any) -> dict[str, Any]:
        idp = self.idps[name]
        return {
            "id": inst_id or name,
            "name": f"{name.upper()} hospital",
            "issuer": idp.issuer,
            "audience": AUDIENCE,
            "algorithms": [idp.alg],
            "jwks_url": self.jwks_url(name),
            **extra,
        }


@contextlib.asynccontextmanager
async def serve_idps(*idps: Idp) -> AsyncIterator[IdpServer]:
    by_name = {i.name: i for i in idps}

    async def jwks(request: Request) -> Response:
        idp = by_name.get(request.path_params["name"])
        if idp is None:
            return JSONResponse({"error": "not found"}, 404)
        idp.fetches += 1
        if idp.down:
            return JSONResponse({"error": "down"}, 500)
        return JSONResponse(idp.jwks())

    app = Starlette(routes=[Route("/{name}/jwks", jwks)])
    async with running(app, Settings(port=0)) as server:
        base = server.http
        for idp in idps:
            idp.issuer = idp.issuer or f"{base}/{idp.name}"
        yield IdpServer(base, by_name)


# the stand-in's own checks --------------------------------------------------------------


async def test_standin_serves_public_keys_and_rotates() -> None:
    idp = Idp("qmh", "")
    async with serve_idps(idp) as server:
        async with httpx.AsyncClient() as http:
            first = (await http.get(server.jwks_url("qmh"))).json()
            assert [k["kid"] for k in first["keys"]] == ["qmh-1"]
            assert all("d" not in k for k in first["keys"])  # never the private part
            idp.rotate()
            second = (await http.get(server.jwks_url("qmh"))).json()
            assert [k["kid"] for k in second["keys"]] == ["qmh-2", "qmh-1"]
            assert idp.fetches == 2


def test_hostile_tokens_have_the_shape_an_attacker_sends() -> None:
    idp = Idp("qmh", "https://login.qmh.example")
    header = json.loads(base64.urlsafe_b64decode(idp.hs256_with_public_key().split(".")[0] + "=="))
    assert header == {"alg": "HS256", "kid": "qmh-1"}
    assert idp.unsigned_token().endswith(".")
