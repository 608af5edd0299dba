"""Appending envelopes and reading a room's event stream through a user's membership.

A user sees seq s of a room when s lies inside one of their membership intervals, where a
member whose role may not receive room messages (a bedside tablet, role ``device``) sees only
the roster and rekey events of the interval, or inside one of their history grants.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from medrelay_protocol import policy
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from . import schema as t
from .audit import ChainWriter, fill_records, pg_audit_rows, pg_known_head_ctes
from .base import AppendResult, AuditRecord, StoredEvent
from .engine import raw_errors
from .rows import EVENT_COLUMNS, EVENTS_CHANNEL, event_of, refuse

MESSAGE_KINDS = {
    "message": policy.may_post,
    "summon": policy.may_summon,
    "grant": policy.may_commit_epoch,  # history grants: only roles that hold and commit keys
}
KINDS_FOR_NON_RECEIVERS = ("roster", "rekey")
RECEIVER_ROLES = tuple(role for role in policy.ROLES if policy.may_receive(role))


def _send_statements() -> dict[str, Any]:
    """The send path's statements, built once with bind parameters: building and cache-keying
    a Core statement per call cost more than executing it (bench.store_ops)."""
    r, m, e = t.rooms.c, t.memberships.c, t.events.c
    return {
        # the batch's room rows in room order (SQLite holds the write lock already;
        # PostgreSQL locks them with _PG_LOCK)
        "lock": sa.select(r.room, r.last_seq, r.epoch, r.pending_rekey)
        .where(r.room.in_(sa.bindparam("rooms", expanding=True)))
        .order_by(r.room)
        .with_for_update(),
        # a superset of the senders' current roles and of the batch's stored sends (the
        # caller picks its exact keys); PostgreSQL uses the exact-key statements below
        "roles": sa.select(m.room, m.user_id, m.role).where(
            m.to_seq.is_(None),
            m.room.in_(sa.bindparam("rooms", expanding=True)),
            m.user_id.in_(sa.bindparam("users", expanding=True)),
        ),
        "stored": sa.select(*EVENT_COLUMNS).where(
            e.room.in_(sa.bindparam("rooms", expanding=True)),
            e.sender_device.in_(sa.bindparam("devices", expanding=True)),
            e.mid.in_(sa.bindparam("mids", expanding=True)),
        ),
        "insert": sa.insert(t.events),
        "last_seq": sa.update(t.rooms)
        .where(r.room == sa.bindparam("b_room"))
        .values(last_seq=sa.bindparam("b_seq")),
    }


_STATEMENTS = _send_statements()
_EVENT_ORDER = ("room", "seq", "kind", "sender_device", "sender_user", "ts", "payload", "mid")
# PostgreSQL: the same work straight to asyncpg on the transaction's connection, with exact
# keys through unnest (unqualified names resolve through search_path)
# the current roles of every member of the batch's rooms (kind false: room, user, role;
# the senders' are what the checks use, the others let the node plan later batches from
# them, ``onetrip.py``) and the batch's sends already stored (kind true: the event), in one
# round trip; after the room locks, as its own statement, so that it reads what was
# committed before the locks were granted
_PG_READ = (
    "SELECT false, m.room, m.user_id, m.role, NULL::bigint, NULL::text, NULL::bigint,"
    " NULL::bytea, NULL::bytea FROM memberships m"
    " WHERE m.room = ANY($1::text[]) AND m.to_seq IS NULL"
    " UNION ALL"
    " SELECT true, e.room, e.sender_device, e.sender_user, e.seq, e.kind, e.ts, e.payload, e.mid"
    " FROM events e JOIN unnest($2::text[], $3::text[], $4::bytea[]) AS k(room, device, mid)"
    " ON e.room = k.room AND e.sender_device = k.device AND e.mid = k.mid"
)
# the batch's writes in one round trip: its new events, each room's last seq with a NOTIFY
# "room \x1f seq" for it, and (_PG_WRITE_AUDIT) its audit rows chained after the writer's
# remembered head, inserted only if the conditional head update matched (its count says)
_PG_WRITE_CTES = (
    "WITH ins AS (INSERT INTO events"
    " (room, seq, kind, sender_device, sender_user, ts, payload, mid)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[], $7::bytea[], $8::bytea[])),"
    " u AS (UPDATE rooms SET last_seq = v.seq"
    " FROM unnest($10::text[], $11::bigint[]) AS v(room, seq) WHERE rooms.room = v.room"
    " RETURNING rooms.room, rooms.last_seq),"
    " n AS (SELECT count(pg_notify($9, u.room || chr(31) || u.last_seq::text)) AS c FROM u)"
)
# (constant text only: S608 cannot see that)
_PG_WRITE = _PG_WRITE_CTES + " SELECT (SELECT c FROM n), 0"  # noqa: S608
_PG_WRITE_AUDIT = (
    _PG_WRITE_CTES  # noqa: S608
    + ", "
    + pg_known_head_ctes(12)
    + " SELECT (SELECT c FROM n), (SELECT count(*) FROM h WHERE ok)"
)
# the batch's room rows, locked in room order
_PG_LOCK = (
    "SELECT room, last_seq, epoch, pending_rekey FROM rooms WHERE room = ANY($1::text[])"
    " ORDER BY room FOR UPDATE"
)
_EMPTY_EVENTS: list[list[Any]] = [[] for _ in range(8)]

_Key = tuple[str, str, bytes]  # (room, sender device, mid)


def plan_send(
    kw: dict[str, Any],
    state: dict[str, list[Any]],
    roles: dict[tuple[str, str], str],
    stored: dict[_Key, StoredEvent],
    new: list[StoredEvent],
) -> tuple[AppendResult, list[AuditRecord]]:
    """One send checked against its batch's state (``state``: room -> [last seq, epoch,
    pending]; ``roles``: the senders' current roles; ``stored``: sends stored already, and
    the batch's own so far), in order, in memory: membership before idempotency (a removed
    user learns nothing, not even the seq of an earlier send), idempotency before the
    epoch (a retry of a stored send gets its ack even after the epoch moved on). A new
    send takes the room's next seq and joins ``new``. Returns the outcome and its audit
    records; a refusal raises ``RequestError``."""
    room, user, device, mid = kw["room"], kw["user"], kw["device"], kw["mid"]
    kind, envelope, now = kw["kind"], kw["envelope"], kw["now"]
    allowed = MESSAGE_KINDS.get(kind)
    if allowed is None:
        raise refuse(ErrorCode.INVALID_FIELD, "not a message kind")
    room_state, role = state.get(room), roles.get((room, user))
    if room_state is None or role is None or not allowed(role):
        raise refuse(ErrorCode.FORBIDDEN, "may not post")  # an unknown room alike
    audit = kw["audit"]
    original = stored.get((room, device, mid))
    if original is not None:
        if (original.payload, original.kind, original.sender_user) != (envelope, kind, user):
            raise refuse(ErrorCode.IDEMPOTENCY_MISMATCH, "mid reused with other bytes")
        seqs = (original.seq, original.seq)
        records = fill_records(audit, now=now, room=room, seqs=seqs, role=role)
        return AppendResult(original, duplicate=True), records
    last_seq, epoch, pending = room_state
    if kw["epoch"] != epoch:
        raise refuse(ErrorCode.STALE_EPOCH, "not the current epoch")
    if pending and not kw["allow_pending"]:
        raise refuse(ErrorCode.REKEY_REQUIRED, "a rekey is pending")
    seq = room_state[0] = last_seq + 1
    event = StoredEvent(room, seq, kind, device, user, now, envelope, mid)
    new.append(event)
    stored[(room, device, mid)] = event
    records = fill_records(audit, now=now, room=room, seqs=(seq, seq), role=role)
    return AppendResult(event, duplicate=False), records


class SendBatch:
    """The sends of one write transaction (a group-commit batch, or a batch of one), in a
    fixed number of statements whatever the batch's size: lock the batch's rooms (in room
    order), read the senders' roles, find sends already stored (retries), insert the new
    events (:meth:`append_many`); then each room's ``last_seq`` and, on PostgreSQL, one
    NOTIFY per room with its newest seq (:meth:`finish`; listeners fill the gap up to it).
    On PostgreSQL that is three round trips between BEGIN and COMMIT: the locks, one read
    (roles and retried sends), and one write in :meth:`finish` (events, last seqs and
    NOTIFYs, and the batch's audit rows when its writer knows the chain head).

    Each send is checked on its own, in order, in memory: membership before idempotency (a
    removed user learns nothing, not even the seq of an earlier send), idempotency before
    the epoch (a retry of a stored send gets its ack even after the epoch moved on). A send
    retried within the batch is a duplicate of its first copy. On PostgreSQL the whole
    transaction is asyncpg's (``pg``, from ``Database.batch_write``): SQLAlchemy's Python
    cost per statement, and its BEGIN and COMMIT, were most of a batch's. A statement
    failing (e.g. an unforeseen conflict) fails the whole batch, which the group committer
    then retries one send at a time."""

    def __init__(self, conn: AsyncConnection, writer: ChainWriter, *, pg: Any = None) -> None:
        if pg is None and conn.dialect.name == "postgresql":
            raise ValueError("PostgreSQL send batches run on asyncpg (Database.batch_write)")
        self._conn = conn
        self._writer = writer
        self._last: dict[str, int] = {}
        self._pg: Any = pg
        """PostgreSQL: the asyncpg connection whose transaction this is."""
        self._new: list[StoredEvent] = []
        """PostgreSQL: the events :meth:`finish` inserts."""
        self.state: dict[str, list[Any]] = {}
        """After :meth:`append_many`: room -> [last seq, epoch, pending] as read under the
        room locks, with the batch's own sends counted (what a committed batch leaves)."""
        self.roles: dict[tuple[str, str], str] = {}
        """After :meth:`append_many`: the senders' current roles as read."""

    async def append_many(
        self, items: Sequence[dict[str, Any]]
    ) -> list[AppendResult | RequestError]:
        conn = self._conn
        rooms = sorted({str(kw["room"]) for kw in items})
        if self._pg is not None:
            async with raw_errors():
                locked = await self._pg.fetch(_PG_LOCK, rooms)
        else:
            locked = (await conn.execute(_STATEMENTS["lock"], {"rooms": rooms})).all()
        state = {row[0]: [row[1], row[2], bool(row[3])] for row in locked}
        pairs = sorted({(str(kw["room"]), str(kw["user"])) for kw in items})
        keys = [(str(kw["room"]), str(kw["device"]), bytes(kw["mid"])) for kw in items]
        if self._pg is not None:
            roles, stored = await self._read_pg(rooms, keys)
        else:
            roles, stored = await self._read(pairs, keys)
        new: list[StoredEvent] = []
        out: list[AppendResult | RequestError] = []
        records: list[AuditRecord] = []
        for kw in items:
            try:
                outcome, audit = plan_send(kw, state, roles, stored, new)
            except RequestError as refused:
                out.append(refused)
                continue
            out.append(outcome)
            records.extend(audit)
            if not outcome.duplicate:
                self._last[outcome.event.room] = outcome.event.seq
        self.state, self.roles = state, roles
        await self._writer.append(conn, records)
        if self._pg is not None:  # inserted by finish(), with everything else it writes
            self._new = new
        elif new:
            rows = [{f: getattr(ev, f) for f in _EVENT_ORDER} for ev in new]
            await conn.execute(_STATEMENTS["insert"], rows)
        return out

    async def _read_pg(
        self, rooms: list[str], keys: list[_Key]
    ) -> tuple[dict[tuple[str, str], str], dict[_Key, StoredEvent]]:
        args = [rooms, *map(list, zip(*keys, strict=True))]
        async with raw_errors():
            rows = await self._pg.fetch(_PG_READ, *args)
        roles: dict[tuple[str, str], str] = {}
        stored: dict[_Key, StoredEvent] = {}
        for r in rows:
            if r[0]:  # (true, room, device, user, seq, kind, ts, payload, mid)
                event = StoredEvent(r[1], r[4], r[5], r[2], r[3], r[6], bytes(r[7]), bytes(r[8]))
                stored[(event.room, event.sender_device, bytes(r[8]))] = event
            else:  # (false, room, user, role, ...)
                roles[(r[1], r[2])] = r[3]
        return roles, stored

    async def _read(
        self, pairs: list[tuple[str, str]], keys: list[_Key]
    ) -> tuple[dict[tuple[str, str], str], dict[_Key, StoredEvent]]:
        wanted_pairs, wanted_keys = set(pairs), set(keys)
        params = {"rooms": sorted({p[0] for p in pairs}), "users": sorted({p[1] for p in pairs})}
        roles = {
            (r.room, r.user_id): r.role
            for r in await self._conn.execute(_STATEMENTS["roles"], params)
            if (r.room, r.user_id) in wanted_pairs
        }
        by_key: dict[str, list[Any]] = {
            "rooms": sorted({k[0] for k in keys}),
            "devices": sorted({k[1] for k in keys}),
            "mids": sorted({k[2] for k in keys}),
        }
        stored = {}
        for row in await self._conn.execute(_STATEMENTS["stored"], by_key):
            event = event_of(row)
            key = (event.room, event.sender_device, event.mid or b"")
            if key in wanted_keys:
                stored[key] = event
        return roles, stored

    async def finish(self) -> None:
        if self._pg is not None:
            await self._finish_pg()
            return
        if not self._last:
            return
        last = sorted(self._last.items())
        self._last.clear()
        rows = [{"b_room": room, "b_seq": seq} for room, seq in last]
        await self._conn.execute(_STATEMENTS["last_seq"], rows)

    async def _finish_pg(self) -> None:
        """One statement: the new events, the last seqs with their NOTIFYs and, inside a
        group-commit batch whose writer remembers its head, the batch's audit rows. If the
        head moved (the statement then stored no audit row), the rows are chained after the
        locked node row when the batch's ``deferred`` block ends, as without a known head."""
        new, self._new = self._new, []
        last = sorted(self._last.items())
        self._last.clear()
        taken = self._writer.take_known_head(self._conn)
        if not new and not last and taken is None:
            return
        events = [[getattr(ev, f) for ev in new] for f in _EVENT_ORDER] if new else _EMPTY_EVENTS
        args = [*events, EVENTS_CHANNEL, [r for r, _ in last], [q for _, q in last]]
        async with raw_errors():
            if taken is None:
                await self._pg.fetchrow(_PG_WRITE, *args)
                return
            try:
                row = await self._pg.fetchrow(
                    _PG_WRITE_AUDIT, *args, *taken.condition, pg_audit_rows(taken.entries)
                )
            except BaseException:
                self._writer.abandon_known_head()
                raise
        self._writer.settle_known_head(self._conn, taken, advanced=row[1] == 1)


async def append_message(
    conn: AsyncConnection, writer: ChainWriter, room: str, *, pg: Any = None, **kw: Any
) -> AppendResult:
    """One send in its own transaction (the store without group commit): a batch of one.
    ``pg``: PostgreSQL's asyncpg connection (``Database.batch_write``)."""
    async with writer.deferred(conn, pg=pg):
        batch = SendBatch(conn, writer, pg=pg)
        (outcome,) = await batch.append_many([{"room": room, **kw}])
        if isinstance(outcome, RequestError):
            raise outcome
        await batch.finish()
    return outcome


def _visible_to(user: str | sa.BindParameter[str]) -> sa.ColumnElement[bool]:
    e, m, g = t.events.c, t.memberships.c, t.grants.c
    interval = sa.exists().where(
        m.room == e.room,
        m.user_id == user,
        m.from_seq <= e.seq,
        sa.or_(m.to_seq.is_(None), m.to_seq >= e.seq),
        sa.or_(m.role.in_(RECEIVER_ROLES), e.kind.in_(KINDS_FOR_NON_RECEIVERS)),
    )
    grant = sa.exists().where(
        g.room == e.room, g.user_id == user, g.from_seq <= e.seq, g.to_seq >= e.seq
    )
    return sa.or_(interval, grant)


def _with_wrap(device: str | sa.BindParameter[str]) -> sa.Select[tuple[object, ...]]:
    e, w = t.events.c, t.wraps.c
    joined = t.events.outerjoin(
        t.wraps, sa.and_(w.room == e.room, w.seq == e.seq, w.device_id == device)
    )
    return sa.select(*EVENT_COLUMNS, w.wrap).select_from(joined)


def _events_of(rows: Sequence[sa.Row[tuple[object, ...]]]) -> list[StoredEvent]:
    out = []
    for row in rows:
        wrap = row._mapping["wrap"]
        out.append(event_of(row, None if wrap is None else bytes(wrap)))
    return out


def _read_statements() -> dict[str, Any]:
    """Delivery's and history's reads, built once with bind parameters (``room``, ``seq``,
    ``user``, ``device``, ``limit``): building and cache-keying them per call was about half
    of a gap read's CPU (``bench.store_ops``)."""
    e = t.events.c
    room = sa.bindparam("room", type_=sa.String)
    seq = sa.bindparam("seq", type_=sa.BigInteger)
    limit = sa.bindparam("limit", type_=sa.Integer)
    visible = _with_wrap(sa.bindparam("device")).where(
        e.room == room, _visible_to(sa.bindparam("user"))
    )
    return {
        "after": visible.where(e.seq > seq).order_by(e.seq).limit(limit),
        "before": visible.where(e.seq < seq).order_by(e.seq.desc()).limit(limit),
        "room": sa.select(*EVENT_COLUMNS)
        .where(e.room == room, e.seq > seq)
        .order_by(e.seq)
        .limit(limit),
    }


_READS = _read_statements()
_NO_SEQ = 2**62
"""``events_before`` with no upper seq: larger than any seq."""


async def events_after(
    conn: AsyncConnection, room: str, after_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    args = {"room": room, "seq": after_seq, "user": user, "device": device}
    result = await conn.execute(_READS["after"], {**args, "limit": max(limit, 0)})
    return _events_of(result.all())


async def events_before(
    conn: AsyncConnection, room: str, before_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    seq = before_seq if before_seq > 0 else _NO_SEQ
    args = {"room": room, "seq": seq, "user": user, "device": device}
    result = await conn.execute(_READS["before"], {**args, "limit": max(limit, 0)})
    return _events_of(result.all())[::-1]


async def room_events(
    conn: AsyncConnection, room: str, after_seq: int, *, limit: int
) -> list[StoredEvent]:
    args = {"room": room, "seq": after_seq, "limit": max(limit, 0)}
    return [event_of(row) for row in await conn.execute(_READS["room"], args)]


async def visible(conn: AsyncConnection, room: str, seq: int, user: str) -> bool:
    m, g = t.memberships.c, t.grants.c
    interval = sa.select(m.from_seq).where(
        m.room == room,
        m.user_id == user,
        m.from_seq <= seq,
        sa.or_(m.to_seq.is_(None), m.to_seq >= seq),
    )
    grant = sa.select(g.from_seq).where(
        g.room == room, g.user_id == user, g.from_seq <= seq, g.to_seq >= seq
    )
    query = sa.select(sa.or_(interval.exists(), grant.exists()))
    return bool((await conn.execute(query)).scalar())


async def record_receipt(conn: AsyncConnection, room: str, device: str, seq: int, now: int) -> int:
    """One atomic upsert that keeps the larger seq, so concurrent receipts never move a
    device's cumulative receipt backwards."""
    r = t.receipts.c
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    row = insert(t.receipts).values(room=room, device_id=device, seq=seq, updated_at=now)
    newer = row.excluded.seq > r.seq
    upsert = row.on_conflict_do_update(
        index_elements=[r.room, r.device_id],
        set_={
            "seq": sa.case((newer, row.excluded.seq), else_=r.seq),
            "updated_at": sa.case((newer, row.excluded.updated_at), else_=r.updated_at),
        },
    ).returning(r.seq)
    return int((await conn.execute(upsert)).scalar_one())


def _receipt_upsert(dialect: str) -> Any:
    r = t.receipts.c
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    row = insert(t.receipts).values(
        room=sa.bindparam("b_room"),
        device_id=sa.bindparam("b_device"),
        seq=sa.bindparam("b_seq"),
        updated_at=sa.bindparam("b_ts"),
    )
    newer = row.excluded.seq > r.seq
    return row.on_conflict_do_update(
        index_elements=[r.room, r.device_id],
        set_={
            "seq": sa.case((newer, row.excluded.seq), else_=r.seq),
            "updated_at": sa.case((newer, row.excluded.updated_at), else_=r.updated_at),
        },
    )


_RECEIPT_UPSERT = {d: _receipt_upsert(d) for d in ("postgresql", "sqlite")}


async def record_receipts(
    conn: AsyncConnection, receipts: Sequence[tuple[str, str, int, int]]
) -> None:
    """Many devices' cumulative receipts (room, device, seq, ts), each kept only if larger,
    in the caller's transaction, in key order (concurrent flushes cannot deadlock)."""
    if receipts:
        rows = [
            {"b_room": room, "b_device": device, "b_seq": seq, "b_ts": ts}
            for room, device, seq, ts in sorted(receipts)
        ]
        await conn.execute(_RECEIPT_UPSERT[conn.dialect.name], rows)


_RECEIPT_OF = sa.select(t.receipts.c.seq).where(
    t.receipts.c.room == sa.bindparam("room", type_=sa.String),
    t.receipts.c.device_id == sa.bindparam("device", type_=sa.String),
)


async def receipt_of(conn: AsyncConnection, room: str, device: str) -> int:
    args = {"room": room, "device": device}
    return int((await conn.execute(_RECEIPT_OF, args)).scalar_one_or_none() or 0)
