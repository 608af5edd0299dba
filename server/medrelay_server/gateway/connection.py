"""One authenticated socket: a bounded outbound queue drained by a single writer task.

Producers never await a recipient: ``enqueue`` either queues the (shared) frame bytes or,
when the queue is full, marks the connection as a slow consumer and closes it with
``SLOW_CONSUMER``; the client resumes from its last seq. Ephemeral frames (typing, read
markers) are shed first: they are dropped once the queue is half full.

When nothing is queued or being written and the socket takes bytes without waiting,
``write_direct`` (and ``enqueue``, which tries it first) writes the frame at once through
``write_now`` (a synchronous write into the transport's buffer; see ``gateway/direct.py``)
instead of waking the writer task: a live fan-out to fifty members is then fifty buffer
appends in one pass, not fifty task steps.
Anything else (a backlog, a paused transport, no ``write_now``) takes the queue, so frames
leave in the order they were offered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from medrelay_protocol.codes import CloseCode

log = logging.getLogger(__name__)
_ids = itertools.count(1)

SendBytes = Callable[[bytes], Awaitable[None]]
WriteNow = Callable[[bytes], bool]
"""Write one frame without waiting; False (and nothing written) if the socket cannot take it
now."""
CloseFn = Callable[[int, str], Awaitable[None]]


@dataclass(eq=False)
class Connection:
    user: str
    device: str
    device_key: bytes
    kind: str
    send_bytes: SendBytes
    close_fn: CloseFn
    queue_limit: int
    expires_at: int
    institution: str | None = None
    address: str | None = None
    id: int = field(default_factory=lambda: next(_ids))
    cursors: dict[str, int] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    """Room -> this device's cumulative receipt as last read or written by this connection."""
    catching_up: set[str] = field(default_factory=set)
    closed: bool = False
    reauth_deadline: int | None = None
    registered: bool = False
    close_code: int | None = None
    _queue: asyncio.Queue[tuple[bytes, tuple[str, int] | None] | None] = field(init=False)
    _writer: asyncio.Task[None] | None = field(default=None, init=False)
    on_written: Callable[[str, int], None] | None = None
    """Called with (room, seq) once a room event's frame offered through ``enqueue`` was
    written to the socket. The live fan-out reports its ``write_direct`` writes itself
    (``Delivery``'s ``on_written``), for the whole room at once."""
    write_now: WriteNow | None = None
    _busy: bool = field(default=False, init=False)
    """The writer holds a frame it has not finished writing."""

    _low: asyncio.Event = field(init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.queue_limit)
        self._low = asyncio.Event()

    def __repr__(self) -> str:
        return f"Connection(id={self.id}, user={self.user!r}, device={self.device!r})"

    def start(self) -> None:
        self._writer = asyncio.create_task(self._drain(), name=f"writer-{self.id}")

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def enqueue(
        self,
        data: bytes,
        *,
        ephemeral: bool = False,
        event: tuple[str, int] | None = None,
        direct: bool = True,
    ) -> bool:
        """Queue frame bytes without waiting. False if dropped (ephemeral) or closing.
        ``event`` = (room, seq) for a room event, reported to ``on_written`` once sent.
        ``direct=False``: the caller's ``write_direct`` was just refused; go to the queue."""
        if self.closed:
            return False
        if ephemeral and self._queue.qsize() * 2 >= self.queue_limit:
            return False
        if direct and self.write_direct(data):
            if event is not None and self.on_written is not None:
                self.on_written(*event)
            return True
        try:
            self._queue.put_nowait((data, event))
        except asyncio.QueueFull:
            self.abort(CloseCode.SLOW_CONSUMER, "slow consumer: resume from your last seq")
            return False
        return True

    def write_direct(self, data: bytes) -> bool:
        """Write ``data`` through ``write_now`` at once if nothing is queued or being written
        and the socket takes it; False (nothing written) otherwise. The caller reports the
        write (``enqueue`` to ``on_written``; the live fan-out journals a room's recipients
        of an event together)."""
        write = self.write_now
        if write is None or self._busy or self.closed or self._queue.qsize():
            return False
        try:
            return write(data)
        except Exception:  # the socket went away under us: the queue path reports it
            return False

    def abort(self, code: int, reason: str) -> None:
        """Close soon, from any context: stop the writer and close the socket."""
        if self.closed:
            return
        self.closed = True
        self._low.set()
        self.close_code = code
        asyncio.get_running_loop().create_task(self._close(code, reason))

    async def _close(self, code: int, reason: str) -> None:
        if self._writer is not None and self._writer is not asyncio.current_task():
            self._writer.cancel()
        with contextlib.suppress(Exception):
            await self.close_fn(code, reason)

    async def _drain(self) -> None:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    return
                data, event = item
                self._busy = True
                try:
                    await self.send_bytes(data)
                    if event is not None and self.on_written is not None:
                        self.on_written(*event)
                finally:
                    self._busy = False
                    self._queue.task_done()
                    if self._queue.qsize() <= self.queue_limit // 4:
                        self._low.set()
        except asyncio.CancelledError:
            raise
        except Exception:  # the socket went away; the reader side notices and cleans up
            self.closed = True

    async def wait_for_room(self) -> None:
        """Backpressure for store replays (never for live fan-out): wait until the queue is
        at most half full, so a resume longer than the queue is paced by the socket instead
        of closing the connection as a slow consumer."""
        while not self.closed and self._queue.qsize() > self.queue_limit // 2:
            self._low.clear()
            await self._low.wait()

    async def flush(self, timeout: float = 1.0) -> None:
        """Wait (bounded) until everything queued so far was written, before a close."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    async def stop(self) -> None:
        self.closed = True
        self._low.set()
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
