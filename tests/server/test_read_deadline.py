"""``gateway/deadline.ReadDeadline``: the token deadline cancels the read loop's wait for a
frame, never a handler, and never swallows another cancellation (a shutdown). The gateway's
own behaviour (``reauth_required``, then 4005) is in ``tests/integration/test_reauth.py``."""

from __future__ import annotations

import asyncio

import pytest
from medrelay_server.clock import FakeClock
from medrelay_server.gateway.deadline import ReadDeadline


async def _read(deadline: ReadDeadline, wait: asyncio.Future[None]) -> str:
    """The read loop's shape: flag the wait, tell our cancellation from others."""
    deadline.reading = True
    try:
        await wait
    except asyncio.CancelledError:
        if deadline.interrupted():
            return "deadline"
        raise
    finally:
        deadline.reading = False
    return "frame"


async def test_a_deadline_passing_during_a_read_interrupts_only_the_read() -> None:
    clock = FakeClock()

    async def loop_task() -> tuple[str, bool]:
        deadline = ReadDeadline(clock)
        deadline.arm(clock.now())  # due now: fires on the loop's next timer pass
        how = await _read(deadline, asyncio.get_running_loop().create_future())
        return how, deadline.expired

    task = asyncio.create_task(loop_task())
    assert await task == ("deadline", True)
    assert not task.cancelled() and task.cancelling() == 0


async def test_a_deadline_passing_during_a_handler_waits_for_the_next_read() -> None:
    clock = FakeClock()
    loop = asyncio.get_running_loop()

    async def loop_task() -> tuple[bool, str]:
        deadline = ReadDeadline(clock)
        deadline.arm(clock.now())
        handler = loop.create_future()  # a handler awaiting the store, past the deadline
        loop.call_later(0.05, handler.set_result, None)
        await handler
        fired = deadline.expired
        frame = loop.create_future()
        frame.set_result(None)
        return fired, await _read(deadline, frame)

    assert await asyncio.create_task(loop_task()) == (True, "frame")


@pytest.mark.parametrize("deadline_fires_too", [False, True])
async def test_another_cancellation_propagates(deadline_fires_too: bool) -> None:
    clock = FakeClock()
    started = asyncio.Event()
    holder: list[ReadDeadline] = []

    async def loop_task() -> str:
        deadline = ReadDeadline(clock)
        holder.append(deadline)
        deadline.arm(clock.now() + 3600)
        started.set()
        return await _read(deadline, asyncio.get_running_loop().create_future())

    task = asyncio.create_task(loop_task())
    await started.wait()
    if deadline_fires_too:
        holder[0].arm(clock.now())  # both in the same pass: the shutdown must win
        holder[0]._fire()
    task.cancel()  # a shutdown
    with pytest.raises(asyncio.CancelledError):
        await task
    holder[0].close()


async def test_arming_the_same_second_keeps_one_timer_and_close_cancels_it() -> None:
    clock = FakeClock()
    deadline = ReadDeadline(clock)
    deadline.arm(clock.now() + 60)
    first = deadline._handle
    deadline.arm(clock.now() + 60)
    assert deadline._handle is first and first is not None
    deadline.arm(clock.now() + 120)  # a renewal moves it
    assert first.cancelled() and deadline._handle is not first
    deadline.close()
    assert deadline._handle is None and not deadline.expired
