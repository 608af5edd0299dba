"""The journal inside the store's transactions: node leases with fencing tokens, and the
hash chain head advanced in the same transaction as the records it covers.

Every write path of :class:`~medrelay_server.store.sql.SqlStore` (sends, commits, room
creation, ``journal()``) ends with :func:`write_audit`, which hands the records to this
process's :class:`ChainWriter`. The writer locks its node's registry row (``FOR UPDATE`` on
PostgreSQL; SQLite holds the database write lock already), refuses the write with
:class:`NodeFenced` unless the row still carries this process's fencing token, links the
records after the head, inserts them and moves the head, all before the caller commits. A
send whose audit record cannot be chained is therefore never stored, let alone acknowledged.

Lock order: a write locks its room row(s) first and the node row last, and the node row is
never held while waiting for a room, so the extra lock cannot deadlock.

Leases: ``acquire`` (at ``open()``) takes a free or expired node id with a fencing token one
higher than the last, refuses one another live process holds (``NodeLeaseHeld``), and
re-takes its own. Each chained write and each ``renew`` extend the lease; ``release`` (at a
clean ``close()``) ends it so a restart need not wait. The token is what fences: a lease that
merely expired, with nobody taking the id over, still lets its holder write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clock import Clock
from ..journal.chain import GENESIS, ChainEntry, chain
from . import schema as t
from .base import AuditRecord, JournalReadOnly, NodeFenced, NodeLeaseHeld
from .engine import raw_errors

DEFAULT_LEASE_SECONDS = 60
DELIVERY_STREAM_SUFFIX = "/deliveries"


def delivery_stream(node: str) -> str:
    """The writer stream of ``node``'s delivery journal (``SqlStore.journal``): its own
    chain and registry row, so a flush of hundreds of delivery and receipt records never
    holds the row that every send batch of the node advances."""
    return node + DELIVERY_STREAM_SUFFIX


_RECORD_COLUMNS = {
    "user_id": "user",
    "device_id": "device",
    "room": "room",
    "seq_from": "seq_from",
    "seq_to": "seq_to",
    "mid": "mid",
    "target": "target",
    "source": "source",
    "detail": "detail",
    "ts": "ts",
    "ts_end": "ts_end",
    "role": "role",
    "institution": "institution",
    "address": "address",
    "patient_tag": "patient_tag",
    "action": "action",
    "outcome": "outcome",
}
_BYTES = {"mid", "patient_tag"}


def audit_values(rec: AuditRecord) -> dict[str, Any]:
    return {col: getattr(rec, attr) for col, attr in _RECORD_COLUMNS.items()}


def record_of(row: Any) -> AuditRecord:
    m = row._mapping
    values: dict[str, Any] = {}
    for col, attr in _RECORD_COLUMNS.items():
        v = m[col]
        values[attr] = bytes(v) if attr in _BYTES and v is not None else v
    return AuditRecord(**values)


def entry_of(row: Any) -> ChainEntry:
    """A chained row as stored (``node``/``idx`` NULL rows have no place: not for those)."""
    return ChainEntry(
        record=record_of(row),
        node=row.node,
        idx=row.idx,
        lease=row.lease,
        prev_hash=bytes(row.prev_hash or b""),
        hash=bytes(row.hash or b""),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class KnownHead:
    """Records chained after a remembered head: the entries to insert, and the parameters
    of the conditional head update (the first seven parameters of
    :func:`pg_known_head_ctes`)."""

    records: list[AuditRecord]
    entries: list[ChainEntry]
    condition: tuple[Any, ...]


class ChainWriter:
    """This process's writer stream. ``node`` None makes a read-only store (the audit CLI);
    ``enabled`` False writes unchained rows (the throughput bench's baseline only).

    ``instance_holder``: this node instance's persistent holder id, given only by a caller
    that holds the instance's exclusive claim (``nodeinstance.NodeInstance``), which
    vouches that any earlier process with that holder id is dead: a lease it left behind
    is taken over at once instead of refused until it expires. Without it the holder is
    random per process."""

    def __init__(
        self,
        node: str | None,
        *,
        clock: Clock,
        lease_seconds: int,
        enabled: bool = True,
        instance_holder: str | None = None,
    ) -> None:
        self.node = node
        self.holder = instance_holder or secrets.token_hex(8)
        self._instance = instance_holder is not None
        self.token: int | None = None
        self.enabled = enabled
        self._clock = clock
        self._lease_seconds = lease_seconds
        self.lease_seconds = lease_seconds
        self._deferred: dict[int, list[AuditRecord]] = {}
        self._head: tuple[int, bytes] | None = None
        """(idx, hash) this writer last chained to; only a hint, checked when used."""
        self._planned: tuple[int, bytes] | None = None
        """The tail of the newest known-head batch still in flight (group commit runs up to
        two at once on PostgreSQL): the next batch chains after it, and its conditional
        head update then waits in PostgreSQL for that batch's commit and matches."""

    async def acquire(self, conn: AsyncConnection) -> int:
        """Lease the node id (inside the caller's write transaction); returns the token."""
        if self.node is None or not self.enabled:
            return 0
        now = self._clock.now()
        row = await self._lock_row(conn)
        if row is None:
            try:
                async with conn.begin_nested():
                    await conn.execute(
                        sa.insert(t.journal_nodes).values(
                            node=self.node,
                            token=1,
                            holder=self.holder,
                            lease_until=now + self._lease_seconds,
                            registered_at=now,
                            head_idx=0,
                            head_hash=GENESIS,
                            base_idx=0,
                            base_hash=GENESIS,
                        )
                    )
            except sa_exc.IntegrityError:  # another process registered it first
                raise NodeLeaseHeld(self.node, now + self._lease_seconds) from None
            self.token = 1
        else:
            mine = row.holder == self.holder and row.token == self.token
            # a lease left by a dead process of this same node instance (see __init__)
            left_by_us = self._instance and row.holder == self.holder
            if not (mine or left_by_us) and row.holder is not None and row.lease_until > now:
                raise NodeLeaseHeld(self.node, row.lease_until)
            token = row.token if mine else row.token + 1
            await self._update(
                conn, token=token, holder=self.holder, lease_until=now + self._lease_seconds
            )
            self.token = token
        self._head = None
        await self._adopt_unchained(conn)
        return self.token

    async def renew(self, conn: AsyncConnection) -> None:
        """Extend the lease; ``NodeFenced`` if another process took the node id over."""
        if self.node is None or not self.enabled:
            return
        await self._fenced_row(conn)
        await self._update(conn, lease_until=self._clock.now() + self._lease_seconds)

    async def release(self, conn: AsyncConnection) -> None:
        if self.node is None or self.token is None:
            return
        n = t.journal_nodes.c
        await conn.execute(
            sa.update(t.journal_nodes)
            .where(n.node == self.node, n.token == self.token, n.holder == self.holder)
            .values(holder=None, lease_until=0)
        )
        self.token = None
        self._head = None

    @contextlib.asynccontextmanager
    async def deferred(self, conn: AsyncConnection, *, pg: Any = None) -> AsyncIterator[None]:
        """Collect what ``conn``'s writes append and chain it all at once at the end (one
        node-row lock, insert and head update per group-commit batch, in order). ``pg``: the
        transaction is asyncpg's own on that connection (``Database.batch_write``)."""
        key = id(conn)
        self._deferred[key] = []
        try:
            yield
            records = self._deferred[key]
        finally:
            del self._deferred[key]
        await self.append(conn, records, begun=True, pg=pg)

    async def append(
        self,
        conn: AsyncConnection,
        records: Sequence[AuditRecord],
        *,
        begun: bool = False,
        pg: Any = None,
    ) -> None:
        """Chain ``records`` after the node's head. ``begun``: the transaction has already
        run a statement (a group-commit batch, or a journal flush's receipts), so on
        PostgreSQL the records are chained after the head this writer last wrote or planned
        (a batch in flight) and stored with the head in one statement, which waits for the
        node row and advances it only if node, fencing token and that head match; if they
        do not (a write planned before this one missed or rolled back, or the id was taken
        over), the row is locked and read as usual. ``pg``: the transaction is
        asyncpg's own (``Database.batch_write``), so every statement goes to it and none
        through ``conn``."""
        if not records:
            return
        pending = self._deferred.get(id(conn))
        if pending is not None:
            pending.extend(records)
            return
        if not self.enabled:
            await conn.execute(sa.insert(t.audit), [audit_values(r) for r in records])
            return
        postgres = pg is not None or conn.dialect.name == "postgresql"
        base = self._planned or self._head
        if (begun or pg is not None) and base is not None and postgres:
            if await self._append_after_known_head(conn, list(records), *base, pg=pg):
                return
        row = await (self._fenced_row(conn) if pg is None else self._fenced_row_pg(pg))
        entries = chain(
            self.node or "", row.token, row.head_idx, bytes(row.head_hash), list(records)
        )
        self._head = (entries[-1].idx, entries[-1].hash)
        self._planned = None  # a batch planned before this will not match: plan anew
        lease = max(row.lease_until, self._clock.now() + self._lease_seconds)
        if postgres:  # the transaction has begun (the row lock): rows and head in one
            # statement, its head condition met by the locked row (a flush of the delivery
            # journal is hundreds of rows: one insert each held every send for 30-60 ms)
            if pg is None:
                pg = (await conn.get_raw_connection()).driver_connection
            condition = (
                self.node, row.token, row.head_idx, bytes(row.head_hash),
                entries[-1].idx, entries[-1].hash, lease,
            )  # fmt: skip
            async with raw_errors():
                stored = await pg.fetchval(
                    _PG_APPEND_KNOWN_HEAD, *condition, pg_audit_rows(entries)
                )
            if stored != 1:  # the row is locked by this transaction: it cannot have moved
                raise RuntimeError("journal head moved under its row lock")
            return
        await conn.execute(_INSERT_AUDIT, [_chained_values(e) for e in entries])
        head = {
            "b_node": self.node,
            "b_idx": entries[-1].idx,
            "b_hash": entries[-1].hash,
            "b_lease": lease,
        }
        await conn.execute(_ADVANCE_HEAD, head)

    def take_known_head(self, conn: AsyncConnection) -> KnownHead | None:
        """PostgreSQL batches: take the records deferred on ``conn`` and chain them after
        the head this writer last wrote, for the caller to store with its own statement
        (:func:`pg_known_head_ctes`), and then to report with
        :meth:`settle_known_head`. None (records left where they are) when there is no
        remembered head or nothing deferred."""
        pending = self._deferred.get(id(conn))
        base = self._planned or self._head
        if not pending or not self.enabled or self.token is None or base is None:
            return None
        records = list(pending)
        pending.clear()
        taken = self._plan_known_head(records, *base)
        self._planned = (taken.entries[-1].idx, taken.entries[-1].hash)
        return taken

    def settle_known_head(self, conn: AsyncConnection, taken: KnownHead, advanced: bool) -> None:
        """``advanced``: the conditional head update matched and the rows are in. If it did
        not match, the records go back to ``conn``'s deferred list, to be chained after the
        locked row when the batch's :meth:`deferred` block ends (and a batch planned after
        this one will not match either: the next plans from the head again)."""
        tail = (taken.entries[-1].idx, taken.entries[-1].hash)
        if advanced:
            self._head = tail
            if self._planned == tail:
                self._planned = None
            return
        self._head = self._planned = None
        self._deferred[id(conn)].extend(taken.records)

    def plan_one_trip(self, records: list[AuditRecord]) -> KnownHead | None:
        """A one-trip call (``medrelay_send_batch_or_state``): ``records`` chained after the head
        this writer last wrote (or after the batch in flight's planned tail), for the call
        to store if the head still matches; report the outcome with :meth:`one_trip_done`.
        None when there is no remembered head (the batch then runs the usual way)."""
        base = self._planned or self._head
        if not records or not self.enabled or self.token is None or base is None:
            return None
        taken = self._plan_known_head(records, *base)
        self._planned = (taken.entries[-1].idx, taken.entries[-1].hash)
        return taken

    def one_trip_done(self, taken: KnownHead, *, stored: bool, head_moved: bool) -> None:
        """``stored``: the call wrote the rows and moved the head. Otherwise the call wrote
        nothing; ``head_moved`` says the head it expected was not the stored one, so the
        next write plans from the locked row again."""
        tail = (taken.entries[-1].idx, taken.entries[-1].hash)
        if stored:
            self._head = tail
        elif head_moved:
            self._head = None
        if self._planned == tail:
            self._planned = None

    def abandon_known_head(self) -> None:
        """A known-head statement failed (its transaction will roll back): plan the next
        batch from the stored head, not from this one's tail."""
        self._head = self._planned = None

    def _plan_known_head(self, records: list[AuditRecord], idx: int, head: bytes) -> KnownHead:
        entries = chain(self.node or "", self.token or 0, idx, head, records)
        lease = self._clock.now() + self._lease_seconds
        condition = (self.node, self.token, idx, head, entries[-1].idx, entries[-1].hash, lease)
        return KnownHead(records, entries, condition)

    async def _append_after_known_head(
        self,
        conn: AsyncConnection,
        records: list[AuditRecord],
        idx: int,
        head: bytes,
        *,
        pg: Any = None,
    ) -> bool:
        if self.token is None:
            return False
        taken = self._plan_known_head(records, idx, head)
        tail = (taken.entries[-1].idx, taken.entries[-1].hash)
        # planned after the batch in flight, if any, and the next batch after this: a send
        # batch and a delivery journal flush in flight together then chain one after the
        # other instead of the later one missing its head and locking the row to read it
        self._planned = tail
        if pg is None:
            pg = (await conn.get_raw_connection()).driver_connection
        try:
            async with raw_errors():  # the head and the rows in one statement: the node row
                # is locked from there to the commit only (the hashes were computed before)
                stored = await pg.fetchval(
                    _PG_APPEND_KNOWN_HEAD, *taken.condition, pg_audit_rows(taken.entries)
                )
        finally:
            if self._planned == tail:
                self._planned = None
        if stored != 1:
            return False
        self._head = tail
        return True

    async def _fenced_row(self, conn: AsyncConnection) -> Any:
        if self.node is None:
            raise JournalReadOnly("this store was opened without a node id")
        return self._fenced(await self._lock_row(conn))

    async def _fenced_row_pg(self, pg: Any) -> Any:
        """:meth:`_fenced_row` on an asyncpg transaction (``Database.batch_write``)."""
        if self.node is None:
            raise JournalReadOnly("this store was opened without a node id")
        async with raw_errors():
            row = await pg.fetchrow(_PG_LOCK_NODE, self.node)
        if row is not None:
            row = _NodeRow(
                row["token"], row["head_idx"], bytes(row["head_hash"]), row["lease_until"]
            )
        return self._fenced(row)

    def _fenced(self, row: Any) -> Any:
        """The locked node row, if it still carries this writer's fencing token."""
        if row is None or self.token is None or row.token != self.token:
            raise NodeFenced(f"node id {self.node!r} is leased by another process")
        return row

    async def _lock_row(self, conn: AsyncConnection) -> Any:
        return (await conn.execute(_LOCK_NODE, {"b_node": self.node})).one_or_none()

    async def _update(self, conn: AsyncConnection, **values: Any) -> None:
        n = t.journal_nodes.c
        await conn.execute(sa.update(t.journal_nodes).where(n.node == self.node).values(**values))

    async def _adopt_unchained(self, conn: AsyncConnection) -> None:
        """Chain rows written before migration 0002 (or by the journal-off bench mode) onto
        this node's chain, oldest first, so that no row stays outside every chain."""
        a = t.audit.c
        rows = (await conn.execute(sa.select(t.audit).where(a.node.is_(None)).order_by(a.id))).all()
        if not rows:
            return
        head = await self._fenced_row(conn)
        records = [record_of(r) for r in rows]
        entries = chain(self.node or "", head.token, head.head_idx, bytes(head.head_hash), records)
        for row, entry in zip(rows, entries, strict=True):
            chained = _chained_values(entry)
            await conn.execute(
                sa.update(t.audit)
                .where(a.id == row.id)
                .values({k: chained[k] for k in ("node", "idx", "lease", "prev_hash", "hash")})
            )
        await self._update(conn, head_idx=entries[-1].idx, head_hash=entries[-1].hash)


# built once: every chained write runs these (bench.store_ops)
_n = t.journal_nodes.c
_LOCK_NODE = sa.select(t.journal_nodes).where(_n.node == sa.bindparam("b_node")).with_for_update()
_ADVANCE_HEAD = (
    sa.update(t.journal_nodes)
    .where(_n.node == sa.bindparam("b_node"))
    .values(
        head_idx=sa.bindparam("b_idx"),
        head_hash=sa.bindparam("b_hash"),
        lease_until=sa.bindparam("b_lease"),
    )
)
_INSERT_AUDIT = sa.insert(t.audit)
# PostgreSQL: the audit columns, in the order of ``medrelay_audit_row`` (migration 0010)
_PG_AUDIT_COLUMNS = (
    "ts", "action", "outcome", "user_id", "device_id", "room", "seq_from", "seq_to", "mid",
    "target", "source", "detail", "node", "idx", "lease", "prev_hash", "hash", "ts_end",
    "role", "institution", "address", "patient_tag",
)  # fmt: skip


def pg_known_head_ctes(first: int) -> str:
    """Two CTEs for a statement that stores a :class:`KnownHead` along with other writes.
    ``h`` advances the head if node, fencing token and head still match; ``a`` inserts the
    rows, in order, only if ``h`` matched. Parameters from ``$first``: node, token, head
    idx, head hash, new idx, new hash, lease (``KnownHead.condition``), then the rows as one
    ``medrelay_audit_row[]`` (:func:`pg_audit_rows`; one array per column cost asyncpg a
    check per element, 2-3 ms of the event loop per 100 rows). The caller selects
    ``count(*) FROM h WHERE ok``: 1 if stored, 0 if not (and nothing was inserted; the
    node row stays locked by the transaction, as a locked read of it would)."""
    p = [f"${first + i}" for i in range(7)]
    columns = ", ".join(_PG_AUDIT_COLUMNS)
    rows = f"${first + 7}::medrelay_audit_row[]"
    # The row is matched by node alone, so the statement waits for a write of this node in
    # flight (its own send batch or journal flush, planned before it) and then compares
    # the head that write committed. With the head in the WHERE clause, READ COMMITTED
    # compared the head before that write, did not wait, and missed.
    match = f"token = {p[1]} AND head_idx = {p[2]} AND head_hash = {p[3]}"
    # built from this module's constants and parameter numbers only, never from input
    return (
        f"h AS (UPDATE journal_nodes SET"  # noqa: S608
        f" head_idx = CASE WHEN {match} THEN {p[4]} ELSE head_idx END,"
        f" head_hash = CASE WHEN {match} THEN {p[5]} ELSE head_hash END,"
        f" lease_until = CASE WHEN {match} THEN GREATEST(lease_until, {p[6]})"
        " ELSE lease_until END"
        f" WHERE node = {p[0]}"
        f" RETURNING token = {p[1]} AND head_idx = {p[4]} AND head_hash = {p[5]} AS ok),"
        f" a AS (INSERT INTO audit ({columns}) SELECT {columns}"
        f" FROM unnest({rows}) WITH ORDINALITY AS r({columns}, ord)"
        " WHERE EXISTS (SELECT 1 FROM h WHERE ok) ORDER BY ord)"
    )


def pg_audit_rows(entries: Sequence[ChainEntry]) -> list[tuple[Any, ...]]:
    """The entries as ``medrelay_audit_row`` values (for ``unnest``)."""
    return [pg_audit_row(e) for e in entries]


_PG_APPEND_KNOWN_HEAD = "WITH " + pg_known_head_ctes(1) + " SELECT count(*) FROM h WHERE ok"  # noqa: S608
_PG_LOCK_NODE = (
    "SELECT token, head_idx, head_hash, lease_until FROM journal_nodes WHERE node = $1 FOR UPDATE"
)


@dataclasses.dataclass(frozen=True, slots=True)
class _NodeRow:
    token: int
    head_idx: int
    head_hash: bytes
    lease_until: int


def pg_audit_row(e: ChainEntry) -> tuple[Any, ...]:
    """One chained row in :data:`_PG_AUDIT_COLUMNS` order, straight from the attributes (a
    dict per column here was 9% of a loaded server's samples)."""
    r = e.record
    return (
        r.ts, r.action, r.outcome, r.user, r.device, r.room, r.seq_from, r.seq_to, r.mid,
        r.target, r.source, r.detail, e.node, e.idx, e.lease, e.prev_hash, e.hash, r.ts_end,
        r.role, r.institution, r.address, r.patient_tag,
    )  # fmt: skip


def _chained_values(entry: ChainEntry) -> dict[str, Any]:
    values = audit_values(entry.record)
    values.update(
        node=entry.node,
        idx=entry.idx,
        lease=entry.lease,
        prev_hash=entry.prev_hash,
        hash=entry.hash,
    )
    return values


async def write_audit(
    conn: AsyncConnection,
    writer: ChainWriter,
    records: Sequence[AuditRecord],
    *,
    now: int | None = None,
    room: str | None = None,
    seqs: tuple[int, int] | None = None,
    begun: bool = False,
    role: str | None = None,
) -> None:
    """Append journal records through ``writer``. Within a write that assigned seqs, records
    that name no seq get the assigned range (callers cannot know it in advance), records that
    name no room get the room, records with ``ts == 0`` get ``now`` and records without a role
    get ``role`` (the actor's, when only the transaction knows it). ``begun``: a statement
    has already run in this transaction (see :meth:`ChainWriter.append`)."""
    out = fill_records(records, now=now, room=room, seqs=seqs, role=role)
    await writer.append(conn, out, begun=begun)


def fill_records(
    records: Sequence[AuditRecord],
    *,
    now: int | None = None,
    room: str | None = None,
    seqs: tuple[int, int] | None = None,
    role: str | None = None,
) -> list[AuditRecord]:
    """The records as :func:`write_audit` stores them (its defaults filled in)."""
    out = []
    for rec in records:
        changes: dict[str, Any] = {}
        if room is not None and rec.room is None:
            changes["room"] = room
        if seqs is not None and rec.seq_from is None and rec.seq_to is None:
            changes["seq_from"], changes["seq_to"] = seqs
        if now is not None and rec.ts == 0:
            changes["ts"] = now
        if role is not None and rec.role is None:
            changes["role"] = role
        out.append(dataclasses.replace(rec, **changes) if changes else rec)
    return out


async def read_audit(conn: AsyncConnection, room: str | None) -> list[AuditRecord]:
    a = t.audit.c
    query = sa.select(t.audit).order_by(a.id)
    if room is not None:
        query = query.where(a.room == room)
    return [record_of(r) for r in await conn.execute(query)]
