"""medrelay's own tokens: short-lived access tokens (JWT, ES256, signed with the server's
key) and opaque refresh tokens and tablet enrollment credentials (random, stored hashed).

An institution's ID token is exchanged once, at sign-in (:mod:`medrelay_server.signin`);
from then on the gateway sees only medrelay access tokens, verified here without any
network I/O, so :class:`MedrelayTokens` is the ``IdentityProvider`` the gateway is given.

Access token: header ``{"alg": "ES256", "typ": "at+jwt", "kid"}``, claims ``iss``
``"medrelay"``, ``aud`` ``"medrelay-gateway"``, ``sub`` (the user id), ``inst``, ``kind``
(``person`` | ``tablet``), ``sid`` (the session: the refresh-token family), ``iat``,
``exp``. Lifetime ``access_ttl`` (15 minutes by default): a revoked session is refused by
every node within that time even if the revocation never reaches it, and within one
re-check interval on nodes that load revocations (:meth:`MedrelayTokens.revoke`).

The signing keys live in one JSON key set file (0600, created on first use) that every
gateway node reads; the first key signs, all of them verify, so a key is rotated by adding a
new one in front and removing the old one after ``access_ttl``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import ClaimError, ExpiredTokenError, JoseError
from joserfc.jwk import ECKey, KeySet
from joserfc.jwt import JWTClaimsRegistry

from .base import Principal
from .errors import AuthReason, refuse
from .files import create_private, read_private

ISSUER = "medrelay"
AUDIENCE = "medrelay-gateway"
ALG = "ES256"
TYP = "at+jwt"
ACCESS_TTL = 15 * 60
LEEWAY = 30
MAX_TOKEN = 4096
REFRESH_PREFIX = "mrrt1."
ENROLL_PREFIX = "mrenr1."
KINDS = ("person", "tablet")
_CLAIM_REASONS = {
    "aud": AuthReason.AUDIENCE_WRONG,
    "iat": AuthReason.NOT_YET_VALID,
    "nbf": AuthReason.NOT_YET_VALID,
}


def load_or_create_keys(path: Path) -> KeySet:
    """The server's token signing keys; a new P-256 key is made (0600) when the file is
    missing. A file readable by group or others is refused."""
    raw = read_private(path)
    if raw is None:
        key = ECKey.generate_key("P-256", parameters={"use": "sig", "alg": ALG}, auto_kid=True)
        create_private(path, json.dumps({"keys": [key.as_dict(private=True)]}).encode())
        raw = read_private(path)
        assert raw is not None
    keys = KeySet.import_key_set(json.loads(raw))
    if not keys or not all(isinstance(k, ECKey) and k.is_private and k.kid for k in keys):
        raise ValueError(f"{path}: expected private P-256 keys with key ids")
    return keys


def new_secret() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def secret_hash(secret: str) -> bytes:
    """Refresh tokens and enrollment secrets are 256-bit random values: a plain SHA-256 is
    enough to store them (nothing to brute-force), and lookups stay one index probe."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


@dataclass(frozen=True, slots=True)
class Access:
    token: str
    expires_at: int


