"""Local delivery: each node feeds its connected member devices every room event in seq order.

Per room with local members online there is one :class:`RoomHub`. It processes the room's
events strictly in seq order (``processed``), whether they arrive from the broker or are
fetched from the store to fill a gap, and keeps the room's membership as of ``processed``:
a removal at seq L takes effect on this node before it looks at L + 1, so a removed user's
devices never get an event after L (I2), on every node, whatever the broker does.

Per connection and room there is a cursor (the last seq queued to that device). A live event
is queued directly when it is the cursor's successor; anything else (a resume, a gap, a
rekey that carries a per-device wrap) is served by a *catch-up* that reads the store, which
filters by the user's membership intervals. Frames are encoded once per event and the same
bytes go to every recipient.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any

from medrelay_protocol import codec
from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.codes import CloseCode
from medrelay_protocol.crypto import SIGNATURE_SIZE
from medrelay_protocol.errors import FrameError
from medrelay_protocol.frames import Deliver

from .fanout.base import Broker
from .gateway.connection import Connection
from .store.base import Store, StoredEvent

log = logging.getLogger(__name__)

ROOM_TOPIC = "room:"
USER_TOPIC = "user:"
RECEIVE_KINDS_FOR_DEVICE_ROLE = frozenset({"roster", "rekey"})
NOTIFY_GRACE_SECONDS = 0.1
"""How long a database notification waits for the broker to deliver the same event."""
REORDER_GRACE_SECONDS = 0.05
"""How long an event that arrived on the broker before an earlier one waits for it there,
before the gap is read from the store."""
EARLY_EVENTS = 64
EARLY_BYTES = 1024 * 1024
"""Per room, at most this many events (and frame bytes) wait for an earlier one; beyond
that the gap is read from the store at once."""
EARLY_BYTES_ALL = 32 * 1024 * 1024
"""The same bound over all rooms of the node."""


def event_frame(ev: StoredEvent) -> bytes:
    return codec.encode(
        Deliver(
            room=ev.room,
            seq=ev.seq,
            kind=ev.kind,
            sender=ev.sender_device,
            user=ev.sender_user,
            ts=ev.ts,
            payload=ev.payload,
            wrap=ev.wrap,
        )
    )


def broker_message(ev: StoredEvent) -> bytes:
    """What one node tells the others: the seq, kind and the ready-to-send frame bytes."""
    return pack_body([ev.room, ev.seq, ev.kind, event_frame(ev), roster_effects(ev)])


@dataclass(frozen=True, slots=True)
class Effects:
    added: dict[str, str] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    roles: dict[str, str] = field(default_factory=dict)
    revoked: tuple[str, ...] = ()
    """Device ids revoked by this event: cut off here, on every node, like a removal."""


def roster_effects(ev: StoredEvent) -> list[object]:
    eff = parse_effects(ev)
    return [eff.added, list(eff.removed), eff.roles, list(eff.revoked)]


def parse_effects(ev: StoredEvent) -> Effects:
    """Membership effect of a stored (already verified) roster event; empty for others."""
    if ev.kind != "roster":
        return Effects()
    try:
        body = unpack_body(ev.payload[:-SIGNATURE_SIZE])
        action, params, signer = body[4], body[5], body[6]
    except (FrameError, IndexError, TypeError):
        log.error("unparseable stored roster entry in room %s seq %d", ev.room, ev.seq)
        return Effects()
    if action == "genesis":
        return Effects(added={str(params["owner"]): "owner"})
    if action == "add":
        return Effects(added={str(params["user"]): str(params["role"])})
    if action == "remove":
        return Effects(removed=(str(params["user"]),))
    if action == "leave":
        return Effects(removed=(str(signer.get("user")),))
    if action == "role":
        return Effects(roles={str(params["user"]): str(params["role"])})
    if action == "revoke_device":
        return Effects(revoked=(str(params["device"]),))
    return Effects()


class Registry:
    """The connections of this node, by user (and counted by device)."""

    def __init__(self) -> None:
        self.by_user: dict[str, set[Connection]] = {}
        self._per_device: dict[str, int] = {}

    def add(self, conn: Connection) -> None:
        conns = self.by_user.setdefault(conn.user, set())
        if conn not in conns:
            conns.add(conn)
            self._per_device[conn.device] = self._per_device.get(conn.device, 0) + 1

    def remove(self, conn: Connection) -> None:
        conns = self.by_user.get(conn.user)
        if conns is not None and conn in conns:
            conns.discard(conn)
            left = self._per_device[conn.device] - 1
            if left:
                self._per_device[conn.device] = left
            else:
                del self._per_device[conn.device]
            if not conns:
                del self.by_user[conn.user]

    def of_user(self, user: str) -> Iterable[Connection]:
        return tuple(self.by_user.get(user, ()))

    def device_count(self, device: str) -> int:
        return self._per_device.get(device, 0)

    def all(self) -> Iterable[Connection]:
        return tuple(c for conns in self.by_user.values() for c in conns)


class RoomHub:
    def __init__(self, room: str, processed: int, members: dict[str, str]) -> None:
        self.room = room
        self.processed = processed
        self.members = members
        self.conns: set[Connection] = set()
        self.lock = asyncio.Lock()
        self.early: dict[int, tuple[str, bytes, Effects]] = {}
        """Events that arrived on the broker before an earlier one, by seq: where two
        nodes commit in one room, each publishes after its own commit, so the later seq
        can arrive first. They wait up to ``reorder_grace`` for the earlier one."""
        self.early_bytes = 0
        self.reorder: asyncio.TimerHandle | None = None


def _each_written(conns: list[Connection], room: str, seq: int) -> None:
    """Report direct writes one connection at a time (a ``Delivery`` without a journal
    callback of its own)."""
    for conn in conns:
        if conn.on_written is not None:
            conn.on_written(room, seq)


class Delivery:
    def __init__(
        self,
        *,
        store: Store,
        broker: Broker,
        registry: Registry,
        replay_batch: int,
        on_delivered: Callable[[int], None] | None = None,
        on_gap_read: Callable[[str], None] | None = None,
        on_written: Callable[[list[Connection], str, int], None] | None = None,
    ) -> None:
        self.store = store
        self.broker = broker
        self.registry = registry
        self.replay_batch = replay_batch
        self.hubs: dict[str, RoomHub] = {}
        self.generation: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_delivered = on_delivered
        self._on_gap_read = on_gap_read
        """Called with ``broker``, ``notify``, ``reconnect`` or ``poll`` for each store read
        that fills a room's gap, by what showed the gap (the app's metrics)."""
        self._on_written = on_written if on_written is not None else _each_written
        """Called with the connections an event's frame was written to at once, the room
        and the seq (the delivery journal, ``gateway.context.journal_fanout``); frames that
        wait in a connection's queue are reported by its own ``on_written`` when written.
        Without it, each connection's own ``on_written`` reports its direct writes too."""
        self._notified: dict[str, list[int]] = {}
        """Per room with a wake scheduled: [the seq that wake checks, the newest notified
        since it was scheduled (checked by the next wake)]."""
        self.notify_grace = NOTIFY_GRACE_SECONDS
        self.reorder_grace = REORDER_GRACE_SECONDS
        self.early_bytes_limit = EARLY_BYTES_ALL
        self.early_bytes = 0
        """Frame bytes waiting for an earlier event, over all rooms."""

    # subscriptions ---------------------------------------------------------------------
    def local_fanout(self, room: str) -> int:
        """How many connections of this node an event of ``room`` goes to now."""
        hub = self.hubs.get(room)
        return len(hub.conns) if hub is not None else 0

    async def attach_user(self, conn: Connection) -> None:
        if len(tuple(self.registry.of_user(conn.user))) == 1:
            await self.broker.subscribe(USER_TOPIC + conn.user, self._on_user_notice)

    async def detach(self, conn: Connection) -> None:
        for room in list(conn.cursors):
            await self.unsubscribe(conn, room)
        if not tuple(self.registry.of_user(conn.user)):
            await self.broker.unsubscribe(USER_TOPIC + conn.user, self._on_user_notice)

    async def subscribe(self, conn: Connection, room: str, after_seq: int) -> None:
        """Start feeding ``room`` to ``conn`` from ``after_seq``; returns once caught up."""
        hub = await self._hub(room)
        hub.conns.add(conn)
        conn.cursors.setdefault(room, after_seq)
        await self._catch_up(conn, hub)

    async def unsubscribe(self, conn: Connection, room: str) -> None:
        conn.cursors.pop(room, None)
        hub = self.hubs.get(room)
        if hub is None:
            return
        hub.conns.discard(conn)
        if not hub.conns:
            del self.hubs[room]
            self._forget_early(hub)
            await self.broker.unsubscribe(ROOM_TOPIC + room, self._on_room_message)

    async def _hub(self, room: str) -> RoomHub:
        hub = self.hubs.get(room)
        if hub is not None:
            return hub
        state = await self.store.room_state(room)  # last_seq first, then members (see docs)
        members = await self.store.members(room)
        hub = self.hubs.get(room)
        if hub is None:
            hub = RoomHub(room, state.last_seq if state else 0, members)
            self.hubs[room] = hub
            await self.broker.subscribe(ROOM_TOPIC + room, self._on_room_message)
        return hub

    # events ----------------------------------------------------------------------------
    async def publish(
        self, events: Iterable[StoredEvent], notify_users: Iterable[str] = ()
    ) -> None:
        """After commit: tell every node (this one included) about the new events."""
        for ev in events:
            await self.broker.publish(ROOM_TOPIC + ev.room, broker_message(ev))
            for user in parse_effects(ev).added:
                await self.broker.publish(USER_TOPIC + user, pack_body([ev.room, ev.seq]))
        for user in notify_users:
            await self.broker.publish(USER_TOPIC + user, pack_body(["", 0]))

    async def _on_user_notice(self, topic: str, payload: bytes) -> None:
        user = topic[len(USER_TOPIC) :]
        try:
            room, _seq = unpack_body(payload)
        except (FrameError, ValueError, TypeError):
            return
        if not isinstance(room, str) or not room:
            return
        for conn in self.registry.of_user(user):
            # an unregistered device (say, a stolen token with the thief's own key) gets nothing
            if room not in conn.cursors and not conn.closed and conn.registered:
                self._spawn(self.subscribe(conn, room, 0))

    async def _on_room_message(self, topic: str, payload: bytes) -> None:
        try:
            room, seq, kind, frame, eff = unpack_body(payload, max_size=1024 * 1024)
        except (FrameError, ValueError, TypeError):
            log.warning("undecodable broker message on %s", topic)
            return
        hub = self.hubs.get(room)
        if hub is None:
            return
        effects = Effects(dict(eff[0]), tuple(eff[1]), dict(eff[2]), tuple(eff[3]))
        if (
            seq > hub.processed + 1
            and not hub.lock.locked()
            and len(hub.early) < EARLY_EVENTS
            and hub.early_bytes + len(frame) <= EARLY_BYTES
            and self.early_bytes + len(frame) <= self.early_bytes_limit
        ):  # an earlier event is likely still on its way: wait for it a little
            if seq not in hub.early:
                hub.early[seq] = (kind, frame, effects)
                hub.early_bytes += len(frame)
                self.early_bytes += len(frame)
            self._arm_reorder(hub)
            return
        async with hub.lock:
            if seq <= hub.processed:
                return
            if seq > hub.processed + 1:
                await self._fill_gap(hub, seq - 1, "broker")
            if seq == hub.processed + 1:
                self._process(hub, seq, kind, frame, effects)
            self._drain_early(hub)

    def _drain_early(self, hub: RoomHub) -> None:
        """Process the events that waited for the ones now processed, in seq order; drop
        those the store supplied meanwhile. Under the hub's lock."""
        while (item := self._pop_early(hub, hub.processed + 1)) is not None:
            self._process(hub, hub.processed + 1, *item)
        for seq in [s for s in hub.early if s <= hub.processed]:
            self._pop_early(hub, seq)
        if not hub.early and hub.reorder is not None:
            hub.reorder.cancel()
            hub.reorder = None

    def _pop_early(self, hub: RoomHub, seq: int) -> tuple[str, bytes, Effects] | None:
        item = hub.early.pop(seq, None)
        if item is not None:
            hub.early_bytes -= len(item[1])
            self.early_bytes -= len(item[1])
        return item

    def _forget_early(self, hub: RoomHub) -> None:
        """A hub dropped: its waiting events and their timer go with it."""
        if hub.reorder is not None:
            hub.reorder.cancel()
            hub.reorder = None
        hub.early.clear()
        self.early_bytes -= hub.early_bytes
        hub.early_bytes = 0

    def _reorder_expired(self, hub: RoomHub) -> None:
        hub.reorder = None
        if hub.early and self.hubs.get(hub.room) is hub:
            self._spawn(self._fill_early(hub))

    def _arm_reorder(self, hub: RoomHub) -> None:
        """Events wait for an earlier one: read the gap a grace from now unless it comes
        (after a read that failed or found less than they wait for, too, so none waits
        for the slow poll in a quiet room)."""
        if hub.early and hub.reorder is None and self.hubs.get(hub.room) is hub:
            loop = asyncio.get_running_loop()
            hub.reorder = loop.call_later(self.reorder_grace, self._reorder_expired, hub)

    async def _fill_early(self, hub: RoomHub) -> None:
        """The earlier events did not come on the broker (a publish lost, or a node slow to
        publish): read what lies before the waiting ones from the store."""
        try:
            async with hub.lock:
                if hub.early:
                    await self._fill_gap(hub, max(hub.early), "broker")
        except Exception as exc:  # the store is away: the waiting events wait on
            log.warning("reading a room's gap failed (%s); retrying", type(exc).__name__)
        finally:
            self._arm_reorder(hub)

    async def resync(self, reason: str = "poll") -> None:
        """Bring every local room up to the store's last seq: after a broker reconnect (a
        publish may have been lost while disconnected) and on the slow poll, so a silent
        broker or a crash between commit and publish never stalls delivery (I8)."""
        last = await self.store.last_seqs(list(self.hubs)) if self.hubs else {}
        for room, hub in list(self.hubs.items()):
            seq = last.get(room, 0)
            if seq > hub.processed:
                async with hub.lock:
                    if self.hubs.get(room) is hub:
                        await self._fill_gap(hub, seq, reason)
            for conn in tuple(hub.conns):  # a catch-up that failed earlier starts again
                cursor = conn.cursors.get(room)
                if cursor is not None and cursor < hub.processed and room not in conn.catching_up:
                    self._spawn(self._catch_up(conn, hub))

    async def resync_users(self) -> None:
        """Join every connected, registered user to rooms they were added to while a user
        notice was lost (the broker is at most once): after a broker reconnect, and slowly."""
        users = [
            user
            for user, conns in self.registry.by_user.items()
            if any(c.registered and not c.closed for c in conns)
        ]
        current = await self.store.current_rooms(users) if users else {}
        for user in users:
            rooms = current.get(user)
            if not rooms:
                continue
            for conn in self.registry.of_user(user):
                if conn.registered and not conn.closed:
                    for room in rooms - set(conn.cursors):
                        self._spawn(self.subscribe(conn, room, 0))

    async def on_broker_reconnect(self) -> None:
        await self.resync("reconnect")
        await self.resync_users()

    async def wake(self, room: str, seq: int) -> None:
        """A hint from outside the broker (PostgreSQL NOTIFY): ``seq`` of ``room`` committed."""
        hub = self.hubs.get(room)
        if hub is None or seq <= hub.processed:
            return
        async with hub.lock:
            await self._fill_gap(hub, seq, "notify")

    def notify(self, room: str, seq: int) -> None:
        """Synchronous entry for database notifications: check a notified seq with
        :meth:`wake` once ``notify_grace`` seconds have passed since it was notified, with
        one wake per room scheduled at a time however many notifications arrive. The NOTIFY
        is a backstop for a lost broker publish; it usually arrives before this node has
        even published its own send, and waking at once would read from the database what
        the broker is about to deliver (bench.costs: one read per send). A wake checks only
        seqs notified at least that long ago: one that checked the newest seq of a busy
        room, notified just before, read from the database what the broker was still
        delivering (``docs/performance.md``, "Eleventh round")."""
        if room not in self.hubs:
            return
        pending = self._notified.get(room)
        if pending is None:
            self._notified[room] = [seq, seq]
            asyncio.get_running_loop().call_later(self.notify_grace, self._wake_notified, room)
        else:
            pending[1] = max(pending[1], seq)

    def _wake_notified(self, room: str) -> None:
        pending = self._notified.pop(room, None)
        if pending is None:
            return
        due, newest = pending
        self._spawn(self.wake(room, due))
        if newest > due:  # notified since this wake was scheduled: its own grace from now
            self._notified[room] = [newest, newest]
            asyncio.get_running_loop().call_later(self.notify_grace, self._wake_notified, room)

    async def poll_forever(self, interval: float) -> None:
        """The slow poll of every subscribed room's last seq (and of the stream generation)."""
        rounds = 0
        while True:
            await asyncio.sleep(interval)
            rounds += 1
            try:
                await self.check_generation()
                await self.resync()
                if rounds % 12 == 0:
                    await self.resync_users()
            except Exception:  # the store may be down; the next round tries again
                log.warning("delivery resync failed; retrying in %.0f s", interval)

    async def check_generation(self) -> bool:
        """If the store's stream generation changed (restored or failed-over database), this
        node's view of every room may be ahead of the store: forget it and close every
        connection so each client reconnects, sees the new generation and resumes from the
        store's heads. Returns True when that happened."""
        read = getattr(self.store, "generation", None)
        if read is None:
            return False
        current = await read()
        if self.generation is None or current == self.generation:
            self.generation = current
            return False
        log.warning("stream generation changed; closing every connection to resynchronise")
        self.generation = current
        for room in list(self.hubs):
            self._forget_early(self.hubs.pop(room))
            await self.broker.unsubscribe(ROOM_TOPIC + room, self._on_room_message)
        for conn in self.registry.all():
            conn.cursors.clear()
            conn.abort(CloseCode.UNAVAILABLE, "stream generation changed; reconnect")
        return True

    async def _fill_gap(self, hub: RoomHub, upto: int, reason: str) -> None:
        """Process the room's events up to ``upto`` from the store, then any that waited
        for them (``hub.early``). Under the hub's lock."""
        await self._read_gap(hub, upto, reason)
        self._drain_early(hub)

    async def _read_gap(self, hub: RoomHub, upto: int, reason: str) -> None:
        while hub.processed < upto:
            if self._on_gap_read is not None:
                self._on_gap_read(reason)
            events = await self.store.room_events(hub.room, hub.processed, limit=self.replay_batch)
            if not events:
                return
            for ev in events:  # all of them: committed, in order (later broker copies
                # are dropped as already processed), so none is read twice
                if ev.seq == hub.processed + 1:
                    self._process(hub, ev.seq, ev.kind, event_frame(ev), parse_effects(ev))

    def _process(self, hub: RoomHub, seq: int, kind: str, frame: bytes, eff: Effects) -> None:
        hub.processed = seq
        delivered = self._offer_all(hub, seq, kind, frame) if hub.conns else 0
        if delivered and self._on_delivered is not None:  # once per event, not per device
            self._on_delivered(delivered)
        for user, role in {**eff.added, **eff.roles}.items():
            hub.members[user] = role
        for user in eff.removed:
            hub.members.pop(user, None)
            for conn in tuple(hub.conns):
                if conn.user == user:
                    hub.conns.discard(conn)
                    conn.cursors.pop(hub.room, None)
        for device in eff.revoked:
            for conn in self.registry.all():
                if conn.device == device:
                    hub.conns.discard(conn)
                    conn.cursors.clear()
                    conn.abort(CloseCode.DEVICE_REVOKED, "this device was revoked")
        if not hub.conns and self.hubs.get(hub.room) is hub:
            del self.hubs[hub.room]
            self._forget_early(hub)
            self._spawn(self.broker.unsubscribe(ROOM_TOPIC + hub.room, self._on_room_message))

    def _offer_all(self, hub: RoomHub, seq: int, kind: str, frame: bytes) -> int:
        """Queue the event for every connection of the room that is next in line, and start
        a catch-up for any that is not; returns how many got it. One pass for the room: the
        frames written at once (``Connection.write_direct``) are journaled together."""
        room, members = hub.room, hub.members
        live = kind != "rekey"  # a rekey carries a per-device wrap: the store serves it
        devices_too = kind in RECEIVE_KINDS_FOR_DEVICE_ROLE
        written: list[Connection] = []
        queued = 0
        try:
            for conn in tuple(hub.conns):
                if conn.closed or room in conn.catching_up:
                    continue
                cursors = conn.cursors
                cursor = cursors.get(room)
                if cursor is None or seq <= cursor:
                    continue
                if seq != cursor + 1 or not live:
                    self._spawn(self._catch_up(conn, hub))
                    continue
                cursors[room] = seq
                role = members.get(conn.user)
                if role is None or (role == "device" and not devices_too):
                    continue
                if conn.write_direct(frame):
                    written.append(conn)
                elif conn.enqueue(frame, event=(room, seq), direct=False):
                    queued += 1
        finally:  # what was written is journaled, whatever happened after it
            if written:
                self._on_written(written, room, seq)
        return len(written) + queued

    async def _catch_up(self, conn: Connection, hub: RoomHub) -> None:
        """Feed ``conn`` from the store until its cursor reaches the hub. A failed read (the
        store is away) leaves the cursor where it was; :meth:`resync` starts it again."""
        room = hub.room
        if room in conn.catching_up:
            return
        conn.catching_up.add(room)
        try:
            await self._catch_up_loop(conn, hub)
        except Exception as exc:
            log.warning(
                "catch-up of a room failed (%s); the next resync retries", type(exc).__name__
            )
        finally:
            conn.catching_up.discard(room)

    async def _catch_up_loop(self, conn: Connection, hub: RoomHub) -> None:
        room = hub.room
        while not conn.closed and room in conn.cursors:
            cursor = conn.cursors[room]
            target = hub.processed
            batch = max(1, min(self.replay_batch, conn.queue_limit // 2))
            events = await self.store.events_after(
                room, cursor, user=conn.user, device=conn.device, limit=batch
            )
            if room not in conn.cursors:
                return
            for ev in events:
                await conn.wait_for_room()
                if room not in conn.cursors or not conn.enqueue(
                    event_frame(ev), event=(room, ev.seq)
                ):
                    return
                conn.cursors[room] = ev.seq
                if self._on_delivered is not None:
                    self._on_delivered(1)
            if not events:
                conn.cursors[room] = max(conn.cursors[room], target)
                if conn.cursors[room] >= hub.processed:
                    return

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in self.registry.all():
            conn.abort(CloseCode.SERVER_SHUTDOWN, "server shutting down")
