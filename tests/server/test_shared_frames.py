"""``direct.SharedFrames`` frames an event once for all its recipients: the bytes must be
exactly what websockets' own server protocol writes for the same payload, at every length
boundary of the frame header (125/126 and 65535/65536)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from medrelay_server.gateway.direct import SharedFrames
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader


def websockets_framing(payload: bytes) -> bytes:
    ws = ServerProtocol()
    ws.state = State.OPEN
    ws.send_binary(payload)
    return b"".join(ws.data_to_send())


def parsed(wire: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        return frame
    raise AssertionError("the frame did not parse from its own bytes")


@given(st.sampled_from([0, 1, 125, 126, 127, 1024, 65535, 65536, 70000]), st.binary(max_size=8))
def test_the_shared_bytes_are_websockets_own_framing(length: int, tail: bytes) -> None:
    payload = (tail * (length // max(1, len(tail)) + 1))[:length] if tail else bytes(length)
    assert len(payload) == length
    wire = SharedFrames().wire(payload)
    assert wire == websockets_framing(payload)
    frame = parsed(wire)
    assert frame.opcode is Opcode.BINARY and frame.fin and frame.data == payload


def test_an_event_is_framed_once_and_the_next_event_anew() -> None:
    shared = SharedFrames()
    first, second = b"a" * 300, b"b" * 300
    wire = shared.wire(first)
    assert shared.wire(first) is wire  # every recipient of the event: the same bytes
    other = shared.wire(second)
    assert parsed(other).data == second
    # equal content in another object is framed again, and comes out the same
    again = shared.wire(bytes(bytearray(first)))
    assert again == wire and again is not wire
