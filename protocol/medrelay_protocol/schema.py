"""Declarative field schemas for frames: types and bounds checked on construction and decode.

A frame or record is a frozen, slotted dataclass. Its annotations give the type and
``bound(...)`` metadata gives the limits. Supported field types: ``int``, ``bool``, ``str``,
``bytes``, ``X | None``, ``tuple[X, ...]``, ``dict[str, int]``, ``dict[str, bytes]`` and
nested :class:`Record` types. Defaults when no bound is given: ``str`` up to 256 characters,
``bytes`` up to 64 KiB, ``int`` in ``[0, 2**63)``, tuples up to 256 items, maps up to 1024
entries.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import InvalidField

DEFAULT_STR = 256
DEFAULT_BYTES = 64 * 1024
DEFAULT_ITEMS = 256
DEFAULT_ENTRIES = 1024
INT_MAX = 2**63 - 1
REDACTED = frozenset({"token", "proof"})


def bound(
    *,
    max_len: int | None = None,
    min_len: int = 0,
    lo: int = 0,
    hi: int = INT_MAX,
    choices: tuple[str, ...] | None = None,
    item_max_len: int | None = None,
    default: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field carrying limits. ``max_len``/``min_len`` apply to the str, bytes,
    tuple or dict itself; each str/bytes item inside a tuple or dict is limited by
    ``item_max_len`` (default: the type's default length); ``lo``/``hi`` apply to ints,
    also inside containers."""
    meta = {
        "max_len": max_len,
        "min_len": min_len,
        "lo": lo,
        "hi": hi,
        "choices": choices,
        "item_max_len": item_max_len,
    }
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: Any
    optional: bool
    required: bool
    max_len: int | None
    min_len: int
    lo: int
    hi: int
    choices: tuple[str, ...] | None
    item_max_len: int | None = None
    # the shape of ``kind``, worked out once by build_specs (not per decoded field)
    origin: Any = None
    """``typing.get_origin(kind)``: tuple, dict or None."""
    args: tuple[Any, ...] = ()
    """``typing.get_args(kind)``."""
    record: bool = False
    """``kind`` is a :class:`Record` subclass."""
    items: Spec | None = None
    """The limits of each item inside a tuple or dict (``item_max_len``, ``lo``/``hi``)."""


class Record:
    """Base of every frame and nested record. Subclasses are frozen slotted dataclasses."""

    __slots__ = ()
    SPECS: ClassVar[tuple[Spec, ...]] = ()
    NAMES: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        for spec in type(self).SPECS:
            check(spec, getattr(self, spec.name))

    def safe_repr(self) -> str:
        """Fields by name; bytes show only their length, secret-bearing strings are redacted."""
        parts = []
        for spec in type(self).SPECS:
            value = getattr(self, spec.name)
            if spec.name in REDACTED and value is not None:
                shown = "<redacted>"
            elif isinstance(value, bytes):
                shown = f"<{len(value)} bytes>"
            elif isinstance(value, dict):
                shown = f"<{len(value)} entries>"
            elif isinstance(value, tuple) and any(isinstance(v, bytes) for v in value):
                shown = f"<{len(value)} items>"
            else:
                shown = repr(value)
            parts.append(f"{spec.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in type(self).SPECS:
            value = getattr(self, spec.name)
            if value is not None:
                out[spec.name] = _to_wire(value)
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any], *, skip: frozenset[str] = frozenset()) -> Any:
        unknown = set(data) - cls.NAMES - skip
        if unknown:
            raise InvalidField(f"unknown field {sorted(unknown)[0]!r}")
        kwargs: dict[str, Any] = {}
        for spec in cls.SPECS:
            if spec.name in data:
                kwargs[spec.name] = _from_wire(spec, data[spec.name])
            elif spec.required:
                raise InvalidField(f"missing field {spec.name!r}")
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - guarded by the checks above
            raise InvalidField("bad fields") from exc


