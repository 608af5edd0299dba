"""A minimal WebSocket client on ``asyncio.Protocol``, for load generators.

Why not the ``websockets`` client: a load generator on a 2-core machine must cost far less per
frame than the server it measures. This client parses server frames in ``data_received``
with one timestamp per read (every frame in one read arrived at the same time), hands each
binary payload to a callback, answers pings, and writes pre-built (pre-masked) frames with
one ``transport.write``. It does not validate the upgrade's accept hash, extensions or UTF-8:
it talks only to the two servers under test, on loopback.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Callable

_c_apply_mask: Callable[[bytes, bytes], bytes] | None
try:
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - the C speedups ship with websockets wheels
    _c_apply_mask = None

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

FrameCallback = Callable[[bytes, float], None]


def apply_mask(data: bytes, mask: bytes) -> bytes:
    if _c_apply_mask is not None:
        return bytes(_c_apply_mask(data, mask))
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One complete masked client frame (FIN set): build ahead of a timed window."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


class WsClosed(Exception):
    pass


class WsClient(asyncio.Protocol):
    """One client connection. ``on_frame(payload, t)`` gets each binary message with the
    monotonic time of the read that completed it; until it is set, messages queue in
    ``inbox`` (for handshakes)."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path, self.headers = host, port, path, headers
        self.transport: asyncio.Transport | None = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed_fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.on_frame: FrameCallback | None = None
        self.close_code: int | None = None
        self._buf = bytearray()
        self._upgraded = False

    # asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(buf[: buf.find(b"\r\n")])
            del buf[: end + 4]
            if b" 101 " not in status + b" ":
                self._fail(WsClosed(f"upgrade refused: {status.decode(errors='replace')}"))
                return
            self._upgraded = True
            if not self.upgraded.done():
                self.upgraded.set_result(None)
        pos, size = 0, len(buf)
        on_frame = self.on_frame
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            hl = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hl = 10
            if size - pos < hl + n:
                break
            payload = bytes(buf[pos + hl : pos + hl + n])
            pos += hl + n
            op = b0 & 0x0F
            if op == OP_BINARY or op == OP_TEXT:
                if on_frame is not None:
                    on_frame(payload, now)
                else:
                    self.inbox.put_nowait(payload)
            elif op == OP_PING:
                self.write(client_frame(payload, OP_PONG))
            elif op == OP_CLOSE:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                self.write(client_frame(payload[:2], OP_CLOSE))
                if self.transport is not None:
                    self.transport.close()
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(WsClosed(f"closed ({self.close_code})"))

    def _fail(self, exc: Exception) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(exc)
        if not self.closed_fut.done():
            self.closed_fut.set_result(self.close_code)
        self.inbox.put_nowait(None)
        if self.transport is not None:
            self.transport.close()

    # API ----------------------------------------------------------------------------------
    @property
    def is_closed(self) -> bool:
        return self.closed_fut.done()

    def write(self, frame: bytes) -> None:
        """Write a frame built with :func:`client_frame`."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def send(self, payload: bytes) -> None:
        self.write(client_frame(payload))

    async def recv(self, timeout: float = 10.0) -> bytes:
        data = await asyncio.wait_for(self.inbox.get(), timeout)
        if data is None:
            self.inbox.put_nowait(None)
            raise WsClosed(f"closed ({self.close_code})")
        return data

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.write(client_frame(struct.pack("!H", 1000), OP_CLOSE))
            self.transport.close()


async def open_ws(
    host: str,
    port: int,
    path: str = "/ws",
    headers: dict[str, str] | None = None,
    *,
    local: str | None = None,
) -> WsClient:
    """Connect and upgrade. ``local`` picks the source address (127.0.0.x spreads many
    connections over several loopback addresses' port ranges)."""
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(
        lambda: WsClient(host, port, path, headers or {}),
        host,
        port,
        local_addr=(local, 0) if local else None,
    )
    await asyncio.wait_for(proto.upgraded, 10.0)
    return proto
