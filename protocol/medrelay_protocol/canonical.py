"""Strict msgpack for signed bodies nested inside frames (certificates, roster entries,
manifests, message headers).

A body is encoded once by its signer; everyone else verifies the signature over the exact
bytes received and only then decodes them with :func:`unpack_body`, which applies the same
limits as the frame codec: bounded sizes, no ext types, string map keys, no duplicate keys.
"""

from __future__ import annotations

from typing import Any, NoReturn

import msgpack

from .errors import FrameTooLarge, MalformedFrame

MAX_BODY_SIZE = 64 * 1024
_MAX_CONTAINER = 4096


def _no_ext(code: int, data: bytes) -> NoReturn:
    raise MalformedFrame("msgpack ext types are not allowed")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not isinstance(key, str):
            raise MalformedFrame("map keys must be strings")
        if key in out:
            raise MalformedFrame("duplicate map key")
        out[key] = value
    return out


def pack_body(value: object) -> bytes:
    """Encode with binary and string types kept apart (``use_bin_type``)."""
    return bytes(msgpack.packb(value, use_bin_type=True, strict_types=False))


def unpack_strict(data: bytes, *, max_size: int, max_container: int = _MAX_CONTAINER) -> Any:
    """Decode one msgpack object with every limit set before any allocation.

    Besides the per-container limit, the whole object may hold at most ``2 * max_container``
    arrays and maps: an empty container costs one byte on the wire but ~70 bytes in memory,
    so without a total a full-size frame of ``[[], [], ...]`` would cost ~32 MiB to decode."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedFrame("expected bytes")
    if len(data) > max_size:
        raise FrameTooLarge(f"{len(data)} bytes exceeds the limit of {max_size}")
    budget = [2 * max_container]

    def spend() -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise MalformedFrame("too many arrays and maps")

    def on_list(items: list[Any]) -> list[Any]:
        spend()
        return items

    def on_map(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        spend()
        return _pairs(pairs)

    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=False,  # checked by _pairs, which also refuses duplicates
            object_pairs_hook=on_map,
            list_hook=on_list,
            ext_hook=_no_ext,
            max_str_len=max_size,
            max_bin_len=max_size,
            max_array_len=max_container,
            max_map_len=max_container,
            max_ext_len=0,
            timestamp=0,
        )
    except MalformedFrame:
        raise
    except (
        ValueError,
        msgpack.UnpackException,
    ) as exc:  # ExtraData, FormatError, StackError, OutOfData, UnicodeDecodeError
        raise MalformedFrame("malformed msgpack") from exc


def unpack_body(data: bytes, *, max_size: int = MAX_BODY_SIZE) -> Any:
    return unpack_strict(data, max_size=max_size)
