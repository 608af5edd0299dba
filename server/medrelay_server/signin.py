"""HTTP routes of sign-in: institution ID token (or tablet enrollment) -> medrelay tokens.

==================================  ========================================================
``POST /auth/signin``               ``{"id_token": ...}`` from the user's institution, or
                                    ``{"enrollment": ...}`` for a ward tablet; returns an
                                    access token (15 min) and a refresh token; with
                                    ``"identity_key": <hex>`` also the institution's
                                    ``attestation`` of that key (first device only)
``POST /auth/refresh``              ``{"refresh_token": ...}``; returns a new pair (the old
                                    refresh token is spent; presenting it again revokes
                                    the session). The new access token renews an open
                                    socket with a ``reauth`` frame.
``POST /auth/backchannel-logout``   OIDC Back-Channel Logout (form field ``logout_token``):
                                    ends the user's sessions and, per institution, removes
                                    them from every room at the next re-check
``GET /institutions``               ids, names, issuers and external sender public keys
                                    (a client puts the key into a room's genesis)
``GET /directory?q=&specialty=&institution=&limit=``  practitioner search (bearer access
                                    token of a person; tablets are refused)
==================================  ========================================================

Refusals are ``401 {"error": "auth_failed" | "token_expired", "code": <ErrorCode>,
"reason": <AuthReason>}``; an institution whose keys cannot be fetched is ``503``. Every
outcome is journaled (``authenticate``) with the client address and never the token. Token
responses carry ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .auth.errors import AuthError, AuthReason, refuse
from .auth.issuers import load_issuers
from .auth.oidc import OidcVerifier
from .auth.tokens import MedrelayTokens
from .clock import Clock
from .institutions import Institutions, SignerUnavailable
from .register.db import Account, IdentityDb
from .register.directory import search
from .register.recheck import CommitExternal, RegisterRechecker
from .register.sessions import Issued, Revoked, Sessions
from .store.base import AuditRecord, Store, StoreUnavailable

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
MAX_SEEN = 100_000
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

Journal = Callable[[Sequence[AuditRecord]], Awaitable[None]]


class BadRequest(Exception):
    pass


@dataclass
class SigninService:
    oidc: OidcVerifier
    tokens: MedrelayTokens
    idb: IdentityDb
    sessions: Sessions
    institutions: Institutions
    clock: Clock
    journal: Journal
    store: Store | None = None
    """For the pinned identity keys: an attestation is made only for a user who has none
    pinned yet (or for the very key pinned)."""
    _seen: dict[bytes, int] = field(default_factory=dict, repr=False)

    # flows ------------------------------------------------------------------------------
    async def attest(self, account: Account, identity_key: bytes, now: int) -> str | None:
        """The institution's attestation of the identity key the client presents at
        sign-in, hex; None when another key is pinned for the user (a changed identity key
        is an administrator action) or the institution's signer is not in this process."""
        if self.store is None:
            return None
        pinned = await self.store.get_identity(account.user)
        if pinned is not None and pinned != identity_key:
            return None
        institution = self.institutions.get(account.institution)
        if institution is None:
            return None
        try:
            raw = await institution.sender.attest(
                user_id=account.user,
                identity_key=identity_key,
                institution=account.institution,
                issued_at=now,
            )
        except SignerUnavailable:
            return None
        return raw.hex()

    async def sign_in_with_id_token(
        self, id_token: str, identity_key: bytes | None = None
    ) -> dict[str, Any]:
        key = identity_key
        now = self.clock.now()
        claims = await self.oidc.verify_id_token(id_token, now)
        digest = hashlib.sha256(id_token.encode()).digest()
        if digest in self._seen:
            raise refuse(AuthReason.REPLAYED, what="id_token", institution=claims.institution)
        doctor_roles = self.institutions[claims.institution].config.claims.doctor_roles
        account = await self.idb.sign_in_person(
            user=claims.user,
            institution=claims.institution,
            subject=claims.subject,
            role=claims.role,
            registration_no=claims.registration,
            requires_registration=claims.role in doctor_roles,
            now=now,
        )
        issued = await self.sessions.start(account.user, idp_sid=claims.sid, now=now)
        self._remember(digest, until=claims.expires_at, now=now)
        return await self._with_attestation(self._grant(account, issued, now), account, key, now)

    async def sign_in_tablet(
        self, credential: str, identity_key: bytes | None = None
    ) -> dict[str, Any]:
        now = self.clock.now()
        account = await self.sessions.check_enrollment(credential, now=now)
        issued = await self.sessions.start(account.user, idp_sid=None, now=now)
        grant = self._grant(account, issued, now)
        return await self._with_attestation(grant, account, identity_key, now)

    async def _with_attestation(
        self, grant: dict[str, Any], account: Account, key: bytes | None, now: int
    ) -> dict[str, Any]:
        if key is not None:
            attestation = await self.attest(account, key, now)
            if attestation is not None:
                grant["attestation"] = attestation
        return grant

    async def refresh(self, refresh_token: str) -> dict[str, Any]:
        now = self.clock.now()
        try:
            issued, account = await self.sessions.rotate(refresh_token, now=now)
        except AuthError as exc:
            if exc.reason is AuthReason.REFRESH_REUSED:
                family = refresh_token.split(".")[1]
                self.tokens.revoke(family, until=now + self.tokens.access_ttl)
            raise
        return self._grant(account, issued, now)

    async def logout(self, logout_token: str) -> list[str]:
        """Returns the users whose sessions ended."""
        now = self.clock.now()
        claims = await self.oidc.verify_logout_token(logout_token, now)
        revoked: list[Revoked] = []
        users: set[str] = set()
        if claims.subject is not None:
            account = await self.idb.account_by_subject(claims.institution, claims.subject)
            if account is not None:
                revoked += await self.sessions.revoke_user(account.user)
                users.add(account.user)
        if claims.sid is not None:
            found = await self.sessions.revoke_idp_session(claims.institution, claims.sid)
            revoked += found
            users |= {r.user for r in found}
        for r in revoked:
            self.tokens.revoke(r.family, until=now + self.tokens.access_ttl)
        if self.institutions[claims.institution].config.logout_removes:
            for user in sorted(users):
                await self.idb.request_removal(user, reason="back-channel logout", now=now)
        return sorted(users)

    def _grant(self, account: Account, issued: Issued, now: int) -> dict[str, Any]:
        access = self.tokens.issue(
            user=account.user,
            institution=account.institution,
            kind=account.kind,
            sid=issued.family,
            now=now,
        )
        return {
            "access_token": access.token,
            "token_type": "Bearer",
            "expires_in": access.expires_at - now,
            "expires_at": access.expires_at,
            "refresh_token": issued.refresh_token,
            "refresh_expires_at": issued.expires_at,
            "user": account.user,
            "institution": account.institution,
            "kind": account.kind,
        }

    def _remember(self, digest: bytes, *, until: int, now: int) -> None:
        """An ID token is exchanged once (on this node): a copy is refused as ``replayed``.
        Remembered only after a successful exchange, so a retry after ``503`` works."""
        if len(self._seen) >= MAX_SEEN:
            for key in [k for k, exp in self._seen.items() if exp < now]:
                del self._seen[key]
        if len(self._seen) < MAX_SEEN:
            self._seen[digest] = until

    # HTTP -------------------------------------------------------------------------------
    async def signin_endpoint(self, request: Request) -> Response:
        async def run(body: dict[str, Any]) -> dict[str, Any]:
            key = _identity_key(body)
            if isinstance(body.get("id_token"), str) and "enrollment" not in body:
                return await self.sign_in_with_id_token(body["id_token"], key)
            if isinstance(body.get("enrollment"), str) and "id_token" not in body:
                return await self.sign_in_tablet(body["enrollment"], key)
            raise BadRequest('send {"id_token": ...} or {"enrollment": ...}')

        return await self._token_endpoint(request, "signin", run)

    async def refresh_endpoint(self, request: Request) -> Response:
        async def run(body: dict[str, Any]) -> dict[str, Any]:
            token = body.get("refresh_token")
            if not isinstance(token, str):
                raise BadRequest('send {"refresh_token": ...}')
            return await self.refresh(token)

        return await self._token_endpoint(request, "refresh", run)

    async def _token_endpoint(
        self,
        request: Request,
        what: str,
        run: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]],
    ) -> Response:
        source = _peer(request)
        try:
            body = await _json_body(request)
            grant = await run(body)
        except BadRequest as exc:
            return JSONResponse({"error": "bad_request", "message": str(exc)}, 400, NO_STORE)
        except AuthError as exc:
            await self._journal(None, "failure", f"{what}: {exc.reason}", source)
            return _auth_failed(exc)
        except (RequestError, StoreUnavailable) as exc:
            if exc.code != ErrorCode.UNAVAILABLE:
                raise
            return JSONResponse({"error": "unavailable"}, 503, {"Retry-After": "5", **NO_STORE})
        await self._journal(grant["user"], "success", what, source)
        return JSONResponse(grant, 200, NO_STORE)

    async def logout_endpoint(self, request: Request) -> Response:
        source = _peer(request)
        try:
            raw = await _body(request)
            fields = parse_qs(raw.decode("ascii"), max_num_fields=4, strict_parsing=True)
            token = fields.get("logout_token", [""])
            if len(token) != 1:
                raise BadRequest("one logout_token")
            users = await self.logout(token[0])
        except (BadRequest, ValueError, UnicodeError):
            return JSONResponse({"error": "invalid_request"}, 400, NO_STORE)
        except AuthError as exc:
            await self._journal(None, "failure", f"backchannel logout: {exc.reason}", source)
            return JSONResponse(
                {"error": "invalid_request", "reason": str(exc.reason)}, 400, NO_STORE
            )
        for user in users:
            await self._journal(user, "success", "backchannel logout", source)
        if not users:
            await self._journal(None, "success", "backchannel logout: no session", source)
        return Response(status_code=200, headers=NO_STORE)

    async def institutions_endpoint(self, request: Request) -> Response:
        return JSONResponse({"institutions": self.institutions.public_listing()})

    async def directory_endpoint(self, request: Request) -> Response:
        header = request.headers.get("authorization", "")
        if not header.lower().startswith("bearer "):
            return JSONResponse({"error": "unauthenticated"}, 401)
        try:
            principal = self.tokens.verify(header[7:].strip(), self.clock.now())
        except AuthError as exc:
            return _auth_failed(exc)
        if principal.kind != "person":
            return JSONResponse({"error": "forbidden"}, 403)
        p = request.query_params
        try:
            limit = int(p.get("limit", "20"))
            results = await search(
                self.idb.database,
                q=p.get("q") or None,
                specialty=p.get("specialty") or None,
                institution=p.get("institution") or None,
                limit=limit,
            )
        except ValueError as exc:
            return JSONResponse({"error": "bad_request", "message": str(exc)}, 400)
        return JSONResponse({"results": [r.as_json() for r in results]})

    async def _journal(self, user: str | None, outcome: str, detail: str, source: str) -> None:
        record = AuditRecord(
            "authenticate",
            outcome,
            user=user,
            source=source,
            detail=detail,
            ts=self.clock.now(),
        )
        try:
            await self.journal([record])
        except Exception:  # the answer goes out; an unjournaled outcome is logged loudly
            log.exception("could not journal a sign-in outcome")


