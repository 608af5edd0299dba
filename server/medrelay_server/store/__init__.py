"""Durable state: the ``Store`` interface (:mod:`.base`) and its SQL implementation.

``SqlStore`` (SQLite or PostgreSQL) is imported from :mod:`.sql` by the composition root;
importing this package alone does not load SQLAlchemy.
"""

from __future__ import annotations

from .base import (
    AppendResult,
    AuditRecord,
    Commit,
    DeviceRecord,
    JournalReadOnly,
    MembershipChange,
    NodeFenced,
    NodeLeaseHeld,
    RoomState,
    Store,
    StoredEvent,
    StoreUnavailable,
)

__all__ = [
    "AppendResult",
    "AuditRecord",
    "Commit",
    "DeviceRecord",
    "JournalReadOnly",
    "MembershipChange",
    "NodeFenced",
    "NodeLeaseHeld",
    "RoomState",
    "Store",
    "StoreUnavailable",
    "StoredEvent",
]
