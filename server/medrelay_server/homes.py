"""Room homes: in a cluster, each room's sends are stored by one node, the room's home.

Every send locks its room's row (the seq counter) in a group-commit batch until that batch
commits. When two gateway nodes take sends for the same rooms, each node's batches wait for
the other's commits on those rows (0.3-1.1 database sessions waiting on a lock at the
two-node maximum, against 0.1-0.2 with one node: ``docs/performance.md``, "Two nodes over
Redis"), and every node added makes it worse. So a send for a room whose home is another
node is forwarded to that node over the broker, stored in the home's own group commit, and
answered with its seq: only one node's pipeline takes a room's lock.

* **Which node.** Every node says it is up on ``home:<scope>`` every ``refresh`` seconds
  (and goodbye when it stops); the live nodes are those heard within ``3 * refresh``, this
  one always included. Hearing a node shows that the broker carries its messages here; a
  node that cannot hear us is found by the forward's timeout. (The journal's leases would
  not do: admin commands and the anchoring signer hold leases too, and a crashed node's
  lease lasts a minute.) A room's home is the live node with the highest hash of (node,
  room) (rendezvous hashing): every node computes the same home from the same list, and
  when a node joins or leaves only the rooms it wins or held move.
* **What moves.** The origin (the node the sender is connected to) checks the frame, the
  rate limit and the envelope's signature as before, then sends the store call's arguments
  to ``home:<scope>:<node>``; the home runs them through ``Store.append_message``,
  publishes the event and replies with seq, time and whether it was a retry; the origin
  acks. The home publishes, not the origin, so that a room's sends are published by one
  node: events from two publishers cross, and each crossing costs every receiving node a
  gap read from the store. (Roster changes and grants are still published by the node
  that stored them, and the Redis broker's pooled publishes can overtake each other: a
  crossing is rarer, never a wrong order, since the hubs process by seq.)
* **Trust.** The home takes the origin's word for who sent it, as every node already takes
  the broker's room events: the broker is inside the deployment's trust boundary (a
  private network, Redis ACLs and TLS: ``docs/operations.md`` section 5). Envelopes stay
  signed end to end, so a forged forward could not pass as a device's message at the
  recipients, but it would be stored. ``scope`` is the database's stream generation, so
  clusters of different databases sharing a Redis never reach each other; it is re-read
  every ``rescope_every`` hellos (a restore changes it).
* **The database stays the authority.** A home only decides which node takes a room's
  lock, never what is stored: membership, epoch and role are checked inside the home's
  transaction, and the journal record says which node the client was connected to
  (``source`` = ``node:<id>``; the chain it is in is the home's). If two nodes briefly
  disagree about the live nodes, both store sends for a room, correctly, with the lock
  contention this module exists to avoid.
* **When the home does not answer.** No reply within ``timeout`` (the home crashed, the
  broker lost the message, the home is overloaded past it), a publish the broker refuses
  (the Redis broker drops instead, and the timeout answers), a home reporting its store
  unavailable or itself busy, or more than ``max_inflight`` forwards or ``max_bytes`` of
  envelopes waiting: the origin stores the send itself, and skips a node that did not
  answer for ``suspend`` seconds (correct, with the lock contention back for its rooms).
  The store call is idempotent on (room, device, mid), so a home that stored it after all
  and the origin's own store give one event. A single node, and the embedded default,
  never forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import itertools
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import FrameError, MedrelayError, RequestError

from .fanout.base import Broker
from .metrics import Metrics
from .store.base import AppendResult, AuditRecord, Store, StoredEvent, StoreUnavailable

log = logging.getLogger(__name__)

HOME_TOPIC = "home:"
_AUDIT_FIELDS = tuple(f.name for f in dataclasses.fields(AuditRecord))
_REQUEST, _REPLY, _REFUSAL, _HELLO, _BYE = "q", "r", "e", "h", "b"
_SCALARS = (str, int, bytes, type(None))


def home_of(room: str, nodes: Sequence[str]) -> str:
    """The node among ``nodes`` (not empty) with the highest hash of (node, room)."""
    return max(
        nodes,
        key=lambda node: hashlib.blake2b(f"{node}\x00{room}".encode(), digest_size=8).digest(),
    )


class RoomHomes:
    def __init__(
        self,
        *,
        store: Store,
        scope: Callable[[], Awaitable[str]],
        broker: Broker,
        publish: Callable[[Sequence[StoredEvent]], Awaitable[None]],
        node: str,
        metrics: Metrics,
        max_body: int,
        timeout: float = 2.0,
        suspend: float = 10.0,
        refresh: float = 2.0,
        max_inflight: int = 4096,
        max_bytes: int = 64 << 20,
        rescope_every: int = 15,
    ) -> None:
        self.store = store
        self._read_scope = scope
        self.broker = broker
        self.publish = publish
        self.node = node
        self.metrics = metrics
        self.max_body = max_body
        self.timeout = timeout
        self.suspend = suspend
        self.refresh = refresh
        self.max_inflight = max_inflight
        self.max_bytes = max_bytes
        """Envelope bytes held by forwards waiting (origin) and by forwards being stored
        (home), each: beyond it the origin stores sends itself and the home says busy."""
        self.rescope_every = rescope_every
        """Hellos between re-reads of the stream generation (after a restore it changes)."""
        self.nodes: tuple[str, ...] = (node,)
        metrics.cluster_nodes.set(1)
        self._homes: dict[str, str] = {}
        self._suspended: dict[str, float] = {}
        self._pending: dict[int, tuple[str, asyncio.Future[list[Any]]]] = {}
        """Forwards waiting for their answer: request id -> (home, future)."""
        self._serving: set[asyncio.Task[None]] = set()
        self._answering: set[asyncio.Task[None]] = set()
        self._pending_bytes = 0
        self._serving_bytes = 0
        self._say_lock = asyncio.Lock()
        self._closing = False
        # from a random start: a late answer meant for this node's previous process (same
        # node id, before a restart) must not match a forward of this one
        self._ids = itertools.count(secrets.randbelow(1 << 62))
        self._scope = ""
        self._heard: dict[str, float] = {}
        """Other nodes -> when they were last heard (event-loop time)."""

    def __repr__(self) -> str:
        return f"RoomHomes(node={self.node!r}, nodes={len(self.nodes)})"

    def topic(self, node: str | None = None) -> str:
        """A node's own topic, or (no node) the one every node says it is up on."""
        return f"{HOME_TOPIC}{self._scope}" + ("" if node is None else f":{node}")

    async def start(self) -> None:
        self._scope = await self._read_scope()
        await self.broker.subscribe(self.topic(self.node), self._on_message)
        await self.broker.subscribe(self.topic(), self._on_presence)
        await self._say(_HELLO)

    async def close(self) -> None:
        if not self._scope or self._closing:  # never started, or closed
            return
        self._closing = True
        await self._say(_BYE)  # after any hello in flight (one at a time): it lands last
        await self._unsubscribe()
        if self._serving:  # forwards already taken are stored and answered, within bounds
            await asyncio.wait(set(self._serving), timeout=self.timeout)
        for task in list(self._serving | self._answering):
            task.cancel()
        # this node's own forwards still waiting: their senders' handlers store them here
        self._release(lambda home: True, "stopping")
        self._heard.clear()
        self._set_nodes()

    async def _unsubscribe(self) -> None:
        for topic, handler in (
            (self.topic(self.node), self._on_message),
            (self.topic(), self._on_presence),
        ):
            with contextlib.suppress(Exception):
                await self.broker.unsubscribe(topic, handler)

    def _release(self, which: Callable[[str], bool], why: str) -> None:
        """Answer waiting forwards to the homes ``which`` selects as unavailable: their
        senders' nodes store the sends themselves, at once."""
        for home, future in self._pending.values():
            if which(home) and not future.done():
                future.set_result([_REFUSAL, 0, int(ErrorCode.UNAVAILABLE), why, True])

    async def _say(self, what: str) -> None:
        async with self._say_lock:
            if what == _HELLO and self._closing:
                return
            try:
                await self.broker.publish(self.topic(), pack_body([what, self.node]))
            except Exception:  # the broker is down: the others stop hearing us
                log.warning("could not reach the other nodes")

    async def run(self, stop: asyncio.Event) -> None:
        """Say hello every ``refresh`` seconds, forget nodes not heard for three, and
        follow the stream generation (``rescope_every`` hellos)."""
        ticks = 0
        while not stop.is_set() and not self._closing:
            ticks += 1
            if ticks % self.rescope_every == 0:
                await self._rescope()
            await self._say(_HELLO)
            self._expire()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.refresh)

    async def _rescope(self) -> None:
        """After a restore the database has a new stream generation, and nodes started
        since then use it: move to it, or the two groups would never hear each other."""
        try:
            scope = await self._read_scope()
        except Exception:  # the store is down: keep the scope we have
            return
        if scope == self._scope or self._closing:
            return
        log.info("stream generation changed: room homes follow it")
        await self._unsubscribe()
        self._release(lambda home: True, "rescoped")
        self._scope = scope
        self._heard.clear()
        self._set_nodes()
        try:
            await self.broker.subscribe(self.topic(self.node), self._on_message)
            await self.broker.subscribe(self.topic(), self._on_presence)
        except Exception:  # alone until the broker is back: every send is stored here
            log.warning("could not subscribe to the room-home topics")

    async def _on_presence(self, topic: str, payload: bytes) -> None:
        try:
            what, node = unpack_body(payload, max_size=1024)
            if what not in (_HELLO, _BYE) or not isinstance(node, str) or not node:
                raise FrameError("bad presence")
        except (FrameError, ValueError, TypeError):
            log.warning("undecodable room-home presence on %s", topic)
            return
        if node == self.node:
            return
        if what == _HELLO:
            known = node in self._heard
            if len(self._heard) < 1024 or known:  # bounded: a cluster is a few nodes
                self._heard[node] = asyncio.get_running_loop().time()
            if not known:
                self._set_nodes()
        elif self._heard.pop(node, None) is not None:
            self._suspended.pop(node, None)
            self._set_nodes()
            self._release(lambda home: home == node, "stopping")  # it will not answer now

    def _expire(self) -> None:
        horizon = asyncio.get_running_loop().time() - 3 * self.refresh
        gone = [node for node, heard in self._heard.items() if heard < horizon]
        for node in gone:
            del self._heard[node]
        if gone:
            self._set_nodes()

    def _set_nodes(self) -> None:
        nodes = tuple(sorted({self.node, *self._heard}))
        if nodes != self.nodes:
            log.info("room homes over %d nodes", len(nodes))
            self.nodes = nodes
            self._homes.clear()
        self.metrics.cluster_nodes.set(len(nodes))

    def home(self, room: str) -> str:
        home = self._homes.get(room)
        if home is None:
            if len(self._homes) >= 65_536:  # bounded: rooms come and go
                self._homes.clear()
            home = self._homes[room] = home_of(room, self.nodes)
        return home

    # the origin's side --------------------------------------------------------------------
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
        """``Store.append_message``, in the room's home node's group commit."""
        kw: dict[str, Any] = {
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
        home = self.home(room)
        if home == self.node:
            self.metrics.home_sends.labels(path="local").inc()
            return await self.store.append_message(room, **kw)
        if self._reachable(home, len(envelope)):
            reply = await self._forward(home, room, kw)
            if reply is not None:
                self.metrics.home_sends.labels(path="forwarded").inc()
                seq, ts, duplicate = reply
                event = StoredEvent(
                    room=room,
                    seq=seq,
                    kind=kind,
                    sender_device=device,
                    sender_user=user,
                    ts=ts,
                    payload=envelope,
                    mid=mid,
                )
                return AppendResult(event=event, duplicate=duplicate, published=True)
        self.metrics.home_sends.labels(path="fallback").inc()
        return await self.store.append_message(room, **kw)

    def _reachable(self, node: str, size: int) -> bool:
        until = self._suspended.get(node)
        if until is not None:
            if asyncio.get_running_loop().time() < until:
                return False
            del self._suspended[node]
        return (
            len(self._pending) < self.max_inflight and self._pending_bytes + size <= self.max_bytes
        )

    async def _forward(
        self, home: str, room: str, kw: dict[str, Any]
    ) -> tuple[int, int, bool] | None:
        """The home's answer, None when the origin must store the send itself; raises the
        home's refusal (not a member, stale epoch, ...) as the store would."""
        rid = next(self._ids)
        audit = [[getattr(a, name) for name in _AUDIT_FIELDS] for a in kw["audit"]]
        body = pack_body(
            [
                _REQUEST,
                self.node,
                rid,
                room,
                kw["user"],
                kw["device"],
                kw["mid"],
                kw["envelope"],
                kw["kind"],
                kw["epoch"],
                kw["allow_pending"],
                kw["now"],
                audit,
            ]
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._pending[rid] = (home, future)
        size = len(kw["envelope"])
        self._pending_bytes += size
        try:
            await self.broker.publish(self.topic(home), body)
            answer = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            log.warning("room home %s did not answer in %.1f s; storing here", home, self.timeout)
            self._suspended[home] = loop.time() + self.suspend
            return None
        except Exception:  # the broker refused the publish: store here
            log.warning("could not forward to room home %s; storing here", home)
            return None
        finally:
            self._pending.pop(rid, None)
            self._pending_bytes -= size
        if answer[0] == _REPLY:
            return int(answer[2]), int(answer[3]), bool(answer[4])
        code, message, unavailable = answer[2], answer[3], answer[4]
        if unavailable:  # the home's store refused (fenced, overloaded): try our own
            return None
        raise RequestError(ErrorCode(code), str(message))

    # the home's side ----------------------------------------------------------------------
    async def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            msg = unpack_body(payload, max_size=self.max_body)
            if not isinstance(msg, list) or not msg:
                raise FrameError("not a list")
            if msg[0] == _REQUEST:
                request = _parse_request(msg)
            elif msg[0] in (_REPLY, _REFUSAL):
                _check_answer(msg)
                request = None
            else:
                raise FrameError("unknown message")
        except (FrameError, ValueError, TypeError, IndexError):
            log.warning("undecodable room-home message on %s", topic)
            return
        if request is None:
            waiting = self._pending.get(msg[1])
            if waiting is not None and not waiting[1].done():
                waiting[1].set_result(msg)
            return
        origin, rid, room, kw = request
        size = len(kw["envelope"])
        if (
            len(self._serving) >= self.max_inflight
            or self._serving_bytes + size > self.max_bytes
            or self._closing
        ):
            # answered from a task: this handler holds up the broker's reader meanwhile
            if len(self._answering) < self.max_inflight:
                busy = [_REFUSAL, rid, int(ErrorCode.UNAVAILABLE), "busy", True]
                answering = asyncio.create_task(self._answer(origin, busy))
                self._answering.add(answering)
                answering.add_done_callback(self._answering.discard)
            return  # beyond that, the origin's timeout answers for us
        self._serving_bytes += size
        task = asyncio.create_task(self._serve(origin, rid, room, kw))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

        def release(_: asyncio.Task[None]) -> None:
            self._serving_bytes -= size

        task.add_done_callback(release)

    async def _serve(self, origin: str, rid: int, room: str, kw: dict[str, Any]) -> None:
        answer: list[Any]
        try:
            result = await self.store.append_message(room, **kw)
            self.metrics.home_sends.labels(path="served").inc()
            event = result.event
            if not result.duplicate:  # one publisher per room: its events go out in seq order
                try:
                    await self.publish([event])
                except Exception:  # stored: the nodes' gap reads and polls deliver it (I8)
                    log.exception("publishing a forwarded send failed")
            answer = [_REPLY, rid, event.seq, event.ts, result.duplicate]
        except StoreUnavailable as exc:
            answer = [_REFUSAL, rid, int(exc.code), exc.message[:256], True]
        except MedrelayError as exc:
            answer = [_REFUSAL, rid, int(exc.code), exc.message[:256], False]
        except Exception:
            log.exception("storing a forwarded send failed")
            answer = [_REFUSAL, rid, int(ErrorCode.INTERNAL_ERROR), "internal error", False]
        await self._answer(origin, answer)

    async def _answer(self, origin: str, answer: list[Any]) -> None:
        try:
            await self.broker.publish(self.topic(origin), pack_body(answer))
        except Exception:  # the origin times out and stores the send itself (idempotent)
            log.warning("could not answer a forwarded send to %s", origin)


def _parse_request(msg: list[Any]) -> tuple[str, int, str, dict[str, Any]]:
    (_, origin, rid, room, user, device, mid, envelope, kind, epoch, allow, now, audit) = msg
    for value, kinds in (
        (origin, str),
        (rid, int),
        (room, str),
        (user, str),
        (device, str),
        (mid, bytes),
        (envelope, bytes),
        (kind, str),
        (epoch, int),
        (allow, bool),
        (now, int),
        (audit, list),
    ):
        if not isinstance(value, kinds):
            raise FrameError("bad field")
    records = []
    for row in audit:
        if not isinstance(row, list) or len(row) != len(_AUDIT_FIELDS):
            raise FrameError("bad audit record")
        if not all(isinstance(v, _SCALARS) for v in row):
            raise FrameError("bad audit value")
        record = AuditRecord(**dict(zip(_AUDIT_FIELDS, row, strict=True)))
        # the journal names the node that committed; ``source`` keeps the one the client used
        records.append(dataclasses.replace(record, source=record.source or f"node:{origin}"))
    kw = {
        "user": user,
        "device": device,
        "mid": mid,
        "envelope": envelope,
        "kind": kind,
        "epoch": epoch,
        "allow_pending": allow,
        "now": now,
        "audit": records,
    }
    return origin, rid, room, kw


def _check_answer(msg: list[Any]) -> None:
    if len(msg) != 5 or not isinstance(msg[1], int):
        raise FrameError("bad answer")
    if msg[0] == _REPLY:
        if not (isinstance(msg[2], int) and isinstance(msg[3], int) and isinstance(msg[4], bool)):
            raise FrameError("bad reply")
    elif not (isinstance(msg[2], int) and isinstance(msg[3], str) and isinstance(msg[4], bool)):
        raise FrameError("bad refusal")
    if msg[0] == _REFUSAL:
        try:
            ErrorCode(msg[2])
        except ValueError as exc:
            raise FrameError("unknown code") from exc
