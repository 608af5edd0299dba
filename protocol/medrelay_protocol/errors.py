"""One error tree; every class carries its wire ``ErrorCode``.

::

    MedrelayError                      code
    +-- FrameError                     (decoding; the peer sent bad bytes)
    |   +-- FrameTooLarge              FRAME_TOO_LARGE
    |   +-- MalformedFrame             BAD_FRAME
    |   +-- UnknownFrameType           UNKNOWN_FRAME_TYPE
    |   +-- InvalidField               INVALID_FIELD
    |   +-- UnsupportedVersion         UNSUPPORTED_VERSION
    +-- CryptoError
    |   +-- DecryptionFailed           DECRYPTION_FAILED   (one opaque error for every failure)
    |   +-- BadSignature               BAD_SIGNATURE
    |   +-- LowOrderPoint              LOW_ORDER_POINT
    |   +-- KeyExpired                 KEY_EXPIRED
    |   +-- CommitmentMismatch         COMMITMENT_MISMATCH
    |   +-- ReplayDetected             REPLAY
    +-- RosterError                    ROSTER_INVALID
    |   +-- RosterForked               ROSTER_CONFLICT
    |   +-- NotAuthorised              FORBIDDEN
    |   +-- UncertifiedDevice          UNCERTIFIED_DEVICE
    +-- EpochError
    |   +-- StaleEpoch                 STALE_EPOCH
    |   +-- UnknownEpoch               DECRYPTION_FAILED (carries the epoch asked for)
    +-- RequestError                   (server refusals; ``code`` set per instance)

Messages never contain key material, plaintext or tokens.
"""

from __future__ import annotations

from typing import ClassVar

from .codes import ErrorCode


class MedrelayError(Exception):
    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__name__)

    @property
    def message(self) -> str:
        return str(self.args[0])


class FrameError(MedrelayError):
    code = ErrorCode.BAD_FRAME


class FrameTooLarge(FrameError):
    code = ErrorCode.FRAME_TOO_LARGE


class MalformedFrame(FrameError):
    code = ErrorCode.BAD_FRAME


class UnknownFrameType(FrameError):
    code = ErrorCode.UNKNOWN_FRAME_TYPE


class InvalidField(FrameError):
    code = ErrorCode.INVALID_FIELD


class UnsupportedVersion(FrameError):
    code = ErrorCode.UNSUPPORTED_VERSION


class CryptoError(MedrelayError):
    code = ErrorCode.DECRYPTION_FAILED


class DecryptionFailed(CryptoError):
    """Every decryption failure: wrong key, tampered bytes, truncated input. Deliberately opaque."""

    code = ErrorCode.DECRYPTION_FAILED

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


class BadSignature(CryptoError):
    code = ErrorCode.BAD_SIGNATURE


class LowOrderPoint(CryptoError):
    code = ErrorCode.LOW_ORDER_POINT


class KeyExpired(CryptoError):
    code = ErrorCode.KEY_EXPIRED


class CommitmentMismatch(CryptoError):
    code = ErrorCode.COMMITMENT_MISMATCH


class ReplayDetected(CryptoError):
    code = ErrorCode.REPLAY


class RosterError(MedrelayError):
    code = ErrorCode.ROSTER_INVALID


class RosterForked(RosterError):
    code = ErrorCode.ROSTER_CONFLICT


class NotAuthorised(RosterError):
    code = ErrorCode.FORBIDDEN


class UncertifiedDevice(RosterError):
    code = ErrorCode.UNCERTIFIED_DEVICE


class EpochError(MedrelayError):
    code = ErrorCode.STALE_EPOCH


class StaleEpoch(EpochError):
    code = ErrorCode.STALE_EPOCH


class UnknownEpoch(EpochError):
    """The receiver holds no key for this epoch; ``epoch`` says which one was asked for."""

    code = ErrorCode.DECRYPTION_FAILED

    def __init__(self, epoch: int, reason: str = "no key for this epoch") -> None:
        super().__init__(f"epoch {epoch}: {reason}")
        self.epoch = epoch
        self.reason = reason


class RequestError(MedrelayError):
    """A server refusal of one request; the code is chosen per instance."""

    def __init__(self, code: ErrorCode, message: str = "", *, detail: object = None) -> None:
        super().__init__(message or code.name.lower())
        self.code = code  # type: ignore[misc]
        self.detail = detail
