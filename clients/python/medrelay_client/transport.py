"""One WebSocket session: handshake, request/response by rid, a queue of pushed frames."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from typing import TypeVar

from medrelay_protocol import SUBPROTOCOL, codec
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError
from medrelay_protocol.frames import Challenge, Error, Frame, Hello, Welcome
from medrelay_protocol.identity import sign_connect_proof
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .keystore import KeyStore

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Frame)


def error_code(number: int) -> ErrorCode:
    """A code this client does not know (a newer server) is treated as an internal error."""
    try:
        return ErrorCode(number)
    except ValueError:
        return ErrorCode.INTERNAL_ERROR


class SessionClosed(Exception):
    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class Session:
    def __init__(self, ws: ClientConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome
        self.pushed: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[Frame]] = {}
        self._rids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())
        self.closed: SessionClosed | None = None

    @classmethod
    async def open(
        cls, url: str, token: str, keys: KeyStore, *, open_timeout: float = 10
    ) -> Session:
        ws = await connect(
            url,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,
            max_size=2 * codec.MAX_FRAME,
            open_timeout=open_timeout,
        )
        try:
            first = await asyncio.wait_for(ws.recv(decode=False), open_timeout)
            challenge = codec.decode(first, from_client=False)
            if not isinstance(challenge, Challenge):
                raise SessionClosed(None, "expected a challenge")
            proof = sign_connect_proof(keys.device, challenge.nonce, keys.user)
            hello = Hello(
                rid="hello", device=keys.device_id, device_key=keys.device.public, proof=proof
            )
            await ws.send(codec.encode(hello))
            second = await asyncio.wait_for(ws.recv(decode=False), open_timeout)
            reply = codec.decode(second, from_client=False)
            if isinstance(reply, Error):
                raise RequestError(error_code(reply.code), reply.message)
            if not isinstance(reply, Welcome):
                raise SessionClosed(None, "expected welcome")
        except BaseException:
            await ws.close()
            raise
        return cls(ws, reply)

    def next_rid(self) -> str:
        return f"r{next(self._rids)}"

    async def request(self, frame: Frame, expect: type[F], *, timeout: float = 30) -> F:
        rid = getattr(frame, "rid", None)
        if rid is None:
            raise ValueError("request frames carry a rid")
        if self.closed is not None:
            raise self.closed
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self._send(codec.encode(frame))
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)
        if isinstance(reply, Error):
            raise RequestError(
                error_code(reply.code),
                reply.message,
                detail={
                    "missing": reply.missing,
                    "extra": reply.extra,
                    "retry_after_ms": reply.retry_after_ms,
                },
            )
        if not isinstance(reply, expect):
            raise RequestError(ErrorCode.BAD_FRAME, f"unexpected reply {reply.TYPE}")
        return reply

    async def send_only(self, frame: Frame) -> None:
        await self._send(codec.encode(frame))

    async def _send(self, data: bytes) -> None:
        """Send, turning the socket's own close exceptions into :class:`SessionClosed`."""
        try:
            await self.ws.send(data)
        except ConnectionClosed as exc:
            raise SessionClosed(self.ws.close_code, self.ws.close_reason or "") from exc

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                if isinstance(data, str):
                    continue
                frame = codec.decode(data, from_client=False)
                rid = getattr(frame, "rid", None)
                fut = self._pending.get(rid) if rid is not None else None
                if fut is not None and not fut.done():
                    fut.set_result(frame)
                else:
                    self.pushed.put_nowait(frame)
        except Exception as exc:  # the socket failed; the close code below tells why
            log.debug("session reader stopped: %s", type(exc).__name__)
        finally:
            self.closed = SessionClosed(self.ws.close_code, self.ws.close_reason or "")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(self.closed)
            self.pushed.put_nowait(None)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(BaseException):
            await self._reader
