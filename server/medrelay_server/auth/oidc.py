"""Verifying an institution's OpenID Connect ID tokens and back-channel logout tokens.

JOSE parsing and signature verification are joserfc's; this module decides which key and
which algorithm may be used, and turns every refusal into a distinct
:class:`~medrelay_server.auth.errors.AuthReason`. The checks, in order:

1. shape: at most ``MAX_TOKEN`` characters, a compact JWS (three segments; a JWE is
   refused), a JSON object payload (``malformed``);
2. ``alg: none`` in any spelling (``alg_none``);
3. the unverified ``iss`` names a configured issuer (``issuer_unknown``); the token is then
   judged by that issuer's rules only;
4. the algorithm is one the issuer allows (``alg_not_allowed``); an HMAC algorithm is
   ``hs_rs_confusion``: issuers sign with asymmetric keys, and HMAC would use the public
   key as the secret;
5. the key: the issuer's key with the token's ``kid``; an unknown ``kid`` refetches the
   JWKS (rate limited: key rotation); a ``kid`` of another issuer's key is
   ``foreign_key``, none at all ``unknown_key``; a key of the wrong type or pinned to
   another algorithm is ``key_mismatch``;
6. the signature; when it fails, a signature that verifies under another issuer's key is
   ``foreign_key``, anything else ``bad_signature``;
7. claims, each with a bounded clock skew (the issuer's ``leeway``, at most 300 s):
   ``aud`` (``audience_wrong``), ``nbf``/``iat`` in the future (``not_yet_valid``),
   ``exp`` (``expired``), an ID token older than ``max_age`` (``too_old``), required and
   mapped claims (``claim_missing`` / ``claim_invalid``), and the token type (a logout
   token is not an ID token: ``wrong_token_type``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from joserfc import jws
from joserfc.errors import (
    ClaimError,
    ExpiredTokenError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import ECKey, Key, KeySet, RSAKey
from joserfc.jwt import JWTClaimsRegistry

from .errors import AuthError, AuthReason, refuse
from .issuers import IssuerConfig
from .jwks import JwksSource, RemoteJwks, StaticJwks

MAX_TOKEN = 8192
MAX_SUBJECT = 96
LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"
_EC_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


@dataclass(frozen=True, slots=True)
class IdClaims:
    """What medrelay takes from a verified ID token (after the institution's claim map)."""

    institution: str
    subject: str
    role: str | None
    registration: str | None
    sid: str | None
    issued_at: int
    expires_at: int

    @property
    def user(self) -> str:
        return f"{self.institution}:{self.subject}"


@dataclass(frozen=True, slots=True)
class LogoutClaims:
    """A verified back-channel logout: by subject, by IdP session id, or both."""

    institution: str
    subject: str | None
    sid: str | None
    jti: str


@dataclass(frozen=True, slots=True)
class _Parsed:
    obj: Any
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


class OidcVerifier:
    """Verifies tokens from the configured issuers; ``sources`` maps institution id to the
    institution's keys."""

    def __init__(self, issuers: Sequence[IssuerConfig], sources: Mapping[str, JwksSource]) -> None:
        self.issuers = {c.id: c for c in issuers}
        self._by_iss = {c.issuer: c for c in issuers}
        self.sources = dict(sources)

    @classmethod
    def from_config(
        cls, issuers: Sequence[IssuerConfig], client: httpx.AsyncClient
    ) -> OidcVerifier:
        sources: dict[str, JwksSource] = {}
        for c in issuers:
            if c.jwks_url is not None:
                sources[c.id] = RemoteJwks(c.jwks_url, client)
            else:
                sources[c.id] = StaticJwks(c.jwks, origin=c.id)
        return cls(issuers, sources)

    def __repr__(self) -> str:
        return f"OidcVerifier(institutions={sorted(self.issuers)})"

    async def verify_id_token(self, token: str, now: int) -> IdClaims:
        issuer, claims = await self._verify(token, now, what="id_token")
        if "events" in claims or claims.get("typ") == "logout+jwt":
            raise refuse(AuthReason.WRONG_TOKEN_TYPE, what="id_token", institution=issuer.id)
        iat = _time(claims, "iat", issuer, "id_token")
        if now - iat > issuer.max_age + issuer.leeway:
            raise refuse(AuthReason.TOO_OLD, what="id_token", institution=issuer.id)
        m = issuer.claims
        subject = _string(claims, m.subject, issuer, "id_token", required=True, limit=MAX_SUBJECT)
        assert subject is not None
        role = _string(claims, m.role, issuer, "id_token", required=False)
        registration = _string(claims, m.registration, issuer, "id_token", required=False)
        return IdClaims(
            institution=issuer.id,
            subject=subject,
            role=role,
            registration=registration.strip().upper() if registration else None,
            sid=_string(claims, "sid", issuer, "id_token", required=False),
            issued_at=iat,
            expires_at=_time(claims, "exp", issuer, "id_token"),
        )

    async def verify_logout_token(self, token: str, now: int) -> LogoutClaims:
        """OpenID Connect Back-Channel Logout 1.0 §2.4: the events claim names the logout
        event, ``sub`` or ``sid`` is present, ``nonce`` is absent, ``jti`` and ``iat`` are
        present, and ``iat`` is within the issuer's ``max_age``."""
        what = "logout_token"
        issuer, claims = await self._verify(token, now, what=what)
        events = claims.get("events")
        if not isinstance(events, dict) or LOGOUT_EVENT not in events or "nonce" in claims:
            raise refuse(AuthReason.WRONG_TOKEN_TYPE, what=what, institution=issuer.id)
        iat = _time(claims, "iat", issuer, what)
        if now - iat > issuer.max_age + issuer.leeway:
            raise refuse(AuthReason.TOO_OLD, what=what, institution=issuer.id)
        subject = _string(claims, issuer.claims.subject, issuer, what, required=False)
        sid = _string(claims, "sid", issuer, what, required=False)
        jti = _string(claims, "jti", issuer, what, required=True)
        if subject is None and sid is None:
            raise refuse(AuthReason.CLAIM_MISSING, what=what, institution=issuer.id)
        assert jti is not None
        return LogoutClaims(institution=issuer.id, subject=subject, sid=sid, jti=jti)

    # ------------------------------------------------------------------------------------
    async def _verify(
        self, token: str, now: int, *, what: str
    ) -> tuple[IssuerConfig, Mapping[str, Any]]:
        parsed = _parse(token, what)
        alg, kid = parsed.header["alg"], parsed.header.get("kid")
        if alg.lower() == "none":
            raise refuse(AuthReason.ALG_NONE, what=what, alg=alg)
        iss = parsed.claims.get("iss")
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise refuse(AuthReason.ISSUER_UNKNOWN, what=what, kid=kid, alg=alg)
        if alg not in issuer.algorithms:
            reason = AuthReason.HS_RS_CONFUSION if alg.startswith("HS") else None
            raise refuse(
                reason or AuthReason.ALG_NOT_ALLOWED,
                what=what,
                institution=issuer.id,
                kid=kid,
                alg=alg,
            )
        if kid is not None and not isinstance(kid, str):
            raise refuse(AuthReason.MALFORMED, what=what, institution=issuer.id)
        candidates = await self._candidates(issuer, kid, alg, now, what)
        if not any(_signature_ok(parsed, key, alg) for key in candidates):
            foreign = self._foreign_signature(issuer, parsed, alg)
            reason = AuthReason.FOREIGN_KEY if foreign else AuthReason.BAD_SIGNATURE
            raise refuse(reason, what=what, institution=issuer.id, kid=kid, alg=alg)
        _check_claims(parsed.claims, issuer, now, what)
        return issuer, parsed.claims

    async def _candidates(
        self, issuer: IssuerConfig, kid: str | None, alg: str, now: int, what: str
    ) -> list[Key]:
        source = self.sources[issuer.id]
        keys = _by_kid(await source.get(now), kid)
        if not keys and kid is not None:
            keys = _by_kid(await source.refresh(now), kid)
        if not keys:
            foreign = kid is not None and self._other_issuer_has_kid(issuer, kid)
            reason = AuthReason.FOREIGN_KEY if foreign else AuthReason.UNKNOWN_KEY
            raise refuse(reason, what=what, institution=issuer.id, kid=kid, alg=alg)
        usable = [k for k in keys if _key_fits(k, alg)]
        if not usable:
            raise refuse(
                AuthReason.KEY_MISMATCH, what=what, institution=issuer.id, kid=kid, alg=alg
            )
        return usable

    def _others(self, issuer: IssuerConfig) -> list[KeySet]:
        out = []
        for ident, source in self.sources.items():
            cached = source.cached()
            if ident != issuer.id and cached is not None:
                out.append(cached)
        return out

    def _other_issuer_has_kid(self, issuer: IssuerConfig, kid: str) -> bool:
        return any(_by_kid(keys, kid) for keys in self._others(issuer))

    def _foreign_signature(self, issuer: IssuerConfig, parsed: _Parsed, alg: str) -> bool:
        return any(
            _key_fits(key, alg) and _signature_ok(parsed, key, alg)
            for keys in self._others(issuer)
            for key in keys
        )


def _parse(token: str, what: str) -> _Parsed:
    if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or token.count(".") != 2:
        raise refuse(AuthReason.MALFORMED, what=what)
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        header = obj.headers()
        claims = json.loads(obj.payload)
    except (JoseError, ValueError, UnicodeError) as exc:
        raise refuse(AuthReason.MALFORMED, what=what) from exc
    if not isinstance(claims, dict) or not isinstance(header.get("alg"), str):
        raise refuse(AuthReason.MALFORMED, what=what)
    return _Parsed(obj, header, claims)


def _by_kid(keys: KeySet, kid: str | None) -> list[Key]:
    if kid is None:
        return list(keys)
    return [k for k in keys if k.kid == kid]


def _key_fits(key: Key, alg: str) -> bool:
    pinned = key.get("alg")
    if pinned is not None and pinned != alg:
        return False
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, RSAKey)
    curve = _EC_CURVES.get(alg)
    return isinstance(key, ECKey) and curve is not None and key.get("crv") == curve


