"""Fuzzing and msgpack bombs: whatever arrives, ``decode`` returns a valid frame or raises a
typed ``FrameError``, and refusing a bomb costs little memory.

Memory is measured with ``tracemalloc`` around the decode call only (the input is built
first). Timings are not asserted; a regression to unbounded work shows up as a slow run.
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from medrelay_protocol import codec
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import FrameError, FrameTooLarge, InvalidField, MalformedFrame
from medrelay_protocol.frames import FRAME_TYPES, Frame

MiB = 1024 * 1024
BOMB_MEMORY = 4 * MiB
FRAMES = [FRAME_TYPES[name] for name in sorted(FRAME_TYPES)]
FIELD_NAMES = sorted({spec.name for cls in FRAMES for spec in cls.SPECS})
DIRECTIONS = st.sampled_from([None, True, False])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode_or_reject(data: bytes, from_client: bool | None = None) -> Frame | None:
    """Decode; anything but a valid frame or a typed FrameError fails the test."""
    rid = codec.peek_request_id(data)  # never raises
    assert rid is None or 0 < len(rid) <= 64
    try:
        frame = codec.decode(data, from_client=from_client)
    except FrameError as exc:
        assert isinstance(exc.code, ErrorCode)
        return None
    assert isinstance(frame, Frame)
    assert from_client is None or type(frame).CLIENT is from_client
    assert codec.decode(codec.encode(frame)) == frame
    return frame


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


# ------------------------------------------------------------------ strategies

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=24)
    | st.binary(max_size=24)
)
KEYS = (
    st.text(max_size=8)
    | st.sampled_from(["t", "rid", *FIELD_NAMES])
    | st.integers(-5, 5)
    | st.binary(max_size=4)
)
OBJECTS = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(KEYS, children, max_size=6),
    max_leaves=40,
)
FRAME_LIKE = st.builds(
    lambda rest, kind: {**rest, "t": kind},
    st.dictionaries(st.sampled_from(FIELD_NAMES), OBJECTS, max_size=8),
    st.sampled_from(sorted(FRAME_TYPES)) | st.text(max_size=8),
)
VALID_FRAMES = st.sampled_from(FRAMES).flatmap(st.from_type)  # registered in conftest


@st.composite
def damaged_wire(draw: st.DrawFn) -> dict[str, Any]:
    """A valid frame's map with some fields dropped or replaced by arbitrary objects."""
    frame = draw(VALID_FRAMES)
    wire: dict[str, Any] = msgpack.unpackb(codec.encode(frame))
    for name in draw(st.lists(st.sampled_from(sorted(wire)), max_size=3)):
        if draw(st.booleans()):
            wire.pop(name, None)
        else:
            wire[name] = draw(OBJECTS)
    return wire


def _mutate(data: bytearray, op: str, where: int, byte: int) -> None:
    if op == "truncate":
        del data[where % (len(data) + 1) :]
    elif not data or op == "insert":
        data.insert(where % (len(data) + 1), byte)
    elif op == "flip":
        data[where % len(data)] ^= byte or 1
    else:
        del data[where % len(data)]


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


# ------------------------------------------------------------------ fuzz


@FUZZ
@given(data=st.binary(max_size=2048), from_client=DIRECTIONS)
def test_random_bytes_raise_only_frame_errors(data: bytes, from_client: bool | None) -> None:
    decode_or_reject(data, from_client)


@FUZZ
@given(
    kind=st.sampled_from(sorted(FRAME_TYPES)),
    tail=st.binary(max_size=256),
    entries=st.integers(1, 15),
)
def test_random_bytes_after_a_frame_type_raise_only_frame_errors(
    kind: str, tail: bytes, entries: int
) -> None:
    decode_or_reject(bytes([0x80 | entries]) + pack("t") + pack(kind) + tail)


@FUZZ
@given(obj=OBJECTS | FRAME_LIKE, from_client=DIRECTIONS)
def test_random_msgpack_objects_decode_or_raise_frame_errors(
    obj: Any, from_client: bool | None
) -> None:
    decode_or_reject(pack(obj), from_client)


@FUZZ
@given(wire=damaged_wire())
def test_damaged_frames_decode_or_raise_frame_errors(wire: dict[str, Any]) -> None:
    decode_or_reject(pack(wire))


@FUZZ
@given(frame=VALID_FRAMES, mutations=MUTATIONS)
def test_mutated_frames_decode_or_raise_frame_errors(
    frame: Frame, mutations: list[tuple[str, int, int]]
) -> None:
    data = bytearray(codec.encode(frame))
    for op, where, byte in mutations:
        _mutate(data, op, where, byte)
    decode_or_reject(bytes(data))


# ------------------------------------------------------------------ bombs


def peak_memory(call: Callable[[], object]) -> tuple[object, int]:
    """(result or raised exception, peak bytes allocated during the call)."""
    tracemalloc.start()
    try:
        try:
            outcome: object = call()
        except Exception as exc:
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def assert_refused_cheaply(
    data: bytes, error: type[FrameError], *, max_size: int = codec.MAX_FRAME
) -> None:
    outcome, peak = peak_memory(lambda: codec.decode(data, max_size=max_size))
    assert type(outcome) is error, outcome
    assert peak < BOMB_MEMORY, f"{peak / MiB:.1f} MiB"


def in_frame(value: bytes) -> bytes:
    """``{"t": "ok", "rid": "r", "x": <value>}`` with ``value`` already encoded."""
    return b"\x83" + pack("t") + pack("ok") + pack("rid") + pack("r") + pack("x") + value


