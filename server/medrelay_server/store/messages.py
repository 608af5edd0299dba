"""Appending envelopes and reading a room's event stream through a user's membership.

A user sees seq s of a room when s lies inside one of their membership intervals, where a
member whose role may not receive room messages (a bedside tablet, role ``device``) sees only
the roster and rekey events of the interval, or inside one of their history grants.
"""

from __future__ import annotations

import dataclasses
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
from .audit import ChainWriter, write_audit
from .base import AppendResult, StoredEvent
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
        # the batch's room rows, locked in room order (PostgreSQL; SQLite holds the write
        # lock already)
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
_PG_ROLES = (
    "SELECT m.room, m.user_id, m.role FROM memberships m"
    " JOIN unnest($1::text[], $2::text[]) AS k(room, user_id)"
    " ON m.room = k.room AND m.user_id = k.user_id WHERE m.to_seq IS NULL"
)
_PG_STORED = (
    "SELECT e.room, e.seq, e.kind, e.sender_device, e.sender_user, e.ts, e.payload, e.mid"
    " FROM events e JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS k(room, device, mid)"
    " ON e.room = k.room AND e.sender_device = k.device AND e.mid = k.mid"
)
_PG_INSERT = (
    "INSERT INTO events (room, seq, kind, sender_device, sender_user, ts, payload, mid)"
    " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[], $7::bytea[], $8::bytea[])"
)
# each room's last seq, and a NOTIFY "room \x1f seq" for it, in one round trip
_PG_LAST_SEQ = (
    "WITH u AS (UPDATE rooms SET last_seq = v.seq"
    " FROM unnest($2::text[], $3::bigint[]) AS v(room, seq) WHERE rooms.room = v.room"
    " RETURNING rooms.room, rooms.last_seq)"
    " SELECT count(pg_notify($1, u.room || chr(31) || u.last_seq::text)) FROM u"
)

_Key = tuple[str, str, bytes]  # (room, sender device, mid)


class SendBatch:
    """The sends of one write transaction (a group-commit batch, or a batch of one), in a
    fixed number of statements whatever the batch's size: lock the batch's rooms (in room
    order), read the senders' roles, find sends already stored (retries), insert the new
    events (:meth:`append_many`); then each room's ``last_seq`` and, on PostgreSQL, one
    NOTIFY per room with its newest seq (:meth:`finish`; listeners fill the gap up to it).

    Each send is checked on its own, in order, in memory: membership before idempotency (a
    removed user learns nothing, not even the seq of an earlier send), idempotency before
    the epoch (a retry of a stored send gets its ack even after the epoch moved on). A send
    retried within the batch is a duplicate of its first copy. On PostgreSQL the statements
    after the first (which SQLAlchemy sends, beginning the transaction) go straight to
    asyncpg on the same connection: SQLAlchemy's per-statement Python cost was most of a
    send's. A statement failing (e.g. an unforeseen conflict) fails the whole batch, which
    the group committer then retries one send at a time."""

    def __init__(self, conn: AsyncConnection, writer: ChainWriter) -> None:
        self._conn = conn
        self._writer = writer
        self._last: dict[str, int] = {}
        self._pg: Any = None
        """PostgreSQL: the transaction's asyncpg connection, once SQLAlchemy has begun it."""

    async def append_many(
        self, items: Sequence[dict[str, Any]]
    ) -> list[AppendResult | RequestError]:
        conn = self._conn
        rooms = sorted({str(kw["room"]) for kw in items})
        locked = (await conn.execute(_STATEMENTS["lock"], {"rooms": rooms})).all()
        state = {row.room: [row.last_seq, row.epoch, bool(row.pending_rekey)] for row in locked}
        pairs = sorted({(str(kw["room"]), str(kw["user"])) for kw in items})
        keys = [(str(kw["room"]), str(kw["device"]), bytes(kw["mid"])) for kw in items]
        if conn.dialect.name == "postgresql":
            roles, stored = await self._read_pg(pairs, keys)
        else:
            roles, stored = await self._read(pairs, keys)
        new: list[StoredEvent] = []
        out: list[AppendResult | RequestError] = []
        for kw in items:
            try:
                out.append(await self._plan(kw, state, roles, stored, new))
            except RequestError as refused:
                out.append(refused)
        if new and self._pg is not None:
            columns = [[getattr(ev, f) for ev in new] for f in _EVENT_ORDER]
            async with raw_errors():
                await self._pg.execute(_PG_INSERT, *columns)
        elif new:
            rows = [{f: getattr(ev, f) for f in _EVENT_ORDER} for ev in new]
            await conn.execute(_STATEMENTS["insert"], rows)
        return out

    async def _read_pg(
        self, pairs: list[tuple[str, str]], keys: list[_Key]
    ) -> tuple[dict[tuple[str, str], str], dict[_Key, StoredEvent]]:
        self._pg = (await self._conn.get_raw_connection()).driver_connection
        async with raw_errors():
            role_rows = await self._pg.fetch(_PG_ROLES, *map(list, zip(*pairs, strict=True)))
            stored_rows = await self._pg.fetch(_PG_STORED, *map(list, zip(*keys, strict=True)))
        roles = {(r[0], r[1]): r[2] for r in role_rows}
        stored = {(r[0], r[3], bytes(r[7])): _event_of_record(r) for r in stored_rows}
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

    async def _plan(
        self,
        kw: dict[str, Any],
        state: dict[str, list[Any]],
        roles: dict[tuple[str, str], str],
        stored: dict[_Key, StoredEvent],
        new: list[StoredEvent],
    ) -> AppendResult:
        room, user, device, mid = kw["room"], kw["user"], kw["device"], kw["mid"]
        kind, envelope, now = kw["kind"], kw["envelope"], kw["now"]
        allowed = MESSAGE_KINDS.get(kind)
        if allowed is None:
            raise refuse(ErrorCode.INVALID_FIELD, "not a message kind")
        room_state, role = state.get(room), roles.get((room, user))
        if room_state is None or role is None or not allowed(role):
            raise refuse(ErrorCode.FORBIDDEN, "may not post")  # an unknown room alike
        audit = [
            a if a.role is not None else dataclasses.replace(a, role=role) for a in kw["audit"]
        ]
        original = stored.get((room, device, mid))
        if original is not None:
            if (original.payload, original.kind, original.sender_user) != (envelope, kind, user):
                raise refuse(ErrorCode.IDEMPOTENCY_MISMATCH, "mid reused with other bytes")
            seqs = (original.seq, original.seq)
            await write_audit(self._conn, self._writer, audit, now=now, room=room, seqs=seqs)
            return AppendResult(original, duplicate=True)
        last_seq, epoch, pending = room_state
        if kw["epoch"] != epoch:
            raise refuse(ErrorCode.STALE_EPOCH, "not the current epoch")
        if pending and not kw["allow_pending"]:
            raise refuse(ErrorCode.REKEY_REQUIRED, "a rekey is pending")
        seq = room_state[0] = last_seq + 1
        event = StoredEvent(room, seq, kind, device, user, now, envelope, mid)
        new.append(event)
        stored[(room, device, mid)] = event
        self._last[room] = seq
        await write_audit(self._conn, self._writer, audit, now=now, room=room, seqs=(seq, seq))
        return AppendResult(event, duplicate=False)

    async def finish(self) -> None:
        if not self._last:
            return
        last = sorted(self._last.items())
        self._last.clear()
        if self._pg is not None:  # one statement each for every room of the batch
            rooms, seqs = [room for room, _ in last], [seq for _, seq in last]
            async with raw_errors():
                await self._pg.fetchval(_PG_LAST_SEQ, EVENTS_CHANNEL, rooms, seqs)
            return
        rows = [{"b_room": room, "b_seq": seq} for room, seq in last]
        await self._conn.execute(_STATEMENTS["last_seq"], rows)


