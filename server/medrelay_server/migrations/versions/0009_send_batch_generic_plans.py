"""PostgreSQL: ``medrelay_send_batch`` plans its statements once per session, with index
paths only.

The store's sessions run with ``plan_cache_mode = force_custom_plan`` (``store/engine.py``):
a generic plan made while ``events`` was small scanned the whole table for every batch as it
grew. Inside the function that setting made PostgreSQL plan each of its ten statements again
at every call, most of the call's CPU in PostgreSQL. The function now carries its own
settings: generic plans (each statement planned once per session) made with sequential
scans priced out (``enable_seqscan = off``), so every plan it keeps uses the tables' indexes
whatever their size when it was made. ``tests/server/test_plan_cache.py`` grows the tables
behind the cached plans and reads them.

SQLite: nothing.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "ALTER FUNCTION medrelay_send_batch"
            " SET plan_cache_mode = force_generic_plan SET enable_seqscan = off"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER FUNCTION medrelay_send_batch RESET ALL")
