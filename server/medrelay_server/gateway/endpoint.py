"""The WebSocket endpoint: handshake, authentication, the read loop, and the one place where
exceptions become error frames or close codes.

Handshake: the server sends ``challenge`` (32-byte nonce) at once; the client answers with
``hello`` carrying its device key, a signature over the nonce and, unless it sent
``Authorization: Bearer`` on the upgrade, its token. Anything else, or nothing within the
handshake deadline, closes the socket. Unknown exceptions become ``INTERNAL_ERROR`` with no
detail (the traceback goes to the log, never to the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from typing import Any

from medrelay_protocol import SUBPROTOCOL, codec
from medrelay_protocol.codes import CloseCode, ErrorCode
from medrelay_protocol.crypto import device_id_for
from medrelay_protocol.errors import (
    BadSignature,
    FrameError,
    MedrelayError,
    RequestError,
)
from medrelay_protocol.frames import Challenge, Error, Frame, Hello, Reauth, ReauthRequired, Welcome
from medrelay_protocol.identity import verify_connect_proof
from starlette.websockets import WebSocket, WebSocketDisconnect

from ..ratelimit import TokenBucket
from ..store.base import StoreUnavailable
from .connection import Connection
from .context import Gateway
from .deadline import ReadDeadline
from .direct import direct_writer

log = logging.getLogger(__name__)


class Closing(Exception):
    """Close the socket with ``code``; when ``error`` is set, an ``error`` frame with that
    code goes out first so the client learns why in the protocol's own terms."""

    def __init__(self, code: CloseCode, reason: str, error: ErrorCode | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error


def error_frame(exc: MedrelayError, rid: str | None) -> Error:
    code = exc.code
    if isinstance(exc, RequestError) and isinstance(exc.detail, dict):
        detail: dict[str, Any] = exc.detail
        return Error(
            code=int(code),
            message=exc.message[:256],
            rid=rid,
            missing=tuple(detail.get("missing", ())),
            extra=tuple(detail.get("extra", ())),
            retry_after_ms=detail.get("retry_after_ms"),
        )
    return Error(code=int(code), message=exc.message[:256], rid=rid)


async def websocket_endpoint(ws: WebSocket) -> None:
    gw: Gateway = ws.app.state.gateway
    origin = ws.headers.get("origin")
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",")]
    # Refusals are made after accepting, so that the client sees a close code, not an HTTP 403.
    await ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    conn: Connection | None = None
    try:
        if origin is not None and origin not in gw.settings.allowed_origins:
            raise Closing(CloseCode.ORIGIN_REFUSED, "origin not allowed")
        if SUBPROTOCOL not in offered:
            raise Closing(CloseCode.PROTOCOL_ERROR, "subprotocol medrelay.v1 required")
        conn = await _handshake(ws, gw)
        await _read_loop(ws, gw, conn)
    except Closing as c:
        gw.metrics.closes.labels(code=str(int(c.code))).inc()
        if c.error is not None:
            data = codec.encode(Error(code=int(c.error), message=c.reason[:256]))
            if conn is not None:
                conn.enqueue(data)
            else:
                with contextlib.suppress(Exception):
                    await ws.send_bytes(data)
        if conn is not None:
            await conn.flush()
        with contextlib.suppress(Exception):
            await ws.close(code=c.code, reason=c.reason)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("connection failed")
        with contextlib.suppress(Exception):
            await ws.close(code=CloseCode.INTERNAL_ERROR, reason="internal error")
    finally:
        if conn is not None:
            await gw.disconnect(conn)
            if conn.registered:
                gw.journal.record_seen(conn.device, gw.clock.now())