def _to_wire(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    return value


def _from_wire(spec: Spec, value: Any) -> Any:
    if spec.record:
        if not isinstance(value, dict):
            raise InvalidField(f"{spec.name}: expected a map")
        return spec.kind.from_wire(value)
    if spec.origin is tuple:
        if not isinstance(value, list):
            raise InvalidField(f"{spec.name}: expected an array")
        item = spec.args[0]
        if isinstance(item, type) and issubclass(item, Record):
            out = []
            for v in value:
                if not isinstance(v, dict):
                    raise InvalidField(f"{spec.name}: expected a map")
                out.append(item.from_wire(v))
            return tuple(out)
        return tuple(value)
    return value


def _type_ok(kind: Any, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_scalar(spec: Spec, kind: Any, value: Any, where: str) -> None:
    if not _type_ok(kind, value):
        raise InvalidField(f"{where}: expected {kind.__name__}")
    if kind is int and not spec.lo <= value <= spec.hi:
        raise InvalidField(f"{where}: out of range")
    if kind in (str, bytes):
        limit = spec.max_len if spec.max_len is not None else _default_len(kind)
        if not spec.min_len <= len(value) <= limit:
            raise InvalidField(f"{where}: bad length")
        if spec.choices is not None and value not in spec.choices:
            raise InvalidField(f"{where}: not one of the allowed values")
        if kind is str and not _utf8_ok(value):
            raise InvalidField(f"{where}: not encodable as UTF-8")


def _utf8_ok(text: str) -> bool:
    """A Python str may hold lone surrogates, which msgpack cannot encode."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _default_len(kind: Any) -> int:
    return DEFAULT_STR if kind is str else DEFAULT_BYTES


def check(spec: Spec, value: Any) -> None:
    if value is None:
        if not spec.optional:
            raise InvalidField(f"{spec.name}: required")
        return
    kind, origin = spec.kind, spec.origin
    if origin is tuple:
        item = spec.args[0]
        if not isinstance(value, tuple) or len(value) > _container_limit(spec, DEFAULT_ITEMS):
            raise InvalidField(f"{spec.name}: bad array")
        for v in value:
            _check_item(spec, item, v)
    elif origin is dict:
        _, val_kind = spec.args
        if not isinstance(value, dict) or len(value) > _container_limit(spec, DEFAULT_ENTRIES):
            raise InvalidField(f"{spec.name}: bad map")
        for k, v in value.items():
            if not isinstance(k, str) or not 0 < len(k) <= DEFAULT_STR or not _utf8_ok(k):
                raise InvalidField(f"{spec.name}: bad key")
            _check_scalar(_item_spec(spec), val_kind, v, spec.name)
    elif spec.record:
        if not isinstance(value, kind):
            raise InvalidField(f"{spec.name}: expected {kind.__name__}")
    else:
        _check_scalar(spec, kind, value, spec.name)


def _container_limit(spec: Spec, default: int) -> int:
    return default if spec.max_len is None else spec.max_len


def _item_spec(spec: Spec) -> Spec:
    """Per-item limits inside containers: ``item_max_len`` (or the type default), ints keep
    lo/hi."""
    return spec.items if spec.items is not None else _items_of(spec)


def _items_of(spec: Spec) -> Spec:
    return dataclasses.replace(spec, max_len=spec.item_max_len, min_len=0, items=None)


def _check_item(spec: Spec, item: Any, value: Any) -> None:
    if isinstance(item, type) and issubclass(item, Record):
        if not isinstance(value, item):
            raise InvalidField(f"{spec.name}: expected {item.__name__}")
    else:
        _check_scalar(_item_spec(spec), item, value, spec.name)


def build_specs(cls: type[Record]) -> tuple[Spec, ...]:
    """Compute a class's specs; also replaces the dataclass repr with :meth:`Record.safe_repr`."""
    cls.__repr__ = Record.safe_repr  # type: ignore[method-assign,assignment]
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        optional = False
        if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            optional, kind = True, args[0]
        meta: Mapping[str, Any] = f.metadata or {}
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        spec = Spec(
            name=f.name,
            kind=kind,
            optional=optional,
            required=not has_default,
            max_len=meta.get("max_len"),
            min_len=meta.get("min_len", 0),
            lo=meta.get("lo", 0),
            hi=meta.get("hi", INT_MAX),
            choices=meta.get("choices"),
            item_max_len=meta.get("item_max_len"),
            origin=typing.get_origin(kind),
            args=typing.get_args(kind),
            record=isinstance(kind, type) and issubclass(kind, Record),
        )
        specs.append(dataclasses.replace(spec, items=_items_of(spec)))
    cls.NAMES = frozenset(s.name for s in specs)
    return tuple(specs)
