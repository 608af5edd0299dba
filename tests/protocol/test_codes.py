"""Wire codes are a published contract: numbers never move, every error class has one.

The tables below are written out literally on purpose. Renumbering, renaming or deleting a
code fails here; adding one means adding a line (and a line in the protocol docs).
"""

from __future__ import annotations

import inspect
import re

import pytest
from medrelay_protocol import errors, frames
from medrelay_protocol.codes import CloseCode, ErrorCode, Reconnect
from medrelay_protocol.errors import MedrelayError, RequestError

ERROR_CODES = {
    "BAD_FRAME": 1000,
    "FRAME_TOO_LARGE": 1001,
    "UNKNOWN_FRAME_TYPE": 1002,
    "INVALID_FIELD": 1003,
    "TEXT_FRAME_REFUSED": 1004,
    "UNSUPPORTED_VERSION": 1005,
    "UNAUTHENTICATED": 1100,
    "AUTH_FAILED": 1101,
    "REAUTH_REQUIRED": 1102,
    "DEVICE_PROOF_FAILED": 1103,
    "TOKEN_EXPIRED": 1104,
    "FORBIDDEN": 1200,
    "NOT_FOUND": 1201,
    "ROSTER_CONFLICT": 1202,
    "STALE_EPOCH": 1203,
    "RECIPIENTS_MISMATCH": 1204,
    "BAD_SIGNATURE": 1205,
    "IDEMPOTENCY_MISMATCH": 1206,
    "UNKNOWN_DEVICE": 1207,
    "REKEY_REQUIRED": 1208,
    "ALREADY_EXISTS": 1209,
    "BACKUP_CONFLICT": 1210,
    "UNKNOWN_REQUEST": 1211,
    "REQUEST_EXPIRED": 1212,
    "ATTESTATION_REQUIRED": 1213,
    "RATE_LIMITED": 1300,
    "QUOTA_EXCEEDED": 1301,
    "TOO_MANY_CONNECTIONS": 1302,
    "TOO_MANY_REQUESTS": 1303,
    "UNAVAILABLE": 1400,
    "INTERNAL_ERROR": 1401,
    "DECRYPTION_FAILED": 1500,
    "LOW_ORDER_POINT": 1501,
    "KEY_EXPIRED": 1502,
    "ROSTER_INVALID": 1503,
    "COMMITMENT_MISMATCH": 1504,
    "REPLAY": 1505,
    "UNCERTIFIED_DEVICE": 1506,
    "CODE_MISMATCH": 1507,
}

CLOSE_CODES = {
    "PROTOCOL_ERROR": (4000, Reconnect.NEVER),
    "UNSUPPORTED_DATA": (4001, Reconnect.NEVER),
    "FRAME_TOO_LARGE": (4002, Reconnect.NEVER),
    "HANDSHAKE_TIMEOUT": (4003, Reconnect.AFTER_BACKOFF),
    "AUTH_FAILED": (4004, Reconnect.AFTER_REAUTH),
    "REAUTH_TIMEOUT": (4005, Reconnect.AFTER_REAUTH),
    "SLOW_CONSUMER": (4006, Reconnect.AFTER_BACKOFF),
    "RATE_LIMITED": (4007, Reconnect.AFTER_BACKOFF),
    "TOO_MANY_CONNECTIONS": (4008, Reconnect.AFTER_BACKOFF),
    "DEVICE_REVOKED": (4009, Reconnect.NEVER),
    "SERVER_SHUTDOWN": (4010, Reconnect.AFTER_BACKOFF),
    "INTERNAL_ERROR": (4011, Reconnect.AFTER_BACKOFF),
    "PING_TIMEOUT": (4012, Reconnect.AFTER_BACKOFF),
    "ORIGIN_REFUSED": (4013, Reconnect.NEVER),
    "UNAVAILABLE": (4014, Reconnect.AFTER_BACKOFF),
}

RETRYABLE = {ErrorCode.RATE_LIMITED, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL_ERROR}

ERROR_CLASSES = sorted(
    (
        cls
        for cls in vars(errors).values()
        if inspect.isclass(cls) and issubclass(cls, MedrelayError)
    ),
    key=lambda cls: cls.__name__,
)


