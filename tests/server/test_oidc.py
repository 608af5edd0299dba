"""ID-token verification against a real HTTP JWKS endpoint on loopback, with two
institutions (RSA and EC keys): every bad token is refused with its own reason and logged
without the token; key rotation at the issuer is picked up, rate limited."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from medrelay_protocol.codes import ErrorCode
from medrelay_server.auth.errors import AuthError, AuthReason
from medrelay_server.auth.issuers import ConfigError, parse_issuers
from medrelay_server.auth.jwks import JwksUnavailable, RemoteJwks
from medrelay_server.auth.oidc import OidcVerifier

from .test_oidc_standin import Idp, IdpServer, b64, serve_idps


@dataclass
class World:
    server: IdpServer
    qmh: Idp
    clinic: Idp
    verifier: OidcVerifier

    def jwks(self, name: str) -> RemoteJwks:
        source = self.verifier.sources[name]
        assert isinstance(source, RemoteJwks)
        return source


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    qmh, clinic = Idp("qmh", ""), Idp("clinic", "", alg="ES256")
    async with serve_idps(qmh, clinic) as server, httpx.AsyncClient() as http:
        configs = parse_issuers(
            {"institution": [server.issuer_config("qmh"), server.issuer_config("clinic")]},
            base=tmp_path,
            data_dir=tmp_path,
        )
        yield World(server, qmh, clinic, OidcVerifier.from_config(configs, http))


def now() -> int:
    return int(time.time())


async def refused(world: World, token: str, at: int | None = None) -> AuthError:
    with pytest.raises(AuthError) as info:
        await world.verifier.verify_id_token(token, at if at is not None else now())
    return info.value


async def test_good_tokens_of_both_institutions(world: World) -> None:
    a = await world.verifier.verify_id_token(world.qmh.token(), now())
    assert (a.institution, a.subject, a.user) == ("qmh", "dr-chan", "qmh:dr-chan")
    assert (a.role, a.registration) == ("doctor", "M15833")
    b = await world.verifier.verify_id_token(
        world.clinic.token(sub="nurse-ho", role="nurse"), now()
    )
    assert (b.institution, b.user, b.role) == ("clinic", "clinic:nurse-ho", "nurse")
    listed = await world.verifier.verify_id_token(world.qmh.token(aud=["other", "medrelay"]), now())
    assert listed.subject == "dr-chan"


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "dr-evil"
    return ".".join((header, b64(json.dumps(claims).encode()), signature))


BAD: list[tuple[str, Any, AuthReason, ErrorCode]] = [
    ("junk", lambda w: "not-a-token", AuthReason.MALFORMED, ErrorCode.AUTH_FAILED),
    ("jwe", lambda w: "a.b.c.d.e", AuthReason.MALFORMED, ErrorCode.AUTH_FAILED),
    ("alg none", lambda w: w.qmh.unsigned_token(), AuthReason.ALG_NONE, ErrorCode.AUTH_FAILED),
    (
        "alg None",
        lambda w: w.qmh.unsigned_token("None"),
        AuthReason.ALG_NONE,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "unknown issuer",
        lambda w: w.qmh.token(iss="https://evil.example"),
        AuthReason.ISSUER_UNKNOWN,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "other audience",
        lambda w: w.qmh.token(aud="another-app"),
        AuthReason.AUDIENCE_WRONG,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "authorised party is another app",
        lambda w: w.qmh.token(aud=["medrelay", "x"], azp="x"),
        AuthReason.AUDIENCE_WRONG,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "expired beyond the skew",
        lambda w: w.qmh.token(iat=now() - 200, exp=now() - 61),
        AuthReason.EXPIRED,
        ErrorCode.TOKEN_EXPIRED,
    ),
    (
        "not yet valid beyond the skew",
        lambda w: w.qmh.token(nbf=now() + 120),
        AuthReason.NOT_YET_VALID,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "issued in the future",
        lambda w: w.qmh.token(iat=now() + 120, exp=now() + 600),
        AuthReason.NOT_YET_VALID,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "issued too long ago",
        lambda w: w.qmh.token(iat=now() - 3600, exp=now() + 600),
        AuthReason.TOO_OLD,
        ErrorCode.TOKEN_EXPIRED,
    ),
    (
        "algorithm the issuer does not use",
        lambda w: w.qmh.token(alg="RS512"),
        AuthReason.ALG_NOT_ALLOWED,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "HS256 keyed with the RSA public key",
        lambda w: w.qmh.hs256_with_public_key(),
        AuthReason.HS_RS_CONFUSION,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "another issuer's key and kid",
        lambda w: w.clinic.token(iss=w.qmh.issuer, alg="ES256"),
        AuthReason.ALG_NOT_ALLOWED,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "unknown key id",
        lambda w: w.qmh.token(kid="nobody-knows"),
        AuthReason.UNKNOWN_KEY,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "signature does not verify (payload changed)",
        lambda w: tampered(w.qmh.token()),
        AuthReason.BAD_SIGNATURE,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "no subject",
        lambda w: w.qmh.token(sub=None),
        AuthReason.CLAIM_MISSING,
        ErrorCode.AUTH_FAILED,
    ),
    ("no expiry", lambda w: w.qmh.token(exp=None), AuthReason.CLAIM_MISSING, ErrorCode.AUTH_FAILED),
    (
        "subject not a string",
        lambda w: w.qmh.token(sub=42),
        AuthReason.CLAIM_INVALID,
        ErrorCode.AUTH_FAILED,
    ),
    (
        "a logout token is not an ID token",
        lambda w: w.qmh.logout_token(),
        AuthReason.WRONG_TOKEN_TYPE,
        ErrorCode.AUTH_FAILED,
    ),
]


@pytest.mark.parametrize(("case", "make", "reason", "code"), BAD, ids=[b[0] for b in BAD])
async def test_bad_tokens_are_refused_with_distinct_logged_reasons(
    world: World,
    caplog: pytest.LogCaptureFixture,
    case: str,
    make: Any,
    reason: AuthReason,
    code: ErrorCode,
) -> None:
    token = make(world)
    with caplog.at_level(logging.WARNING, logger="medrelay_server.auth"):
        error = await refused(world, token)
    assert (error.reason, error.code) == (reason, code), case
    assert error.message == str(reason)
    logged = [r.getMessage() for r in caplog.records if r.name == "medrelay_server.auth"]
    assert any(f"reason={reason}" in m for m in logged), logged
    assert token not in caplog.text


async def test_a_key_from_another_issuer_is_recognised(world: World) -> None:
    """The same algorithm at both institutions: a token claiming QMH but signed with the
    other issuer's key is refused as foreign, whether it names that key's id or QMH's."""
    other = Idp("other", world.qmh.issuer)  # an RSA issuer we also trust, as "clinic2"
    async with serve_idps(other) as server2, httpx.AsyncClient() as http:
        configs = parse_issuers(
            {
                "institution": [
                    world.server.issuer_config("qmh"),
                    {**server2.issuer_config("other"), "issuer": "https://other.example"},
                ]
            },
            base=Path("."),
            data_dir=Path("."),
        )
        verifier = OidcVerifier.from_config(configs, http)
        await verifier.verify_id_token(other.token(iss="https://other.example"), now())
        for kid in (other.key.kid, world.qmh.key.kid):
            forged = other.token(kid=kid)  # iss is QMH's
            with pytest.raises(AuthError) as info:
                await verifier.verify_id_token(forged, now())
            assert info.value.reason is AuthReason.FOREIGN_KEY, kid


