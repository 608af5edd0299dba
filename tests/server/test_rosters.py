"""The verified-roster cache hands a state out only for exactly the head and length the
store reports for its room, and stays bounded."""

from __future__ import annotations

import pytest
from medrelay_protocol.roster import RosterState
from medrelay_server.rosters import VerifiedRosters


def _state(room: str, head: bytes, length: int) -> RosterState:
    return RosterState(
        room=room, head=head, length=length, members={}, external_sender=None, history="shared"
    )


def test_only_the_same_head_and_length_hit() -> None:
    cache = VerifiedRosters()
    state = _state("r1", b"h" * 32, 3)
    cache.put(state)
    assert cache.get("r1", b"h" * 32, 3) is state
    assert cache.get("r1", b"x" * 32, 3) is None  # another history (another node's change)
    assert cache.get("r1", b"h" * 32, 4) is None
    assert cache.get("r2", b"h" * 32, 3) is None


def test_a_newer_state_replaces_the_older() -> None:
    cache = VerifiedRosters()
    cache.put(_state("r1", b"a" * 32, 1))
    cache.put(_state("r1", b"b" * 32, 2))
    assert cache.get("r1", b"a" * 32, 1) is None
    assert cache.get("r1", b"b" * 32, 2) is not None
    assert len(cache) == 1


def test_bounded_least_recently_used_first() -> None:
    cache = VerifiedRosters(limit=2)
    cache.put(_state("r1", b"1" * 32, 1))
    cache.put(_state("r2", b"2" * 32, 1))
    assert cache.get("r1", b"1" * 32, 1) is not None  # r1 used last: r2 goes next
    cache.put(_state("r3", b"3" * 32, 1))
    assert len(cache) == 2
    assert cache.get("r2", b"2" * 32, 1) is None
    assert cache.get("r1", b"1" * 32, 1) is not None
    assert cache.get("r3", b"3" * 32, 1) is not None


def test_a_cache_needs_room() -> None:
    with pytest.raises(ValueError):
        VerifiedRosters(limit=0)