class MedrelayTokens:
    """Issues and verifies access tokens; the gateway's ``IdentityProvider``."""

    def __init__(self, keys: KeySet, *, access_ttl: int = ACCESS_TTL) -> None:
        signing = next(iter(keys), None)
        if signing is None:
            raise ValueError("no signing key")
        self._keys = keys
        self._signing = signing
        self.access_ttl = access_ttl
        self._revoked: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"MedrelayTokens(kid={self._signing.kid!r}, keys=<redacted>)"

    @classmethod
    def from_file(cls, path: Path, *, access_ttl: int = ACCESS_TTL) -> MedrelayTokens:
        return cls(load_or_create_keys(path), access_ttl=access_ttl)

    def issue(self, *, user: str, institution: str, kind: str, sid: str, now: int) -> Access:
        if kind not in KINDS:
            raise ValueError("kind must be person or tablet")
        exp = now + self.access_ttl
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": user,
            "inst": institution,
            "kind": kind,
            "sid": sid,
            "iat": now,
            "exp": exp,
        }
        header = {"alg": ALG, "typ": TYP, "kid": self._signing.kid}
        token = jwt.encode(header, claims, self._signing, algorithms=[ALG], default_type=None)
        return Access(token, exp)

    def revoke(self, sid: str, *, until: int) -> None:
        """Refuse access tokens of session ``sid`` until ``until`` (their latest expiry)."""
        self._revoked[sid] = max(until, self._revoked.get(sid, 0))

    def forget_expired_revocations(self, now: int) -> None:
        for sid in [s for s, until in self._revoked.items() if until < now]:
            del self._revoked[sid]

    def verify(self, token: str, now: int) -> Principal:
        claims = self._verified_claims(token, now)
        sub, inst, kind, sid = (claims.get(k) for k in ("sub", "inst", "kind", "sid"))
        if not all(isinstance(v, str) and 0 < len(v) <= 128 for v in (sub, inst, sid)):
            raise refuse(AuthReason.CLAIM_INVALID, what="access_token")
        if kind not in KINDS:
            raise refuse(AuthReason.CLAIM_INVALID, what="access_token")
        assert isinstance(sub, str) and isinstance(inst, str) and isinstance(sid, str)
        if sid in self._revoked:
            raise refuse(AuthReason.SESSION_REVOKED, what="access_token", institution=inst)
        return Principal(user=sub, institution=inst, kind=str(kind), expires_at=int(claims["exp"]))

    def _verified_claims(self, token: str, now: int) -> dict[str, Any]:
        what = "access_token"
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN or token.count(".") != 2:
            raise refuse(AuthReason.MALFORMED, what=what)
        try:
            obj = jws.extract_compact(token.encode("ascii"))
            header = obj.headers()
        except (JoseError, ValueError, UnicodeError) as exc:
            raise refuse(AuthReason.MALFORMED, what=what) from exc
        alg, kid = header.get("alg"), header.get("kid")
        if header.get("typ") != TYP:
            raise refuse(AuthReason.WRONG_TOKEN_TYPE, what=what, kid=kid, alg=alg)
        if alg != ALG:
            reason = AuthReason.ALG_NONE if str(alg).lower() == "none" else None
            raise refuse(reason or AuthReason.ALG_NOT_ALLOWED, what=what, kid=kid, alg=alg)
        key = next((k for k in self._keys if k.kid == kid), None) if isinstance(kid, str) else None
        if key is None:
            raise refuse(AuthReason.UNKNOWN_KEY, what=what, kid=kid, alg=alg)
        try:
            if not jws.validate_compact(obj, key, algorithms=[ALG]):
                raise refuse(AuthReason.BAD_SIGNATURE, what=what, kid=kid, alg=alg)
            claims = json.loads(obj.payload)
        except (JoseError, ValueError) as exc:
            raise refuse(AuthReason.MALFORMED, what=what) from exc
        if not isinstance(claims, dict):
            raise refuse(AuthReason.MALFORMED, what=what)
        registry = JWTClaimsRegistry(
            now=now,
            leeway=LEEWAY,
            iss={"essential": True, "value": ISSUER},
            aud={"essential": True, "value": AUDIENCE},
            exp={"essential": True},
            iat={"essential": True},
            sub={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError as exc:
            raise refuse(AuthReason.EXPIRED, what=what) from exc
        except ClaimError as exc:
            reason = _CLAIM_REASONS.get(exc.claim, AuthReason.CLAIM_INVALID)
            raise refuse(reason, what=what) from exc
        return claims


def split_credential(value: object, prefix: str) -> tuple[str, str] | None:
    """``<prefix><id>.<secret>`` -> (id, secret), or None when it is not shaped so."""
    if not isinstance(value, str) or not value.startswith(prefix) or len(value) > 256:
        return None
    ident, _, secret = value[len(prefix) :].partition(".")
    if not ident or not secret or not ident.isalnum():
        return None
    return ident, secret


def new_id() -> str:
    return os.urandom(12).hex()
