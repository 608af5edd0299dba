"""The journal's one-buffer record hash equals the definition spelled with the protocol's
generic length-prefixed helpers, for any record (including absent and empty fields)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from medrelay_server.journal.chain import record_hash, record_hash_generic
from medrelay_server.store.base import AuditRecord

text = st.none() | st.text(max_size=40)
num = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1)
blob = st.none() | st.binary(max_size=40)

records = st.builds(
    AuditRecord,
    action=st.text(max_size=20),
    outcome=st.text(max_size=10),
    user=text, device=text, room=text, seq_from=num, seq_to=num, mid=blob, target=text,
    source=text, detail=text, ts=st.integers(min_value=0, max_value=2**40), ts_end=num,
    role=text, institution=text, address=text, patient_tag=blob,
)  # fmt: skip


@given(
    rec=records,
    node=st.text(max_size=30),
    idx=st.integers(min_value=0, max_value=2**64 - 1),
    lease=st.integers(min_value=0, max_value=2**64 - 1),
    prev=st.binary(min_size=32, max_size=32),
)
def test_fast_hash_equals_the_definition(
    rec: AuditRecord, node: str, idx: int, lease: int, prev: bytes
) -> None:
    assert record_hash(node, idx, lease, rec, prev) == record_hash_generic(
        node, idx, lease, rec, prev
    )


@pytest.mark.parametrize("field", ["user", "seq_from"])
def test_bool_fields_are_refused_as_before(field: str) -> None:
    rec = AuditRecord(action="a", outcome="success", **{field: True})  # type: ignore[arg-type]
    for fn in (record_hash, record_hash_generic):
        with pytest.raises(TypeError):
            fn("n", 1, 1, rec, bytes(32))


def test_out_of_range_positions_are_refused_as_before() -> None:
    rec = AuditRecord(action="a", outcome="success")
    for fn in (record_hash, record_hash_generic):
        with pytest.raises(ValueError):
            fn("n", 2**64, 1, rec, bytes(32))
