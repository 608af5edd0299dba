"""Tamper-evident journal: chain columns on ``audit`` (node, index, prev hash, hash) and the
FHIR AuditEvent actor/source fields, the node registry with leases and fencing tokens
(``journal_nodes``, which also holds each chain's head), the anchor log (``journal_anchors``
and its Merkle leaves ``journal_leaves``) and a per-room retention override.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

_AUDIT_COLUMNS = (
    ("node", sa.Text),
    ("idx", sa.BigInteger),
    ("lease", sa.BigInteger),
    ("prev_hash", sa.LargeBinary),
    ("hash", sa.LargeBinary),
    ("ts_end", sa.BigInteger),
    ("role", sa.Text),
    ("institution", sa.Text),
    ("address", sa.Text),
    ("patient_tag", sa.LargeBinary),
)


def upgrade() -> None:
    for name, type_ in _AUDIT_COLUMNS:
        op.add_column("audit", sa.Column(name, type_, nullable=True))
    op.create_index("ix_audit_chain", "audit", ["node", "idx"], unique=True)
    op.create_index("ix_audit_user", "audit", ["user_id"])
    op.create_index("ix_audit_ts", "audit", ["ts"])
    op.create_table(
        "journal_nodes",
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
    op.create_table(
        "journal_anchors",
        sa.Column("anchor_no", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("tree_size", sa.BigInteger, nullable=False),
        sa.Column("root", sa.LargeBinary, nullable=False),
        sa.Column("frontier", sa.LargeBinary, nullable=False),
        sa.Column("key_id", sa.Text, nullable=True),
        sa.Column("signature", sa.LargeBinary, nullable=True),
        sa.Column("published_at", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "journal_leaves",
        sa.Column("pos", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("anchor_no", sa.BigInteger, nullable=False),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("token", sa.BigInteger, nullable=False),
        sa.Column("registered_at", sa.BigInteger, nullable=False),
        sa.Column("head_idx", sa.BigInteger, nullable=False),
        sa.Column("head_hash", sa.LargeBinary, nullable=False),
    )
    op.create_index("ix_journal_leaves_node", "journal_leaves", ["node", "head_idx"])
    op.add_column("rooms", sa.Column("retention_seconds", sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("retention_seconds")
    op.drop_index("ix_journal_leaves_node", table_name="journal_leaves")
    op.drop_table("journal_leaves")
    op.drop_table("journal_anchors")
    op.drop_table("journal_nodes")
    for index in ("ix_audit_ts", "ix_audit_user", "ix_audit_chain"):
        op.drop_index(index, table_name="audit")
    with op.batch_alter_table("audit") as batch:
        for name, _type in reversed(_AUDIT_COLUMNS):
            batch.drop_column(name)
