"""Codec: every way a frame can be wrong gets its own typed error and wire code.

Bad frames are built by hand (``raw_map``) where msgpack itself would refuse to produce
them: duplicate keys, non-string keys, ext types, invalid UTF-8.
"""

from __future__ import annotations

import datetime
import tracemalloc
from typing import Any

import msgpack
import pytest
from medrelay_protocol import codec, frames
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import (
    FrameError,
    FrameTooLarge,
    InvalidField,
    MalformedFrame,
    UnknownFrameType,
)
from medrelay_protocol.frames import FRAME_TYPES, Frame

FRAMES = [FRAME_TYPES[name] for name in sorted(FRAME_TYPES)]
REQUIRED = [(cls, spec.name) for cls in FRAMES for spec in cls.SPECS if spec.required]


class Raw(bytes):
    """Already-encoded msgpack, spliced into :func:`raw_map` as is."""


def pack(value: Any) -> bytes:
    if isinstance(value, Raw):
        return bytes(value)
    return bytes(msgpack.packb(value, use_bin_type=True))


def raw_map(*pairs: tuple[Any, Any]) -> Raw:
    """A msgpack map written pair by pair, so keys may repeat or be of any type."""
    assert len(pairs) < 16
    return Raw(bytes([0x80 | len(pairs)]) + b"".join(pack(k) + pack(v) for k, v in pairs))


def raw_array(*items: Any) -> Raw:
    assert len(items) < 16
    return Raw(bytes([0x90 | len(items)]) + b"".join(pack(i) for i in items))


def wire(frame: Frame, **changes: Any) -> dict[str, Any]:
    return {"t": frame.TYPE, **frame.to_wire(), **changes}


def rejects(data: Any, error: type[FrameError], code: ErrorCode, **kw: Any) -> FrameError:
    with pytest.raises(FrameError) as caught:
        codec.decode(data, **kw)
    assert type(caught.value) is error, caught.value
    assert caught.value.code is code
    return caught.value


@pytest.fixture
def send(make_minimal: Any) -> frames.Send:
    frame: frames.Send = make_minimal(frames.Send, rid="req-1", room="ward-7", mid=b"m" * 16)
    return frame


# ------------------------------------------------------------------ size


def test_oversize_is_refused_before_unpacking() -> None:
    garbage = b"\xc1" * (600 * 1024)  # 0xc1 is never valid msgpack
    tracemalloc.start()
    try:
        rejects(garbage, FrameTooLarge, ErrorCode.FRAME_TOO_LARGE)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    rejects(b"\xc1" * (codec.MAX_FRAME + 1), FrameTooLarge, ErrorCode.FRAME_TOO_LARGE)
    rejects(b"\xc1" * codec.MAX_FRAME, MalformedFrame, ErrorCode.BAD_FRAME)
    rejects(bytearray(600 * 1024), FrameTooLarge, ErrorCode.FRAME_TOO_LARGE)
    rejects(memoryview(bytes(600 * 1024)), FrameTooLarge, ErrorCode.FRAME_TOO_LARGE)


def test_max_size_is_inclusive(send: frames.Send) -> None:
    data = codec.encode(send)
    assert codec.decode(data, max_size=len(data)) == send
    rejects(data, FrameTooLarge, ErrorCode.FRAME_TOO_LARGE, max_size=len(data) - 1)


def test_valid_frame_over_the_limit_is_too_large(make_minimal: Any) -> None:
    event = make_minimal(frames.Deliver, payload=b"p" * (70 * 1024))
    page = make_minimal(frames.HistoryPage, events=(event,) * 10)
    data = codec.encode(page)
    assert len(data) > codec.MAX_FRAME
    rejects(data, FrameTooLarge, ErrorCode.FRAME_TOO_LARGE)
    assert codec.decode(data, max_size=len(data)) == page


@pytest.mark.parametrize("data", ["text frame", None, 7, [b"\x80"]], ids=repr)
def test_non_bytes_input_is_malformed(data: Any) -> None:
    rejects(data, MalformedFrame, ErrorCode.BAD_FRAME)


def test_bytes_like_inputs_decode(send: frames.Send) -> None:
    data = codec.encode(send)
    assert codec.decode(bytearray(data)) == send
    assert codec.decode(memoryview(data)) == send


