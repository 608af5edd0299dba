"""The bare relay: the fastest thing Python does here, for comparison with medrelay.

A ``websockets`` asyncio server; no authentication, no crypto checks, no storage, no
compression. A client's first binary message is ``JOIN<group>|<name>``: it joins the group
and gets the same bytes back (a name ending in ``|s`` sends without receiving, like a
bedside tablet in medrelay). Afterwards every binary message starting with ``DATA`` is
broadcast (``websockets.broadcast``: no per-recipient await) to every member of the group,
the sender included, as medrelay delivers a message to every member device. ``KICK<name>``
removes that member from the group (the bare analogue of a revocation) and is echoed back to
the kicker once done.

    python -m bench.baseline --port 8800
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

MAX_SIZE = 1024 * 1024

groups: dict[bytes, set[ServerConnection]] = {}
by_name: dict[bytes, tuple[bytes, ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:
    try:
        first = await ws.recv(decode=False)
    except ConnectionClosed:
        return
    if not isinstance(first, bytes) or not first.startswith(b"JOIN"):
        await ws.close(1008, "join first")
        return
    group, _, name = first[4:].partition(b"|")
    members = groups.setdefault(group, set())
    if not name.endswith(b"|s"):  # "|s": a send-only member (a bedside tablet)
        members.add(ws)
    by_name[name] = (group, ws)
    await ws.send(first)
    try:
        async for message in ws:
            if not isinstance(message, bytes):
                continue
            tag = message[:4]
            if tag == b"DATA":
                broadcast(members, message)
            elif tag == b"KICK":
                target = by_name.get(message[4:])
                if target is not None:
                    groups.get(target[0], set()).discard(target[1])
                await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        members.discard(ws)
        if by_name.get(name, (b"", None))[1] is ws:
            del by_name[name]


async def main(host: str, port: int) -> None:
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        host,
        port,
        compression=None,
        max_size=MAX_SIZE,
        max_queue=64,
        backlog=4096,
    ):
        gc.collect()  # as medrelay serve does after start-up (server/medrelay_server/heap.py)
        gc.freeze()
        await stop


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bare websockets broadcast relay")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.host, args.port))