async def test_clock_skew_is_bounded(world: World) -> None:
    t = now()
    within = world.qmh.token(iat=t - 100, exp=t - 30)  # expired 30 s ago, leeway 60 s
    assert (await world.verifier.verify_id_token(within, t)).subject == "dr-chan"
    early = world.qmh.token(nbf=t + 30)
    assert (await world.verifier.verify_id_token(early, t)).subject == "dr-chan"
    for leeway in (301, -1):
        with pytest.raises(ConfigError):
            parse_issuers(
                {"institution": [world.server.issuer_config("qmh", leeway_seconds=leeway)]},
                base=Path("."),
                data_dir=Path("."),
            )


async def test_key_rotation_is_picked_up_with_a_rate_limit(world: World) -> None:
    t = now()
    await world.verifier.verify_id_token(world.qmh.token(), t)
    assert world.qmh.fetches == 1
    world.qmh.rotate()
    rotated = world.qmh.token()  # signed with qmh-2, not yet known to medrelay
    assert (await world.verifier.verify_id_token(rotated, t)).subject == "dr-chan"
    assert world.qmh.fetches == 2
    # unknown kids within a minute of the last forced fetch do not hit the institution again
    for i in range(5):
        error = await refused(world, world.qmh.token(kid=f"made-up-{i}"), t + 1)
        assert error.reason is AuthReason.UNKNOWN_KEY
    assert world.qmh.fetches == 2
    # after the interval, a new key is fetched again; the retired one is then refused
    retired = world.qmh.keys[-1]
    world.qmh.rotate(keep_old=False)
    assert (await world.verifier.verify_id_token(world.qmh.token(), t + 61)).subject == "dr-chan"
    assert world.qmh.fetches == 3
    error = await refused(world, world.qmh.token(key=retired), t + 62)
    assert error.reason is AuthReason.UNKNOWN_KEY


