"""The delivery checker: given what was acknowledged and what every member device surfaced,
assert the product promise (I2, I3) held through whatever fault the test caused.

* every acknowledged message reached every device that was a member at its seq, exactly
  once (client-side de-duplication is part of the client: what it surfaces is what counts);
* per room, each device saw events in strictly increasing seq order;
* nothing unacknowledged was shown: every message a device surfaced is one whose send was
  acknowledged at that very seq, with that very text;
* a device never saw a seq at which it was not a member (a removal at L cuts it at L).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from medrelay_client.client import Message

Visible = Callable[[str, int], bool]  # (room, seq) -> was this device a member at seq?


def always(room: str, seq: int) -> bool:
    return True


def up_to(last: int) -> Visible:
    return lambda room, seq: seq <= last


@dataclass
class Ledger:
    """What the senders were told: (room, seq) -> text, filled as acks arrive."""

    acked: dict[tuple[str, int], str] = field(default_factory=dict)
    _waiting: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    def ack(self, room: str, seq: int, text: str) -> None:
        prior = self.acked.setdefault((room, seq), text)
        assert prior == text, f"seq {seq} in {room} acknowledged for two different messages"
        for n, event in self._waiting:
            if len(self.acked) >= n:
                event.set()

    async def reached(self, n: int, timeout: float = 20.0) -> None:
        """Return once ``n`` sends have been acknowledged."""
        event = asyncio.Event()
        self._waiting.append((n, event))
        if len(self.acked) >= n:
            event.set()
        await asyncio.wait_for(event.wait(), timeout)

    def seqs(self, room: str) -> set[int]:
        return {s for r, s in self.acked if r == room}


def check(
    ledger: Ledger,
    received: Mapping[str, Sequence[Message]],
    visible: Mapping[str, Visible] | None = None,
) -> None:
    problems: list[str] = []
    for device, messages in received.items():
        may_see = (visible or {}).get(device, always)
        rooms = {m.room for m in messages} | {r for r, _ in ledger.acked}
        for room in sorted(rooms):
            events = [m for m in messages if m.room == room]
            seqs = [m.seq for m in events]
            dupes = sorted({s for s in seqs if seqs.count(s) > 1})
            if dupes:
                problems.append(f"{device}: seqs {dupes} in {room} surfaced more than once")
            if not all(a < b for a, b in itertools.pairwise(seqs)):
                problems.append(f"{device}: {room} out of seq order: {seqs}")
            for m in events:
                if not may_see(room, m.seq):
                    problems.append(f"{device}: saw seq {m.seq} in {room} while not a member")
                if m.kind != "message":
                    continue
                text = m.body.get("text") if isinstance(m.body, dict) else None
                if ledger.acked.get((room, m.seq)) != text:
                    problems.append(f"{device}: showed unacknowledged seq {m.seq} ({text!r})")
                if m.problem is not None:
                    problems.append(f"{device}: seq {m.seq} surfaced with problem {m.problem}")
            got = set(seqs)
            missing = sorted(s for s in ledger.seqs(room) if may_see(room, s) and s not in got)
            if missing:
                problems.append(
                    f"{device}: never got acknowledged seqs {missing} in {room} "
                    f"(it surfaced seqs {seqs[-8:]} last, kinds {[m.kind for m in events[-8:]]})"
                )
    assert not problems, "delivery checker:\n  " + "\n  ".join(problems)
