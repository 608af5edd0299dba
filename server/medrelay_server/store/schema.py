"""Table definitions shared by the queries of :mod:`medrelay_server.store`.

The migrations under ``medrelay_server/migrations/versions`` create these tables; they do
not import this module (a migration is frozen once released, this module keeps moving), and
``tests/server/test_store_contract.py`` checks that the two agree.

Decisions:

* ``rooms.last_seq`` is the per-room counter row: seqs are assigned from it under the room's
  row lock, never from a SEQUENCE or autoincrement (ARCHITECTURE §9).
* ``memberships`` holds closed intervals ``[from_seq, to_seq]`` per user and role; an open
  interval (``to_seq`` NULL) is a current membership. ``grants`` holds history grants.
* Columns are named ``user_id`` rather than ``user`` (a reserved word in PostgreSQL).
* Times are integers chosen by the caller (the service's clock), never database defaults.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# BIGINT on PostgreSQL; INTEGER on SQLite so that an integer primary key auto-increments.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

rooms = sa.Table(
    "rooms",
    metadata,
    sa.Column("room", sa.Text, primary_key=True),
    sa.Column("last_seq", sa.BigInteger, nullable=False),
    sa.Column("roster_head", sa.LargeBinary, nullable=False),
    sa.Column("roster_length", sa.Integer, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("pending_rekey", sa.Boolean, nullable=False),
    sa.Column("device_list_version", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("retention_seconds", sa.BigInteger, nullable=True),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("sender_device", sa.Text, nullable=False),
    sa.Column("sender_user", sa.Text, nullable=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("mid", sa.LargeBinary, nullable=True),
    # NULL mids are distinct on both dialects, so roster and rekey events never collide.
    sa.UniqueConstraint("room", "sender_device", "mid", name="uq_events_idempotency"),
)

roster = sa.Table(
    "roster",
    metadata,
    sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("entry", sa.LargeBinary, nullable=False),
)

wraps = sa.Table(
    "wraps",
    metadata,
    sa.Column("room", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("wrap", sa.LargeBinary, nullable=False),
    sa.ForeignKeyConstraint(["room", "seq"], ["events.room", "events.seq"]),
)

memberships = sa.Table(
    "memberships",
    metadata,
    sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("from_seq", sa.BigInteger, primary_key=True),
    sa.Column("to_seq", sa.BigInteger, nullable=True),
    sa.Column("role", sa.Text, nullable=False),
    sa.Index("ix_memberships_user", "user_id", "to_seq"),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("from_seq", sa.BigInteger, nullable=False),
    sa.Column("to_seq", sa.BigInteger, nullable=False),
    sa.Column("granted_at", sa.BigInteger, nullable=False),
    sa.Index("ix_grants_room_user", "room", "user_id"),
)

identities = sa.Table(
    "identities",
    metadata,
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("identity_key", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # the institution's signed attestation of the first key (NULL: pinned before 0006)
    sa.Column("attestation", sa.LargeBinary, nullable=True),
)

key_backups = sa.Table(
    "key_backups",
    metadata,
    sa.Column("user_id", sa.Text, primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("blob", sa.LargeBinary, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("updated_by", sa.Text, nullable=False),
)

approval_requests = sa.Table(
    "approval_requests",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, nullable=False, index=True),
    sa.Column("device_id", sa.Text, nullable=False),
    sa.Column("device_key", sa.LargeBinary, nullable=False),
    sa.Column("bundle", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("certificate", sa.LargeBinary, nullable=True),
    sa.Column("backup_share", sa.LargeBinary, nullable=True),
    sa.Column("approved_by", sa.Text, nullable=True),
    sa.Column("approved_at", sa.BigInteger, nullable=True),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("user_id", sa.Text, nullable=False, index=True),
    sa.Column("signing_key", sa.LargeBinary, nullable=False),
    sa.Column("certificate", sa.LargeBinary, nullable=False),
    sa.Column("bundle", sa.LargeBinary, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # when a connection of this device last opened or closed (unix seconds); a device
    # unseen for the configured period is retired
    sa.Column("last_seen", sa.BigInteger, nullable=True),
)

receipts = sa.Table(
    "receipts",
    metadata,
    sa.Column("room", sa.Text, primary_key=True),
    sa.Column("device_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
)

blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("blob", sa.LargeBinary, primary_key=True),
    sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), nullable=False, index=True),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("chunks", sa.Integer, nullable=False),
    sa.Column("bytes", sa.BigInteger, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
)

blob_chunks = sa.Table(
    "blob_chunks",
    metadata,
    sa.Column("blob", sa.LargeBinary, sa.ForeignKey("blobs.blob"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=True),
    sa.Column("device_id", sa.Text, nullable=True),
    sa.Column("room", sa.Text, nullable=True, index=True),
    sa.Column("seq_from", sa.BigInteger, nullable=True),
    sa.Column("seq_to", sa.BigInteger, nullable=True),
    sa.Column("mid", sa.LargeBinary, nullable=True),
    sa.Column("target", sa.Text, nullable=True),
    sa.Column("source", sa.Text, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    # the chain (medrelay_server.journal.chain); NULL only on rows written before 0002
    sa.Column("node", sa.Text, nullable=True),
    sa.Column("idx", sa.BigInteger, nullable=True),
    sa.Column("lease", sa.BigInteger, nullable=True),
    sa.Column("prev_hash", sa.LargeBinary, nullable=True),
    sa.Column("hash", sa.LargeBinary, nullable=True),
    sa.Column("ts_end", sa.BigInteger, nullable=True),
    sa.Column("role", sa.Text, nullable=True),
    sa.Column("institution", sa.Text, nullable=True),
    sa.Column("address", sa.Text, nullable=True),
    sa.Column("patient_tag", sa.LargeBinary, nullable=True),
    sa.Index("ix_audit_chain", "node", "idx", unique=True),
    sa.Index("ix_audit_user", "user_id"),
    sa.Index("ix_audit_ts", "ts"),
)

# The node registry: one row per node id, with its lease, fencing token and chain head
# (advanced in the same transaction as the records it covers), and the base a retention
# cut left (the chain then starts at base_idx + 1, linking to base_hash).
journal_nodes = sa.Table(
    "journal_nodes",
    metadata,
    sa.Column("node", sa.Text, primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("holder", sa.Text, nullable=True),
    sa.Column("lease_until", sa.BigInteger, nullable=False),
    sa.Column("registered_at", sa.BigInteger, nullable=False),
    sa.Column("head_idx", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.LargeBinary, nullable=False),
    sa.Column("base_idx", sa.BigInteger, nullable=False),
    sa.Column("base_hash", sa.LargeBinary, nullable=False),
)

# Signed anchors: RFC 9162 tree heads over the append-only log of leaves (node heads).
journal_anchors = sa.Table(
    "journal_anchors",
    metadata,
    sa.Column("anchor_no", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("ts", sa.BigInteger, nullable=False),
    sa.Column("tree_size", sa.BigInteger, nullable=False),
    sa.Column("root", sa.LargeBinary, nullable=False),
    sa.Column("frontier", sa.LargeBinary, nullable=False),
    sa.Column("key_id", sa.Text, nullable=True),
    sa.Column("signature", sa.LargeBinary, nullable=True),
    sa.Column("published_at", sa.BigInteger, nullable=True),
)

journal_leaves = sa.Table(
    "journal_leaves",
    metadata,
    sa.Column("pos", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("anchor_no", sa.BigInteger, nullable=False),
    sa.Column("node", sa.Text, nullable=False),
    sa.Column("token", sa.BigInteger, nullable=False),
    sa.Column("registered_at", sa.BigInteger, nullable=False),
    sa.Column("head_idx", sa.BigInteger, nullable=False),
    sa.Column("head_hash", sa.LargeBinary, nullable=False),
    sa.Index("ix_journal_leaves_node", "node", "head_idx"),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)
"""``generation``: a random id made when the database was created. Clients compare it at
connect (with PostgreSQL's timeline) to notice a restored or failed-over database whose
room streams may have rolled back or reused seqs."""
