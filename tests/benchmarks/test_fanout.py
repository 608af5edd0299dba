"""``bench.fanout`` measures the fan-out the server runs: medrelay's side is wired as
``create_app`` and the gateway wire it (every connection gets every frame's bytes and the
delivery journal holds one range per device, or the run raises), and the bare side is
``websockets.broadcast`` delivering every frame."""

from __future__ import annotations

from bench.fanout import bare_run, medrelay_run


async def test_both_sides_deliver_every_frame_and_report_a_cost() -> None:
    assert await medrelay_run(size=5, events=40, per_pass=3) > 0
    assert await bare_run(size=5, events=40, per_pass=3) > 0
