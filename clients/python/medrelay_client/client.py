"""The async medrelay client: rooms, end-to-end encrypted messages, resume and de-duplication.

``Client`` keeps one session open, reconnecting with jittered exponential backoff and
resuming every room from the last seq it processed. Incoming events are processed in order
by one task; decrypted messages come out of :meth:`Client.messages`. The client verifies the
roster chain (pinning its head), device certificates under the identity keys the roster
pins, rekey manifests and key commitments, and message signatures; it never trusts the
server for any of these.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from medrelay_protocol.codes import CloseCode, ErrorCode, Reconnect
from medrelay_protocol.crypto import fingerprint
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import (
    Approvals,
    Deliver,
    DeviceRequest,
    Error,
    Frame,
    ListApprovals,
    PendingDevice,
    Sync,
    Synced,
)
from medrelay_protocol.identity import DeviceCertificate

from . import enrolment
from .keystore import KeyStore
from .rooms import RoomLogic
from .transport import Session, SessionClosed

log = logging.getLogger(__name__)

TokenProvider = Callable[[], Awaitable[str]]
_NEVER_RECONNECT = frozenset(int(c) for c in CloseCode if c.reconnect is Reconnect.NEVER)


@dataclass(frozen=True, slots=True)
class Message:
    """A decrypted event for the user: a message, a summon, or a notice (``kind`` says)."""

    room: str
    seq: int
    kind: str
    sender_user: str
    sender_device: str
    body: Any
    ts: int
    problem: str | None = None


@dataclass
class Client:
    url: str
    keys: KeyStore
    token_provider: TokenProvider
    kind: str = "person"
    fallback_urls: tuple[str, ...] = ()
    """Other gateway nodes to try, in turn, when ``url`` does not answer."""
    base_backoff: float = 0.2
    max_backoff: float = 10.0
    session: Session | None = None
    _inbox: asyncio.Queue[Message] = field(default_factory=asyncio.Queue)
    _runner: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    logic: RoomLogic = field(init=False)
    fatal: SessionClosed | None = None
    _unreceipted: dict[str, int] = field(default_factory=dict)
    device_requests: dict[str, DeviceRequest | PendingDevice] = field(default_factory=dict)
    """New devices of this user waiting for approval (pushed, or from ``list_approvals``)."""
    _device_request: asyncio.Event = field(default_factory=asyncio.Event)

    institution_keys: dict[str, bytes] | None = None
    """Institution id -> attestation key, pinned at enrolment (``GET /institutions``): a
    user is added to a room only if their identity key carries a valid attestation."""

    def __post_init__(self) -> None:
        self.logic = RoomLogic(self.keys, self.request, kind=self.kind)
        self.logic.institution_keys = self.institution_keys

    @property
    def user(self) -> str:
        return self.keys.user

    # lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (registering this device the first time) and resume every room."""
        self._runner = asyncio.create_task(self._run(), name=f"client-{self.user}")
        waiter = asyncio.create_task(self._connected.wait())
        done, _ = await asyncio.wait({waiter, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        if self._runner in done:
            waiter.cancel()
            self._runner.result()

    async def close(self) -> None:
        self._stopping = True
        if self.session is not None:
            await self.session.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        self.keys.save()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def drop_connection(self) -> None:
        """Close the socket as a network failure would (tests, demo); the client resumes."""
        if self.session is not None:
            await self.session.ws.close()

    async def _run(self) -> None:
        attempt = 0
        tries = 0
        while not self._stopping:
            urls = (self.url, *self.fallback_urls)  # read each time: callers may repoint it
            url = urls[tries % len(urls)]
            tries += 1
            try:
                token = await self.token_provider()
                session = await Session.open(url, token, self.keys)
            except (OSError, SessionClosed, TimeoutError, RequestError) as exc:
                if isinstance(exc, RequestError) and exc.code == ErrorCode.AUTH_FAILED:
                    raise
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            self.session = session
            try:
                await self.logic.ensure_registered()
                await self._check_generation(session)
                await self._resume(session)
                self._connected.set()
                await self._pump(session)
            except SessionClosed:
                pass
            except Exception as exc:
                # a refused resume, a broken socket, a frame we cannot read: start over with
                # backoff; the run loop never dies while the client is open
                log.warning("session ended (%s); reconnecting", type(exc).__name__)
            finally:
                self._connected.clear()
                await session.close()
            closed = session.closed
            if closed is not None and closed.code in _NEVER_RECONNECT:
                self.fatal = closed
                return
            await asyncio.sleep(self._backoff(1))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.base_backoff * 2 ** min(attempt, 10))
        return random.uniform(self.base_backoff / 2, ceiling)  # noqa: S311 - jitter, not crypto

    async def _check_generation(self, session: Session) -> None:
        """A new stream generation means the server's database was restored or failed over:
        a room whose head is now below what this device already processed was rolled back,
        and its next seqs will be reused for other events. Say so, and resume from the
        server's head so the reused seqs are not skipped as duplicates."""
        generation = session.welcome.generation
        if generation is None or generation == self.keys.generation:
            return
        if self.keys.generation:
            for room, role in (await self.rooms_now(session)).items():
                keys = self.keys.rooms.get(room)
                if keys is not None and keys.last_seq > role:
                    problem = (
                        f"the server's history of this room rolled back from seq "
                        f"{keys.last_seq} to {role} (database restored or failed over); "
                        "messages after that may be missing or renumbered"
                    )
                    await self._inbox.put(Message(room, role, "notice", "", "", None, 0, problem))
                    keys.last_seq = role
        self.keys.generation = generation
        self.keys.save()

    async def rooms_now(self, session: Session) -> dict[str, int]:
        from medrelay_protocol.frames import ListRooms, Rooms

        reply: Rooms = await session.request(ListRooms(rid=session.next_rid()), Rooms)
        return {r.room: r.last_seq for r in reply.rooms}

    async def _resume(self, session: Session) -> None:
        """Resume every room from its last seq. A room this user is no longer in (removed
        while offline) is refused as a whole sync: drop such rooms and try once more."""
        rooms = {room: keys.last_seq for room, keys in self.keys.rooms.items()}
        try:
            await self.request(Sync(rid=session.next_rid(), rooms=rooms), Synced, timeout=60)
        except RequestError as exc:
            if exc.code != ErrorCode.FORBIDDEN:
                raise
            current = await self.rooms_now(session)
            for room in set(rooms) - set(current):
                self.keys.forget_room(room)
            rooms = {room: seq for room, seq in rooms.items() if room in current}
            await self.request(Sync(rid=session.next_rid(), rooms=rooms), Synced, timeout=60)

    async def _pump(self, session: Session) -> None:
        while True:
            frame = await session.pushed.get()
            if frame is None:
                raise session.closed or SessionClosed(None, "closed")
            await self._on_push(frame)
            if session.pushed.empty():
                await self._flush_receipts(session)

    async def _flush_receipts(self, session: Session) -> None:
        """Cumulative receipts, one per room per burst of deliveries. A room forgotten
        within the burst (this user's removal came after the event being acknowledged) gets
        none, and is not brought back: ``keys.room`` would recreate it, empty, and the next
        resume would ask for it again."""
        from medrelay_protocol.frames import Receipt

        due, self._unreceipted = self._unreceipted, {}
        for room, seq in due.items():
            keys = self.keys.rooms.get(room)
            if (keys is not None and keys.current) or room in self.logic.rosters:
                await session.send_only(Receipt(room=room, seq=seq))

    async def _on_push(self, frame: Frame) -> None:
        if isinstance(frame, Deliver):
            await self._on_deliver(frame)
        elif isinstance(frame, DeviceRequest):
            self.device_requests[frame.request] = frame
            self._device_request.set()
        elif isinstance(frame, Error):
            log.warning("server error %s", ErrorCode(frame.code).name)

    async def _on_deliver(self, ev: Deliver) -> None:
        keys = self.keys.room(ev.room)
        if ev.seq <= keys.last_seq:
            return  # a replay of something already processed
        try:
            body, problem = await self.logic.process(ev)
        except RequestError as exc:
            if exc.code.retryable or exc.code == ErrorCode.UNAVAILABLE:
                raise  # temporary: end the session; the event is replayed after reconnecting
            body, problem = None, f"refused: {exc.code.name.lower()}"
        except MedrelayError as exc:
            body, problem = None, f"refused: {exc.code.name.lower()}"
        after = self.keys.rooms.get(ev.room)  # None: this event removed us; room forgotten
        if after is not None:
            after.last_seq = max(after.last_seq, ev.seq)
            self.keys.save()
            self._unreceipted[ev.room] = ev.seq
        if body is not None or problem is not None:
            await self._inbox.put(
                Message(ev.room, ev.seq, ev.kind, ev.user, ev.sender, body, ev.ts, problem)
            )

    # requests ----------------------------------------------------------------------------
    async def request(self, frame: Frame, expect: type[Any], *, timeout: float = 30) -> Any:
        session = self.session
        if session is None:
            raise SessionClosed(None, "not connected")
        try:
            return await session.request(frame, expect, timeout=timeout)
        except SessionClosed:
            # the socket is gone before the run loop noticed: callers that wait for a
            # connection must wait for the reconnect, not spin on a dead session
            if self.session is session:
                self._connected.clear()
            raise

    def rid(self) -> str:
        assert self.session is not None
        return self.session.next_rid()

    # the user's API ------------------------------------------------------------------------
    async def messages(self) -> AsyncIterator[Message]:
        while True:
            yield await self._inbox.get()

    async def next_message(self, timeout: float = 10) -> Message:
        return await asyncio.wait_for(self._inbox.get(), timeout)

    async def create_room(
        self,
        room: str | None = None,
        *,
        external_sender: bytes | None = None,
        history: str = "joined",
    ) -> str:
        """Create a room (an opaque random id unless given) owned by this user."""
        await self._connected.wait()
        return await self.logic.create_room(
            room or os.urandom(12).hex(), external_sender=external_sender, history=history
        )

    async def add(
        self, room: str, user: str, role: str = "member", *, history_from_seq: int | None = None
    ) -> int:
        await self._connected.wait()
        return await self.logic.add(room, user, role, history_from_seq=history_from_seq)

    async def remove(self, room: str, user: str) -> int:
        await self._connected.wait()
        return await self.logic.remove(room, user)

    async def leave(self, room: str) -> int:
        await self._connected.wait()
        seq = await self.logic.leave(room)
        self.keys.forget_room(room)
        return seq

    async def revoke_device(self, device_id: str) -> list[str]:
        """Revoke one of this user's devices (lost or stolen) from this device: a signed
        ``revoke_device`` change with a rekey in every room, so the device is cut off and
        every later message is under a key it never had. Returns the rooms rotated."""
        await self._connected.wait()
        rooms = sorted(await self.rooms())
        for room in rooms:
            await self.logic.revoke_device(room, device_id)
        return rooms

    # the user's devices ---------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """The user's one fingerprint (from the identity key), the same on every device."""
        return fingerprint(self.user, self.keys.identity.public)

    async def list_device_requests(self) -> dict[str, DeviceRequest | PendingDevice]:
        """Ask the server for the user's pending device requests (e.g. after connecting)."""
        await self._connected.wait()
        reply: Approvals = await self.request(ListApprovals(rid=self.rid()), Approvals)
        self.device_requests = {p.request: p for p in reply.requests}
        if reply.requests:
            self._device_request.set()
        return dict(self.device_requests)

    async def wait_for_device_request(self, timeout: float = 15.0) -> DeviceRequest | PendingDevice:
        """The oldest pending request, waiting for one to be pushed if there is none."""
        await self._connected.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if not self.device_requests:
            await self.list_device_requests()
        while not self.device_requests:
            self._device_request.clear()
            await asyncio.wait_for(self._device_request.wait(), max(0.0, deadline - loop.time()))
        return min(self.device_requests.values(), key=lambda p: (p.created_at, p.request))

    async def approve_device(self, request_id: str, code: str) -> DeviceCertificate:
        """Approve a new device of this user: ``code`` is what the user typed (or scanned)
        from the new device's screen. A code that does not match the key the server
        delivered raises :class:`~medrelay_protocol.enrolment.CodeMismatch` and nothing is
        issued. Otherwise the device gets its certificate and the backup key."""
        await self._connected.wait()
        pending = self.device_requests.get(request_id)
        if pending is None:
            await self.list_device_requests()
            pending = self.device_requests.get(request_id)
        if pending is None:
            raise RequestError(ErrorCode.UNKNOWN_REQUEST, "no such request")
        cert = await enrolment.approve(self.keys, self.request, self.rid, pending, code)
        self.device_requests.pop(request_id, None)
        return cert

    async def ensure_backup(self) -> int:
        """Store (or check) the user's encrypted key backup; returns its version."""
        await self._connected.wait()
        return await enrolment.ensure_backup(self.keys, self.request, self.rid)

    async def wait_for_key(self, room: str, timeout: float = 15.0) -> None:
        """Wait until this device holds the room's current epoch key (after being added,
        the wrap arrives with the rekey event)."""
        await self._connected.wait()
        await self.logic.await_epoch(room, timeout=timeout)

    async def send_text(self, room: str, text: str) -> int:
        return await self.send_body(room, {"type": "text", "text": text})

    async def send_body(
        self,
        room: str,
        body: dict[str, Any],
        *,
        urgent_role: str | None = None,
        patient_tag: bytes | None = None,
    ) -> int:
        """Encrypt, sign and send; retried with the identical bytes across reconnects until
        acknowledged. Returns the seq the server assigned."""
        await self._connected.wait()
        priority = "urgent" if urgent_role is not None else "routine"
        sealed = await self.logic.seal(room, body, priority=priority)
        while True:
            await self._connected.wait()
            try:
                return await self.logic.submit(
                    room, sealed, urgent_role=urgent_role, patient_tag=patient_tag
                )
            except SessionClosed:
                continue
            except RequestError as exc:
                if exc.code == ErrorCode.RATE_LIMITED:
                    detail = exc.detail if isinstance(exc.detail, dict) else {}
                    await asyncio.sleep((detail.get("retry_after_ms") or 100) / 1000)
                    continue
                if exc.code == ErrorCode.UNAVAILABLE:  # the server's store is away: same bytes
                    await asyncio.sleep(self._backoff(2))
                    continue
                if exc.code in (ErrorCode.STALE_EPOCH, ErrorCode.REKEY_REQUIRED):
                    await self.logic.refresh(room)
                    sealed = await self.logic.seal(room, body, priority=priority)
                    continue
                raise

    async def send_file(self, room: str, data: bytes, *, name: str, mime: str) -> int:
        await self._connected.wait()
        pointer = await self.logic.upload(room, data)
        return await self.send_body(room, {"type": "file", "name": name, "mime": mime, **pointer})

    async def download(self, body: dict[str, Any]) -> bytes:
        await self._connected.wait()
        return await self.logic.download(body)

    async def rooms(self) -> dict[str, str]:
        """Rooms this user is a member of -> role."""
        await self._connected.wait()
        from medrelay_protocol.frames import ListRooms, Rooms

        reply: Rooms = await self.request(ListRooms(rid=self.rid()), Rooms)
        return {r.room: r.role for r in reply.rooms}

    async def history(self, room: str, *, before: int = 0, limit: int = 50) -> list[Message]:
        await self._connected.wait()
        out = []
        for ev in await self.logic.history(room, before=before, limit=limit):
            body, problem = await self.logic.decrypt_event(ev, live=False)
            out.append(Message(ev.room, ev.seq, ev.kind, ev.user, ev.sender, body, ev.ts, problem))
        return out


__all__ = ["Client", "Message", "RequestError"]


def new_mid() -> bytes:
    return os.urandom(16)