# ------------------------------------------------------------------ msgpack layer


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81", b"\x92\xc0", b"\xa5abc"], ids=repr)
def test_invalid_msgpack_is_malformed(data: bytes) -> None:
    rejects(data, MalformedFrame, ErrorCode.BAD_FRAME)


def test_every_truncation_is_malformed(send: frames.Send) -> None:
    data = codec.encode(send)
    for end in range(len(data)):
        rejects(data[:end], MalformedFrame, ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("tail", [b"\xc0", b"\x00", b"\xc1", None], ids=repr)
def test_trailing_bytes_are_malformed(send: frames.Send, tail: bytes | None) -> None:
    data = codec.encode(send)
    rejects(data + (data if tail is None else tail), MalformedFrame, ErrorCode.BAD_FRAME)


@pytest.mark.parametrize(
    "value", [["t", "ok"], [{"t": "ok", "rid": "r"}], 1, "ok", None, True, 1.5, b"ok"], ids=repr
)
def test_top_level_must_be_a_map(value: Any) -> None:
    rejects(pack(value), MalformedFrame, ErrorCode.BAD_FRAME)


EXT = {
    "fixext1": Raw(b"\xd4\x05\x00"),
    "fixext16": Raw(b"\xd8\x05" + bytes(16)),
    "ext8": Raw(b"\xc7\x03\x05abc"),
    "ext8-empty": Raw(b"\xc7\x00\x05"),
    "ext16": Raw(b"\xc8\x00\x02\x05ab"),
    "ext32": Raw(b"\xc9\x00\x00\x00\x01\x05a"),
    "timestamp32": Raw(pack(msgpack.Timestamp(1_700_000_000))),
    "timestamp64": Raw(pack(msgpack.Timestamp(1_700_000_000, 5))),
    "timestamp96": Raw(pack(msgpack.Timestamp(2**40, 5))),
    "datetime": Raw(
        msgpack.packb(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), datetime=True)
    ),
    "timestamp-bad-length": Raw(b"\xc7\x03\xffabc"),
}


@pytest.mark.parametrize("ext", EXT.values(), ids=EXT.keys())
def test_ext_types_are_malformed_anywhere(ext: Raw) -> None:
    assert ext[0] in (0xC7, 0xC8, 0xC9, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8)
    placements = [
        ext,
        raw_map(("t", "ok"), ("rid", ext)),
        raw_map(("t", "sync"), ("rid", "r"), ("rooms", raw_map(("ward", ext)))),
        raw_map(("t", "get_devices"), ("rid", "r"), ("users", raw_array("a", ext))),
        raw_map(("t", "ok"), ("rid", "r"), (ext, 1)),
    ]
    for data in placements:
        rejects(data, MalformedFrame, ErrorCode.BAD_FRAME)


@pytest.mark.parametrize("key", [1, -1, b"rid", None, True, 1.5, Raw(b"\x91\x01"), Raw(b"\x80")])
def test_map_keys_must_be_strings(key: Any) -> None:
    rejects(raw_map(("t", "ok"), ("rid", "r"), (key, 1)), MalformedFrame, ErrorCode.BAD_FRAME)
    nested = raw_map(("t", "sync"), ("rid", "r"), ("rooms", raw_map((key, 1))))
    rejects(nested, MalformedFrame, ErrorCode.BAD_FRAME)


def test_bytes_rid_key_is_malformed_not_a_missing_field() -> None:
    rejects(raw_map(("t", "ok"), (b"rid", "r")), MalformedFrame, ErrorCode.BAD_FRAME)


def test_duplicate_keys_are_malformed(make_minimal: Any) -> None:
    event = make_minimal(frames.Deliver).to_wire()
    cases = [
        raw_map(("t", "ok"), ("rid", "a"), ("rid", "b")),
        raw_map(("t", "ok"), ("rid", "a"), ("rid", "a")),
        raw_map(("t", "ok"), ("t", "ok"), ("rid", "a")),
        raw_map(("t", "ok"), ("rid", "a"), ("t", "ack")),
        raw_map(("t", "sync"), ("rid", "r"), ("rooms", raw_map(("w", 1), ("w", 2)))),
        raw_map(
            ("t", "history_page"),
            ("rid", "r"),
            ("room", "w"),
            ("events", raw_array(raw_map(*event.items(), ("seq", 1)))),
        ),
    ]
    assert codec.decode(raw_map(("t", "ok"), ("rid", "a"))) == frames.Ok(rid="a")
    for data in cases:
        rejects(data, MalformedFrame, ErrorCode.BAD_FRAME)


