"""``Gateway``: the per-app object that holds the injected dependencies and routes frames.

Made once in ``create_app``; handlers receive it with the connection and the frame.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from medrelay_protocol.canonical import pack_body, unpack_body
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import FrameError, RequestError
from medrelay_protocol.frames import (
    ApprovalStatus,
    DeviceRequest,
    Frame,
    GetDevices,
    Ok,
    Reauth,
    RegisterDevice,
    RequestApproval,
)
from medrelay_protocol.verified import VerifiedDevices

from ..auth.base import IdentityProvider
from ..clock import Clock
from ..delivery import Delivery, Registry
from ..fanout.base import Broker
from ..journal.delivery import DeliveryJournal
from ..metrics import Metrics
from ..ratelimit import TokenBucket
from ..rosters import VerifiedRosters
from ..settings import Settings
from ..store.base import ApprovalRecord, AuditRecord, Store
from .connection import Connection
from .direct import PassFlush, SharedFrames

log = logging.getLogger(__name__)

HandlerFn = Callable[["Gateway", Connection, Any], Awaitable[None]]


class Attester(Protocol):
    """An institution's identity attestation signer (``institutions.ExternalSender``,
    ``auth.dev.DevIssuer``)."""

    @property
    def public_key(self) -> bytes: ...

    async def attest(
        self, *, user_id: str, identity_key: bytes, institution: str, issued_at: int
    ) -> bytes: ...


UNREGISTERED_OK = (RegisterDevice, GetDevices, RequestApproval)
APPROVAL_TOPIC = "approval:"
"""Broker topic per user: ``[kind, request id]`` with kind ``request`` (tell the user's
registered devices) or ``approved`` (tell the requesting device), on every node."""


def journal_writes(
    journal: DeliveryJournal, clock: Clock, conn: Connection
) -> Callable[[str, int], None]:
    """``conn.on_written``: journal each room event written to ``conn``'s socket."""

    def written(room: str, seq: int) -> None:
        journal.record_written_to((conn,), room, seq, clock.now())

    return written


def journal_fanout(
    journal: DeliveryJournal, clock: Clock
) -> Callable[[list[Connection], str, int], None]:
    """``Delivery``'s ``on_written``: journal the connections a live event's frame was
    written to at once, together."""

    def written(conns: list[Connection], room: str, seq: int) -> None:
        journal.record_written_to(conns, room, seq, clock.now())

    return written


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
    rosters: VerifiedRosters = field(default_factory=VerifiedRosters)
    """Rooms' verified roster states by head (``rosters.py``): a change verifies one entry."""
    devices_checked: VerifiedDevices = field(default_factory=VerifiedDevices)
    """Outcomes of member devices' certificate and bundle checks (``medrelay_protocol.verified``):
    a change checks only the devices it has not seen."""
    approval_ttl: int = 600
    """Seconds a device approval request lives (``request_approval``)."""
    max_pending_approvals: int = 4
    """Unapproved live requests per user; one more is ``TOO_MANY_REQUESTS``."""
    attesters: dict[str, Attester] = field(default_factory=dict)
    """Institution id -> who vouches for its users' first identity keys (its key checks
    ``register_device.attestation``). Set by ``create_app``."""
    self_attesting: frozenset[str] = frozenset()
    """Institutions whose attester runs in this process and attests at registration when
    the device brings no attestation: only the development issuer (``dev``), whose token
    *is* the sign-in."""
    frames: SharedFrames = field(default_factory=SharedFrames)
    """The live fan-out's WebSocket framing, done once per event for all its recipients
    (``direct.py``)."""
    flushes: PassFlush = field(default_factory=PassFlush)
    """The direct writes' socket flushes, one loop callback per pass for all connections."""
    require_attestation: bool = False
    """Refuse a first identity key without an attestation (``ATTESTATION_REQUIRED``). True
    whenever institutions are configured; False only for an app wired with bare tokens and
    no institutions (some tests), which then pins on first use."""

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
        conn.on_written = journal_writes(self.journal, self.clock, conn)
        conn.start()
        self.registry.add(conn)
        self.metrics.connections.inc()
        await self.delivery.attach_user(conn)
        if len(tuple(self.registry.of_user(conn.user))) == 1:
            await self.broker.subscribe(APPROVAL_TOPIC + conn.user, self._on_approval_notice)
        # a success is journaled with the next flush, like deliveries (failures at once)
        self.journal.record(self._auth_record(conn.user, conn.device, "success", None, source))

    async def disconnect(self, conn: Connection) -> None:
        await conn.stop()
        self.registry.remove(conn)
        if not tuple(self.registry.of_user(conn.user)):
            self._announce_offline(conn)
            await self.broker.unsubscribe(APPROVAL_TOPIC + conn.user, self._on_approval_notice)
        self.metrics.connections.dec()
        await self.delivery.detach(conn)
        if self.registry.device_count(conn.device) == 0:
            self.buckets.pop(conn.device, None)

    async def announce_approval(self, user: str, kind: str, request: str) -> None:
        """Tell every node (this one included) about a new or approved device request."""
        await self.broker.publish(APPROVAL_TOPIC + user, pack_body([kind, request]))

    async def _on_approval_notice(self, topic: str, payload: bytes) -> None:
        from medrelay_protocol import codec

        user = topic[len(APPROVAL_TOPIC) :]
        try:
            kind, request = unpack_body(payload)
        except (FrameError, ValueError, TypeError):
            return
        conns = tuple(self.registry.of_user(user))
        if not conns or not isinstance(request, str):
            return
        record = await self.store.get_request(request)
        if record is None or record.user != user:
            return
        if kind == "request" and not record.approved:
            data = codec.encode(
                DeviceRequest(
                    request=record.id,
                    device=record.device_id,
                    device_key=record.device_key,
                    bundle=record.bundle,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                )
            )
            for conn in conns:  # only certified devices may approve; never the requester
                if conn.registered and not conn.closed and conn.device != record.device_id:
                    conn.enqueue(data)
        elif kind == "approved" and record.approved:
            data = codec.encode(approval_status(record, await self.store.get_identity(user)))
            for conn in conns:
                if conn.device == record.device_id and not conn.closed:
                    conn.enqueue(data)

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
            await self.store.journal([self._auth_record(user, device, outcome, detail, source)])
        except Exception:  # the connection goes on; an unjournaled auth is logged loudly
            log.exception("could not journal an authentication outcome")

    def _auth_record(
        self,
        user: str | None,
        device: str | None,
        outcome: str,
        detail: str | None,
        source: str | None,
    ) -> AuditRecord:
        return AuditRecord(
            action="authenticate",
            outcome=outcome,
            user=user,
            device=device,
            source=source,
            detail=detail,
            ts=self.clock.now(),
        )

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


def approval_status(
    record: ApprovalRecord, identity_key: bytes | None, rid: str | None = None
) -> ApprovalStatus:
    """What the requesting device is told about its request."""
    if not record.approved:
        return ApprovalStatus(
            rid=rid, request=record.id, state="pending", expires_at=record.expires_at
        )
    return ApprovalStatus(
        rid=rid,
        request=record.id,
        state="approved",
        expires_at=record.expires_at,
        identity_key=identity_key,
        certificate=record.certificate,
        backup_share=record.backup_share,
    )
