"""A connection's token deadline: one timer per connection, not a timeout scope per read.

The read loop must notice a token's expiry (and, after ``reauth_required``, the end of the
grace period) while it waits for the next frame, but never interrupt a handler. A timeout
scope around each read does that, and costs per frame: an ``asyncio.Timeout``, a timer handle
with a copy of the context pushed onto the loop's heap and cancelled again, and the scope's
own coroutines. Those objects live as long as the connection waits for its next frame, so
with thousands of connections each sending now and then, every young garbage collection
walked a few thousand of them (``docs/performance.md``, "Thirteenth round").

:class:`ReadDeadline` keeps one timer handle, armed at the connection's current deadline and
re-armed only when that changes (a renewal, the grace period). When it fires it sets
:attr:`expired`; if the loop is waiting in a read at that moment, it cancels the read loop's
task and :meth:`interrupted` tells that cancellation from any other (a shutdown), just as
``asyncio.timeout`` does. Frames already received are not lost: the cancelled wait leaves
them in the protocol's queue for the next read.
"""

from __future__ import annotations

import asyncio

from ..clock import Clock


class ReadDeadline:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._due: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cancelled_read = False
        self.expired = False
        """The deadline passed; the loop handles it before its next read."""
        self.reading = False
        """Set by the loop around its wait for a frame: only that wait is ever cancelled."""

    def arm(self, due: int) -> None:
        """Fire at ``due`` (Unix seconds, the clock's); a no-op if already armed there."""
        if due == self._due:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        delay = max(0.001, float(due - self._clock.now()))
        self._handle = self._loop.call_at(self._loop.time() + delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._due = None  # the next ``arm`` re-arms, even at the same second
        self.expired = True
        if self.reading and not self._cancelled_read:
            self._cancelled_read = True
            self._task.cancel()

    def interrupted(self) -> bool:
        """In the loop's ``except CancelledError`` around a read: True if this deadline
        cancelled it and nothing else asked to cancel the task (then carry on), False if the
        cancellation must propagate."""
        if not self._cancelled_read:
            return False
        self._cancelled_read = False
        return self._task.uncancel() == 0

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
