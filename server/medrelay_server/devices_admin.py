"""The server-side device lifecycle: retiring devices unseen for a configured period, and an
administrator's revocation (a phone reported lost to the hospital's IT).

Both take one path, :func:`revoke_device`, whose effect is that of any revocation:

* **directory**: the device is marked revoked (permanent) in the same transaction as its
  journal record (``device_retire`` / ``device_revoke``, actor and reason; never a key or
  token). The owner's rooms get a new ``device_list_version`` and become *pending*: the next
  member device that sends first commits a new epoch, and a rekey must wrap for exactly the
  unrevoked certified devices (I6), so the device never receives another key. Clients wrap
  only to the devices the directory lists as unrevoked.
* **cut-off**: its connections on this node are closed at once with ``DEVICE_REVOKED``; other
  nodes (and a node serving while the CLI revoked from another process) learn it from a
  PostgreSQL ``NOTIFY`` sent at commit, and at the latest at their next check of their live
  connections against the directory (``Settings.device_check_interval_seconds``). A revoked
  device cannot connect again (the handshake refuses it with ``DEVICE_REVOKED``).

No roster entry is written: the server holds no key that could sign one for the user, and
the institution's external sender key (which may sign ``revoke_device``) is, in production,
not on the gateways. The directory flag and the pending rekey are what keep the keys away.

Revoking is idempotent: the row is locked and a device already revoked is left alone (no
second journal record), so any number of nodes may run :func:`retire_job` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from medrelay_protocol.codes import CloseCode

from .clock import Clock
from .gateway.connection import Connection
from .settings import Settings
from .store import lifecycle
from .store.audit import write_audit
from .store.base import AuditRecord
from .store.sql import SqlStore

log = logging.getLogger(__name__)

Connections = Callable[[], Iterable[Connection]]
"""This node's live connections (``gateway.registry.all``); read anew at every use."""
Job = Callable[[asyncio.Event], Coroutine[Any, Any, None]]

RETIRE_ACTION = "device_retire"
REVOKE_ACTION = "device_revoke"
RETIRE_BATCH = 100
MAX_TOUCH_INTERVAL = 3600.0
DAY = 86_400


@dataclass(frozen=True, slots=True)
class Revocation:
    device: str
    user: str
    rooms: tuple[str, ...]
    """The owner's rooms, now pending a rekey."""


def _no_connections() -> Iterable[Connection]:
    return ()


async def revoke_device(
    store: SqlStore,
    device_id: str,
    *,
    now: int,
    reason: str,
    actor: str | None = "admin",
    action: str = REVOKE_ACTION,
    connections: Connections = _no_connections,
    unseen_before: int | None = None,
) -> Revocation | None:
    """Revoke ``device_id`` (see the module docstring) and cut off its connections here.

    Returns None when nothing changed (already revoked: the cut-off is then sent again; or,
    with ``unseen_before``, the device was seen since). ``RequestError(NOT_FOUND)`` when
    there is no such device."""
    async with store.database.write() as conn:
        before = await lifecycle.revoke(conn, device_id, unseen_before=unseen_before)
        if before is None:
            revocation = None
            if unseen_before is None:  # already revoked: tell the nodes again, harmlessly
                await lifecycle.notify_revoked(conn, device_id)
        else:
            rooms = tuple(await lifecycle.current_rooms(conn, before.user))
            record = AuditRecord(
                action=action,
                outcome="success",
                user=actor,
                target=device_id,
                detail=f"owner {before.user}, {len(rooms)} rooms pending rekey: {reason}"[:500],
                ts=now,
            )
            await write_audit(conn, store.writer, [record])
            await lifecycle.notify_revoked(conn, device_id)
            revocation = Revocation(device_id, before.user, rooms)
    cut_off(connections, device_id)
    return revocation


def cut_off(connections: Connections, device_id: str) -> int:
    """Close this node's connections of ``device_id`` with ``DEVICE_REVOKED``."""
    n = 0
    for conn in connections():
        if conn.device == device_id and not conn.closed:
            conn.abort(CloseCode.DEVICE_REVOKED, "this device was revoked")
            n += 1
    return n


async def check_live(store: SqlStore, connections: Connections) -> int:
    """Cut off every live connection whose device the directory marks revoked: the bound on
    a revocation this node did not hear about (a lost NOTIFY, SQLite and the CLI)."""
    live = {c.device for c in connections() if not c.closed}
    if not live:
        return 0
    async with store.database.read() as conn:
        revoked = await lifecycle.revoked_among(conn, live)
    return sum(cut_off(connections, device) for device in sorted(revoked))


async def touch_live(store: SqlStore, connections: Connections, now: int) -> None:
    """Record ``now`` as last seen for every device with a live connection here, so a device
    connected for longer than the retirement period is never taken for unseen."""
    live = {c.device for c in connections() if not c.closed}
    if live:
        async with store.database.write() as conn:
            await lifecycle.touch_devices(conn, live, now)


