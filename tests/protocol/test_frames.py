"""Frames and records: validated and frozen on construction, round-trip through the codec,
and print no secrets or raw bytes.

Every test is generic over ``frames`` (each class's ``SPECS``), so a new frame type or field
is covered without editing this file. ``st.from_type(cls)`` strategies come from conftest.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from medrelay_protocol import codec, frames
from medrelay_protocol.errors import InvalidField
from medrelay_protocol.frames import FRAME_TYPES, Frame
from medrelay_protocol.schema import (
    DEFAULT_BYTES,
    DEFAULT_ENTRIES,
    DEFAULT_ITEMS,
    DEFAULT_STR,
    Record,
    Spec,
)


def _is_record(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Record)


RECORDS = sorted(
    (v for v in vars(frames).values() if _is_record(v) and v.SPECS), key=lambda c: c.__name__
)
FRAMES = [FRAME_TYPES[name] for name in sorted(FRAME_TYPES)]
FIELDS = [(cls, spec) for cls in RECORDS for spec in cls.SPECS]


def _shape(spec: Spec) -> str:
    origin = typing.get_origin(spec.kind)
    if origin is tuple:
        return "tuple"
    if origin is dict:
        return "dict"
    if _is_record(spec.kind):
        return "record"
    return str(spec.kind.__name__)


def _field_id(param: Any) -> str:
    cls, spec = param
    return f"{cls.__name__}.{spec.name}"


def _fields_of(*shapes: str) -> list[tuple[type[Record], Spec]]:
    return [(cls, spec) for cls, spec in FIELDS if _shape(spec) in shapes]


def _limit(spec: Spec, default: int) -> int:
    return default if spec.max_len is None else spec.max_len


def _round_trip(frame: Frame) -> None:
    data = codec.encode(frame)
    again = codec.decode(data, from_client=type(frame).CLIENT)
    assert type(again) is type(frame)
    assert again == frame
    assert codec.encode(again) == data


# ------------------------------------------------------------------ registry and shape


def test_registry_names_each_frame_once() -> None:
    assert len(FRAMES) == len(set(FRAMES))
    for name, cls in FRAME_TYPES.items():
        assert issubclass(cls, Frame)
        assert cls.TYPE == name
        assert "t" not in {s.name for s in cls.SPECS}, "'t' is the frame type key"
    assert any(cls.CLIENT for cls in FRAMES)
    assert any(not cls.CLIENT for cls in FRAMES)


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_dataclass_fields_match_annotations_and_specs(cls: type[Record]) -> None:
    declared = [
        name
        for name, hint in typing.get_type_hints(cls).items()
        if typing.get_origin(hint) is not typing.ClassVar
    ]
    assert [f.name for f in dataclasses.fields(cls)] == declared  # type: ignore[arg-type]
    assert [s.name for s in cls.SPECS] == declared


def test_no_field_object_is_shared() -> None:
    """``dataclass`` renames a Field object in place; sharing one drops fields silently."""
    all_fields = [f for cls in RECORDS for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    assert len({id(f) for f in all_fields}) == len(all_fields)


# ------------------------------------------------------------------ round trip


@pytest.mark.parametrize("cls", FRAMES, ids=lambda c: c.TYPE)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_frame_round_trips(cls: type[Frame], data: st.DataObject) -> None:
    frame = data.draw(st.from_type(cls))
    _round_trip(frame)
    wire = msgpack.unpackb(codec.encode(frame), raw=False)
    assert wire["t"] == cls.TYPE
    present = {s.name for s in cls.SPECS if getattr(frame, s.name) is not None}
    assert set(wire) == {"t"} | present, "None fields are omitted, every other field is sent"


def test_nested_records_round_trip(make_minimal: Any) -> None:
    event = frames.Deliver(
        room="ward-7", seq=3, kind="message", sender="d1", user="alice", ts=9, payload=b"p"
    )
    page = frames.HistoryPage(rid="r1", room="ward-7", events=(event, event), more=True)
    _round_trip(page)
    wire = msgpack.unpackb(codec.encode(page), raw=False)
    assert "t" not in wire["events"][0], "nested records carry no frame type"
    user = frames.UserDevices(
        user="alice", identity_key=b"k" * 32, certificates=(b"c",), revoked=("d9",)
    )
    _round_trip(frames.Devices(rid="r2", users=(user, make_minimal(frames.UserDevices))))


# ------------------------------------------------------------------ validation


def _scalar_edges(spec: Spec) -> tuple[list[Any], list[Any]]:
    """(accepted, refused) values at and just past a scalar field's bounds."""
    shape = _shape(spec)
    if shape == "int":
        return [spec.lo, spec.hi], [spec.lo - 1, spec.hi + 1]
    if shape == "bool":
        return [True, False], []
    if spec.choices is not None:
        return list(spec.choices), ["not-" + spec.choices[0], spec.choices[0].upper()]
    limit = _limit(spec, DEFAULT_STR if shape == "str" else DEFAULT_BYTES)
    unit: Any = "x" if shape == "str" else b"\x01"
    ok = [unit * spec.min_len, unit * limit]
    bad = [unit * (limit + 1)]
    if spec.min_len > 0:
        bad.append(unit * (spec.min_len - 1))
    if shape == "str":
        ok.append("\u00e9" * limit)  # lengths count characters, not UTF-8 bytes
        bad.append("\ud800" * max(spec.min_len, 1))  # lone surrogate: not encodable
    return ok, bad


