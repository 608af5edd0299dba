"""``Connection.enqueue``'s direct write: used only when nothing is queued or being written,
so frames leave in the order they were offered whichever path each one takes."""

from __future__ import annotations

import asyncio

from medrelay_protocol.codes import CloseCode
from medrelay_server.gateway.connection import Connection


class Socket:
    """A socket whose direct writes can be refused (a paused transport) and whose queued
    writes wait until released (a slow peer)."""

    def __init__(self) -> None:
        self.wire: list[bytes] = []
        self.direct: list[bytes] = []
        self.accept_direct = True
        self.raise_direct = False
        self.release = asyncio.Event()
        self.release.set()
        self.closed: list[int] = []
        self.written: list[tuple[str, int]] = []

    def write_now(self, data: bytes) -> bool:
        if self.raise_direct:
            raise ConnectionResetError
        if not self.accept_direct:
            return False
        self.direct.append(data)
        self.wire.append(data)
        return True

    async def send(self, data: bytes) -> None:
        await self.release.wait()
        self.wire.append(data)

    async def close(self, code: int, _reason: str) -> None:
        self.closed.append(code)

    def connection(self, limit: int = 8) -> Connection:
        conn = Connection(
            "u", "d", b"k" * 32, "person", self.send, self.close, limit, 2**40,
            write_now=self.write_now,
        )  # fmt: skip
        conn.on_written = lambda room, seq: self.written.append((room, seq))
        conn.start()
        return conn


def frames(n: int, start: int = 0) -> list[bytes]:
    return [b"f%03d" % i for i in range(start, start + n)]


async def test_direct_writes_skip_the_queue_and_report_each_event() -> None:
    sock = Socket()
    conn = sock.connection()
    for i, data in enumerate(frames(5), 1):
        assert conn.enqueue(data, event=("r", i))
        assert conn.depth == 0
    assert sock.direct == frames(5)
    assert sock.written == [("r", i) for i in range(1, 6)]
    await conn.stop()


async def test_order_holds_when_the_socket_pauses_and_resumes() -> None:
    sock = Socket()
    conn = sock.connection(limit=64)
    for data in frames(3):
        conn.enqueue(data)
    sock.accept_direct = False  # the transport pauses: frames queue behind a slow write
    sock.release.clear()
    for data in frames(3, 3):
        conn.enqueue(data)
    sock.accept_direct = True  # it could take bytes again, but frames are still queued
    for data in frames(3, 6):
        conn.enqueue(data)
    assert conn.depth > 0
    sock.release.set()
    await conn.flush(timeout=5.0)
    assert sock.wire == frames(9)
    assert sock.direct == frames(3)  # nothing jumped the queue
    for data in frames(2, 9):  # drained: direct again
        conn.enqueue(data)
    assert sock.wire == frames(11)
    assert sock.direct == frames(3) + frames(2, 9)
    await conn.stop()


async def test_a_failing_direct_write_falls_back_to_the_queue() -> None:
    sock = Socket()
    sock.raise_direct = True
    conn = sock.connection()
    assert conn.enqueue(b"x", event=("r", 1))
    await conn.flush(timeout=5.0)
    assert sock.wire == [b"x"]
    assert sock.written == [("r", 1)]
    await conn.stop()


async def test_a_slow_consumer_is_still_closed_when_its_queue_fills() -> None:
    sock = Socket()
    sock.accept_direct = False
    sock.release.clear()
    conn = sock.connection(limit=4)
    results = [conn.enqueue(data) for data in frames(10)]
    assert False in results
    assert conn.closed and conn.close_code == CloseCode.SLOW_CONSUMER
    await conn.stop()
