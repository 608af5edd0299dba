"""The hash chain of one writer stream (one gateway node): pure functions, no I/O.

Record ``i`` of node ``n`` carries ``prev_hash`` (the hash of record ``i - 1``, or the
chain's base hash for the first record: 32 zero bytes, or the anchored head a retention cut
left behind) and ``hash``::

    hash = BLAKE2b-256(person="mr-audit",
                       "medrelay-audit/1", node, idx, lease,
                       ts, ts_end, action, outcome, user, device, role, institution,
                       address, room, seq_from, seq_to, mid, target, source, patient_tag,
                       detail, prev_hash)

over length-prefixed fields (:func:`medrelay_protocol.crypto.blake2b_256`), where each
optional field is ``0x00`` when absent and ``0x01`` followed by its value when present, so
"absent" and "empty" never collide. ``idx`` is hashed, so a record moved to another position
no longer matches its hash; ``lease`` (the fencing token it was written under) records which
lease of the node id wrote it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from medrelay_protocol.crypto import blake2b_256

from ..store.base import AuditRecord

PERSON = b"mr-audit"
LABEL = b"medrelay-audit/1"
GENESIS = bytes(32)

Optional = str | int | bytes | None


def _opt(value: Optional) -> bytes:
    if value is None:
        return b"\x00"
    if isinstance(value, bool):
        raise TypeError("bool is not a journal field")
    if isinstance(value, int):
        return b"\x01" + struct.pack(">q", value)
    if isinstance(value, str):
        return b"\x01" + value.encode("utf-8")
    return b"\x01" + bytes(value)


def record_fields(rec: AuditRecord) -> list[bytes]:
    """The record's fields in their canonical order (everything but the chain position)."""
    values: tuple[Optional, ...] = (
        rec.ts,
        rec.ts_end,
        rec.action,
        rec.outcome,
        rec.user,
        rec.device,
        rec.role,
        rec.institution,
        rec.address,
        rec.room,
        rec.seq_from,
        rec.seq_to,
        rec.mid,
        rec.target,
        rec.source,
        rec.patient_tag,
        rec.detail,
    )
    return [_opt(v) for v in values]


def record_hash(node: str, idx: int, lease: int, rec: AuditRecord, prev_hash: bytes) -> bytes:
    return blake2b_256(LABEL, node, idx, lease, *record_fields(rec), prev_hash, person=PERSON)


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """A journal record at its place in a node's chain, as stored."""

    record: AuditRecord
    node: str
    idx: int
    lease: int
    prev_hash: bytes
    hash: bytes

    def recomputed(self, idx: int | None = None) -> bytes:
        """The hash this record should carry at position ``idx`` (default: its own)."""
        at = self.idx if idx is None else idx
        return record_hash(self.node, at, self.lease, self.record, self.prev_hash)


def chain(
    node: str, lease: int, start_idx: int, prev_hash: bytes, records: list[AuditRecord]
) -> list[ChainEntry]:
    """Link ``records`` onto a chain whose last record is ``start_idx`` with ``prev_hash``."""
    out = []
    for i, rec in enumerate(records, start=start_idx + 1):
        h = record_hash(node, i, lease, rec, prev_hash)
        out.append(ChainEntry(rec, node, i, lease, prev_hash, h))
        prev_hash = h
    return out
