"""Writing a frame into the socket without a task step (the live fan-out's fast path).

ASGI's ``send`` is a coroutine: each frame through it costs a writer-task wake-up and a
few awaits (Starlette's state checks, uvicorn's ``writable`` wait), about as much as the
rest of a delivery. Under uvicorn's ``websockets-sansio`` protocol (``serve.py`` configures
its subclass, ``wsprotocol.RelayProtocol``) that send is, once the socket is open and not
paused, three synchronous steps: websockets' ``ServerProtocol.send_binary`` frames the
bytes, ``data_to_send`` takes them, and ``transport.write`` appends them to the socket's
buffer. :func:`direct_writer` does those steps when they would not wait (the last once per
loop pass for all the frames of the pass), and declines (returns False, nothing written)
otherwise, so the caller falls back to the ASGI send. Framing stays websockets' own: a
server's unmasked frame without extensions is the same bytes for every connection, so
:class:`SharedFrames` frames each event once (websockets' ``Frame.serialize``) and every
recipient's writer appends those bytes to its output buffer, as ``send_binary`` would.

:class:`CaptureProtocol` is the outermost ASGI middleware: it records the server's own
``send`` for WebSocket scopes, before Starlette wraps it, under :data:`SCOPE_KEY`. Under any
other server (or protocol implementation) there is nothing to record and every frame takes
the ASGI path; ``tests/server/test_direct_write.py`` fails if the configured server stops
providing the fast path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState
from websockets.frames import Frame, Opcode
from websockets.protocol import SERVER, State

SCOPE_KEY = "medrelay.ws_protocol"
log = logging.getLogger(__name__)


class CaptureProtocol:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            protocol = getattr(send, "__self__", None)
            if isinstance(protocol, WebSocketsSansIOProtocol):
                scope[SCOPE_KEY] = protocol
        await self.app(scope, receive, send)


class SharedFrames:
    """The wire bytes of the last payload framed: the fan-out hands every recipient of an
    event the same ``bytes`` object, so one entry, matched by identity, frames each event
    once (about 1.1 µs a recipient for a 1 KiB frame here, against 0.07 µs to append it).
    The entry holds its payload, so an identity match is never a different object."""

    __slots__ = ("_payload", "_wire")

    def __init__(self) -> None:
        self._payload: bytes | None = None
        self._wire = b""

    def wire(self, payload: bytes) -> bytes:
        if payload is not self._payload:
            self._wire = Frame(Opcode.BINARY, payload).serialize(mask=False, extensions=[])
            self._payload = payload
        return self._wire


class PassFlush:
    """One loop callback per pass for every connection that has frames to flush, instead of
    one each (``call_soon`` and its handle cost about as much as the flush itself)."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: list[Callable[[], None]] = []

    def add(self, flush: Callable[[], None]) -> None:
        if not self._due:
            asyncio.get_running_loop().call_soon(self._run)
        self._due.append(flush)

    def _run(self) -> None:
        due, self._due = self._due, []
        for i, flush in enumerate(due):
            try:
                flush()
            except Exception as exc:  # one socket's failure must not keep the rest waiting
                log.warning("a socket flush failed (%s)", type(exc).__name__)
            except BaseException:  # not ours to swallow: the rest still flush, next pass
                rest = due[i + 1 :]
                if rest:
                    if not self._due:
                        asyncio.get_running_loop().call_soon(self._run)
                    self._due[:0] = rest
                raise


def direct_writer(
    scope: Scope, shared: SharedFrames | None = None, passes: PassFlush | None = None
) -> Callable[[bytes], bool] | None:
    """A synchronous binary-frame writer for this WebSocket, or None (no fast path).

    Frames are framed at once into websockets' output buffer, and the buffer goes to the
    socket once per event-loop pass (``call_soon``): every frame a connection gets in one
    pass (an ack and the sender's own event; a batch's events for a room) leaves in one
    ``send()`` system call, the largest single cost of a delivery on loopback (about 20 µs
    here). Anything else that writes to this socket (uvicorn's pongs and closes, the ASGI
    path) takes the same buffer first, so frames keep their order. With ``shared``, a frame
    is framed once for all the connections it goes to, where the connection negotiated no
    extension (``serve.py`` turns per-message deflate off); otherwise websockets frames it.
    With ``passes``, the pass's flushes of all connections run from one loop callback."""
    protocol: Any = scope.get(SCOPE_KEY)
    if protocol is None:
        return None
    ws, transport, writable = protocol.conn, protocol.transport, protocol.writable
    if ws.side is not SERVER or ws.extensions:
        shared = None
    loop = asyncio.get_running_loop()
    pending = False

    def flush() -> None:
        nonlocal pending
        pending = False
        out = ws.data_to_send()
        if out and not transport.is_closing():
            transport.write(b"".join(out))

    def write(data: bytes) -> bool:
        nonlocal pending
        if (
            protocol.close_sent
            or protocol.disconnected
            or ws.state is not State.OPEN
            or not writable.is_set()
            or transport.is_closing()
        ):
            return False
        if shared is not None and not ws.expect_continuation_frame and type(data) is bytes:
            ws.writes.append(shared.wire(data))  # data_to_send() swaps in a new list
        else:
            try:
                ws.send_binary(data)
            except InvalidState:
                return False
        if not pending:
            pending = True
            if passes is not None:
                passes.add(flush)
            else:
                loop.call_soon(flush)
        return True

    return write