@pytest.mark.parametrize(
    "text",
    [b"\xff\xfe", b"\xc0\xaf", b"\xed\xa0\x80", b"\xc3", b"\xf4\x90\x80\x80", b"ok\x80"],
    ids=repr,
)
def test_invalid_utf8_is_malformed(text: bytes) -> None:
    bad = Raw(bytes([0xA0 | len(text)]) + text)
    rejects(raw_map(("t", "ok"), ("rid", bad)), MalformedFrame, ErrorCode.BAD_FRAME)
    rejects(raw_map(("t", bad), ("rid", "r")), MalformedFrame, ErrorCode.BAD_FRAME)
    rejects(raw_map(("t", "ok"), ("rid", "r"), (bad, 1)), MalformedFrame, ErrorCode.BAD_FRAME)


# ------------------------------------------------------------------ frame type


@pytest.mark.parametrize("wire_map", [{"rid": "r"}, {}], ids=repr)
def test_missing_type_is_unknown(wire_map: dict[str, Any]) -> None:
    rejects(pack(wire_map), UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE)


@pytest.mark.parametrize("kind", [1, b"ok", None, ["ok"], {"ok": 1}, True, 1.5], ids=repr)
def test_non_string_type_is_unknown(kind: Any) -> None:
    rejects(pack({"t": kind, "rid": "r"}), UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE)


@pytest.mark.parametrize(
    "kind", ["nope", "", "OK", "ok ", "Ok", "room_info", "RoomInfo", "user_devices", "Frame"]
)
def test_unknown_type_is_refused(kind: str) -> None:
    rejects(pack({"t": kind, "rid": "r"}), UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE)


@pytest.mark.parametrize("cls", FRAMES, ids=lambda c: c.TYPE)
def test_frame_direction_is_enforced(cls: type[Frame], make_minimal: Any) -> None:
    frame = make_minimal(cls)
    data = codec.encode(frame)
    assert codec.decode(data) == frame
    assert codec.decode(data, from_client=cls.CLIENT) == frame
    rejects(data, UnknownFrameType, ErrorCode.UNKNOWN_FRAME_TYPE, from_client=not cls.CLIENT)


# ------------------------------------------------------------------ schema


def test_unknown_fields_are_invalid(send: frames.Send, make_minimal: Any) -> None:
    for extra in ({"x": 1}, {"T": "send"}, {"rid ": "r"}, {"": 1}):
        rejects(pack(wire(send, **extra)), InvalidField, ErrorCode.INVALID_FIELD)
    event = make_minimal(frames.Deliver).to_wire()
    for bad_event in ({**event, "x": 1}, {**event, "t": "deliver"}):
        page = wire(make_minimal(frames.HistoryPage), events=[bad_event])
        rejects(pack(page), InvalidField, ErrorCode.INVALID_FIELD)


@pytest.mark.parametrize("case", REQUIRED, ids=lambda c: f"{c[0].TYPE}.{c[1]}")
def test_missing_or_nil_required_field_is_invalid(
    case: tuple[type[Frame], str], make_minimal: Any
) -> None:
    cls, name = case
    full = wire(make_minimal(cls))
    missing = {k: v for k, v in full.items() if k != name}
    error = rejects(pack(missing), InvalidField, ErrorCode.INVALID_FIELD)
    assert name in str(error)
    rejects(pack({**full, name: None}), InvalidField, ErrorCode.INVALID_FIELD)