def test_error_code_table_is_stable() -> None:
    # __members__ includes aliases, so a duplicated number shows up as an extra name here.
    assert {name: int(code) for name, code in ErrorCode.__members__.items()} == ERROR_CODES
    assert len(set(ERROR_CODES.values())) == len(ERROR_CODES)


def test_close_code_table_is_stable() -> None:
    table = {name: (int(code), code.reconnect) for name, code in CloseCode.__members__.items()}
    assert table == CLOSE_CODES


def test_close_codes_are_in_the_private_range_and_distinct_from_error_codes() -> None:
    for code in CloseCode:
        assert 4000 <= code <= 4999
        assert isinstance(code.reconnect, Reconnect)
    assert not {int(c) for c in CloseCode} & {int(c) for c in ErrorCode}
    assert {c.value for c in Reconnect} == {"never", "after_backoff", "after_reauth"}


def test_error_codes_are_grouped_by_hundreds() -> None:
    for code in ErrorCode:
        assert 1000 <= code <= 1599
    framing = {c for c in ErrorCode if c < 1100}
    assert framing == {
        ErrorCode.BAD_FRAME,
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNKNOWN_FRAME_TYPE,
        ErrorCode.INVALID_FIELD,
        ErrorCode.TEXT_FRAME_REFUSED,
        ErrorCode.UNSUPPORTED_VERSION,
    }


def test_retryable_codes() -> None:
    assert {code for code in ErrorCode if code.retryable} == RETRYABLE
    for code in ErrorCode:
        assert isinstance(code.retryable, bool)
        if code >= 1500:  # raised by client-side verification; retrying changes nothing
            assert not code.retryable


def test_every_code_fits_the_error_frame() -> None:
    for code in [*ErrorCode, *CloseCode]:
        assert frames.Error(code=int(code), message=code.name.lower()).code == code


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_class_carries_an_error_code(cls: type[MedrelayError]) -> None:
    assert isinstance(cls.code, ErrorCode)
    if cls is RequestError:
        error = RequestError(ErrorCode.NOT_FOUND)
        assert error.code is ErrorCode.NOT_FOUND
        assert error.message == "not_found"
        return
    if cls is errors.UnknownEpoch:
        error = errors.UnknownEpoch(7)
        assert error.epoch == 7
    else:
        error = cls()
    assert error.code is cls.code
    assert error.message


def _documented_tree() -> dict[str, str | None]:
    """``{class name: code name or None}`` from the drawing in errors.py's docstring."""
    doc = errors.__doc__ or ""
    tree: dict[str, str | None] = {}
    for line in doc.splitlines():
        match = re.match(r"\s*(?:\+--\s*)?([A-Z]\w+)\s*(\(|[A-Z_]{3,})?", line.split("|")[-1])
        if match and match.group(1) in vars(errors):
            code = match.group(2)
            tree[match.group(1)] = code if code and code != "(" else None
    return tree


def test_docstring_tree_matches_the_classes() -> None:
    tree = _documented_tree()
    assert set(tree) == {cls.__name__ for cls in ERROR_CLASSES}
    for name, code in tree.items():
        if code is not None:
            assert getattr(errors, name).code is ErrorCode[code], name


def test_frame_errors_map_to_framing_codes() -> None:
    assert errors.FrameTooLarge.code is ErrorCode.FRAME_TOO_LARGE
    assert errors.MalformedFrame.code is ErrorCode.BAD_FRAME
    assert errors.UnknownFrameType.code is ErrorCode.UNKNOWN_FRAME_TYPE
    assert errors.InvalidField.code is ErrorCode.INVALID_FIELD
    assert errors.UnsupportedVersion.code is ErrorCode.UNSUPPORTED_VERSION
    for cls in ERROR_CLASSES:
        if issubclass(cls, errors.FrameError):
            assert cls.code < 1100


def test_decryption_failure_is_opaque() -> None:
    assert str(errors.DecryptionFailed()) == "decryption failed"
    assert errors.UnknownEpoch(3).code is errors.DecryptionFailed.code
