"""``direct.PassFlush``: the flushes of every connection written in one pass of the loop run
from one callback in the next, in the order they were added; one that fails does not keep
the others from running."""

from __future__ import annotations

import asyncio

from medrelay_server.gateway.direct import PassFlush


async def test_one_callback_runs_every_flush_of_the_pass_in_order() -> None:
    passes = PassFlush()
    ran: list[str] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_soon = loop.call_soon

    def counting_call_soon(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal scheduled
        scheduled += 1
        return call_soon(*args, **kwargs)

    def failing() -> None:
        ran.append("b")
        raise ConnectionResetError

    loop.call_soon = counting_call_soon  # type: ignore[method-assign]
    try:
        passes.add(lambda: ran.append("a"))
        passes.add(failing)
        passes.add(lambda: (ran.append("c"), done.set()))
    finally:
        loop.call_soon = call_soon  # type: ignore[method-assign]
    assert scheduled == 1 and ran == []  # nothing runs before the next pass
    await asyncio.wait_for(done.wait(), 10)
    assert ran == ["a", "b", "c"]
    # the next pass schedules afresh
    again = asyncio.Event()
    passes.add(again.set)
    await asyncio.wait_for(again.wait(), 10)