WRONG_TYPES = [
    (frames.Send, "rid", 1),  # int for str
    (frames.Send, "rid", b"req-1"),  # bytes for str
    (frames.Send, "mid", "m" * 16),  # str for bytes
    (frames.Send, "envelope", "ciphertext"),  # str for bytes
    (frames.Receipt, "seq", True),  # bool for int
    (frames.Receipt, "seq", 1.0),  # float for int
    (frames.Receipt, "seq", "1"),
    (frames.Receipt, "seq", -1),
    (frames.Receipt, "seq", 2**64 - 1),
    (frames.BlobPut, "final", 1),  # int for bool
    (frames.BlobPut, "final", 0.0),  # float for bool
    (frames.BlobPut, "final", "true"),
    (frames.History, "limit", 201),
    (frames.Sync, "rooms", [["w", 1]]),  # array for map
    (frames.Sync, "rooms", {"w": "1"}),
    (frames.Sync, "rooms", {"w": -1}),
    (frames.Sync, "rooms", {"": 1}),
    (frames.GetDevices, "users", {"a": "b"}),  # map for array
    (frames.GetDevices, "users", "alice"),
    (frames.GetDevices, "users", [1]),
    (frames.Error, "code", 999),
    (frames.Error, "message", 1.5),
]


@pytest.mark.parametrize("case", WRONG_TYPES, ids=lambda c: f"{c[0].TYPE}.{c[1]}={c[2]!r}")
def test_wrong_field_types_are_invalid(
    case: tuple[type[Frame], str, Any], make_minimal: Any
) -> None:
    cls, name, value = case
    error = rejects(
        pack(wire(make_minimal(cls), **{name: value})), InvalidField, ErrorCode.INVALID_FIELD
    )
    assert name in str(error)


def test_nested_record_wrong_type_is_invalid(make_minimal: Any) -> None:
    event = make_minimal(frames.Deliver).to_wire()
    page = make_minimal(frames.HistoryPage)
    user = make_minimal(frames.UserDevices).to_wire()
    room = make_minimal(frames.RoomInfo).to_wire()
    cases = [
        wire(page, events=[1]),
        wire(page, events=["deliver"]),
        wire(page, events=event),  # a map where an array belongs
        wire(page, events=[list(event.values())]),  # an array where a map belongs
        wire(page, events=[{**event, "seq": "1"}]),
        wire(page, events=[{**event, "seq": 0}]),
        wire(page, events=[{k: v for k, v in event.items() if k != "payload"}]),
        wire(make_minimal(frames.Devices), users=["alice"]),
        wire(make_minimal(frames.Devices), users=[{**user, "identity_key": "k" * 32}]),
        wire(make_minimal(frames.Rooms), rooms=[{**room, "role": "janitor"}]),
        wire(make_minimal(frames.Rooms), rooms=[None]),
    ]
    assert codec.decode(pack(wire(page, events=[event]))) == frames.HistoryPage(
        rid=page.rid, room=page.room, events=(frames.Deliver(**event),)
    )
    for data in cases:
        rejects(pack(data), InvalidField, ErrorCode.INVALID_FIELD)


# ------------------------------------------------------------------ request id


def test_peek_request_id_echoes_rid_of_invalid_frames(send: frames.Send) -> None:
    without_envelope = {k: v for k, v in wire(send, rid="req-7").items() if k != "envelope"}
    invalid = [
        (pack(without_envelope), InvalidField),
        (pack(wire(send, rid="req-7", x=1)), InvalidField),
        (pack({"t": "nope", "rid": "req-7"}), UnknownFrameType),
        (pack({"rid": "req-7"}), UnknownFrameType),
    ]
    for data, error in invalid:
        with pytest.raises(error):
            codec.decode(data)
        assert codec.peek_request_id(data) == "req-7"
    assert codec.peek_request_id(codec.encode(send)) == "req-1"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"\xc1" * (600 * 1024),
        pack(["rid", "req-7"]),
        pack({"t": "ok", "rid": 7}),
        pack({"t": "ok", "rid": ""}),
        pack({"t": "ok", "rid": "r" * 65}),
        pack({"t": "ok", "rid": b"req-7"}),
        pack({"t": "ok"}),
        raw_map(("t", "ok"), ("rid", "req-7"), ("rid", "req-8")),
        pack({"t": "ok", "rid": "req-7"}) + b"\xc0",
        b"\xdd\xff\xff\xff\xff",
    ],
    ids=lambda d: repr(d[:12]),
)
def test_peek_request_id_returns_none_for_garbage(data: bytes) -> None:
    assert codec.peek_request_id(data) is None
