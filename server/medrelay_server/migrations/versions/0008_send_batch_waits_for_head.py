"""PostgreSQL: ``medrelay_send_batch`` waits for this node's write in flight, then checks
the journal head.

0007 advanced the head with ``UPDATE journal_nodes ... WHERE node AND token AND head``.
Under READ COMMITTED an UPDATE whose WHERE clause does not match the row's committed
version skips it without waiting for its lock, so a call planned after a write of the same
node still in flight (a delivery journal flush) compared the older head and missed, and the
batch ran the usual way. Now the call locks the node row first (waiting for that write's
commit) and compares the head it committed. Nothing else changes.

SQLite: nothing.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def _function_0007() -> str:
    """0007's definition (migrations are never edited, so it stays what 0007 created)."""
    path = Path(__file__).with_name("0007_one_trip_sends.py")
    spec = importlib.util.spec_from_file_location("medrelay_migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: str = module.FUNCTION
    return function


CONDITIONAL = """    UPDATE journal_nodes SET head_idx = h_new_idx, head_hash = h_new_hash,
        lease_until = GREATEST(lease_until, h_lease)
        WHERE node = h_node AND token = h_token AND head_idx = h_idx AND head_hash = h_hash;
    IF NOT FOUND THEN
        RETURN 4;
    END IF;
"""
LOCKED = """    SELECT token = h_token AND head_idx = h_idx AND head_hash = h_hash INTO matched
        FROM journal_nodes WHERE node = h_node FOR UPDATE;
    IF matched IS NOT TRUE THEN
        RETURN 4;
    END IF;
    UPDATE journal_nodes SET head_idx = h_new_idx, head_hash = h_new_hash,
        lease_until = GREATEST(lease_until, h_lease)
        WHERE node = h_node;
"""


def function_0008() -> str:
    old = _function_0007()
    if CONDITIONAL not in old or "    n integer;\n" not in old:
        raise RuntimeError("0007's medrelay_send_batch is not the one 0008 amends")
    new = old.replace(CONDITIONAL, LOCKED)
    return new.replace("    n integer;\n", "    n integer;\n    matched boolean;\n")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(function_0008())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_function_0007())
