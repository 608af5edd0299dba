"""Device enrolment: the institution's identity attestation, pending device approvals and
the user's encrypted key backup.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("identities") as batch:
        batch.add_column(sa.Column("attestation", sa.LargeBinary, nullable=True))
    op.create_table(
        "key_backups",
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("blob", sa.LargeBinary, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False),
    )
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("user_id", sa.Text, nullable=False),
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
    op.create_index("ix_approval_requests_user_id", "approval_requests", ["user_id"])


def downgrade() -> None:
    op.drop_index("ix_approval_requests_user_id", "approval_requests")
    op.drop_table("approval_requests")
    op.drop_table("key_backups")
    with op.batch_alter_table("identities") as batch:
        batch.drop_column("attestation")
