"""``SqlStore``: the :class:`~medrelay_server.store.base.Store` over SQLAlchemy Core, on
SQLite (aiosqlite) or PostgreSQL (asyncpg).

Usage::

    store = SqlStore("sqlite+aiosqlite:///var/lib/medrelay/medrelay.db", node_id="node-1")
    store = SqlStore("postgresql+asyncpg://medrelay@db/medrelay", schema="medrelay",
                     node_id="gw-2")
    await store.open()      # runs the Alembic migrations, leases the node id, then serves
    ...
    await store.close()     # releases the lease

Each method is one transaction (see :mod:`.engine` for how each dialect locks); the queries
live in :mod:`.rooms`, :mod:`.messages`, :mod:`.devices` and :mod:`.blobs`, the journal's
chain and node lease in :mod:`.audit`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from sqlalchemy import exc as sa_exc

from ..clock import Clock, SystemClock
from ..settings import DEFAULT_POOL_SIZE
from . import blobs, devices, enrolment, messages, rooms
from . import schema as t
from .audit import (
    DEFAULT_LEASE_SECONDS,
    ChainWriter,
    delivery_stream,
    read_audit,
    write_audit,
)
from .base import (
    AppendResult,
    ApprovalRecord,
    AuditRecord,
    Commit,
    DeviceRecord,
    RoomState,
    StoredEvent,
    StoreUnavailable,
)
from .engine import Database
from .group import BatchObserver, GroupCommitter
from .onetrip import OneTrip
from .rows import EVENTS_CHANNEL, current_role, get_room

log = logging.getLogger(__name__)

JOURNAL_SLICE = 100
"""Records per statement of a delivery journal flush (``SqlStore.journal``)."""


_GENERATION = sa.select(t.meta.c.value).where(t.meta.c.key == "generation")
_GENERATION_AND_TIMELINE = sa.select(
    t.meta.c.value,
    sa.select(sa.column("timeline_id"))
    .select_from(sa.func.pg_control_checkpoint())
    .scalar_subquery(),
).where(t.meta.c.key == "generation")


class SqlStore:
    """The durable store. ``url`` is a SQLAlchemy URL (``sqlite://`` and ``postgresql://``
    select the async drivers); ``schema`` (PostgreSQL only) puts every table into that
    schema, created on ``open()`` if missing.

    Where ``base.py`` leaves room, this implementation decides:

    * Audit records passed to a write that assigns seqs get that seq range when they name
      none, the room when they name none, and ``now`` when their ``ts`` is 0.
    * ``create_room``: ``device_list_version`` starts at 0, the epoch at 1.
    * ``commit``: the sender may also be a user this very commit adds (self-add under a
      standing authorisation); a manifest needs a role that may commit epochs; a history
      grant needs a role that may read history (``FORBIDDEN``); removing or re-roling a
      non-member is ``NOT_FOUND``; a malformed commit (entry without head, nothing to do,
      wraps without manifest, epoch not moving forward) is ``INVALID_FIELD``; a commit
      without a manifest never clears a pending rekey.
    * ``append_message``: only kinds ``message`` and ``summon`` (``INVALID_FIELD``); the
      membership check comes before the idempotency check, which comes before the epoch
      and pending checks (a retry of a stored send is acknowledged after a rekey).
    * ``put_chunk``: the uploader must be a current member and the blob's first uploader
      (``FORBIDDEN``); an unknown room is ``NOT_FOUND``.
    * ``put_device``: an id owned by another user or with another signing key is
      ``ALREADY_EXISTS``; revocation is permanent and, like a new device, bumps
      ``device_list_version``.


    The journal (``docs/audit.md``): ``node_id`` names this process's writer stream, and
    ``<node_id>/deliveries`` the stream of its delivery journal (``journal()``); every
    audit record is chained onto one of them inside the transaction that writes it, under
    a lease taken at ``open()`` (``NodeLeaseHeld`` if another live process holds the id)
    and fenced by its token (``NodeFenced`` once another process took the id over).
    ``node_id=None`` opens a read-only store for the audit CLI (journal writes raise
    ``JournalReadOnly``).
    ``journal=False`` writes unchained records: **for the throughput bench only**, never in
    a server. ``clock`` times the lease (Unix seconds). ``group_commit`` (default on) runs
    concurrent ``append_message`` calls in shared transactions (:mod:`.group`), one batch at
    a time unless ``batches_in_flight`` says more (PostgreSQL only; SQLite keeps one).
    ``one_trip_sends`` (default on, PostgreSQL with group commit): a batch planned from what
    this node remembers is stored in one call when that still holds (:mod:`.onetrip`).
    ``instance_holder`` (from ``nodeinstance.NodeInstance``, whose claim the caller holds)
    lets a restart after a crash take over the lease its dead predecessor left.
    """

    def __init__(
        self,
        url: str,
        *,
        schema: str | None = None,
        node_id: str | None = "node-1",
        clock: Clock | None = None,
        lease_seconds: int = DEFAULT_LEASE_SECONDS,
        journal: bool = True,
        group_commit: bool = True,
        instance_holder: str | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
        batches_in_flight: int | None = None,
        one_trip_sends: bool = True,
    ) -> None:
        self._db = Database(url, schema=schema, pool_size=pool_size)
        clock = clock or SystemClock()
        self.writer = ChainWriter(
            node_id,
            clock=clock,
            lease_seconds=lease_seconds,
            enabled=journal,
            instance_holder=instance_holder,
        )
        self.delivery_writer = ChainWriter(
            None if node_id is None else delivery_stream(node_id),
            clock=clock,
            lease_seconds=lease_seconds,
            enabled=journal,
            instance_holder=instance_holder,
        )
        """The stream ``journal()`` writes: the delivery journal's flushes (deliveries,
        receipts, sign-ins) chain apart from the node's sends and commits, so a flush
        never holds a send batch behind the node row."""
        one_trip = None
        if one_trip_sends and journal and not self._db.is_sqlite:
            one_trip = OneTrip(self._db, self.writer)
        self._one_trip = one_trip
        self._timeline_readable = True
        """PostgreSQL: False once reading the timeline was refused (a role without the
        privilege): the generation is then the id alone, read in one statement."""
        self._group = (
            GroupCommitter(self._db, self.writer, depth=batches_in_flight, one_trip=one_trip)
            if group_commit
            else None
        )

    def __repr__(self) -> str:
        dialect = "sqlite" if self._db.is_sqlite else "postgresql"
        return f"SqlStore({dialect}, schema={self._db.schema!r}, node={self.node_id!r})"

    @property
    def node_id(self) -> str | None:
        return self.writer.node

    @property
    def database(self) -> Database:
        """For the journal package (anchors, verification, retention) and tests."""
        return self._db

    async def open(self) -> None:
        await self._db.migrate()
        async with self._db.write() as conn:
            await self.writer.acquire(conn)
            await self.delivery_writer.acquire(conn)

    async def generation(self) -> str:
        """The stream generation: the database's random id, plus PostgreSQL's timeline when
        this role may read it (a promoted standby has a new timeline). It changes when the
        database is restored or failed over, which is when seqs may have been reused."""
        if not self._db.is_sqlite and self._timeline_readable:
            try:  # every handshake asks: one statement, not two
                async with self._db.read() as conn:
                    row = (await conn.execute(_GENERATION_AND_TIMELINE)).one()
                return f"{row[0]}.{row[1]}"
            except StoreUnavailable:
                raise
            except Exception:  # no privilege to read the control file: the id alone
                self._timeline_readable = False
        async with self._db.read() as conn:
            return str((await conn.execute(_GENERATION)).scalar_one())

    async def new_generation(self) -> str:
        """Give the database a new stream generation (after restoring a backup)."""
        value = secrets.token_hex(8)
        async with self._db.write() as conn:
            await conn.execute(
                sa.update(t.meta).where(t.meta.c.key == "generation").values(value=value)
            )
        return value

    def observe_send_batches(self, observer: BatchObserver) -> None:
        """Report every committed group-commit batch's :class:`BatchTimes` to ``observer``
        (the app's metrics); nothing without group commit."""
        if self._group is not None:
            self._group.observer = observer

    def bound_send_batches(self, fanout: Callable[[str], int]) -> None:
        """Bound each group-commit batch by its rooms' local deliveries as well as by its
        sends (``group.MAX_FANOUT``); ``fanout(room)`` is how many devices on this node
        an event of ``room`` goes to. Nothing without group commit."""
        if self._group is not None:
            self._group.fanout = fanout

    async def listen(self, callback: Callable[[str, int], None], stop: asyncio.Event) -> None:
        """Call ``callback(room, seq)`` for every event committed by any node (PostgreSQL
        LISTEN/NOTIFY) until ``stop``; a no-op on SQLite."""

        def parse(payload: str) -> None:
            room, _, seq = payload.rpartition("\x1f")
            if room and seq.isdigit():
                if self._group is not None:
                    self._group.heard(room, int(seq))
                callback(room, int(seq))

        await self._db.listen(EVENTS_CHANNEL, parse, stop)

    async def close(self) -> None:
        if self._group is not None:
            await self._group.close()
        if self._one_trip is not None:
            await self._one_trip.close()
        try:
            async with self._db.write() as conn:
                await self.writer.release(conn)
                await self.delivery_writer.release(conn)
        except Exception:  # noqa: S110 - the lease then simply expires
            pass
        await self._db.dispose()

    async def renew_lease(self) -> None:
        """Extend this node's lease (call at a third of ``lease_seconds`` when idle; chained
        writes extend it too). Raises ``NodeFenced`` once another process holds the id."""
        async with self._db.write() as conn:
            await self.writer.renew(conn)
            await self.delivery_writer.renew(conn)

    async def ping(self) -> None:
        async with self._db.read() as conn:
            await conn.execute(sa.select(1))

    # identities and devices -------------------------------------------------------------
    async def put_identity(
        self, user: str, identity_key: bytes, now: int, attestation: bytes | None = None
    ) -> None:
        async with self._db.write() as conn:
            await devices.put_identity(conn, user, identity_key, now, attestation)

    async def get_identity(self, user: str) -> bytes | None:
        async with self._db.read() as conn:
            return await devices.get_identity(conn, user)

    async def get_attestation(self, user: str) -> bytes | None:
        async with self._db.read() as conn:
            return await devices.get_attestation(conn, user)

    # device approvals and key backups ---------------------------------------------------
    async def request_approval(
        self,
        *,
        request_id: str,
        user: str,
        device_id: str,
        device_key: bytes,
        bundle: bytes,
        now: int,
        ttl: int,
        max_pending: int,
    ) -> ApprovalRecord:
        async with self._db.write() as conn:
            return await enrolment.request_approval(
                conn,
                request_id=request_id,
                user=user,
                device_id=device_id,
                device_key=device_key,
                bundle=bundle,
                now=now,
                ttl=ttl,
                max_pending=max_pending,
            )

    async def pending_requests(self, user: str, now: int) -> list[ApprovalRecord]:
        async with self._db.read() as conn:
            return await enrolment.pending_requests(conn, user, now)

    async def get_request(self, request_id: str) -> ApprovalRecord | None:
        async with self._db.read() as conn:
            return await enrolment.get_request(conn, request_id)

    async def approve_request(
        self,
        *,
        user: str,
        request_id: str,
        certificate: bytes,
        backup_share: bytes,
        approver: str,
        now: int,
    ) -> ApprovalRecord:
        async with self._db.write() as conn:
            return await enrolment.approve(
                conn,
                user=user,
                request_id=request_id,
                certificate=certificate,
                backup_share=backup_share,
                approver=approver,
                now=now,
            )

    async def put_backup(
        self, user: str, *, version: int, blob: bytes, device: str, now: int
    ) -> None:
        async with self._db.write() as conn:
            await enrolment.put_backup(
                conn, user=user, version=version, blob=blob, device=device, now=now
            )

    async def get_backup(self, user: str) -> tuple[int, bytes] | None:
        async with self._db.read() as conn:
            return await enrolment.get_backup(conn, user)

    async def put_device(self, device: DeviceRecord) -> None:
        async with self._db.write() as conn:
            await devices.put_device(conn, device)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        async with self._db.read() as conn:
            return await devices.get_device(conn, device_id)

    async def devices_for(self, users: Sequence[str]) -> list[DeviceRecord]:
        async with self._db.read() as conn:
            return await devices.devices_for(conn, users)

    async def device_lists(
        self, users: Sequence[str]
    ) -> tuple[list[DeviceRecord], dict[str, tuple[bytes, bytes | None]]]:
        async with self._db.read() as conn:
            return await devices.devices_for(conn, users), await devices.identities_for(conn, users)

    async def touch_device(self, device_id: str, now: int) -> None:
        async with self._db.write() as conn:
            await devices.touch_device(conn, device_id, now)

    async def unseen_devices(self, before: int, *, limit: int) -> list[DeviceRecord]:
        async with self._db.read() as conn:
            return await devices.unseen_devices(conn, before, limit=limit)

    # rooms and membership ---------------------------------------------------------------
    async def create_room(
        self,
        room: str,
        *,
        genesis: bytes,
        head: bytes,
        owner: str,
        sender_device: str,
        manifest: bytes,
        wraps: Mapping[str, bytes],
        now: int,
        audit: Sequence[AuditRecord],
    ) -> list[StoredEvent]:
        try:
            async with self._db.write() as conn:
                return await rooms.create_room(
                    conn,
                    self.writer,
                    room,
                    genesis=genesis,
                    head=head,
                    owner=owner,
                    sender_device=sender_device,
                    manifest=manifest,
                    wraps=wraps,
                    now=now,
                    audit=audit,
                )
        except sa_exc.IntegrityError as exc:  # lost a race with a concurrent create
            raise RequestError(ErrorCode.ALREADY_EXISTS, "room exists") from exc

    async def room_state(self, room: str) -> RoomState | None:
        async with self._db.read() as conn:
            return await get_room(conn, room)

    async def roster_entries(self, room: str) -> list[bytes]:
        async with self._db.read() as conn:
            return await rooms.roster_entries(conn, room)

    async def member_role(self, room: str, user: str) -> str | None:
        async with self._db.read() as conn:
            return await current_role(conn, room, user)

    async def members(self, room: str) -> dict[str, str]:
        async with self._db.read() as conn:
            return await rooms.members(conn, room)

    async def rooms_for_user(self, user: str) -> list[tuple[RoomState, str]]:
        async with self._db.read() as conn:
            return await rooms.rooms_for_user(conn, user)

    async def last_seqs(self, room_ids: Sequence[str]) -> dict[str, int]:
        async with self._db.read() as conn:
            return await rooms.last_seqs(conn, room_ids)

    async def current_rooms(self, users: Sequence[str]) -> dict[str, set[str]]:
        async with self._db.read() as conn:
            return await rooms.current_rooms(conn, users)

    async def commit(
        self, commit: Commit, *, now: int, audit: Sequence[AuditRecord]
    ) -> list[StoredEvent]:
        async with self._db.write() as conn:
            return await rooms.commit(conn, self.writer, commit, now=now, audit=audit)

    async def append_message(
        self,
        room: str,
        *,
        user: str,
        device: str,
        mid: bytes,
        envelope: bytes,
        kind: str,
        epoch: int,
        allow_pending: bool,
        now: int,
        audit: Sequence[AuditRecord],
    ) -> AppendResult:
        kw = {
            "room": room,
            "user": user,
            "device": device,
            "mid": mid,
            "envelope": envelope,
            "kind": kind,
            "epoch": epoch,
            "allow_pending": allow_pending,
            "now": now,
            "audit": audit,
        }
        if self._group is not None:
            return await self._group.append(**kw)
        async with self._db.batch_write() as (conn, pg):
            return await messages.append_message(conn, self.writer, pg=pg, **kw)  # type: ignore[arg-type]

    async def events_after(
        self, room: str, after_seq: int, *, user: str, device: str, limit: int
    ) -> list[StoredEvent]:
        async with self._db.read() as conn:
            return await messages.events_after(
                conn, room, after_seq, user=user, device=device, limit=limit
            )

    async def events_before(
        self, room: str, before_seq: int, *, user: str, device: str, limit: int
    ) -> list[StoredEvent]:
        async with self._db.read() as conn:
            return await messages.events_before(
                conn, room, before_seq, user=user, device=device, limit=limit
            )

    async def room_events(self, room: str, after_seq: int, *, limit: int) -> list[StoredEvent]:
        async with self._db.read() as conn:
            return await messages.room_events(conn, room, after_seq, limit=limit)

    async def visible(self, room: str, seq: int, user: str) -> bool:
        async with self._db.read() as conn:
            return await messages.visible(conn, room, seq, user)

    async def record_receipt(self, room: str, device: str, seq: int, now: int) -> int:
        async with self._db.write() as conn:
            return await messages.record_receipt(conn, room, device, seq, now)

    async def receipt_of(self, room: str, device: str) -> int:
        async with self._db.read() as conn:
            return await messages.receipt_of(conn, room, device)

    # attachments ------------------------------------------------------------------------
    async def put_chunk(
        self,
        room: str,
        blob: bytes,
        index: int,
        data: bytes,
        final: bool,
        *,
        user: str,
        now: int,
        max_blob_bytes: int,
        max_room_bytes: int,
    ) -> None:
        async with self._db.write() as conn:
            await blobs.put_chunk(
                conn,
                room,
                blob,
                index,
                data,
                final,
                user=user,
                now=now,
                max_blob_bytes=max_blob_bytes,
                max_room_bytes=max_room_bytes,
            )

    async def get_chunk(self, blob: bytes, index: int) -> tuple[str, bytes, bool] | None:
        async with self._db.read() as conn:
            return await blobs.get_chunk(conn, blob, index)

    async def blob_status(self, blob: bytes) -> tuple[str, int, bool] | None:
        async with self._db.read() as conn:
            return await blobs.blob_status(conn, blob)

    async def delete_room_blobs_before(self, room: str, ts: int) -> int:
        async with self._db.write() as conn:
            return await blobs.delete_room_blobs_before(conn, room, ts)

    # journal ----------------------------------------------------------------------------
    async def journal(
        self,
        records: Sequence[AuditRecord],
        *,
        receipts: Sequence[tuple[str, str, int, int]] = (),
        seen: Sequence[tuple[str, int]] = (),
    ) -> None:
        async with self._db.write() as conn:
            await messages.record_receipts(conn, receipts)
            await devices.touch_devices_seen(conn, seen)
            # the delivery stream's own row, never the one send batches advance; once a
            # statement has begun the transaction, each slice is chained after the writer's
            # remembered head in one statement (``ChainWriter.append``). Slices, because
            # hashing and encoding a statement's records runs on the event loop: a flush of
            # 600 records in one stopped it for 9-10 ms (docs/performance.md, "Ninth round")
            begun = bool(receipts or seen)
            for start in range(0, len(records), JOURNAL_SLICE):
                chunk = records[start : start + JOURNAL_SLICE]
                await write_audit(conn, self.delivery_writer, chunk, begun=begun or start > 0)

    async def audit_records(self, *, room: str | None = None) -> list[AuditRecord]:
        async with self._db.read() as conn:
            return await read_audit(conn, room)


def lease_job(store: SqlStore) -> Callable[[asyncio.Event], Coroutine[Any, Any, None]]:
    """Renew the node's journal lease at a third of its length until stopped (nodes that do
    not anchor still must keep their lease)."""

    async def run(stop: asyncio.Event) -> None:
        interval = max(1.0, store.writer.lease_seconds / 3)
        while not stop.is_set():
            try:
                await store.renew_lease()
            except Exception:
                log.exception("could not renew the journal lease")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)

    return run
