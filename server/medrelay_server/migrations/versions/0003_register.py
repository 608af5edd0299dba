"""Identity register: the imported Medical Council register, accounts, sign-in sessions
(hashed refresh tokens) and ward-tablet enrollments.

Revision ID: 0003
Revises: 0002
Create Date: 2025-02-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "register_entries",
        sa.Column("registration_no", sa.Text, primary_key=True),
        sa.Column("name_en", sa.Text, nullable=False),
        sa.Column("name_zh", sa.Text, nullable=True),
        sa.Column("specialty", sa.Text, nullable=True),
        sa.Column("reg_type", sa.Text, nullable=True),
        sa.Column("qualification", sa.Text, nullable=True),
        sa.Column("qualification_date", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
    )
    op.create_index("ix_register_entries_status", "register_entries", ["status"])
    op.create_table(
        "accounts",
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("institution", sa.Text, nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=True),
        sa.Column("registration_no", sa.Text, nullable=True),
        sa.Column("ward", sa.Text, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("status_reason", sa.Text, nullable=True),
        sa.Column("status_at", sa.BigInteger, nullable=False),
        sa.Column("removal_pending", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("last_signin_at", sa.BigInteger, nullable=True),
        sa.UniqueConstraint("institution", "subject", name="uq_accounts_subject"),
    )
    op.create_index("ix_accounts_registration", "accounts", ["registration_no"])
    op.create_table(
        "auth_sessions",
        sa.Column("token_hash", sa.LargeBinary, primary_key=True),
        sa.Column("family", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("idp_sid", sa.Text, nullable=True),
        sa.Column("issued_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("family_expires_at", sa.BigInteger, nullable=False),
        sa.Column("used", sa.Boolean, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_index("ix_auth_sessions_family", "auth_sessions", ["family"])
    op.create_index("ix_auth_sessions_user", "auth_sessions", ["user_id"])
    op.create_index("ix_auth_sessions_idp_sid", "auth_sessions", ["idp_sid"])
    op.create_table(
        "tablet_enrollments",
        sa.Column("enrollment_id", sa.Text, primary_key=True),
        sa.Column("secret_hash", sa.LargeBinary, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("institution", sa.Text, nullable=False),
        sa.Column("ward", sa.Text, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False),
    )
    op.create_index("ix_tablet_enrollments_user", "tablet_enrollments", ["user_id"])


def downgrade() -> None:
    op.drop_table("tablet_enrollments")
    op.drop_table("auth_sessions")
    op.drop_table("accounts")
    op.drop_table("register_entries")
