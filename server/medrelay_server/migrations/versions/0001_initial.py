"""Initial schema: rooms and their event stream, roster, wraps, membership intervals,
history grants, identities, devices, receipts, blobs and the audit journal.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "rooms",
        sa.Column("room", sa.Text, primary_key=True),
        sa.Column("last_seq", sa.BigInteger, nullable=False),
        sa.Column("roster_head", sa.LargeBinary, nullable=False),
        sa.Column("roster_length", sa.Integer, nullable=False),
        sa.Column("epoch", sa.BigInteger, nullable=False),
        sa.Column("pending_rekey", sa.Boolean, nullable=False),
        sa.Column("device_list_version", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "events",
        sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("sender_device", sa.Text, nullable=False),
        sa.Column("sender_user", sa.Text, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("mid", sa.LargeBinary, nullable=True),
        sa.UniqueConstraint("room", "sender_device", "mid", name="uq_events_idempotency"),
    )
    op.create_table(
        "roster",
        sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("entry", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "wraps",
        sa.Column("room", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("wrap", sa.LargeBinary, nullable=False),
        sa.ForeignKeyConstraint(["room", "seq"], ["events.room", "events.seq"]),
    )
    op.create_table(
        "memberships",
        sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), primary_key=True),
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("from_seq", sa.BigInteger, primary_key=True),
        sa.Column("to_seq", sa.BigInteger, nullable=True),
        sa.Column("role", sa.Text, nullable=False),
    )
    op.create_index("ix_memberships_user", "memberships", ["user_id", "to_seq"])
    op.create_table(
        "grants",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("from_seq", sa.BigInteger, nullable=False),
        sa.Column("to_seq", sa.BigInteger, nullable=False),
        sa.Column("granted_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_grants_room_user", "grants", ["room", "user_id"])
    op.create_table(
        "identities",
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("identity_key", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "devices",
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("signing_key", sa.LargeBinary, nullable=False),
        sa.Column("certificate", sa.LargeBinary, nullable=False),
        sa.Column("bundle", sa.LargeBinary, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_devices_user_id", "devices", ["user_id"])
    op.create_table(
        "receipts",
        sa.Column("room", sa.Text, primary_key=True),
        sa.Column("device_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "blobs",
        sa.Column("blob", sa.LargeBinary, primary_key=True),
        sa.Column("room", sa.Text, sa.ForeignKey("rooms.room"), nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("chunks", sa.Integer, nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("complete", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_blobs_room", "blobs", ["room"])
    op.create_table(
        "blob_chunks",
        sa.Column("blob", sa.LargeBinary, sa.ForeignKey("blobs.blob"), primary_key=True),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("data", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "audit",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=True),
        sa.Column("device_id", sa.Text, nullable=True),
        sa.Column("room", sa.Text, nullable=True),
        sa.Column("seq_from", sa.BigInteger, nullable=True),
        sa.Column("seq_to", sa.BigInteger, nullable=True),
        sa.Column("mid", sa.LargeBinary, nullable=True),
        sa.Column("target", sa.Text, nullable=True),
        sa.Column("source", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
    )
    op.create_index("ix_audit_room", "audit", ["room"])


def downgrade() -> None:
    for index, table in (
        ("ix_audit_room", "audit"),
        ("ix_blobs_room", "blobs"),
        ("ix_devices_user_id", "devices"),
        ("ix_grants_room_user", "grants"),
        ("ix_memberships_user", "memberships"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "audit",
        "blob_chunks",
        "blobs",
        "receipts",
        "devices",
        "identities",
        "grants",
        "memberships",
        "wraps",
        "roster",
        "events",
        "rooms",
    ):
        op.drop_table(table)
