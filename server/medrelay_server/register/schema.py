"""Tables of the identity register (migration ``0003``), on the store's ``MetaData``.

Decisions:

* ``register_entries`` is the imported Medical Council list, keyed by the registration
  number as a string (CLINICAL §4.1: no hard format check). Only ``status = 'active'``
  lets a doctor sign in; an entry missing from a full import is kept with status
  ``removed`` (the history of who was registered when stays answerable).
* ``accounts`` binds a user id (``<institution>:<subject>``, or ``tablet:<inst>:<ward>:<id>``)
  to the institution's subject, its role claim and registration number. ``status`` is
  ``active``, ``lapsed`` or ``deprovisioned``; ``removal_pending`` asks the re-check job to
  take the account out of every room (set on lapse, deprovisioning and back-channel logout).
* ``auth_sessions`` holds refresh tokens hashed (SHA-256 of a 256-bit random token); a
  ``family`` is one sign-in session (the ``sid`` of its access tokens); a rotated token is
  ``used``, and presenting a used one revokes the family.
* ``tablet_enrollments`` holds the long-lived enrollment credentials of ward tablets, hashed.
"""

from __future__ import annotations

import sqlalchemy as sa

from ..store.schema import metadata

register_entries = sa.Table(
    "register_entries",
    metadata,
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
    sa.Index("ix_register_entries_status", "status"),
)

accounts = sa.Table(
    "accounts",
    metadata,
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
    sa.Index("ix_accounts_registration", "registration_no"),
)

auth_sessions = sa.Table(
    "auth_sessions",
    metadata,
    sa.Column("token_hash", sa.LargeBinary, primary_key=True),
    sa.Column("family", sa.Text, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("idp_sid", sa.Text, nullable=True),
    sa.Column("issued_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("family_expires_at", sa.BigInteger, nullable=False),
    sa.Column("used", sa.Boolean, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Index("ix_auth_sessions_family", "family"),
    sa.Index("ix_auth_sessions_user", "user_id"),
    sa.Index("ix_auth_sessions_idp_sid", "idp_sid"),
)

tablet_enrollments = sa.Table(
    "tablet_enrollments",
    metadata,
    sa.Column("enrollment_id", sa.Text, primary_key=True),
    sa.Column("secret_hash", sa.LargeBinary, nullable=False),
    sa.Column("user_id", sa.Text, nullable=False),
    sa.Column("institution", sa.Text, nullable=False),
    sa.Column("ward", sa.Text, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=False),
    sa.Column("revoked", sa.Boolean, nullable=False),
    sa.Index("ix_tablet_enrollments_user", "user_id"),
)
