"""Client-side epoch bookkeeping of one room: which epoch secrets a device holds, when it
must rekey before sending, and which message counters it has already seen.

:class:`EpochState` is a small state machine (states and events are strings, transitions a
table, as in h11)::

    state           event                new state       notes
    no_key          rekey                active          first key, or re-added after forget
    active          rekey                active          epoch n -> n+1
    pending_rekey   rekey                active          the pending removal is now fenced
    no_key          removal_committed    no_key
    active          removal_committed    pending_rekey   sends must commit a new epoch first
    pending_rekey   removal_committed    pending_rekey
    any             forget               no_key          this user was removed: wipe secrets

Rekeys must arrive in order (number = current + 1): a lower or equal number is
:class:`StaleEpoch`, the same number with another roster head is :class:`RosterForked`, and a
higher number means one was missed: :class:`UnknownEpoch` names the epoch to fetch first. The
caller checks a rekey (signature, roster head against its verified roster, key commitment)
before handing its secret here; this module stores, it does not verify.

Python cannot zero immutable ``bytes``; :meth:`EpochState.forget` drops every reference so the
secrets become unreachable, and nothing here ever prints a secret.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .crypto import KEY_SIZE
from .errors import (
    EpochError,
    MalformedFrame,
    ReplayDetected,
    RosterForked,
    StaleEpoch,
    UnknownEpoch,
)

NO_KEY: Final = "no_key"
ACTIVE: Final = "active"
PENDING_REKEY: Final = "pending_rekey"

REKEY: Final = "rekey"
REMOVAL_COMMITTED: Final = "removal_committed"
FORGET: Final = "forget"

TRANSITIONS: Final[Mapping[tuple[str, str], str]] = {
    (NO_KEY, REKEY): ACTIVE,
    (ACTIVE, REKEY): ACTIVE,
    (PENDING_REKEY, REKEY): ACTIVE,
    (NO_KEY, REMOVAL_COMMITTED): NO_KEY,
    (ACTIVE, REMOVAL_COMMITTED): PENDING_REKEY,
    (PENDING_REKEY, REMOVAL_COMMITTED): PENDING_REKEY,
    (NO_KEY, FORGET): NO_KEY,
    (ACTIVE, FORGET): NO_KEY,
    (PENDING_REKEY, FORGET): NO_KEY,
}

WITHHELD: Final = "withheld: not a member at that epoch"
NOT_YET_RECEIVED: Final = "not yet received"
FORGOTTEN: Final = "forgotten: removed from the room"


@dataclass(frozen=True, slots=True)
class EpochId:
    """An epoch is identified by its number and the roster head it was committed at, so two
    branches of a forked roster can never share an epoch id."""

    number: int
    roster_head: bytes

    def __post_init__(self) -> None:
        if not 0 < self.number < 2**63 or len(self.roster_head) != KEY_SIZE:
            raise MalformedFrame("epoch id: bad field")

    def encode(self) -> bytes:
        """40 bytes: the number as u64 big-endian, then the roster head."""
        return self.number.to_bytes(8, "big") + self.roster_head

    @classmethod
    def decode(cls, data: bytes) -> EpochId:
        if len(data) != 8 + KEY_SIZE:
            raise MalformedFrame("epoch id: bad length")
        return cls(int.from_bytes(data[:8], "big"), bytes(data[8:]))


class EpochState:
    """Epoch secrets one device holds for one room. Prints no secrets."""

    __slots__ = ("_current", "_high", "_known", "_removed", "_state")

    def __init__(self) -> None:
        self._state: str = NO_KEY
        self._current: EpochId | None = None
        self._known: dict[int, tuple[EpochId, bytes]] = {}
        self._high = 0  # highest epoch number ever applied: a re-add may not go backwards
        self._removed = False

    @property
    def state(self) -> str:
        return self._state

    @property
    def current(self) -> EpochId | None:
        return self._current

    @property
    def needs_rekey(self) -> bool:
        """True when the next send must commit a new epoch first (a removal is pending)."""
        return self._state == PENDING_REKEY

    def _fire(self, event: str) -> None:
        self._state = TRANSITIONS[(self._state, event)]

    def on_rekey(self, epoch: EpochId, secret: bytes) -> None:
        if len(secret) != KEY_SIZE:
            raise ValueError("an epoch secret is 32 bytes")
        current = self._current
        if current is None:
            if epoch.number <= self._high:
                raise StaleEpoch(f"epoch {epoch.number} is not newer than {self._high}")
        elif epoch.number == current.number and epoch.roster_head != current.roster_head:
            raise RosterForked(f"two different epochs numbered {epoch.number}")
        elif epoch.number <= current.number:
            raise StaleEpoch(f"epoch {epoch.number} is not newer than {current.number}")
        elif epoch.number > current.number + 1:
            raise UnknownEpoch(current.number + 1, NOT_YET_RECEIVED)
        self._known[epoch.number] = (epoch, bytes(secret))
        self._current = epoch
        self._high = epoch.number
        self._removed = False
        self._fire(REKEY)

    def on_history_grant(self, epoch: EpochId, secret: bytes) -> None:
        """Store an older epoch's secret wrapped to this device by a history grant (§5.6)."""
        if len(secret) != KEY_SIZE:
            raise ValueError("an epoch secret is 32 bytes")
        if self._current is None or epoch.number >= self._current.number:
            raise EpochError("a history grant covers only epochs before the current one")
        held = self._known.get(epoch.number)
        if held is not None and held[0] != epoch:
            raise RosterForked(f"two different epochs numbered {epoch.number}")
        self._known[epoch.number] = (epoch, bytes(secret))

    def on_removal_committed(self) -> None:
        """Someone left or was removed without a rekey in the same commit."""
        self._fire(REMOVAL_COMMITTED)

    def forget(self) -> None:
        """This user was removed: drop every secret; lookups now say ``forgotten``."""
        self._known.clear()
        self._current = None
        self._removed = True
        self._fire(FORGET)

    def secret_for(self, number: int) -> bytes:
        held = self._known.get(number)
        if held is not None:
            return held[1]
        if self._removed:
            raise UnknownEpoch(number, FORGOTTEN)
        if self._current is None or number > self._current.number:
            raise UnknownEpoch(number, NOT_YET_RECEIVED)
        raise UnknownEpoch(number, WITHHELD)

    def epoch_for(self, number: int) -> EpochId:
        held = self._known.get(number)
        if held is None:
            self.secret_for(number)  # raises with the right reason
        assert held is not None
        return held[0]

    def send_key(self) -> tuple[EpochId, bytes]:
        """The epoch to encrypt a new message under; refuses while a rekey is pending."""
        if self._state == PENDING_REKEY:
            raise StaleEpoch("a removal is pending: commit a new epoch before sending")
        if self._current is None:
            raise EpochError("no epoch key yet")
        return self._current, self._known[self._current.number][1]

    def __repr__(self) -> str:
        number = self._current.number if self._current is not None else None
        return f"EpochState(state={self._state!r}, current={number}, held={len(self._known)})"


