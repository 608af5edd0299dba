"""Waiting for state that announces no event of its own (a row written by another process,
a connection the server has finished with): poll the condition, bounded by a deadline."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(check: Callable[[], Awaitable[bool]], *, timeout: float = 10.0) -> None:
    """Return once ``check()`` holds; ``TimeoutError`` after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)