HEADER_BOMBS = {
    "array32": b"\xdd\xff\xff\xff\xff",
    "array16": b"\xdc\xff\xff",
    "map32": b"\xdf\xff\xff\xff\xff",
    "map-1e6": b"\xdf" + (10**6).to_bytes(4, "big"),
    "str32": b"\xdb\xff\xff\xff\xff",
    "bin32": b"\xc6\xff\xff\xff\xff",
    "ext32": b"\xc9\xff\xff\xff\xff\x05",
}


@pytest.mark.parametrize("header", HEADER_BOMBS.values(), ids=HEADER_BOMBS.keys())
@pytest.mark.parametrize("max_size", [codec.MAX_FRAME, 2**33], ids=["default", "huge-limit"])
def test_length_header_bombs(header: bytes, max_size: int) -> None:
    for data in (header + b"\xa1a\xc0" * 8, in_frame(header + b"\xc0" * 8)):
        assert_refused_cheaply(data, MalformedFrame, max_size=max_size)


@pytest.fixture(scope="module")
def million_key_map() -> bytes:
    entries = b"".join(b"\xa6%06d\x00" % i for i in range(10**6))
    return b"\xdf" + (10**6).to_bytes(4, "big") + entries


def test_actual_million_entry_map(million_key_map: bytes) -> None:
    data = million_key_map
    assert len(data) > codec.MAX_FRAME
    assert_refused_cheaply(data, FrameTooLarge)
    assert_refused_cheaply(data, MalformedFrame, max_size=len(data))  # container limit


def test_actual_million_element_array() -> None:
    data = b"\xdd" + (10**6).to_bytes(4, "big") + b"\xc0" * 10**6
    assert_refused_cheaply(data, FrameTooLarge)
    assert_refused_cheaply(data, MalformedFrame, max_size=len(data))
    assert_refused_cheaply(in_frame(data), MalformedFrame, max_size=len(data) + 32)


def test_container_limit_is_exact() -> None:
    limit = codec.MAX_CONTAINER
    array = b"\xdd" + limit.to_bytes(4, "big") + b"\xc0" * limit
    assert_refused_cheaply(in_frame(array), InvalidField)  # decoded; "x" is not a field
    array = b"\xdd" + (limit + 1).to_bytes(4, "big") + b"\xc0" * (limit + 1)
    assert_refused_cheaply(in_frame(array), MalformedFrame)


@pytest.mark.parametrize(
    "data",
    [
        b"\x91" * 100_000 + b"\xc0",
        b"\x81\xa1k" * 100_000 + b"\xc0",
        in_frame(b"\x91" * 100_000 + b"\xc0"),
        b"\x92\xc0" * 100_000 + b"\xc0",
    ],
    ids=["arrays", "maps", "in-frame", "right-leaning"],
)
@pytest.mark.parametrize("max_size", [codec.MAX_FRAME, 2**33], ids=["default", "huge-limit"])
def test_deep_nesting(data: bytes, max_size: int) -> None:
    assert_refused_cheaply(data, MalformedFrame, max_size=max_size)


def _full_frame_of(element: bytes) -> bytes:
    """As many 4096-element arrays of ``element`` as fit in one frame, in one array."""
    inner = b"\xdd" + (4096).to_bytes(4, "big") + element * 4096
    count = (codec.MAX_FRAME - 5) // len(inner)
    return b"\xdd" + count.to_bytes(4, "big") + inner * count


@pytest.mark.parametrize("element", [b"\x90", b"\x80", b"\x81\xa1k\xc0"], ids=repr)
def test_full_frame_of_empty_containers(element: bytes) -> None:
    """One wire byte per container but ~70 bytes of memory: the total is capped too."""
    data = _full_frame_of(element)
    assert len(data) <= codec.MAX_FRAME
    assert_refused_cheaply(data, MalformedFrame)


def test_total_container_budget_is_exact() -> None:
    """A frame holds at most ``2 * MAX_CONTAINER`` arrays and maps, itself included."""

    def frame_with(empties: int) -> bytes:
        first = min(empties, codec.MAX_CONTAINER)
        rest = empties - first
        return (
            b"\x84"
            + pack("t")
            + pack("ok")
            + pack("rid")
            + pack("r")
            + pack("x")
            + b"\xdd"
            + first.to_bytes(4, "big")
            + b"\x90" * first
            + pack("y")
            + b"\xdd"
            + rest.to_bytes(4, "big")
            + b"\x90" * rest
        )

    budget = 2 * codec.MAX_CONTAINER - 3  # the top map and the two arrays
    assert_refused_cheaply(frame_with(budget), InvalidField)
    assert_refused_cheaply(frame_with(budget + 1), MalformedFrame)


@pytest.mark.parametrize(
    "element",
    [b"\xe0", b"\xa2ab", b"\xcd\x01\x01", b"\xcb" + bytes(8)],
    ids=["negative-fixint", "2-char-str", "uint16", "float"],
)
def test_full_frame_of_scalars_costs_a_bounded_multiple(element: bytes) -> None:
    """Small Python objects cost up to ~40x their wire size; a frame's cost stays bounded."""
    data = _full_frame_of(element)
    outcome, peak = peak_memory(lambda: codec.decode(data))
    assert type(outcome) is MalformedFrame  # a valid array, but not a map
    assert peak < 64 * codec.MAX_FRAME, f"{peak / MiB:.1f} MiB"
