"""Verified roster states of recently changed rooms, so that a change does not verify the
room's whole roster chain from its genesis again.

A room's roster is a hash chain of signed entries; its head and length name one history.
A state verified here is kept under the room with its own head and length, and handed out
only for exactly that head and length, as the store reports them for the room (``RoomState``):
the same chain, already verified. Anything else (another node's change, a bad cache entry)
misses and the caller verifies the stored chain from its genesis, as before. Bounded: the
least recently used room goes first.
"""

from __future__ import annotations

from collections import OrderedDict

from medrelay_protocol.roster import RosterState

DEFAULT_ROOMS = 1024


class VerifiedRosters:
    def __init__(self, limit: int = DEFAULT_ROOMS) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self._limit = limit
        self._states: OrderedDict[str, RosterState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def get(self, room: str, head: bytes, length: int) -> RosterState | None:
        state = self._states.get(room)
        if state is None or state.head != head or state.length != length:
            return None
        self._states.move_to_end(room)
        return state

    def put(self, state: RosterState) -> None:
        self._states[state.room] = state
        self._states.move_to_end(state.room)
        while len(self._states) > self._limit:
            self._states.popitem(last=False)