async def retire_unseen(
    store: SqlStore,
    *,
    now: int,
    after_seconds: int,
    connections: Connections = _no_connections,
    batch: int = RETIRE_BATCH,
) -> list[Revocation]:
    """One retirement pass: touch this node's live devices, then revoke every device unseen
    (last seen, or created when never seen) for ``after_seconds``."""
    await touch_live(store, connections, now)
    before = now - after_seconds
    reason = f"unseen for {after_seconds // DAY} days ({after_seconds} s)"
    retired: list[Revocation] = []
    while True:
        unseen = await store.unseen_devices(before, limit=batch)
        for record in unseen:
            done = await revoke_device(
                store,
                record.device_id,
                now=now,
                reason=reason,
                actor=None,
                action=RETIRE_ACTION,
                connections=connections,
                unseen_before=before,
            )
            if done is not None:
                retired.append(done)
        if len(unseen) < batch:
            return retired


@dataclass(frozen=True, slots=True)
class LifecycleTimes:
    retire_after: int
    """Seconds unseen before a device is retired; 0: never."""
    check_every: float
    """Seconds between checks of the live connections against the directory."""
    touch_every: float
    """Seconds between retirement passes (each touches the live devices first)."""

    @classmethod
    def of(cls, settings: Settings) -> LifecycleTimes:
        after = max(0, int(settings.device_retire_after_seconds))
        touch = min(MAX_TOUCH_INTERVAL, after / 4) if after else MAX_TOUCH_INTERVAL
        check = max(0.05, settings.device_check_interval_seconds)
        return cls(retire_after=after, check_every=check, touch_every=max(touch, check))


def retire_job(
    store: SqlStore,
    settings: Settings,
    clock: Clock,
    *,
    connections: Connections,
    times: LifecycleTimes | None = None,
) -> Job:
    """The node's device lifecycle job for ``create_app(background=...)``, until stopped:

    * every ``touch_every`` (a quarter of the retirement period, at most an hour; the first
      time one interval after start): touch the live devices, then retire the unseen ones
      (when the period is not 0);
    * every ``device_check_interval_seconds``: close live connections of revoked devices;
    * on PostgreSQL, at once on each revocation's NOTIFY.

    Failures are logged and retried at the next round. Every node runs it (each must touch
    its own connections); retiring the same device twice does nothing the second time.
    ``times`` overrides what ``settings`` gives (tests run passes every fraction of a second
    with a fake clock standing far ahead)."""
    times = times or LifecycleTimes.of(settings)
    tasks: set[asyncio.Task[None]] = set()

    async def cut_if_revoked(device: str) -> None:
        try:
            record = await store.get_device(device)
        except Exception:  # the store is away: the next check closes it
            log.warning("could not read a revoked device; the next check closes it")
            return
        if record is not None and record.revoked:  # the database decides, not the message
            cut_off(connections, device)

    def heard(payload: str) -> None:
        if any(c.device == payload for c in connections()):
            task = asyncio.get_running_loop().create_task(cut_if_revoked(payload))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def run(stop: asyncio.Event) -> None:
        listener = asyncio.create_task(
            store.database.listen(lifecycle.REVOKED_CHANNEL, heard, stop)
        )
        loop = asyncio.get_running_loop()
        # not at once: after a restart, devices first get one period to reconnect (touch)
        next_pass = loop.time() + times.touch_every
        try:
            while not stop.is_set():
                if loop.time() >= next_pass:
                    next_pass = loop.time() + times.touch_every
                    await _pass(store, clock, times, connections)
                await _check(store, connections)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=times.check_every)
        finally:
            listener.cancel()
            for task in (listener, *tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    return run


async def _pass(
    store: SqlStore, clock: Clock, times: LifecycleTimes, connections: Connections
) -> None:
    try:
        if times.retire_after:
            retired = await retire_unseen(
                store, now=clock.now(), after_seconds=times.retire_after, connections=connections
            )
            if retired:
                log.info("retired %d devices unseen for %d s", len(retired), times.retire_after)
        else:
            await touch_live(store, connections, clock.now())
    except Exception:
        log.exception("device retirement pass failed; retrying next period")


async def _check(store: SqlStore, connections: Connections) -> None:
    try:
        closed = await check_live(store, connections)
        if closed:
            log.info("closed %d connections of revoked devices", closed)
    except Exception:
        log.warning("check of live devices failed; retrying", exc_info=True)


async def admin_revoke(
    database_url: str,
    device_id: str,
    *,
    reason: str,
    now: int,
    schema: str | None = None,
    node_id: str = "admin",
) -> Revocation | None:
    """``medrelay admin revoke-device``: open the database as a process of its own (journal
    stream ``node_id``), revoke, close. Running nodes cut the device off on the NOTIFY
    (PostgreSQL) or at their next check of live connections."""
    store = SqlStore(database_url, schema=schema, node_id=node_id)
    await store.open()
    try:
        return await revoke_device(store, device_id, now=now, reason=reason, actor="admin")
    finally:
        await store.close()
