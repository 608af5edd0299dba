"""``RedisBroker``: the fast path between gateway nodes over Redis pub/sub (classic or sharded).

Guarantees (the :mod:`.base` contract, and what Redis adds to it):

* **At most once, best effort.** Redis pub/sub keeps nothing: a payload published while a
  subscriber's link is down, or dropped by Redis because the subscriber fell behind
  (``client-output-buffer-limit pubsub``), is lost. ``publish`` never raises for an outage;
  the payload is dropped and counted (``dropped``). Nodes find the gap by seq and fill it
  from the store (I8).
* **Loss is announced.** Every time a subscriber link comes back (Redis restarted, the
  connection dropped for an overrun buffer or a silent peer, a slot moved in a cluster) the
  broker re-subscribes every topic it carries and then calls ``on_resync``; the node must
  then re-read every subscribed room from the store, because anything published while the
  link was down is gone. ``on_resync`` runs in its own task, never concurrently with itself,
  and once more if another reconnect happens while it runs.
* **Per-publisher order.** One publisher connection, commands in call order, and one reader
  that awaits handlers one payload at a time: payloads published by one node on one topic
  reach each subscriber in publish order. A slow handler slows the reader; Redis then bounds
  the backlog with its output-buffer limit and drops the link, which is a reconnect and a
  resync, never unbounded memory here (I7).
* **Opaque payloads.** Bytes in, the same bytes out.
* **Only what is asked for.** A topic is subscribed in Redis while at least one handler is
  registered for it. ``subscribe`` returns once Redis confirmed the subscription (or at
  once when the link is down: the topic is subscribed on reconnect, then ``on_resync``);
  ``unsubscribe`` stops delivery to that handler before it returns.
* **Sharded pub/sub.** With ``sharded=True`` (or ``None`` and a server that reports
  ``cluster_enabled:1``) topics use ``SPUBLISH``/``SSUBSCRIBE`` (Redis 7). On Redis Cluster
  each topic is subscribed on the primary that owns its slot, one link per primary, and a
  moved slot (Redis sends an unsolicited ``sunsubscribe``) re-homes the topic and resyncs.

Every node must use the same mode: classic and sharded channels are separate namespaces.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError
from redis.retry import Retry

from .base import Handler

log = logging.getLogger(__name__)

ResyncHook = Callable[[], Awaitable[None]]
_NET_ERRORS = (RedisError, OSError)


class BrokerUnavailable(ConnectionError):
    """Redis cannot carry messages now (readiness reports it)."""


class _LinkLost(ConnectionError):
    pass


class RedisBroker:
    """Fan-out over Redis; see the module docstring for the guarantees.

    ``url`` is a redis URL (``redis://``, ``rediss://``, ``unix://``); for Redis Cluster give
    any node and leave ``sharded`` as ``None`` (detected) or ``True``.
    """

    def __init__(
        self,
        url: str,
        *,
        node_id: str,
        sharded: bool | None = None,
        backoff_base: float = 0.1,
        backoff_max: float = 5.0,
        ping_interval: float = 5.0,
        confirm_timeout: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.node_id = node_id
        self.sharded = sharded
        self.on_resync: ResyncHook | None = None
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.ping_interval = ping_interval
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self.dropped = 0
        self.reconnects = 0
        self.resyncs = 0
        self._handlers: dict[str, list[Handler]] = {}
        self._links: dict[str, _Link] = {}
        self._pub: Redis | RedisCluster | None = None
        self._cluster: RedisCluster | None = None
        self._resync_due = False
        self._resync_task: asyncio.Task[None] | None = None
        self._setup_task: asyncio.Task[None] | None = None
        self._closing = False
        self._set_up = asyncio.Event()

    def __repr__(self) -> str:
        return f"RedisBroker(node_id={self.node_id!r}, sharded={self.sharded!r})"

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect and detect the mode. Redis being down is not fatal: the node starts, its
        readiness says ``broker: unavailable`` and set-up is retried in the background."""
        try:
            await self._setup()
        except _NET_ERRORS as exc:
            log.warning("redis unavailable at start (%s); retrying", type(exc).__name__)
            self._setup_task = asyncio.get_running_loop().create_task(self._setup_retry())

    async def _setup_retry(self) -> None:
        attempt = 0
        while not self._closing:
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))
            try:
                await self._setup()
                return
            except _NET_ERRORS:
                continue

    async def _setup(self) -> None:
        probe = self._standalone_conn()
        await probe.connect()  # type: ignore[no-untyped-call]
        try:
            await probe.send_command("INFO", "cluster")
            info = await probe.read_response()
        finally:
            await probe.disconnect()
        clustered = b"cluster_enabled:1" in bytes(info)
        if self.sharded is None:
            self.sharded = clustered
        if clustered:
            cluster = RedisCluster.from_url(self.url, **self._cluster_kwargs())
            await cluster.initialize()
            self._cluster = cluster
            self._pub = cluster
        else:
            self._pub = Redis(connection_pool=ConnectionPool.from_url(self.url, **self._kwargs(1)))
            self._links["main"] = _Link(self, "main", self._standalone_conn)
        for topic in self._handlers:  # registered while Redis was unreachable
            link = self._link_for(topic)
            if link is not None:
                link.topics.add(topic)
        for link in self._links.values():
            link.start()
        self._set_up.set()

    async def wait_live(self) -> None:
        """Return once Redis is reached and every subscriber link is up (tests, start-up)."""
        await self._set_up.wait()
        for link in list(self._links.values()):
            await link.live.wait()

    async def close(self) -> None:
        self._closing = True
        for link in list(self._links.values()):
            await link.stop()
        self._links.clear()
        for task in (self._resync_task, self._setup_task):
            if task is not None:
                task.cancel()
        if self._pub is not None:
            await self._pub.aclose()
        self._handlers.clear()

    async def ping(self) -> None:
        if self._pub is None:
            raise BrokerUnavailable("redis not connected")
        for link in self._links.values():
            if not link.live.is_set():
                raise BrokerUnavailable(f"redis link {link.name} down")
        try:
            await self._pub.ping()
        except _NET_ERRORS as exc:
            raise BrokerUnavailable("redis unreachable") from exc

    # pub/sub -----------------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes) -> None:
        try:
            if self._pub is None:
                raise BrokerUnavailable("redis not connected")
            command = "SPUBLISH" if self.sharded else "PUBLISH"
            await self._pub.execute_command(command, topic, payload)
        except (*_NET_ERRORS, BrokerUnavailable) as exc:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("redis publish dropped (%d so far): %s", self.dropped, type(exc))

    async def subscribe(self, topic: str, handler: Handler) -> None:
        handlers = self._handlers.setdefault(topic, [])
        handlers.append(handler)
        link = self._link_for(topic) if len(handlers) == 1 else None
        if link is not None:
            await link.add(topic)

    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        handlers = self._handlers.get(topic)
        if not handlers or handler not in handlers:
            return
        handlers.remove(handler)
        if not handlers:
            del self._handlers[topic]
            for link in list(self._links.values()):
                if topic in link.topics:
                    await link.remove(topic)

    async def _dispatch(self, topic: str, payload: bytes) -> None:
        for handler in list(self._handlers.get(topic, ())):
            try:
                await handler(topic, payload)
            except Exception:  # one failing subscriber must not starve the others
                log.exception("broker handler failed for topic %s", topic)

    # links and cluster routing --------------------------------------------------------------
    def _link_for(self, topic: str) -> _Link | None:
        """The link that carries ``topic`` (``None`` before set-up has reached Redis)."""
        if self._cluster is None:
            return self._links.get("main")
        node = self._cluster.nodes_manager.get_node_from_slot(key_slot(topic.encode()))
        name = f"{node.host}:{node.port}"
        link = self._links.get(name)
        if link is None:
            host, port = node.host, node.port
            link = _Link(self, name, lambda: self._standalone_conn(host=host, port=port))
            self._links[name] = link
            if self._pub is not None:
                link.start()
        return link

    async def _rehome(self, topic: str, old: _Link) -> None:
        """Cluster only: the topic's slot moved (or its primary failed over)."""
        if self._cluster is None or topic not in self._handlers:
            return
        await self._cluster.nodes_manager.initialize()
        new = self._link_for(topic)
        if new is not None and new is not old:
            old.topics.discard(topic)
            await new.add(topic)
        self._resync_soon()

    async def _refresh_routes(self, link: _Link) -> None:
        """Cluster only, after a link failed: move its topics to their current owners."""
        if self._cluster is None:
            return
        try:
            await self._cluster.nodes_manager.initialize()
        except _NET_ERRORS:
            return
        for topic in list(link.topics):
            new = self._link_for(topic)
            if new is not None and new is not link:
                link.topics.discard(topic)
                await new.add(topic)

    # resync ----------------------------------------------------------------------------
    def _resync_soon(self) -> None:
        self._resync_due = True
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync_loop())

    async def _resync_loop(self) -> None:
        while self._resync_due and not self._closing:
            self._resync_due = False
            self.resyncs += 1
            hook = self.on_resync
            if hook is None:
                continue
            try:
                await hook()
            except Exception:
                log.exception("on_resync failed")

    # connections -----------------------------------------------------------------------
    def _kwargs(self, retries: int) -> dict[str, Any]:
        return {
            "protocol": 2,
            "socket_connect_timeout": self.connect_timeout,
            "socket_timeout": max(self.connect_timeout, 2.0),
            "socket_keepalive": True,
            "health_check_interval": 0,
            "retry": Retry(NoBackoff(), retries),
            "client_name": f"medrelay-{self.node_id}",
        }

    def _cluster_kwargs(self) -> dict[str, Any]:
        kw = self._kwargs(1)
        kw.pop("health_check_interval")
        return kw

    def _standalone_conn(self, **override: Any) -> AbstractConnection:
        """A fresh connection to the URL's server (or, in a cluster, to ``host``/``port``)."""
        pool = ConnectionPool.from_url(self.url, **self._kwargs(0))
        conn: AbstractConnection = pool.connection_class(**{**pool.connection_kwargs, **override})
        return conn

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** min(attempt, 16))
        return random.uniform(0, ceiling)  # noqa: S311 - jitter, not crypto


