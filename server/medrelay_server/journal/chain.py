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

import hashlib
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


def record_hash_generic(
    node: str, idx: int, lease: int, rec: AuditRecord, prev_hash: bytes
) -> bytes:
    """The definition above, spelled with the protocol's generic helpers (tests compare)."""
    return blake2b_256(LABEL, node, idx, lease, *record_fields(rec), prev_hash, person=PERSON)


_U32 = struct.Struct(">I").pack
_U64 = struct.Struct(">Q").pack
_I64 = struct.Struct(">q").pack
_LABEL_FIELD = _U32(len(LABEL)) + LABEL
_ABSENT = _U32(1) + b"\x00"
_INT_PREFIX = _U32(9) + b"\x01"
_PERSON16 = PERSON.ljust(16, b"\0")


def _opt_field(value: Optional) -> bytes:
    """``encode_field(_opt(value))`` in one step."""
    if value is None:
        return _ABSENT
    kind = type(value)
    if kind is int:
        return _INT_PREFIX + _I64(value)
    if kind is str:
        raw = value.encode("utf-8")  # type: ignore[union-attr]
    elif isinstance(value, bool):
        raise TypeError("bool is not a journal field")
    elif isinstance(value, int):
        return _INT_PREFIX + _I64(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
    else:
        raw = bytes(value)
    return _U32(len(raw) + 1) + b"\x01" + raw


def _uint_field(value: int) -> bytes:
    if isinstance(value, bool):
        raise TypeError("bool is not a signature field")
    if not 0 <= value < 2**64:
        raise ValueError("integer field out of range")
    return b"\x00\x00\x00\x08" + _U64(value)


def record_hash(node: str, idx: int, lease: int, rec: AuditRecord, prev_hash: bytes) -> bytes:
    """:func:`record_hash_generic`, built as one buffer (the journal hashes every record it
    writes, on the event loop: this is a third of the generic form's cost)."""
    node_raw = node.encode("utf-8")
    h = hashlib.blake2b(digest_size=32, person=_PERSON16)
    h.update(
        b"".join(
            (
                _LABEL_FIELD,
                _U32(len(node_raw)),
                node_raw,
                _uint_field(idx),
                _uint_field(lease),
                _opt_field(rec.ts),
                _opt_field(rec.ts_end),
                _opt_field(rec.action),
                _opt_field(rec.outcome),
                _opt_field(rec.user),
                _opt_field(rec.device),
                _opt_field(rec.role),
                _opt_field(rec.institution),
                _opt_field(rec.address),
                _opt_field(rec.room),
                _opt_field(rec.seq_from),
                _opt_field(rec.seq_to),
                _opt_field(rec.mid),
                _opt_field(rec.target),
                _opt_field(rec.source),
                _opt_field(rec.patient_tag),
                _opt_field(rec.detail),
                _U32(len(prev_hash)),
                bytes(prev_hash),
            )
        )
    )
    return h.digest()


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
