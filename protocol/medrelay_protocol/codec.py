"""Frame codec: one msgpack map per binary WebSocket message, decoded strictly.

Order of checks in :func:`decode` (cheapest first, nothing allocated before its bound):

1. size against ``max_size`` (default :data:`MAX_FRAME`) -> ``FrameTooLarge``
2. msgpack with explicit limits: strings/bins no longer than the frame, arrays and maps of
   at most :data:`MAX_CONTAINER` items, no ext types (timestamps included), string map keys
   only, duplicate keys refused, trailing bytes refused -> ``MalformedFrame``
3. top level is a map with a string ``t`` naming a known frame type -> ``UnknownFrameType``
4. the frame's schema: every field's type and bounds, no unknown fields -> ``InvalidField``

Frames are decoded one at a time; no streaming unpacker is kept between frames.
"""

from __future__ import annotations

from typing import Any

from . import PROTOCOL_VERSION
from .canonical import pack_body, unpack_strict
from .errors import InvalidField, MalformedFrame, UnknownFrameType, UnsupportedVersion
from .frames import FRAME_TYPES, Frame

MAX_FRAME = 512 * 1024
MAX_CONTAINER = 4096
_SKIP = frozenset({"t"})


def encode(frame: Frame) -> bytes:
    wire = frame.to_wire()
    wire["t"] = frame.TYPE
    return pack_body(wire)


def decode(data: bytes, *, max_size: int = MAX_FRAME, from_client: bool | None = None) -> Frame:
    """Decode one frame. ``from_client=True`` accepts only client frame types, ``False`` only
    server frame types, ``None`` either (tests, tools)."""
    obj = unpack_strict(data, max_size=max_size, max_container=MAX_CONTAINER)
    if not isinstance(obj, dict):
        raise MalformedFrame("a frame is a msgpack map")
    kind = obj.get("t")
    if not isinstance(kind, str):
        raise UnknownFrameType("missing frame type")
    cls = FRAME_TYPES.get(kind)
    if cls is None or (from_client is not None and cls.CLIENT is not from_client):
        raise UnknownFrameType("unknown frame type")
    if "v" in obj and obj["v"] != PROTOCOL_VERSION and any(s.name == "v" for s in cls.SPECS):
        raise UnsupportedVersion("unsupported protocol version")
    frame: Frame = cls.from_wire(obj, skip=_SKIP)
    return frame


def request_id(data: Any) -> str | None:
    """Best-effort ``rid`` from a frame that failed to decode, so the error can echo it."""
    if isinstance(data, dict):
        rid = data.get("rid")
        if isinstance(rid, str) and 0 < len(rid) <= 64:
            return rid
    return None


def peek_request_id(data: bytes, *, max_size: int = MAX_FRAME) -> str | None:
    try:
        return request_id(unpack_strict(data, max_size=max_size, max_container=MAX_CONTAINER))
    except (MalformedFrame, InvalidField):
        return None
    except Exception:  # any failure just means "no rid to echo"
        return None
