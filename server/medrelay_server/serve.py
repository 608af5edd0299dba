"""Run the app under uvicorn, in this process: used by ``medrelay serve``, the demo and tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette

from .settings import Settings
from .wsprotocol import RelayProtocol


def uvicorn_config(
    app: Starlette, settings: Settings, *, log_level: str = "info"
) -> uvicorn.Config:
    limits = settings.limits
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws=RelayProtocol,
        ws_max_size=limits.max_frame * 2,
        ws_ping_interval=limits.ping_interval,
        ws_ping_timeout=limits.ping_timeout,
        ws_per_message_deflate=False,
        log_level=log_level,
        lifespan="on",
        server_header=False,
    )


@dataclass
class Running:
    server: uvicorn.Server
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running(
    app: Starlette, settings: Settings, *, log_level: str = "warning"
) -> AsyncIterator[Running]:
    """Start a server on ``settings.port`` (0 picks a free loopback port) and stop it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, settings, log_level=log_level))
    server.config.setup_event_loop = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("server stopped during start-up")
            await asyncio.sleep(0.01)
        yield Running(server, port)
    finally:
        server.should_exit = True
        await task
        sock.close()
