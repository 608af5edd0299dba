"""PostgreSQL: ``medrelay_send_batch_or_state``, which answers a moved room with its state.

0010's ``medrelay_send_batch`` answers 1 when a room's last seq, epoch or pending flag is not
what the node predicted, and the node then runs the batch the usual way: five round trips,
holding the room locks across three of them. Where two nodes send into the same rooms (any
deployment of more than one node: a room's members connect wherever the balancer sends
them) nearly every call missed that way, and the two nodes' usual-way batches waited on each
other's locks (``docs/performance.md``, "Eleventh round").

This function does the same checks and writes (0010's text, amended below) and, when a
room moved, also returns every room's last seq, epoch and pending flag as it read them under
the locks, in the order of ``p_rooms`` (a room that does not exist is left out). The node
plans the batch again from them and calls again (up to four calls in all): usually two round
trips instead of six. It
returns a row ``(o_code, o_last, o_epochs, o_pending)``; the arrays are NULL unless
``o_code`` is 1.

0010's function stays beside it for the previous release's nodes during a rolling upgrade.

SQLite: nothing.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from alembic import op

revision = "0011"
down_revision: str | None = "0010"
branch_labels: str | None = None
depends_on: str | None = None

NAME = "medrelay_send_batch_or_state"


def _function_0010() -> str:
    """0010's definition (migrations are never edited, so it stays what 0010 created)."""
    path = Path(__file__).with_name("0010_send_batch_rows.py")
    spec = importlib.util.spec_from_file_location("medrelay_migration_0010", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: str = module.FUNCTION
    return function


AMENDMENTS = (
    # the name, and the answer as a row
    ("CREATE FUNCTION medrelay_send_batch(", f"CREATE FUNCTION {NAME}("),
    (
        "    p_audit medrelay_audit_row[]\n) RETURNS integer",
        "    p_audit medrelay_audit_row[],\n"
        "    OUT o_code integer, OUT o_last bigint[], OUT o_epochs bigint[],"
        " OUT o_pending boolean[]\n) RETURNS record",
    ),
    # a moved room: every room's state, read under the locks, in the order of p_rooms
    (
        "    IF n <> cardinality(p_rooms) THEN\n        RETURN 1;\n",
        "    IF n <> cardinality(p_rooms) THEN\n"
        "        SELECT array_agg(r.last_seq ORDER BY k.ord), array_agg(r.epoch ORDER BY k.ord),\n"
        "            array_agg(r.pending_rekey ORDER BY k.ord)\n"
        "            INTO o_last, o_epochs, o_pending\n"
        "            FROM unnest(p_rooms) WITH ORDINALITY AS k(room, ord)\n"
        "            JOIN rooms r ON r.room = k.room;\n"
        "        o_code := 1;\n"
        "        RETURN;\n",
    ),
)
_RETURN = re.compile(r"RETURN (\d);")


def function_0011() -> str:
    text = _function_0010()
    for old, new in AMENDMENTS:
        if text.count(old) != 1:
            raise RuntimeError("0010's medrelay_send_batch is not the one 0011 amends")
        text = text.replace(old, new)
    # every other answer: set the code, return the row
    return _RETURN.sub(r"o_code := \1; RETURN;", text)


SIGNATURE = (
    f"{NAME}(text[], bigint[], bigint[], boolean[], bigint[], text[], text[],"
    " text[], medrelay_event_row[], text, text, bigint, bigint, bytea, bigint, bytea, bigint,"
    " medrelay_audit_row[])"
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(function_0011())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION {SIGNATURE}")
