"""Time is a dependency: services take a ``Clock``; tests pass a fake one."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> int:
        """Unix time in whole seconds."""

    def now_ms(self) -> int:
        """Unix time in milliseconds."""


class SystemClock:
    def now(self) -> int:
        return int(time.time())

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000


class FakeClock:
    def __init__(self, start: int = 1_800_000_000) -> None:
        self.t_ms = start * 1000

    def now(self) -> int:
        return self.t_ms // 1000

    def now_ms(self) -> int:
        return self.t_ms

    def advance(self, seconds: float) -> None:
        self.t_ms += int(seconds * 1000)
