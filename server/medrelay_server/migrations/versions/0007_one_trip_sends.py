"""PostgreSQL: a send batch in one round trip when the node's predictions hold.

``medrelay_send_batch`` is called outside any transaction, so the call is its own
transaction. It locks the batch's rooms in room order, then (each statement with a new
snapshot, so it sees every change committed before the locks were granted, as the
transaction of ``SendBatch`` does) checks what the node predicted: each room's last seq,
epoch and pending flag, each sender's current role, that no send of the batch is stored
already, and the node's journal head (node, fencing token, head). If any of these differs
it returns a non-zero code having written nothing, and the node runs the batch the usual
way. If all hold it writes the events, the last seqs with one NOTIFY per room, the audit
rows and the new head, and returns 0. The code: 1 room state, 2 roles, 3 a send already
stored, 4 journal head.

SQLite: nothing (a batch there is one process's own transaction, no round trips).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

FUNCTION = """
CREATE OR REPLACE FUNCTION medrelay_send_batch(
    p_rooms text[], p_last bigint[], p_epochs bigint[], p_pending boolean[], p_new_last bigint[],
    p_role_rooms text[], p_role_users text[], p_roles text[],
    e_room text[], e_seq bigint[], e_kind text[], e_device text[], e_user text[],
    e_ts bigint[], e_payload bytea[], e_mid bytea[],
    p_channel text,
    h_node text, h_token bigint, h_idx bigint, h_hash bytea,
    h_new_idx bigint, h_new_hash bytea, h_lease bigint,
    a_ts bigint[], a_action text[], a_outcome text[], a_user_id text[], a_device_id text[],
    a_room text[], a_seq_from bigint[], a_seq_to bigint[], a_mid bytea[], a_target text[],
    a_source text[], a_detail text[], a_node text[], a_idx bigint[], a_lease bigint[],
    a_prev_hash bytea[], a_hash bytea[], a_ts_end bigint[], a_role text[],
    a_institution text[], a_address text[], a_patient_tag bytea[]
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM rooms WHERE room = ANY(p_rooms) ORDER BY room FOR UPDATE;
    SELECT count(*) INTO n FROM rooms r
        JOIN unnest(p_rooms, p_last, p_epochs, p_pending) AS k(room, last_seq, epoch, pending)
        ON r.room = k.room
        WHERE r.last_seq = k.last_seq AND r.epoch = k.epoch AND r.pending_rekey = k.pending;
    IF n <> cardinality(p_rooms) THEN
        RETURN 1;
    END IF;
    SELECT count(*) INTO n FROM memberships m
        JOIN unnest(p_role_rooms, p_role_users, p_roles) AS k(room, user_id, role)
        ON m.room = k.room AND m.user_id = k.user_id
        WHERE m.to_seq IS NULL AND m.role = k.role;
    IF n <> cardinality(p_role_rooms) THEN
        RETURN 2;
    END IF;
    PERFORM 1 FROM events e
        JOIN unnest(e_room, e_device, e_mid) AS k(room, device, mid)
        ON e.room = k.room AND e.sender_device = k.device AND e.mid = k.mid;
    IF FOUND THEN
        RETURN 3;
    END IF;
    UPDATE journal_nodes SET head_idx = h_new_idx, head_hash = h_new_hash,
        lease_until = GREATEST(lease_until, h_lease)
        WHERE node = h_node AND token = h_token AND head_idx = h_idx AND head_hash = h_hash;
    IF NOT FOUND THEN
        RETURN 4;
    END IF;
    INSERT INTO events (room, seq, kind, sender_device, sender_user, ts, payload, mid)
        SELECT * FROM unnest(e_room, e_seq, e_kind, e_device, e_user, e_ts, e_payload, e_mid);
    UPDATE rooms SET last_seq = v.seq
        FROM unnest(p_rooms, p_new_last) AS v(room, seq) WHERE rooms.room = v.room;
    PERFORM pg_notify(p_channel, v.room || chr(31) || v.seq::text)
        FROM unnest(p_rooms, p_new_last) AS v(room, seq);
    INSERT INTO audit (
        ts, action, outcome, user_id, device_id, room, seq_from, seq_to, mid, target,
        source, detail, node, idx, lease, prev_hash, hash, ts_end, role, institution,
        address, patient_tag
    ) SELECT
        ts, action, outcome, user_id, device_id, room, seq_from, seq_to, mid, target,
        source, detail, node, idx, lease, prev_hash, hash, ts_end, role, institution,
        address, patient_tag
    FROM unnest(
        a_ts, a_action, a_outcome, a_user_id, a_device_id, a_room, a_seq_from, a_seq_to,
        a_mid, a_target, a_source, a_detail, a_node, a_idx, a_lease, a_prev_hash, a_hash,
        a_ts_end, a_role, a_institution, a_address, a_patient_tag
    ) WITH ORDINALITY AS r(
        ts, action, outcome, user_id, device_id, room, seq_from, seq_to, mid, target,
        source, detail, node, idx, lease, prev_hash, hash, ts_end, role, institution,
        address, patient_tag,
        ord
    )
    ORDER BY ord;
    RETURN 0;
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS medrelay_send_batch")
