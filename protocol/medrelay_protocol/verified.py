"""Device certificates and bundles already checked, so that a room change does not check
every member's signatures again.

A rekey must wrap to exactly the certified, unexpired devices of the room's members, so
the server (and the client that builds it) checks each member device's certificate under
the member's identity key and its bundle under the device key: two Ed25519 checks of about
70 µs each per device, 14 ms in a room of 50 members with two devices, at every change.
The devices hardly ever change between two changes of a room.

The outcome of a check is a function of the signed bytes and the key alone, so it is kept
under exactly those: the same bytes under the same key give the same outcome, including a
refusal, and any other bytes or key are checked afresh. What depends on the time or on the
room is not kept: a bundle's expiry is checked against ``now`` at every use, and
revocation, issue time and role stay the caller's checks (``certified_devices``).

Bounded: at most ``limit`` outcomes (a certificate or bundle of about 150 bytes and its
key, about 600 bytes an entry), least recently used out first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TypeVar

from .crypto import check_not_expired
from .errors import MedrelayError
from .identity import DeviceBundle, DeviceCertificate

DEFAULT_LIMIT = 20_000
"""Outcomes kept: a certificate and a bundle for each of 10,000 devices (about 12 MB)."""

_T = TypeVar("_T", DeviceCertificate, DeviceBundle)


@dataclass(frozen=True, slots=True)
class _Refusal:
    error: type[MedrelayError]
    message: str


class VerifiedDevices:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._kept: OrderedDict[
            tuple[bool, bytes, bytes], DeviceCertificate | DeviceBundle | _Refusal
        ] = OrderedDict()
        self.checks = 0
        """Signature checks made (outcomes not found here)."""

    def __len__(self) -> int:
        return len(self._kept)

    def __repr__(self) -> str:
        return f"VerifiedDevices({len(self._kept)} of {self._limit}, {self.checks} checks)"

    def certificate(self, raw: bytes, identity_key: bytes) -> DeviceCertificate:
        """:meth:`DeviceCertificate.verify`, from the outcome kept for these bytes and key."""
        return self._outcome(DeviceCertificate, True, raw, identity_key)

    def bundle(self, raw: bytes, device_key: bytes, *, now: int) -> DeviceBundle:
        """:meth:`DeviceBundle.verify` with ``now``: the signature's outcome may be kept, the
        expiry is checked at every call."""
        bundle = self._outcome(DeviceBundle, False, raw, device_key)
        check_not_expired(bundle.expires_at, now)
        return bundle

    def _outcome(self, kind: type[_T], is_cert: bool, raw: bytes, key: bytes) -> _T:
        slot = (is_cert, bytes(key), bytes(raw))
        kept = self._kept.get(slot)
        if kept is None:
            self.checks += 1
            try:
                kept = kind.verify(slot[2], slot[1])
            except MedrelayError as exc:  # the class and message only: not its traceback
                kept = _Refusal(type(exc), exc.message)
            self._kept[slot] = kept
            if len(self._kept) > self._limit:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(slot)
        if isinstance(kept, _Refusal):
            raise kept.error(kept.message)
        assert isinstance(kept, kind)
        return kept