async def _receive_frame(ws: WebSocket, gw: Gateway) -> tuple[bytes | None, str | None]:
    """Return (bytes, None) or raise Closing / WebSocketDisconnect."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is not None:
        raise Closing(
            CloseCode.UNSUPPORTED_DATA, "text frames are refused", ErrorCode.TEXT_FRAME_REFUSED
        )
    data = message.get("bytes")
    if data is None:
        raise Closing(CloseCode.PROTOCOL_ERROR, "empty message")
    gw.metrics.frames_in.inc()
    return data, None


async def _handshake(ws: WebSocket, gw: Gateway) -> Connection:
    nonce = os.urandom(32)
    await ws.send_bytes(codec.encode(Challenge(nonce=nonce, server_time=gw.clock.now())))
    deadline = gw.settings.limits.handshake_seconds
    try:
        data, _ = await asyncio.wait_for(_receive_frame(ws, gw), timeout=deadline)
    except TimeoutError as exc:
        raise Closing(CloseCode.HANDSHAKE_TIMEOUT, "no hello in time") from exc
    assert data is not None
    if len(data) > gw.settings.limits.max_frame:
        raise Closing(CloseCode.FRAME_TOO_LARGE, "frame too large", ErrorCode.FRAME_TOO_LARGE)
    try:
        hello = codec.decode(data, from_client=True)
    except FrameError as exc:
        raise Closing(CloseCode.PROTOCOL_ERROR, f"bad hello: {exc.code.name}", exc.code) from exc
    if not isinstance(hello, Hello):
        raise Closing(CloseCode.PROTOCOL_ERROR, "first frame must be hello")
    token = hello.token or _bearer(ws)
    if token is None:
        await _reject(gw, "", hello, "no token")
        raise Closing(CloseCode.AUTH_FAILED, "authentication required", ErrorCode.UNAUTHENTICATED)
    try:
        principal = gw.identity.verify(token, gw.clock.now())
    except RequestError as exc:
        await _reject(gw, "", hello, exc.message)  # the reason, never the token
        raise Closing(CloseCode.AUTH_FAILED, exc.message[:120], exc.code) from exc
    if device_id_for(hello.device_key) != hello.device:
        await _reject(gw, principal.user, hello, "device id mismatch")
        raise Closing(CloseCode.AUTH_FAILED, "device proof failed", ErrorCode.DEVICE_PROOF_FAILED)
    try:
        verify_connect_proof(hello.device_key, nonce, principal.user, hello.proof)
    except BadSignature as exc:
        await _reject(gw, principal.user, hello, "device proof failed")
        raise Closing(
            CloseCode.AUTH_FAILED, "device proof failed", ErrorCode.DEVICE_PROOF_FAILED
        ) from exc
    try:
        known = await gw.store.get_device(hello.device)
    except StoreUnavailable as exc:
        raise Closing(CloseCode.UNAVAILABLE, "try again shortly", ErrorCode.UNAVAILABLE) from exc
    if known is not None and (known.user != principal.user or known.revoked):
        await _reject(gw, principal.user, hello, "device not usable")
        raise Closing(
            CloseCode.DEVICE_REVOKED, "device not usable by this user", ErrorCode.FORBIDDEN
        )
    if gw.registry.device_count(hello.device) >= gw.settings.limits.connections_per_device:
        raise Closing(
            CloseCode.TOO_MANY_CONNECTIONS,
            "too many connections for this device",
            ErrorCode.TOO_MANY_CONNECTIONS,
        )
    try:  # before the connection is registered anywhere: a failure here leaves nothing behind
        generation = await _generation(gw)
    except StoreUnavailable as exc:
        raise Closing(CloseCode.UNAVAILABLE, "try again shortly", ErrorCode.UNAVAILABLE) from exc
    if known is not None:  # stored with the delivery journal's next flush
        gw.journal.record_seen(hello.device, gw.clock.now())
    conn = Connection(
        user=principal.user,
        device=hello.device,
        device_key=hello.device_key,
        kind=principal.kind,
        send_bytes=ws.send_bytes,
        write_now=direct_writer(ws.scope, gw.frames, gw.flushes),
        close_fn=lambda code, reason: ws.close(code=code, reason=reason),
        queue_limit=gw.settings.limits.outbound_queue,
        expires_at=principal.expires_at,
        institution=principal.institution,
        address=_peer(ws),
        registered=known is not None,
    )
    await gw.connect(conn, source=_peer(ws))
    welcome = Welcome(
        generation=generation,
        rid=hello.rid,
        user=principal.user,
        device=hello.device,
        session=secrets.token_hex(8),
        server_time=gw.clock.now(),
        limits={
            "max_frame": gw.settings.limits.max_frame,
            "outbound_queue": gw.settings.limits.outbound_queue,
            "sends_per_second": int(gw.settings.limits.sends_per_second),
            "token_expires_at": principal.expires_at,
        },
    )
    conn.enqueue(codec.encode(welcome))
    return conn


async def _generation(gw: Gateway) -> str | None:
    """The stream generation this node serves: the one its slow poll last confirmed
    (``Delivery.check_generation`` closes every connection when it changes), read from the
    store only until the first poll. A read per handshake cost two transactions."""
    known = gw.delivery.generation
    if known is not None:
        return known
    read = getattr(gw.store, "generation", None)
    if read is None:
        return None
    current: str = await read()
    if gw.delivery.generation is None:
        gw.delivery.generation = current
    return current


async def _reject(gw: Gateway, user: str, hello: Hello, why: str) -> None:
    await gw.journal_auth(user or None, hello.device, "failure", why)


def _bearer(ws: WebSocket) -> str | None:
    value = ws.headers.get("authorization", "")
    if value.lower().startswith("bearer "):
        return value[7:].strip() or None
    return None


def _peer(ws: WebSocket) -> str:
    client = ws.client
    return f"{client.host}:{client.port}" if client else "unknown"


async def _read_loop(ws: WebSocket, gw: Gateway, conn: Connection) -> None:
    """Read frames until the socket closes. Every frame costs a token of the connection's
    frame bucket; a peer that keeps sending after a burst of refusals is closed (4007)."""
    limits = gw.settings.limits
    bucket = TokenBucket(limits.frames_per_second, limits.frame_burst, gw.clock.now_ms())
    refused = 0
    deadline = ReadDeadline(gw.clock)  # one timer for the token, not a timeout per read
    try:
        while not conn.closed:
            if deadline.expired:  # (a renewal may have moved the deadline since it fired)
                deadline.expired = False
                if gw.clock.now() >= _reauth_due(conn):
                    await _expire(gw, conn)
            deadline.arm(_reauth_due(conn))
            deadline.reading = True
            try:
                data, _ = await _receive_frame(ws, gw)
            except asyncio.CancelledError:
                if deadline.interrupted():
                    continue  # the deadline passed while waiting: handled at the loop's top
                raise
            finally:
                deadline.reading = False
            assert data is not None
            if len(data) > limits.max_frame:
                raise Closing(
                    CloseCode.FRAME_TOO_LARGE, "frame too large", ErrorCode.FRAME_TOO_LARGE
                )
            wait = bucket.take(gw.clock.now_ms())
            if wait:
                refused += 1
                if refused > limits.frame_burst:
                    raise Closing(CloseCode.RATE_LIMITED, "too many frames", ErrorCode.RATE_LIMITED)
                limited = RequestError(
                    ErrorCode.RATE_LIMITED, "slow down", detail={"retry_after_ms": wait}
                )
                rid = codec.peek_request_id(data, max_size=limits.max_frame)
                _send_error(gw, conn, limited, rid)
                continue
            refused = 0
            await _dispatch(gw, conn, data)
    finally:
        deadline.close()


def _reauth_due(conn: Connection) -> int:
    """When the read loop must act on the token: its expiry, or once ``reauth_required``
    went out, the end of the grace period."""
    return conn.expires_at if conn.reauth_deadline is None else conn.reauth_deadline


async def _expire(gw: Gateway, conn: Connection) -> None:
    now = gw.clock.now()
    if conn.reauth_deadline is None:
        conn.reauth_deadline = now + int(gw.settings.limits.reauth_grace_seconds)
        conn.enqueue(codec.encode(ReauthRequired(deadline=conn.reauth_deadline)))
    elif now >= conn.reauth_deadline:
        raise Closing(
            CloseCode.REAUTH_TIMEOUT, "token expired and was not renewed", ErrorCode.TOKEN_EXPIRED
        )


async def _dispatch(gw: Gateway, conn: Connection, data: bytes) -> None:
    rid: str | None = None
    try:
        frame: Frame = codec.decode(data, max_size=gw.settings.limits.max_frame, from_client=True)
        rid = getattr(frame, "rid", None)
        if isinstance(frame, Reauth):
            await gw.reauth(conn, frame)
            return
        if conn.reauth_deadline is not None:
            raise RequestError(ErrorCode.REAUTH_REQUIRED, "renew your token")
        await gw.handle(conn, frame)
    except FrameError as exc:
        rid = rid or codec.peek_request_id(data, max_size=gw.settings.limits.max_frame)
        _send_error(gw, conn, exc, rid)
    except StoreUnavailable:
        _send_error(gw, conn, RequestError(ErrorCode.UNAVAILABLE, "try again"), rid)
    except MedrelayError as exc:
        _send_error(gw, conn, exc, rid)
    except Closing:
        raise
    except Exception:
        log.exception("handler failed")
        _send_error(gw, conn, RequestError(ErrorCode.INTERNAL_ERROR, "internal error"), rid)


def _send_error(gw: Gateway, conn: Connection, exc: MedrelayError, rid: str | None) -> None:
    gw.metrics.errors.labels(code=str(int(exc.code))).inc()
    conn.enqueue(codec.encode(error_frame(exc, rid)))