class _Link:
    """One subscriber connection to one Redis server, the topics it carries, its reader."""

    def __init__(
        self, broker: RedisBroker, name: str, connect: Callable[[], AbstractConnection]
    ) -> None:
        self.broker = broker
        self.name = name
        self._connect = connect
        self.topics: set[str] = set()
        self.conn: AbstractConnection | None = None
        self.live = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self._waiters: dict[str, collections.deque[asyncio.Future[bool]]] = {}
        self._unsub_sent: collections.Counter[str] = collections.Counter()
        self._lock = asyncio.Lock()
        self._ever_up = False

    def start(self) -> None:
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        if self.conn is not None:
            await self.conn.disconnect(nowait=True)

    @property
    def _verbs(self) -> tuple[str, str]:
        return (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if self.broker.sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )

    async def add(self, topic: str) -> None:
        self.topics.add(topic)
        async with self._lock:
            conn = self.conn
            if conn is None:
                return  # subscribed on (re)connect, followed by on_resync
            waiter = self._expect(topic)
            try:
                await conn.send_command(self._verbs[0], topic)
            except _NET_ERRORS:
                return
        if asyncio.current_task() is self.task:
            return  # called from a handler: the confirmation is read by this very task
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.broker.confirm_timeout)
        except TimeoutError:
            log.warning("redis did not confirm the subscription in time on %s", self.name)

    async def remove(self, topic: str) -> None:
        self.topics.discard(topic)
        async with self._lock:
            if self.conn is None:
                return
            self._unsub_sent[topic] += 1
            try:
                await self.conn.send_command(self._verbs[1], topic)
            except _NET_ERRORS:
                return

    def _expect(self, topic: str) -> asyncio.Future[bool]:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(topic, collections.deque()).append(fut)
        return fut

    async def _run(self) -> None:
        attempt = 0
        while not self.broker._closing:
            try:
                conn = self._connect()
                await conn.connect()  # type: ignore[no-untyped-call]
            except _NET_ERRORS as exc:
                attempt += 1
                log.debug("redis link %s connect failed: %s", self.name, type(exc))
                await self.broker._refresh_routes(self)
                await asyncio.sleep(self.broker._backoff(attempt))
                continue
            try:
                await self._serve(conn)
            except (*_NET_ERRORS, _LinkLost) as exc:
                log.warning("redis link %s lost (%s); reconnecting", self.name, type(exc).__name__)
            finally:
                await self._down(conn)
            attempt = 0
            self.broker.reconnects += 1
            await self.broker._refresh_routes(self)
            await asyncio.sleep(self.broker._backoff(attempt))

    async def _serve(self, conn: AbstractConnection) -> None:
        async with self._lock:
            self.conn = conn
            initial = [self._expect(t) for t in sorted(self.topics)]
            for batch in self._batches(sorted(self.topics)):
                await conn.send_command(self._verbs[0], *batch)
        self._maybe_live(initial)
        waiting_pong = False
        while True:
            reply = await conn.read_response(timeout=self.broker.ping_interval)
            if reply is None:
                if waiting_pong:
                    raise _LinkLost("no reply to ping")
                await conn.send_command("PING")
                waiting_pong = True
                continue
            waiting_pong = False
            await self._on_reply(reply)
            if not self.live.is_set():
                self._maybe_live(initial)

    def _batches(self, topics: list[str]) -> list[list[str]]:
        """Re-subscribe commands: 256 channels each; sharded ones per hash slot (Redis
        refuses an ``SSUBSCRIBE`` whose channels span slots)."""
        if not self.broker.sharded:
            return [topics[i : i + 256] for i in range(0, len(topics), 256)]
        by_slot: dict[int, list[str]] = {}
        for t in topics:
            by_slot.setdefault(key_slot(t.encode()), []).append(t)
        return list(by_slot.values())

    def _maybe_live(self, initial: list[asyncio.Future[bool]]) -> None:
        if all(f.done() for f in initial):
            self.live.set()
            if self._ever_up or initial:
                self.broker._resync_soon()
            self._ever_up = True

    async def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) < 3:
            return  # PONG
        kind, channel, data = bytes(reply[0]), bytes(reply[1]).decode(), reply[2]
        if kind in (b"message", b"smessage"):
            if channel in self.topics:
                await self.broker._dispatch(channel, bytes(data))
        elif kind in (b"subscribe", b"ssubscribe"):
            waiters = self._waiters.get(channel)
            if waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(True)
                if not waiters:
                    del self._waiters[channel]
        elif kind in (b"unsubscribe", b"sunsubscribe"):
            if self._unsub_sent[channel] > 0:
                self._unsub_sent[channel] -= 1
                if not self._unsub_sent[channel]:
                    del self._unsub_sent[channel]
            elif channel in self.topics:  # unsolicited: the slot moved away
                asyncio.get_running_loop().create_task(self.broker._rehome(channel, self))

    async def _down(self, conn: AbstractConnection) -> None:
        self.live.clear()
        async with self._lock:
            self.conn = None
            for waiters in self._waiters.values():
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(False)
            self._waiters.clear()
            self._unsub_sent.clear()
        await conn.disconnect(nowait=True)
