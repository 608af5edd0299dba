"""``Gateway``: the per-app object that holds the injected dependencies and routes frames.

Made once in ``create_app``; handlers receive it with the connection and the frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import Frame, GetDevices, Ok, Reauth, RegisterDevice

from ..auth.base import IdentityProvider
from ..clock import Clock
from ..delivery import Delivery, Registry
from ..fanout.base import Broker
from ..journal.delivery import DeliveryJournal
from ..metrics import Metrics
from ..ratelimit import TokenBucket
from ..settings import Settings
from ..store.base import AuditRecord, Store
from .connection import Connection

log = logging.getLogger(__name__)

HandlerFn = Callable[["Gateway", Connection, Any], Awaitable[None]]
UNREGISTERED_OK = (RegisterDevice, GetDevices)


@dataclass
class Gateway:
    settings: Settings
    store: Store
    broker: Broker
    clock: Clock
    identity: IdentityProvider
    metrics: Metrics
    registry: Registry
    delivery: Delivery
    journal: DeliveryJournal
    handlers: dict[type[Frame], HandlerFn] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)

    async def handle(self, conn: Connection, frame: Frame) -> None:
        handler = self.handlers.get(type(frame))
        if handler is None:
            raise RequestError(ErrorCode.UNKNOWN_FRAME_TYPE, "not a request frame")
        if not conn.registered and not isinstance(frame, UNREGISTERED_OK):
            await self._require_registered(conn)
        await handler(self, conn, frame)

    async def _require_registered(self, conn: Connection) -> None:
        """A token names a user; only a device certified by that user's identity key may act
        in rooms. A stolen token with a device of the thief's own is refused here
        (``UNKNOWN_DEVICE``): it cannot register without the user's identity key."""
        record = await self.store.get_device(conn.device)
        if record is None or record.user != conn.user or record.revoked:
            raise RequestError(ErrorCode.UNKNOWN_DEVICE, "register this device first")
        conn.registered = True

    def reply(self, conn: Connection, frame: Frame) -> None:
        from medrelay_protocol import codec

        self.metrics.frames_out.inc()
        conn.enqueue(codec.encode(frame))

    def rate_check(self, conn: Connection) -> None:
        limits = self.settings.limits
        now = self.clock.now_ms()
        bucket = self.buckets.get(conn.device)
        if bucket is None:
            bucket = self.buckets[conn.device] = TokenBucket(
                limits.sends_per_second, limits.send_burst, now
            )
        wait = bucket.take(now)
        if wait:
            raise RequestError(ErrorCode.RATE_LIMITED, "slow down", detail={"retry_after_ms": wait})

    async def connect(self, conn: Connection, *, source: str) -> None:
        journal, clock = self.journal, self.clock

        def written(room: str, seq: int) -> None:
            journal.record_written(conn.user, conn.device, room, seq, clock.now())

        conn.on_written = written
        conn.start()
        self.registry.add(conn)
        self.metrics.connections.inc()
        await self.delivery.attach_user(conn)
        await self.journal_auth(conn.user, conn.device, "success", None, source=source)

    async def disconnect(self, conn: Connection) -> None:
        await conn.stop()
        self.registry.remove(conn)
        if not tuple(self.registry.of_user(conn.user)):
            self._announce_offline(conn)
        self.metrics.connections.dec()
        await self.delivery.detach(conn)
        if self.registry.device_count(conn.device) == 0:
            self.buckets.pop(conn.device, None)

    def _announce_offline(self, conn: Connection) -> None:
        from medrelay_protocol import codec
        from medrelay_protocol.frames import PresenceEvent

        data = codec.encode(PresenceEvent(user=conn.user, status="offline"))
        for room in tuple(conn.cursors):
            hub = self.delivery.hubs.get(room)
            for other in tuple(hub.conns) if hub is not None else ():
                if (
                    other.user != conn.user
                    and hub is not None
                    and hub.members.get(other.user) not in (None, "device")
                ):
                    other.enqueue(data, ephemeral=True)

    async def reauth(self, conn: Connection, frame: Reauth) -> None:
        principal = self.identity.verify(frame.token, self.clock.now())
        if principal.user != conn.user:
            raise RequestError(ErrorCode.AUTH_FAILED, "token names another user")
        conn.expires_at = principal.expires_at
        conn.reauth_deadline = None
        await self.journal_auth(conn.user, conn.device, "success", "reauth")
        self.reply(conn, Ok(rid=frame.rid))

    async def journal_auth(
        self,
        user: str | None,
        device: str | None,
        outcome: str,
        detail: str | None,
        *,
        source: str | None = None,
    ) -> None:
        try:
            await self.store.journal(
                [
                    AuditRecord(
                        action="authenticate",
                        outcome=outcome,
                        user=user,
                        device=device,
                        source=source,
                        detail=detail,
                        ts=self.clock.now(),
                    )
                ]
            )
        except Exception:  # the connection goes on; an unjournaled auth is logged loudly
            log.exception("could not journal an authentication outcome")

    def audit(self, conn: Connection, action: str, **kw: Any) -> AuditRecord:
        """A success record with the connection's actor and source filled in."""
        return AuditRecord(
            action=action,
            outcome="success",
            user=conn.user,
            device=conn.device,
            institution=conn.institution,
            address=conn.address,
            ts=self.clock.now(),
            **kw,
        )
