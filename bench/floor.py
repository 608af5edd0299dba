"""What a send costs on this machine before any of medrelay's own code, against what the
target leaves.

    python -m bench.floor [--room-size 10 50] [--bare-us 8.1] [--target 0.6]

Two costs of a send, measured in this process:

* **a delivery's socket write**: one consult-sized WebSocket frame (a 1 KiB envelope in a
  ``deliver`` frame, framed once) written with ``send()`` into a loopback TCP connection
  (``TCP_NODELAY``, as asyncio sets it) that another process drains. CPU (user + system)
  per write; on loopback the kernel's receive path runs in the writer's system time. Both
  servers pay it for each delivery whose connection gets no other frame in the same pass of
  the event loop (medrelay's direct writer sends a pass's frames together; the bare relay
  writes each one), and the bare relay pays little else;
* **the envelope check** (I5: the server verifies every envelope's signature): decoding a
  sealed consult envelope and its strict Ed25519 check, as ``handle_send`` does, per send.
  No code change removes it.

Per send into a room of ``--room-size``: that floor (one write per member and the check).
``--bare-us`` is the bare relay's server CPU per delivery from a run of ``python -m bench``
in the same hour (1e6 / its "deliveries per server CPU-second" in rooms of that size); with
it, the table adds what ``--target`` x the bare relay's rate leaves per send, and what is left
of that after the floor for everything else a send does (the durable journal and its
commit, the audit chain, the ack, the frame's way through Python). Without it the bare
relay's cost per delivery is taken as the write alone, which is lower than it is.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time

from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.envelope import Envelope
from medrelay_server.delivery import event_frame
from medrelay_server.store.base import StoredEvent
from websockets.frames import Frame, Opcode

from .mr import seal
from .topology import CONSULT_BODY

DRAIN = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
total = 0
while chunk := s.recv(1 << 20):
    total += len(chunk)
print(total)
"""


def deliver_frame(envelope: bytes) -> bytes:
    """The WebSocket frame of one delivery of ``envelope`` (server side: unmasked), with the
    server's own ``deliver`` encoding (``delivery.event_frame``)."""
    event = StoredEvent("r" * 24, 1, "message", "d" * 32, "u" * 32, 1_700_000_000_000, envelope)
    return Frame(Opcode.BINARY, event_frame(event)).serialize(mask=False, extensions=[])


def write_cost(frame: bytes, writes: int) -> float:
    """CPU seconds per ``send()`` of ``frame`` into a loopback socket another process reads."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reader = subprocess.Popen(
            [sys.executable, "-c", DRAIN, str(port)], stdout=subprocess.PIPE, text=True
        )
        try:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                warm = min(1000, writes)
                for _ in range(warm):  # warm the path
                    conn.sendall(frame)
                start = time.process_time()
                for _ in range(writes):
                    conn.sendall(frame)
                cpu = time.process_time() - start
        finally:
            out, _ = reader.communicate(timeout=30)
    if int(out or 0) != (warm + writes) * len(frame):
        raise RuntimeError(f"the reader got {out.strip()} bytes, not every write")
    return cpu / writes


def check_cost(checks: int) -> float:
    """CPU seconds per decode and Ed25519 check of one sealed consult envelope."""
    device = SigningKey.generate()
    room, head = "r" * 24, bytes(32)
    envelopes = [
        seal(device, room, epoch=1, roster_head=head, counter=i, body_size=CONSULT_BODY)[1]
        for i in range(64)
    ]
    for raw in envelopes:
        Envelope.decode(raw).verify(device.public)
    start = time.process_time()
    for i in range(checks):
        Envelope.decode(envelopes[i % len(envelopes)]).verify(device.public)
    return (time.process_time() - start) / checks


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--room-size", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--writes", type=int, default=20_000)
    parser.add_argument("--checks", type=int, default=2_000)
    parser.add_argument("--bare-us", type=float, help="bare relay's CPU µs per delivery")
    parser.add_argument("--target", type=float, default=0.6)
    args = parser.parse_args()
    _, sample = seal(
        SigningKey.generate(),
        "r" * 24,
        epoch=1,
        roster_head=bytes(32),
        counter=0,
        body_size=CONSULT_BODY,
    )
    frame = deliver_frame(sample)
    w = write_cost(frame, args.writes)
    v = check_cost(args.checks)
    bare_us = args.bare_us if args.bare_us is not None else w * 1e6
    source = "given" if args.bare_us is not None else "the write alone: a lower bound"
    print("CPU per operation, this machine, this process:")
    print(f"  {w * 1e6:8.2f} µs  a delivery's socket write ({len(frame)} B frame, loopback)")
    print(f"  {v * 1e6:8.2f} µs  a send's envelope decode and Ed25519 check")
    print(f"  {bare_us:8.2f} µs  the bare relay's CPU per delivery ({source})")
    print()
    print(f"per send, µs; budget = what {args.target} x the bare relay's deliveries/s leaves")
    print(" room   bare relay   floor (writes + check)   budget   left for the rest")
    for n in args.room_size:
        floor = (n * w + v) * 1e6
        budget = n * bare_us / args.target
        print(f" {n:4} {n * bare_us:12.1f} {floor:24.1f} {budget:8.1f} {budget - floor:19.1f}")


if __name__ == "__main__":
    main()
