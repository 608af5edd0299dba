"""The PostgreSQL audit insert's row tuple carries every column in the statement's order."""

from __future__ import annotations

import dataclasses

from medrelay_server.journal.chain import chain
from medrelay_server.store.audit import _PG_AUDIT_COLUMNS, _chained_values, pg_audit_row
from medrelay_server.store.base import AuditRecord


def test_pg_row_matches_the_column_mapping() -> None:
    # every field a distinct value, so a swapped pair of columns cannot go unnoticed
    values: dict[str, object] = {}
    for n, f in enumerate(dataclasses.fields(AuditRecord)):
        values[f.name] = (
            n if f.name in ("seq_from", "seq_to", "ts", "ts_end") else
            b"b%d" % n if f.name in ("mid", "patient_tag") else
            f"v{n}"
        )  # fmt: skip
    record = AuditRecord(**values)  # type: ignore[arg-type]
    (entry,) = chain("node-1", 3, 7, b"\x01" * 32, [record])
    assert pg_audit_row(entry) == tuple(_chained_values(entry)[c] for c in _PG_AUDIT_COLUMNS)
    assert len(set(pg_audit_row(entry))) == len(_PG_AUDIT_COLUMNS)
