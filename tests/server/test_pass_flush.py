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


async def test_a_flush_added_while_the_pass_runs_goes_to_the_next_pass() -> None:
    passes = PassFlush()
    ran: list[str] = []
    done = asyncio.Event()

    def first() -> None:
        ran.append("first")
        passes.add(lambda: (ran.append("later"), done.set()))

    passes.add(first)
    passes.add(lambda: ran.append("second"))
    await asyncio.wait_for(done.wait(), 10)
    assert ran == ["first", "second", "later"]


async def test_a_base_exception_keeps_the_rest_of_the_pass_for_the_next() -> None:
    """A flush that raises something other than an ``Exception`` (not the pass's to
    swallow) leaves the callback (asyncio hands it to the loop's exception handler), and
    the flushes after it still run, in the next pass."""
    passes = PassFlush()
    ran: list[str] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    raised: list[BaseException] = []
    loop.set_exception_handler(lambda _loop, ctx: raised.append(ctx["exception"]))

    class Stop(BaseException):
        pass

    def stopping() -> None:
        raise Stop

    try:
        passes.add(stopping)
        passes.add(lambda: (ran.append("after"), done.set()))
        await asyncio.wait_for(done.wait(), 10)
    finally:
        loop.set_exception_handler(None)
    assert ran == ["after"]
    assert len(raised) == 1 and isinstance(raised[0], Stop)
