"""The live fan-out's own CPU per delivery, in process, beside ``websockets.broadcast``.

    python -m bench.fanout [--room-size 10 50] [--events 20000] [--per-pass 8] [--repeat 5]

What it measures: one consult event (a 1 KiB envelope in the server's ``deliver`` frame)
handed to every member of a room, ``--events`` times, with the event loop running its
callbacks every ``--per-pass`` events (as a group-commit batch's events reach a room
together). Both sides write into transports that only count bytes, so what is measured is
the Python of the fan-out and no system call: the socket's ``send()`` (``bench.floor``
measures it) is not in either figure.

* **medrelay**: ``Delivery._process`` into a ``RoomHub`` of real ``Connection`` objects, each
  wired as ``create_app`` and ``Gateway.connect`` wire them (the delivery journal's
  callbacks, the real ``direct_writer`` over websockets' ``ServerProtocol``, frames shared
  across the room by ``SharedFrames``), and the real ``DeliveryJournal`` recording each
  write.
* **bare**: what the bare relay does per message (``bench/baseline.py``):
  ``websockets.broadcast`` to the room's connections (websockets' asyncio ``Connection``,
  the base of the bare relay's ``ServerConnection``), which frames the message for each
  connection and writes it at once.

Each figure is the best of ``--repeat`` runs (CPU time of this process per delivery). The
check at the end of a run fails loudly if any connection did not get every frame.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

from medrelay_server.clock import SystemClock
from medrelay_server.delivery import Delivery, Effects, Registry, RoomHub, event_frame
from medrelay_server.fanout.base import Broker
from medrelay_server.gateway.connection import Connection
from medrelay_server.gateway.context import journal_fanout, journal_writes
from medrelay_server.gateway.direct import SCOPE_KEY, PassFlush, SharedFrames, direct_writer
from medrelay_server.journal.delivery import DeliveryJournal
from medrelay_server.store.base import Store, StoredEvent
from websockets.asyncio.connection import Connection as WsConnection
from websockets.asyncio.connection import broadcast
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

ROOM = "r" * 24
ENVELOPE = bytes(1100)


class CountingTransport(asyncio.Transport):
    """A transport that takes every write and counts its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _NullSink:
    async def journal(self, records: Any, *, receipts: Any = (), seen: Any = ()) -> None:
        return None


class _Protocol:
    """The attributes of uvicorn's websockets-sansio protocol that the direct writer reads."""

    def __init__(self, transport: CountingTransport) -> None:
        self.conn = _open_protocol()
        self.transport = transport
        self.writable = asyncio.Event()
        self.writable.set()
        self.close_sent = False
        self.disconnected = False


def _open_protocol() -> ServerProtocol:
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    return protocol


async def _noop_send(data: bytes) -> None:
    return None


async def _noop_close(code: int, reason: str) -> None:
    return None


def sample_frame() -> bytes:
    event = StoredEvent(ROOM, 1, "message", "d" * 32, "u" * 32, 1_700_000_000_000, ENVELOPE)
    return event_frame(event)


async def medrelay_run(size: int, events: int, per_pass: int) -> float:
    """CPU seconds per delivery of medrelay's live fan-out into a room of ``size``."""
    journal = DeliveryJournal(_NullSink(), SystemClock(), max_records=1 << 30)
    delivery = Delivery(
        store=cast(Store, None),
        broker=cast(Broker, None),
        registry=Registry(),
        replay_batch=64,
        on_written=journal_fanout(journal, SystemClock()),
    )
    hub = RoomHub(ROOM, 0, {f"user{i}": "member" for i in range(size)})
    delivery.hubs[ROOM] = hub
    shared, passes = SharedFrames(), PassFlush()
    transports = []
    for i in range(size):
        transport = CountingTransport()
        transports.append(transport)
        conn = Connection(
            user=f"user{i}",
            device=f"device{i}",
            device_key=b"",
            kind="user",
            send_bytes=_noop_send,
            close_fn=_noop_close,
            queue_limit=256,
            expires_at=0,
        )
        conn.write_now = direct_writer({SCOPE_KEY: _Protocol(transport)}, shared, passes)
        conn.on_written = journal_writes(journal, SystemClock(), conn)
        conn.cursors[ROOM] = 0
        hub.conns.add(conn)
    # two equal frames that are not the same object, used in turn: every event is framed
    # for its room once, as live (``SharedFrames`` matches by identity)
    frames, effects = (sample_frame(), sample_frame()), Effects()
    if frames[0] is frames[1]:
        raise RuntimeError("the two frames must be distinct objects")

    def one(seq: int) -> None:
        delivery._process(hub, seq, "message", frames[seq % 2], effects)

    cpu = await _drive(events, per_pass, one)
    _check(transports, events, frames[0])
    if journal.pending != size:
        raise RuntimeError(f"the journal holds {journal.pending} ranges, not {size}")
    return cpu / (events * size)


async def bare_run(size: int, events: int, per_pass: int) -> float:
    """CPU seconds per delivery of ``websockets.broadcast`` into a room of ``size``."""
    transports, conns = [], []
    for _ in range(size):
        transport = CountingTransport()
        conn = WsConnection(_open_protocol())
        conn.connection_made(transport)
        transports.append(transport)
        conns.append(conn)
    members = set(conns)
    message = b"DATA" + sample_frame()[4:]
    cpu = await _drive(events, per_pass, lambda _: broadcast(members, message))
    _check(transports, events, message)
    return cpu / (events * size)


async def _drive(events: int, per_pass: int, one: Callable[[int], None]) -> float:
    """CPU seconds for ``one(1)`` .. ``one(events)``, the loop running its callbacks (the
    socket flushes) after every ``per_pass`` of them."""
    start = time.process_time()
    for i in range(1, events + 1):
        one(i)
        if i % per_pass == 0:
            await asyncio.sleep(0)
    await asyncio.sleep(0)
    return time.process_time() - start


def _check(transports: list[CountingTransport], events: int, payload: bytes) -> None:
    """Every connection got every event's frame."""
    expected = events * len(Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[]))
    short = [t.written for t in transports if t.written != expected]
    if short:
        raise RuntimeError(f"{len(short)} connections got {short[0]} bytes, not {expected}")


async def measure(size: int, events: int, per_pass: int, repeat: int) -> tuple[float, float]:
    mine = min([await medrelay_run(size, events, per_pass) for _ in range(repeat)])
    bare = min([await bare_run(size, events, per_pass) for _ in range(repeat)])
    return mine, bare


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("--room-size", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--per-pass", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("live fan-out, CPU µs per delivery in process (no system calls), best of", args.repeat)
    print(" room   medrelay   websockets.broadcast   ratio")
    for size in args.room_size:
        mine, bare = asyncio.run(measure(size, args.events, args.per_pass, args.repeat))
        print(f" {size:4} {mine * 1e6:10.3f} {bare * 1e6:22.3f} {mine / bare:7.2f}")


if __name__ == "__main__":
    main()