def _event_of_record(r: Any) -> StoredEvent:
    """An asyncpg record of :data:`_PG_STORED` (columns in ``_EVENT_ORDER`` order)."""
    return StoredEvent(r[0], r[1], r[2], r[3], r[4], r[5], bytes(r[6]), bytes(r[7]))


async def append_message(
    conn: AsyncConnection, writer: ChainWriter, room: str, **kw: Any
) -> AppendResult:
    """One send in its own transaction (the store without group commit)."""
    batch = SendBatch(conn, writer)
    (outcome,) = await batch.append_many([{"room": room, **kw}])
    if isinstance(outcome, RequestError):
        raise outcome
    await batch.finish()
    return outcome


def _visible_to(user: str) -> sa.ColumnElement[bool]:
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


def _with_wrap(device: str) -> sa.Select[tuple[object, ...]]:
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


async def events_after(
    conn: AsyncConnection, room: str, after_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = (
        _with_wrap(device)
        .where(e.room == room, e.seq > after_seq, _visible_to(user))
        .order_by(e.seq)
        .limit(max(limit, 0))
    )
    return _events_of((await conn.execute(query)).all())


async def events_before(
    conn: AsyncConnection, room: str, before_seq: int, *, user: str, device: str, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = _with_wrap(device).where(e.room == room, _visible_to(user))
    if before_seq > 0:
        query = query.where(e.seq < before_seq)
    query = query.order_by(e.seq.desc()).limit(max(limit, 0))
    return _events_of((await conn.execute(query)).all())[::-1]


async def room_events(
    conn: AsyncConnection, room: str, after_seq: int, *, limit: int
) -> list[StoredEvent]:
    e = t.events.c
    query = (
        sa.select(*EVENT_COLUMNS)
        .where(e.room == room, e.seq > after_seq)
        .order_by(e.seq)
        .limit(max(limit, 0))
    )
    return [event_of(row) for row in await conn.execute(query)]


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


async def receipt_of(conn: AsyncConnection, room: str, device: str) -> int:
    r = t.receipts.c
    query = sa.select(r.seq).where(r.room == room, r.device_id == device)
    return int((await conn.execute(query)).scalar_one_or_none() or 0)