async def test_keys_are_cached_and_an_outage_keeps_the_last_good_keys(world: World) -> None:
    t = now()
    await world.verifier.verify_id_token(world.qmh.token(), t)
    await world.verifier.verify_id_token(world.qmh.token(), t + 10)
    assert world.qmh.fetches == 1
    world.qmh.down = True
    # the cache is stale after an hour; the refetch fails, the last good keys still work
    later = t + 3601
    token = world.qmh.token(iat=later, exp=later + 300)
    assert (await world.verifier.verify_id_token(token, later)).subject == "dr-chan"
    assert world.qmh.fetches == 2
    # an institution never reached at all is unavailable (retryable), not "bad token"
    world.clinic.down = True
    with pytest.raises(JwksUnavailable) as info:
        await world.verifier.verify_id_token(world.clinic.token(), t)
    assert info.value.code == ErrorCode.UNAVAILABLE


async def test_logout_tokens(world: World) -> None:
    claims = await world.verifier.verify_logout_token(world.qmh.logout_token(sid="s-1"), now())
    assert (claims.institution, claims.subject, claims.sid) == ("qmh", "dr-chan", "s-1")
    with pytest.raises(AuthError) as info:
        await world.verifier.verify_logout_token(world.qmh.token(), now())
    assert info.value.reason is AuthReason.WRONG_TOKEN_TYPE
    with pytest.raises(AuthError) as info:
        await world.verifier.verify_logout_token(world.qmh.logout_token(sub=None), now())
    assert info.value.reason is AuthReason.CLAIM_MISSING


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithms": ["HS256"]}, "algorithms"),
        ({"algorithms": ["none"]}, "algorithms"),
        ({"algorithms": []}, "algorithms"),
        ({"jwks_url": "http://idp.example/jwks"}, "https"),
        ({"jwks": {"keys": []}}, "exactly one"),
        ({"id": "Bad Id"}, "id must"),
        ({"id": "tablet"}, "reserved"),
        ({"colour": "blue"}, "unknown key"),
        ({"claims": {"subject": "sub", "shoe_size": "x"}}, "unknown claims key"),
        ({"external_sender_public": "abcd"}, "64 hex"),
    ],
)
def test_config_refuses_unsafe_or_mistyped_settings(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    entry = {
        "id": "qmh",
        "name": "Queen Mary",
        "issuer": "https://login.qmh.example",
        "audience": "medrelay",
        "algorithms": ["RS256"],
        "jwks_url": "https://login.qmh.example/jwks",
    }
    entry.update(change)
    with pytest.raises(ConfigError, match=message):
        parse_issuers({"institution": [entry]}, base=tmp_path, data_dir=tmp_path)


def test_config_file_toml_and_json(tmp_path: Path) -> None:
    from medrelay_server.auth.issuers import load_issuers

    (tmp_path / "qmh.jwks.json").write_text(json.dumps(Idp("qmh", "x").jwks()))
    toml = tmp_path / "institutions.toml"
    toml.write_text(
        """
[[institution]]
id = "qmh"
name = "Queen Mary Hospital"
issuer = "https://login.qmh.example"
audience = "medrelay"
algorithms = ["RS256"]
jwks_file = "qmh.jwks.json"
leeway_seconds = 30
[institution.claims]
registration = "hk_mchk_no"
doctor_roles = ["doctor", "consultant"]
"""
    )
    [qmh] = load_issuers(toml, data_dir=tmp_path / "data")
    assert qmh.jwks is not None and qmh.jwks_url is None and qmh.leeway == 30
    assert qmh.claims.registration == "hk_mchk_no"
    assert qmh.claims.doctor_roles == ("doctor", "consultant")
    assert (
        qmh.external_sender_key
        == tmp_path / "data" / "institutions" / "qmh" / "external_sender.key"
    )
    js = tmp_path / "institutions.json"
    js.write_text(
        '{"institutions": [{"id": "c", "name": "C", "issuer": "https://c", "audience": "m",'
        ' "jwks_url": "http://127.0.0.1:9/jwks"}]}'
    )
    [c] = load_issuers(js, data_dir=tmp_path)
    assert c.algorithms == ("RS256",)
    js.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        load_issuers(js, data_dir=tmp_path)