def signin_routes(service: SigninService) -> list[Route]:
    return [
        Route("/auth/signin", service.signin_endpoint, methods=["POST"]),
        Route("/auth/refresh", service.refresh_endpoint, methods=["POST"]),
        Route("/auth/backchannel-logout", service.logout_endpoint, methods=["POST"]),
        Route("/institutions", service.institutions_endpoint, methods=["GET"]),
        Route("/directory", service.directory_endpoint, methods=["GET"]),
    ]


def _auth_failed(exc: AuthError) -> Response:
    error = "token_expired" if exc.code == ErrorCode.TOKEN_EXPIRED else "auth_failed"
    body = {"error": error, "code": int(exc.code), "reason": str(exc.reason)}
    return JSONResponse(body, 401, {"WWW-Authenticate": "Bearer", **NO_STORE})


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise BadRequest("body too large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            raise BadRequest("body too large")
    return bytes(data)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await _body(request))
    except (ValueError, UnicodeError) as exc:
        raise BadRequest("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _identity_key(body: dict[str, Any]) -> bytes | None:
    value = body.get("identity_key")
    if value is None:
        return None
    try:
        key = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BadRequest("identity_key: 64 hex characters (an Ed25519 public key)")
    return key


def _peer(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"


@dataclass
class IdentityStack:
    """Everything sign-in needs, built once by :func:`build_identity` for ``create_app``."""

    tokens: MedrelayTokens
    oidc: OidcVerifier
    idb: IdentityDb
    sessions: Sessions
    institutions: Institutions
    service: SigninService
    http: httpx.AsyncClient

    def routes(self) -> list[Route]:
        return signin_routes(self.service)

    def rechecker(self, store: Store, commit: CommitExternal) -> RegisterRechecker:
        return RegisterRechecker(
            idb=self.idb,
            sessions=self.sessions,
            store=store,
            institutions=self.institutions,
            commit=commit,
            tokens=self.tokens,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.idb.close()


def build_identity(
    *,
    institutions_file: Path,
    data_dir: Path,
    database_url: str,
    store: Store,
    clock: Clock,
    schema: str | None = None,
    http: httpx.AsyncClient | None = None,
) -> IdentityStack:
    """Read the institutions file, load (or create) the token signing keys
    (``<data_dir>/token_keys.json``) and the external sender keys, and wire sign-in."""
    configs = load_issuers(institutions_file, data_dir=data_dir)
    institutions = Institutions.from_config(configs)
    client = http or httpx.AsyncClient()
    oidc = OidcVerifier.from_config(configs, client)
    tokens = MedrelayTokens.from_file(data_dir / "token_keys.json")
    idb = IdentityDb(database_url, schema=schema)
    sessions = Sessions(idb.database)
    service = SigninService(
        oidc, tokens, idb, sessions, institutions, clock, store.journal, store=store
    )
    return IdentityStack(tokens, oidc, idb, sessions, institutions, service, client)
