"""Development token issuer: HMAC-signed tokens for the embedded default and the tests.

Enabled only by an explicit flag (``medrelay serve --dev-issuer``). It issues a token for any
user name asked for, so it must never face a real network; production uses OIDC issuers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
from pathlib import Path

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.enrolment import IdentityAttestation
from medrelay_protocol.errors import RequestError

from .base import Principal

PREFIX = "mrdev1."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


INSTITUTION = "dev"


class DevIssuer:
    """Also the development institution ``dev``: it attests users' first identity keys with
    an Ed25519 key derived from its secret (so every node given the same key file attests
    with the same key), served as the ``dev`` institution by ``GET /institutions``."""

    def __init__(self, key: bytes | None = None, *, ttl: int = 3600) -> None:
        self._key = key if key is not None else os.urandom(32)
        self.ttl = ttl
        seed = hashlib.blake2b(self._key, digest_size=32, person=b"mr-dev-attest").digest()
        self._attest_key = SigningKey(seed)

    @property
    def public_key(self) -> bytes:
        """The ``dev`` institution's attestation public key."""
        return self._attest_key.public

    async def attest(
        self, *, user_id: str, identity_key: bytes, institution: str, issued_at: int
    ) -> bytes:
        return IdentityAttestation.issue(
            self._attest_key,
            user_id=user_id,
            identity_key=identity_key,
            institution=institution,
            issued_at=issued_at,
        ).raw

    def __repr__(self) -> str:
        return "DevIssuer(key=<redacted>)"

    @classmethod
    def from_file(cls, path: Path) -> DevIssuer:
        """The key in ``path`` (created 0600 if missing): tokens then survive restarts and
        are accepted by every node given the same file."""
        if not path.exists():
            # written whole under a private name, then linked into place: nodes started at
            # once race to create it, and the loser reads the winner's complete key
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(os.urandom(32))
                with contextlib.suppress(FileExistsError):
                    os.link(staged, path)
            finally:
                staged.unlink()
        key = path.read_bytes()
        if len(key) != 32:
            raise ValueError(f"{path} does not hold a 32-byte key")
        return cls(key)

    def issue(self, user: str, now: int, *, kind: str = "person", ttl: int | None = None) -> str:
        claims = {"sub": user, "inst": INSTITUTION, "kind": kind, "exp": now + (ttl or self.ttl)}
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{PREFIX}{body}.{_b64(mac)}"

    def verify(self, token: str, now: int) -> Principal:
        try:
            if not token.startswith(PREFIX):
                raise ValueError
            body, mac = token[len(PREFIX) :].split(".")
            expected = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                raise ValueError
            claims = json.loads(_unb64(body))
            user, kind, exp = str(claims["sub"]), str(claims["kind"]), int(claims["exp"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RequestError(ErrorCode.AUTH_FAILED, "invalid token") from exc
        if not 0 < len(user) <= 128 or kind not in ("person", "tablet"):
            raise RequestError(ErrorCode.AUTH_FAILED, "invalid token")
        if now >= exp:
            raise RequestError(ErrorCode.TOKEN_EXPIRED, "token expired")
        return Principal(user=user, institution=INSTITUTION, kind=kind, expires_at=exp)
