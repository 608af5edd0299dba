"""The server's WebSocket protocol (``wsprotocol.RelayProtocol``) against a real client on a
real socket: reads pause on a backlog (bounded) rather than on every message, nothing is
lost or reordered across a pause, and keepalive pings are spread. These read uvicorn's
protocol internals on purpose: if an upgrade moves them, this fails rather than the node
silently buffering without bound or pausing per frame again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from medrelay_server.serve import running
from medrelay_server.settings import Limits, Settings
from medrelay_server.wsprotocol import READ_AHEAD_BYTES, READ_AHEAD_MESSAGES, RelayProtocol
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from tests.polling import until

READ_CHUNK = 256 * 1024  # asyncio's largest single read of a socket


class Held:
    """A WebSocket app that reads nothing until ``release`` is set, then reads ``count``
    messages and reports them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.release = asyncio.Event()
        self.got: list[bytes] = []
        self.done = asyncio.Event()

    async def endpoint(self, ws: WebSocket) -> None:
        await ws.accept()
        async with asyncio.timeout(30):  # a failed test must not hold the server's shutdown
            await self.release.wait()
        for _ in range(self.count):
            self.got.append(await ws.receive_bytes())
        self.done.set()
        await ws.close()


@asynccontextmanager
async def serving(
    endpoint: Callable[[WebSocket], Any], limits: Limits | None = None
) -> AsyncIterator[tuple[str, Callable[[], RelayProtocol]]]:
    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    settings = Settings(port=0, limits=limits or Limits())
    async with running(app, settings) as srv:

        def protocol() -> RelayProtocol:
            (only,) = srv.server.server_state.connections
            assert isinstance(only, RelayProtocol)
            return only

        yield srv.url, protocol


async def test_a_few_waiting_messages_do_not_pause_reading() -> None:
    held = Held(5)
    async with serving(held.endpoint) as (url, protocol):
        async with connect(url, compression=None) as client:
            for i in range(5):
                await client.send(bytes([i]) * 100)

            async def queued() -> bool:
                return protocol().queue.qsize() == 5

            await until(queued)
            assert not protocol().read_paused
            assert protocol().queued_bytes == 500
            held.release.set()
            await held.done.wait()
    assert held.got == [bytes([i]) * 100 for i in range(5)]


async def test_a_backlog_pauses_reading_within_its_bound_and_loses_nothing() -> None:
    frames = [i.to_bytes(4, "big") * 256 for i in range(3_000)]  # 1 KiB each, 3 MiB in all
    held = Held(len(frames))
    async with serving(held.endpoint) as (url, protocol):
        async with connect(url, compression=None) as client:
            sending = asyncio.create_task(_send_all(client, frames))

            async def paused() -> bool:
                return protocol().read_paused

            try:
                await until(paused)
                p = protocol()
                # the bound: the read-ahead, plus what one read of the socket brought in
                assert p.queued_bytes <= READ_AHEAD_BYTES + READ_CHUNK
                assert p.queue.qsize() <= READ_AHEAD_MESSAGES + READ_CHUNK // 1024
                assert p.queued_bytes >= 1024 * READ_AHEAD_MESSAGES  # paused for a backlog
                assert p.queued_bytes < sum(map(len, frames)) // 4  # the rest: in the sockets
            finally:
                held.release.set()
            await held.done.wait()
            await sending
            assert not protocol().read_paused and protocol().queued_bytes == 0
    assert held.got == frames


async def _send_all(client: Any, frames: list[bytes]) -> None:
    for f in frames:
        await client.send(f)


async def test_keepalive_pings_are_due_within_the_spread_of_the_interval() -> None:
    interval = 8.0  # long: no ping is sent while the test reschedules them

    async def idle(ws: WebSocket) -> None:
        await ws.accept()
        await ws.receive()

    async with serving(idle, Limits(ping_interval=interval, ping_timeout=interval)) as (
        url,
        protocol,
    ):
        async with connect(url, compression=None):

            async def armed() -> bool:
                return protocol().ping_timer is not None

            await until(armed)
            p = protocol()
            dues: list[float] = []
            for _ in range(50):
                assert p.ping_timer is not None
                p.ping_timer.cancel()
                before = p.loop.time()
                p.schedule_ping()
                assert p.ping_timer is not None
                dues.append(p.ping_timer.when() - before)
    assert all(0.75 * interval - 0.05 <= d <= interval + 0.05 for d in dues), dues
    assert max(dues) - min(dues) > 0.1 * interval  # spread, not one fixed delay
