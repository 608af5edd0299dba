"""Stable numeric codes: per-request ``ErrorCode`` and connection-fatal ``CloseCode``.

Numbers never change meaning once released; new codes get new numbers. ``docs/protocol.md``
lists the same tables and a test keeps the two in step.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Per-request error carried in an ``error`` frame that echoes the request id."""

    # 1000-1099: framing and decoding
    BAD_FRAME = 1000
    FRAME_TOO_LARGE = 1001
    UNKNOWN_FRAME_TYPE = 1002
    INVALID_FIELD = 1003
    TEXT_FRAME_REFUSED = 1004
    UNSUPPORTED_VERSION = 1005
    # 1100-1199: authentication
    UNAUTHENTICATED = 1100
    AUTH_FAILED = 1101
    REAUTH_REQUIRED = 1102
    DEVICE_PROOF_FAILED = 1103
    TOKEN_EXPIRED = 1104
    # 1200-1299: authorisation and state
    FORBIDDEN = 1200
    NOT_FOUND = 1201
    ROSTER_CONFLICT = 1202
    STALE_EPOCH = 1203
    RECIPIENTS_MISMATCH = 1204
    BAD_SIGNATURE = 1205
    IDEMPOTENCY_MISMATCH = 1206
    UNKNOWN_DEVICE = 1207
    REKEY_REQUIRED = 1208
    ALREADY_EXISTS = 1209
    BACKUP_CONFLICT = 1210
    UNKNOWN_REQUEST = 1211
    REQUEST_EXPIRED = 1212
    ATTESTATION_REQUIRED = 1213
    # 1300-1399: limits
    RATE_LIMITED = 1300
    QUOTA_EXCEEDED = 1301
    TOO_MANY_CONNECTIONS = 1302
    TOO_MANY_REQUESTS = 1303
    # 1400-1499: server side
    UNAVAILABLE = 1400
    INTERNAL_ERROR = 1401
    # 1500-1599: verification failures; raised by clients, and 1503/1506 also sent by the
    # server when it refuses a roster change it verified the same way
    DECRYPTION_FAILED = 1500
    LOW_ORDER_POINT = 1501
    KEY_EXPIRED = 1502
    ROSTER_INVALID = 1503
    COMMITMENT_MISMATCH = 1504
    REPLAY = 1505
    UNCERTIFIED_DEVICE = 1506
    CODE_MISMATCH = 1507

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed if sent again later, unchanged."""
        return self in _RETRYABLE


_RETRYABLE = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL_ERROR})


class Reconnect(enum.Enum):
    """What a client should do after a close."""

    NEVER = "never"
    """Do not reconnect: the client is wrong or no longer allowed. Tell the user."""
    AFTER_BACKOFF = "after_backoff"
    """Reconnect with jittered exponential backoff, then resume from the last seq."""
    AFTER_REAUTH = "after_reauth"
    """Obtain a fresh token first, then reconnect."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes (4000-4999) for connection-fatal conditions."""

    PROTOCOL_ERROR = 4000
    UNSUPPORTED_DATA = 4001
    FRAME_TOO_LARGE = 4002
    HANDSHAKE_TIMEOUT = 4003
    AUTH_FAILED = 4004
    REAUTH_TIMEOUT = 4005
    SLOW_CONSUMER = 4006
    RATE_LIMITED = 4007
    TOO_MANY_CONNECTIONS = 4008
    DEVICE_REVOKED = 4009
    SERVER_SHUTDOWN = 4010
    INTERNAL_ERROR = 4011
    PING_TIMEOUT = 4012
    ORIGIN_REFUSED = 4013
    UNAVAILABLE = 4014

    @property
    def reconnect(self) -> Reconnect:
        return _RECONNECT[self]


_RECONNECT: dict[CloseCode, Reconnect] = {
    CloseCode.PROTOCOL_ERROR: Reconnect.NEVER,
    CloseCode.UNSUPPORTED_DATA: Reconnect.NEVER,
    CloseCode.FRAME_TOO_LARGE: Reconnect.NEVER,
    CloseCode.HANDSHAKE_TIMEOUT: Reconnect.AFTER_BACKOFF,
    CloseCode.AUTH_FAILED: Reconnect.AFTER_REAUTH,
    CloseCode.REAUTH_TIMEOUT: Reconnect.AFTER_REAUTH,
    CloseCode.SLOW_CONSUMER: Reconnect.AFTER_BACKOFF,
    CloseCode.RATE_LIMITED: Reconnect.AFTER_BACKOFF,
    CloseCode.TOO_MANY_CONNECTIONS: Reconnect.AFTER_BACKOFF,
    CloseCode.DEVICE_REVOKED: Reconnect.NEVER,
    CloseCode.SERVER_SHUTDOWN: Reconnect.AFTER_BACKOFF,
    CloseCode.INTERNAL_ERROR: Reconnect.AFTER_BACKOFF,
    CloseCode.PING_TIMEOUT: Reconnect.AFTER_BACKOFF,
    CloseCode.ORIGIN_REFUSED: Reconnect.NEVER,
    CloseCode.UNAVAILABLE: Reconnect.AFTER_BACKOFF,
}