@pytest.mark.parametrize("field", _fields_of("int", "bool", "str", "bytes"), ids=_field_id)
def test_scalar_bounds(field: tuple[type[Record], Spec], make_minimal: Any) -> None:
    cls, spec = field
    ok, bad = _scalar_edges(spec)
    for value in ok:
        obj = make_minimal(cls, **{spec.name: value})
        if isinstance(obj, Frame):
            _round_trip(obj)
    for value in bad:
        with pytest.raises(InvalidField, match=spec.name):
            make_minimal(cls, **{spec.name: value})


def _item(kind: Any, make_minimal: Any) -> Any:
    if _is_record(kind):
        return make_minimal(kind)
    return {str: "u", bytes: b"b", int: 0, bool: False}[kind]


@pytest.mark.parametrize("field", _fields_of("tuple"), ids=_field_id)
def test_array_bounds(field: tuple[type[Record], Spec], make_minimal: Any) -> None:
    cls, spec = field
    kind = typing.get_args(spec.kind)[0]
    item = _item(kind, make_minimal)
    limit = _limit(spec, DEFAULT_ITEMS)
    full = make_minimal(cls, **{spec.name: (item,) * limit})
    if isinstance(full, Frame):
        _round_trip(full)  # the largest legitimate array decodes within every codec limit
    wrong_items: list[Any] = [None, 1.5]
    if _is_record(kind):
        other = frames.Ok(rid="r") if kind is not frames.Ok else frames.ListRooms(rid="r")
        wrong_items += [other, make_minimal(kind).to_wire()]
    elif kind is str:
        wrong_items += [b"u", "x" * (DEFAULT_STR + 1), "\udfff"]
    elif kind is bytes:
        wrong_items += ["b", bytearray(b"b"), b"x" * (DEFAULT_BYTES + 1)]
    refused: list[Any] = [(item,) * (limit + 1), [item], ""]
    refused += [(item, wrong) for wrong in wrong_items]
    for value in refused:
        with pytest.raises(InvalidField, match=spec.name):
            make_minimal(cls, **{spec.name: value})


@pytest.mark.parametrize("field", _fields_of("dict"), ids=_field_id)
def test_map_bounds(field: tuple[type[Record], Spec], make_minimal: Any) -> None:
    cls, spec = field
    kind = typing.get_args(spec.kind)[1]
    value = _item(kind, make_minimal)
    limit = _limit(spec, DEFAULT_ENTRIES)
    full = make_minimal(cls, **{spec.name: {f"k{i}": value for i in range(limit)}})
    if isinstance(full, Frame):
        _round_trip(full)
    wrong_values: list[Any] = [None, 1.5, "1"] if kind is int else [None, "b", 1]
    if kind is int:
        wrong_values += [True, spec.lo - 1, spec.hi + 1]
    refused: list[Any] = [
        {f"k{i}": value for i in range(limit + 1)},
        {"": value},
        {"k" * (DEFAULT_STR + 1): value},
        {"\ud800": value},
        {1: value},
        {b"k": value},
        [("k", value)],
    ]
    refused += [{"k": wrong} for wrong in wrong_values]
    for bad in refused:
        with pytest.raises(InvalidField, match=spec.name):
            make_minimal(cls, **{spec.name: bad})