def should_rotate(
    now: int, messages_in_epoch: int, *, started_at: int, max_age: int, max_messages: int
) -> bool:
    """Rotate on a timer and on a message count, to bound what one epoch key exposes."""
    return now - started_at >= max_age or messages_in_epoch >= max_messages


class ReplayWindow:
    """Counters seen from one sender device in one epoch.

    :meth:`accept` takes each counter once; a repeat raises :class:`ReplayDetected`. Counters
    skipped over are remembered as missing (at most ``max_missing``, the most recent ones) and
    reported, so the client can show a gap and still accept them if they arrive late. A
    counter older than that bound is refused like a replay: memory stays bounded whatever a
    sender does.
    """

    __slots__ = ("_high", "_max_missing", "_missing")

    def __init__(self, *, max_missing: int = 1024) -> None:
        if max_missing < 0:
            raise ValueError("max_missing must be >= 0")
        self._max_missing = max_missing
        self._high = -1
        self._missing: set[int] = set()

    @property
    def highest(self) -> int:
        return self._high

    @property
    def missing(self) -> list[int]:
        return sorted(self._missing)

    def accept(self, counter: int) -> list[int]:
        """Accept ``counter``; returns the counters newly found missing (ascending)."""
        if isinstance(counter, bool) or not 0 <= counter < 2**64:
            raise MalformedFrame("counter out of range")
        if counter > self._high:
            floor = max(self._high + 1, counter - self._max_missing)
            gap = list(range(floor, counter))
            self._high = counter
            cutoff = counter - self._max_missing
            self._missing = {c for c in self._missing if c >= cutoff}
            self._missing.update(gap)
            return gap
        if counter in self._missing:
            self._missing.discard(counter)
            return []
        raise ReplayDetected(f"counter {counter} already seen or too old")


class ReplayGuard:
    """One :class:`ReplayWindow` per (sender device, epoch number)."""

    __slots__ = ("_max_missing", "_windows")

    def __init__(self, *, max_missing: int = 1024) -> None:
        self._max_missing = max_missing
        self._windows: dict[tuple[str, int], ReplayWindow] = {}

    def accept(self, sender_device: str, epoch: int, counter: int) -> list[int]:
        key = (sender_device, epoch)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = ReplayWindow(max_missing=self._max_missing)
        return window.accept(counter)

    def drop_epochs_before(self, number: int) -> None:
        """Forget the windows of epochs the caller has retired, to bound memory."""
        self._windows = {k: w for k, w in self._windows.items() if k[1] >= number}
