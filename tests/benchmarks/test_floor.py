"""``bench.floor`` measures real work: the frame it writes is a delivery the client decodes,
and the cost it reports comes from writes another process actually read."""

from __future__ import annotations

from medrelay_protocol import codec
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.envelope import Envelope
from medrelay_protocol.frames import Deliver
from websockets.frames import Frame
from websockets.streams import StreamReader

from bench.floor import check_cost, deliver_frame, write_cost
from bench.mr import seal
from bench.topology import CONSULT_BODY


def test_the_measured_frame_is_a_consult_delivery() -> None:
    device = SigningKey.generate()
    _, envelope = seal(
        device, "r" * 24, epoch=1, roster_head=bytes(32), counter=0, body_size=CONSULT_BODY
    )
    reader = StreamReader()
    reader.feed_data(deliver_frame(envelope))
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
        raise AssertionError("incomplete frame")
    except StopIteration as done:
        frame: Frame = done.value
    deliver = codec.decode(frame.data)
    assert isinstance(deliver, Deliver) and deliver.payload == envelope
    Envelope.decode(deliver.payload).verify(device.public)  # a real, signed envelope
    assert len(envelope) > CONSULT_BODY


def test_the_costs_come_from_real_work() -> None:
    _, envelope = seal(
        SigningKey.generate(), "r" * 24, epoch=1, roster_head=bytes(32), counter=0, body_size=1
    )
    assert write_cost(deliver_frame(envelope), 200) > 0
    assert check_cost(20) > 0