def _wrong_types(spec: Spec, make_minimal: Any) -> list[Any]:
    n = max(spec.min_len, 1)
    wrong: dict[str, list[Any]] = {
        "int": [True, False, 1.0, "1", b"\x01", [1]],
        "bool": [1, 0, 1.0, "true", b"\x01"],
        "str": [b"x" * n, 1, ["x"], 1.5],
        "bytes": ["x" * n, bytearray(n), memoryview(b"\x01" * n), 1, [1] * n],
        "tuple": [[], {}, "x", 1],
        "dict": [[], (), "x", 1],
        "record": [{}, 1, "x"],
    }
    values = wrong[_shape(spec)]
    if _shape(spec) == "record":
        values.append(make_minimal(spec.kind).to_wire())
    if not spec.optional:
        values.append(None)
    return values


@pytest.mark.parametrize("field", FIELDS, ids=_field_id)
def test_wrong_types_are_refused(field: tuple[type[Record], Spec], make_minimal: Any) -> None:
    cls, spec = field
    for value in _wrong_types(spec, make_minimal):
        with pytest.raises(InvalidField, match=spec.name):
            make_minimal(cls, **{spec.name: value})


# ------------------------------------------------------------------ frozen


@pytest.mark.parametrize("cls", RECORDS, ids=lambda c: c.__name__)
def test_records_are_frozen_and_slotted(cls: type[Record], make_minimal: Any) -> None:
    obj = make_minimal(cls)
    for spec in cls.SPECS:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, spec.name, getattr(obj, spec.name))
        with pytest.raises(dataclasses.FrozenInstanceError):
            delattr(obj, spec.name)
    # A new attribute is refused too; on Python 3.11 a frozen slotted dataclass raises
    # TypeError here (the generated __setattr__ names the pre-slots class) not FrozenInstanceError.
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        obj.not_a_field = 1
    assert not hasattr(obj, "__dict__")
    assert not hasattr(obj, "not_a_field")


# ------------------------------------------------------------------ repr

TOKEN = "eyJhbGciOiJFZERTQSJ9.SECRET-BEARER-TOKEN.c2ln"
PROOF = bytes(range(64))


def test_hello_repr_hides_token_and_proof(make_minimal: Any) -> None:
    hello = make_minimal(frames.Hello, device="dev-1", proof=PROOF, token=TOKEN)
    for text in (repr(hello), str(hello), f"{hello!r}", repr((hello,))):
        assert TOKEN not in text
        assert "SECRET" not in text
        assert repr(PROOF) not in text
        assert "\\x01\\x02" not in text
        assert "token=<redacted>" in text
        assert "proof=<redacted>" in text
        assert "dev-1" in text


def test_reauth_repr_hides_token() -> None:
    reauth = frames.Reauth(rid="r9", token=TOKEN)
    assert TOKEN not in repr(reauth)
    assert "SECRET" not in str(reauth)
    assert repr(reauth) == "Reauth(rid='r9', token=<redacted>)"


def test_refused_token_is_not_echoed_in_the_error() -> None:
    with pytest.raises(InvalidField) as caught:
        frames.Reauth(rid="r9", token=TOKEN * 200)
    assert "SECRET" not in str(caught.value)
    wire = msgpack.packb({"t": "reauth", "rid": "r9", "token": TOKEN * 200})
    with pytest.raises(InvalidField) as caught:
        codec.decode(wire)
    assert "SECRET" not in str(caught.value)


def _bytes_values(value: Any) -> list[bytes]:
    if isinstance(value, bytes):
        return [value]
    if isinstance(value, Record):
        return [b for s in type(value).SPECS for b in _bytes_values(getattr(value, s.name))]
    if isinstance(value, tuple):
        return [b for v in value for b in _bytes_values(v)]
    if isinstance(value, dict):
        return [b for v in value.values() for b in _bytes_values(v)]
    return []


@settings(max_examples=300, deadline=None)
@given(frame=st.sampled_from(FRAMES).flatmap(st.from_type))
def test_repr_shows_byte_lengths_never_bytes(frame: Frame) -> None:
    text = repr(frame)
    assert text.startswith(type(frame).__name__ + "(")
    for value in _bytes_values(frame):
        assert repr(value) not in text
    for spec in type(frame).SPECS:
        value = getattr(frame, spec.name)
        if isinstance(value, bytes) and spec.name not in ("token", "proof"):
            assert f"{spec.name}=<{len(value)} bytes>" in text