def _signature_ok(parsed: _Parsed, key: Key, alg: str) -> bool:
    try:
        return bool(jws.validate_compact(parsed.obj, key, algorithms=[alg]))
    except (JoseError, ValueError):
        return False


def _check_claims(claims: Mapping[str, Any], issuer: IssuerConfig, now: int, what: str) -> None:
    """Audience first, then the clock, then the rest: the reason does not depend on the
    order of the claims in the token."""

    def registry(**options: Any) -> JWTClaimsRegistry:
        return JWTClaimsRegistry(now=now, leeway=issuer.leeway, **options)

    steps: tuple[tuple[JWTClaimsRegistry, tuple[str, ...], AuthReason], ...] = (
        (registry(aud={"value": issuer.audience}), ("aud",), AuthReason.AUDIENCE_WRONG),
        (registry(), ("nbf", "iat"), AuthReason.NOT_YET_VALID),
        (registry(), ("exp",), AuthReason.EXPIRED),
    )
    for step, names, reason in steps:
        try:
            step.validate({n: claims[n] for n in names if n in claims})
        except ExpiredTokenError as exc:
            raise refuse(AuthReason.EXPIRED, what=what, institution=issuer.id) from exc
        except ClaimError as exc:
            raise refuse(reason, what=what, institution=issuer.id) from exc
    azp = claims.get("azp")
    if azp is not None and azp != issuer.audience:
        raise refuse(AuthReason.AUDIENCE_WRONG, what=what, institution=issuer.id)
    whole = registry(
        iss={"essential": True, "value": issuer.issuer},
        aud={"essential": True, "value": issuer.audience},
        exp={"essential": True},
        iat={"essential": True},
    )
    try:
        whole.validate(dict(claims))
    except ClaimError as exc:
        missing = isinstance(exc, MissingClaimError)
        reason = AuthReason.CLAIM_MISSING if missing else AuthReason.CLAIM_INVALID
        raise refuse(reason, what=what, institution=issuer.id) from exc


def _time(claims: Mapping[str, Any], name: str, issuer: IssuerConfig, what: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise refuse(AuthReason.CLAIM_INVALID, what=what, institution=issuer.id)
    return int(value)


def _string(
    claims: Mapping[str, Any],
    name: str,
    issuer: IssuerConfig,
    what: str,
    *,
    required: bool,
    limit: int = 128,
) -> str | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise refuse(AuthReason.CLAIM_MISSING, what=what, institution=issuer.id)
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise refuse(AuthReason.CLAIM_INVALID, what=what, institution=issuer.id)
    return value


__all__ = ["AuthError", "IdClaims", "LogoutClaims", "OidcVerifier"]
