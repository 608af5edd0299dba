"""Hypothesis strategies for every frame and nested record, derived from each class's SPECS.

Importing this conftest registers a strategy per :class:`Record` type, so tests write
``st.from_type(frames.Hello)`` (or any frame or record) and get valid instances. Lengths
and item counts are capped (``STR_CAP`` and friends) so generated frames stay small and
fast; exact bounds are tested deterministically with :func:`minimal`.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from hypothesis import strategies as st
from medrelay_protocol import frames
from medrelay_protocol.schema import (
    DEFAULT_BYTES,
    DEFAULT_ENTRIES,
    DEFAULT_ITEMS,
    DEFAULT_STR,
    Record,
    Spec,
)

STR_CAP = 16
BYTES_CAP = 40
ITEMS_CAP = 3


def is_record(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Record)


def record_types() -> list[type[Record]]:
    """Every frame and nested record type defined in ``frames``."""
    found = [v for v in vars(frames).values() if is_record(v) and v.SPECS]
    return sorted(found, key=lambda cls: cls.__name__)


def _scalar(spec: Spec, kind: Any, *, item: bool = False) -> st.SearchStrategy[Any]:
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.integers(spec.lo, spec.hi)
    if spec.choices is not None:
        return st.sampled_from(spec.choices)
    default = DEFAULT_STR if kind is str else DEFAULT_BYTES
    lo = 0 if item else spec.min_len
    hi = default if item or spec.max_len is None else spec.max_len
    cap = min(hi, max(lo, STR_CAP if kind is str else BYTES_CAP))
    if kind is str:
        return st.text(min_size=lo, max_size=cap)
    return st.binary(min_size=lo, max_size=cap)


def field_strategy(spec: Spec) -> st.SearchStrategy[Any]:
    kind, origin = spec.kind, typing.get_origin(spec.kind)
    inner: st.SearchStrategy[Any]
    if origin is tuple:
        item = typing.get_args(kind)[0]
        items = record_strategy(item) if is_record(item) else _scalar(spec, item, item=True)
        limit = DEFAULT_ITEMS if spec.max_len is None else spec.max_len
        inner = st.lists(items, max_size=min(limit, ITEMS_CAP)).map(tuple)
    elif origin is dict:
        value = typing.get_args(kind)[1]
        limit = DEFAULT_ENTRIES if spec.max_len is None else spec.max_len
        keys = st.text(min_size=1, max_size=STR_CAP)
        inner = st.dictionaries(
            keys, _scalar(spec, value, item=True), max_size=min(limit, ITEMS_CAP)
        )
    elif is_record(kind):
        inner = record_strategy(kind)
    else:
        inner = _scalar(spec, kind)
    return st.none() | inner if spec.optional else inner


def record_strategy(cls: type[Record]) -> st.SearchStrategy[Any]:
    """Built from the SPECS directly (nested records too), so it never depends on the order
    in which types were registered with Hypothesis."""
    return st.builds(cls, **{spec.name: field_strategy(spec) for spec in cls.SPECS})


for _cls in record_types():
    st.register_type_strategy(_cls, record_strategy(_cls))


def minimal_value(spec: Spec) -> Any:
    """The smallest valid value of a field (``None`` when optional)."""
    kind, origin = spec.kind, typing.get_origin(spec.kind)
    if spec.optional:
        return None
    if origin is tuple:
        return ()
    if origin is dict:
        return {}
    if is_record(kind):
        return minimal(kind)
    if kind is bool:
        return False
    if kind is int:
        return spec.lo
    if spec.choices is not None:
        return spec.choices[0]
    if kind is str:
        return "x" * spec.min_len
    return b"\x01" * spec.min_len


def minimal(cls: type[Record], **overrides: Any) -> Any:
    """A valid instance of ``cls`` with every field minimal, except ``overrides``."""
    kwargs = {spec.name: minimal_value(spec) for spec in cls.SPECS}
    kwargs.update(overrides)
    return cls(**kwargs)


@pytest.fixture(scope="session")
def make_minimal() -> Any:
    return minimal
