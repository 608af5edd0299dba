"""Typed authentication refusals: one wire code, a distinct ``reason`` for operators.

::

    RequestError                       (protocol; code set per instance)
    +-- AuthError                      reason: AuthReason, logged and put in the message
        +-- TokenRefused               AUTH_FAILED    (bad, foreign or unusable token)
        +-- TokenExpired               TOKEN_EXPIRED  (expired, or an ID token too old)
        +-- AccountRefused             AUTH_FAILED    (valid token, but this account may not
                                                       sign in: register, deprovisioning)

The wire carries only the code and ``"<reason>"`` as the message: a client learns which rule
refused it (so a misconfigured institution is quick to diagnose) but never an oracle about
keys, and never the token. :func:`refuse` logs every refusal once, with the institution,
key id and algorithm when known, never the token.
"""

from __future__ import annotations

import enum
import logging

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError

log = logging.getLogger("medrelay_server.auth")


class AuthReason(enum.StrEnum):
    MALFORMED = "malformed"
    """Not a compact JWS (a JWE, junk, oversized, bad JSON) or a required header missing."""
    ISSUER_UNKNOWN = "issuer_unknown"
    AUDIENCE_WRONG = "audience_wrong"
    EXPIRED = "expired"
    TOO_OLD = "too_old"
    """An ID token issued longer ago than the institution's ``max_age`` (replayed)."""
    NOT_YET_VALID = "not_yet_valid"
    """``nbf`` or ``iat`` further in the future than the clock-skew bound."""
    ALG_NONE = "alg_none"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    HS_RS_CONFUSION = "hs_rs_confusion"
    """An HMAC algorithm where the institution signs with a public key (the classic attack:
    the public key used as the HMAC secret)."""
    FOREIGN_KEY = "foreign_key"
    """Signed with (or naming) a key that belongs to another configured issuer."""
    UNKNOWN_KEY = "unknown_key"
    KEY_MISMATCH = "key_mismatch"
    """The key named by ``kid`` is of another type or pinned to another algorithm."""
    BAD_SIGNATURE = "bad_signature"
    CLAIM_MISSING = "claim_missing"
    CLAIM_INVALID = "claim_invalid"
    REPLAYED = "replayed"
    """An ID token exchanged a second time (a copied token)."""
    WRONG_TOKEN_TYPE = "wrong_token_type"  # noqa: S105 - a reason, not a secret
    """A token of another kind (an access token where an ID token is due, a logout token
    used to sign in, ...)."""
    SESSION_REVOKED = "session_revoked"
    REFRESH_INVALID = "refresh_invalid"
    REFRESH_REUSED = "refresh_reused"
    """A rotated refresh token presented again: the whole session is revoked (theft)."""
    ENROLLMENT_INVALID = "enrollment_invalid"
    NOT_REGISTERED = "not_registered"
    """A doctor whose token names no registration number, or one not on the register."""
    REGISTRATION_INACTIVE = "registration_inactive"
    ACCOUNT_DISABLED = "account_disabled"


_EXPIRY = frozenset({AuthReason.EXPIRED, AuthReason.TOO_OLD})
_ACCOUNT = frozenset(
    {AuthReason.NOT_REGISTERED, AuthReason.REGISTRATION_INACTIVE, AuthReason.ACCOUNT_DISABLED}
)


class AuthError(RequestError):
    """Base of every authentication refusal; ``reason`` says which rule refused."""

    def __init__(self, code: ErrorCode, reason: AuthReason) -> None:
        super().__init__(code, str(reason))
        self.reason = reason


class TokenRefused(AuthError):
    def __init__(self, reason: AuthReason) -> None:
        super().__init__(ErrorCode.AUTH_FAILED, reason)


class TokenExpired(AuthError):
    def __init__(self, reason: AuthReason = AuthReason.EXPIRED) -> None:
        super().__init__(ErrorCode.TOKEN_EXPIRED, reason)


class AccountRefused(AuthError):
    def __init__(self, reason: AuthReason) -> None:
        super().__init__(ErrorCode.AUTH_FAILED, reason)


def auth_error(reason: AuthReason) -> AuthError:
    if reason in _EXPIRY:
        return TokenExpired(reason)
    if reason in _ACCOUNT:
        return AccountRefused(reason)
    return TokenRefused(reason)


def refuse(
    reason: AuthReason,
    *,
    what: str,
    institution: str | None = None,
    kid: object = None,
    alg: object = None,
) -> AuthError:
    """Log a refusal (never the token) and return the error to raise."""
    log.warning(
        "auth refused: what=%s reason=%s institution=%s kid=%.64r alg=%.16r",
        what,
        reason,
        institution or "-",
        kid,
        alg,
    )
    return auth_error(reason)
