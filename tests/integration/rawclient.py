"""A raw WebSocket peer for integration tests: it speaks the wire protocol byte by byte, so a
test can send what no well-behaved client would (oversized, malformed, forged, replayed) and
observe exactly what the server answers and how it closes.

``RawClient.open`` performs the same handshake as ``medrelay_client.transport.Session.open``
(challenge -> hello with a device proof -> welcome); ``connect_ws`` opens a bare socket for
tests of the handshake itself.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from medrelay_client.client import Client, Message
from medrelay_client.keystore import KeyStore
from medrelay_protocol import SUBPROTOCOL, codec
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    SigningKey,
    aead_seal,
    device_id_for,
    message_key,
    pad,
    random_nonce,
    sign_with_label,
)
from medrelay_protocol.envelope import MESSAGE_LABEL, Envelope, MessageHeader
from medrelay_protocol.frames import Challenge, Error, Frame, Hello, Ok, RegisterDevice, Welcome
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate, sign_connect_proof
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10.0


async def connect_ws(
    url: str,
    *,
    token: str | None = None,
    subprotocols: tuple[str, ...] = (SUBPROTOCOL,),
    origin: str | None = None,
    max_queue: int | None = 16,
    rcvbuf: int | None = None,
) -> ClientConnection:
    """A bare socket (no handshake frames yet). ``subprotocols=()`` offers none; ``rcvbuf``
    shrinks the kernel receive buffer so a client that does not read is noticed soon."""
    headers: dict[str, str] = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    kw: dict[str, Any] = {}
    if rcvbuf is not None:
        host, port = url.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        kw["sock"] = sock
    return await connect(
        url,
        subprotocols=list(subprotocols) or None,  # type: ignore[arg-type]
        additional_headers=headers,
        origin=origin,  # type: ignore[arg-type]
        compression=None,
        max_size=4 * codec.MAX_FRAME,
        max_queue=max_queue,
        open_timeout=TIMEOUT,
        **kw,
    )


async def recv_frame(ws: ClientConnection, timeout: float = TIMEOUT) -> Frame:
    data = await asyncio.wait_for(ws.recv(decode=False), timeout)
    assert isinstance(data, bytes), "the server sent a text frame"
    return codec.decode(data, max_size=4 * codec.MAX_FRAME, from_client=False)


async def close_code_after(
    ws: ClientConnection, timeout: float = TIMEOUT
) -> tuple[int | None, list[Frame]]:
    """Read (and keep) every frame until the server closes; return its close code and them."""
    frames: list[Frame] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                data = await ws.recv(decode=False)
                if isinstance(data, bytes):
                    frames.append(codec.decode(data, max_size=4 * codec.MAX_FRAME))
        except ConnectionClosed:
            pass
    return ws.close_code, frames


@dataclass
class RawClient:
    ws: ClientConnection
    keys: KeyStore
    welcome: Welcome
    pushed: list[Frame] = field(default_factory=list)
    _rids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    async def open(
        cls,
        url: str,
        keys: KeyStore,
        token: str,
        *,
        token_in_hello: bool = False,
        register: bool = True,
        **connect_kw: Any,
    ) -> RawClient:
        """Connect and authenticate; with ``register`` (the default) also publish the
        device's certificate and bundle, as every real client does before using rooms."""
        ws = await connect_ws(url, token=None if token_in_hello else token, **connect_kw)
        challenge = await recv_frame(ws)
        assert isinstance(challenge, Challenge), challenge
        await ws.send(
            codec.encode(hello_for(keys, challenge.nonce, token if token_in_hello else None))
        )
        reply = await recv_frame(ws)
        if not isinstance(reply, Welcome):
            await ws.close()
            raise AssertionError(f"expected welcome, got {reply!r}")
        raw = cls(ws, keys, reply)
        if register:
            now = int(time.time())
            cert = DeviceCertificate.issue(
                keys.identity, keys.user, keys.device.public, "person", now
            )
            bundle = DeviceBundle.issue(keys.device, keys.receiving.public, now + 86400)
            frame = RegisterDevice(
                rid="register",
                identity_key=keys.identity.public,
                certificate=cert.raw,
                bundle=bundle.raw,
            )
            ok = await raw.request(frame)
            assert isinstance(ok, Ok), ok
        return raw

    def rid(self) -> str:
        return f"raw{next(self._rids)}"

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    async def send(self, frame: Frame) -> None:
        await self.ws.send(codec.encode(frame))

    async def recv(self, timeout: float = TIMEOUT) -> Frame:
        return await recv_frame(self.ws, timeout)

    async def reply_to(self, rid: str | None, timeout: float = TIMEOUT) -> Frame:
        """The next frame that echoes ``rid`` (``None``: the next error without a rid);
        anything pushed meanwhile is kept in ``pushed``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if getattr(frame, "rid", None) == rid and (
                    rid is not None or isinstance(frame, Error)
                ):
                    return frame
                self.pushed.append(frame)

    async def request(self, frame: Frame, timeout: float = TIMEOUT) -> Frame:
        await self.send(frame)
        return await self.reply_to(getattr(frame, "rid", None), timeout)

    async def error_for(self, data: bytes, rid: str | None) -> Error:
        await self.send_raw(data)
        reply = await self.reply_to(rid)
        assert isinstance(reply, Error), reply
        return reply

    async def closed_with(self, timeout: float = TIMEOUT) -> tuple[int | None, list[Frame]]:
        return await close_code_after(self.ws, timeout)

    async def close(self) -> None:
        await self.ws.close()


def hello_for(
    keys: KeyStore, nonce: bytes, token: str | None = None, *, rid: str = "hello"
) -> Hello:
    proof = sign_connect_proof(keys.device, nonce, keys.user)
    return Hello(
        rid=rid, device=keys.device_id, device_key=keys.device.public, proof=proof, token=token
    )


def envelope_for(
    device: SigningKey,
    room: str,
    *,
    mid: bytes | None = None,
    epoch: int = 1,
    roster_head: bytes = b"\0" * 32,
    counter: int = 0,
    secret: bytes | None = None,
    body: object = None,
    signer: SigningKey | None = None,
) -> Envelope:
    """An envelope whose header names ``device``, encrypted like ``seal_message`` does and
    signed by ``signer`` (default: ``device`` itself). A different ``signer`` makes the
    forgery no real client can produce."""
    header = MessageHeader(
        room=room,
        epoch=epoch,
        roster_head=roster_head,
        sender_device=device_id_for(device.public),
        counter=counter,
        mid=mid or os.urandom(16),
    )
    header_bytes = header.encode()
    secret = secret or os.urandom(32)
    body = body if body is not None else {"type": "text", "text": "x"}
    nonce = random_nonce()
    key = message_key(secret, room, epoch, roster_head)
    ct = aead_seal(key, nonce, pad(pack_body(body)), header_bytes)
    sig = sign_with_label(signer or device, MESSAGE_LABEL, header_bytes, nonce, ct)
    return Envelope(header_bytes, nonce, ct, sig)


def room_envelope(keys: KeyStore, room: str, body: object, *, mid: bytes | None = None) -> Envelope:
    """A real message for ``room`` under the key store's current epoch (what a client sends),
    advancing its counter."""
    rk = keys.room(room)
    env = envelope_for(
        keys.device,
        room,
        mid=mid,
        epoch=rk.current,
        roster_head=rk.heads[rk.current],
        counter=rk.counter,
        secret=rk.epochs[rk.current],
        body=body,
    )
    rk.counter += 1
    keys.save()
    return env


def flip_signature(envelope: bytes) -> bytes:
    env = Envelope.decode(envelope)
    sig = bytearray(env.signature)
    sig[10] ^= 0x01
    return Envelope(env.header_bytes, env.nonce, env.ciphertext, bytes(sig)).encode()


def raw_map(**fields: Any) -> bytes:
    """A msgpack map as given (no schema): for frames with wrong types or unknown ``t``."""
    return pack_body(fields)


# ----------------------------------------------------------------- with real clients


async def next_of_kind(client: Client, kind: str = "message", timeout: float = TIMEOUT) -> Message:
    """The next decrypted event of ``kind`` (notices of roster changes are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            m = await client.next_message(timeout)
            if m.kind == kind:
                return m


async def collect_until(client: Client, last_text: str, timeout: float = TIMEOUT) -> list[Message]:
    """Every event the client surfaces up to and including the message ``last_text``."""
    got: list[Message] = []
    async with asyncio.timeout(timeout):
        while True:
            m = await client.next_message(timeout)
            got.append(m)
            if m.kind == "message" and isinstance(m.body, dict) and m.body.get("text") == last_text:
                return got


async def assert_alive(sender: Client, receiver: Client, room: str) -> None:
    """The server still relays: a fresh message from ``sender`` reaches ``receiver``."""
    text = f"still alive {os.urandom(4).hex()}"
    seq = await asyncio.wait_for(sender.send_text(room, text), TIMEOUT)
    got = await collect_until(receiver, text)
    assert got[-1].seq == seq


def texts(messages: list[Message]) -> list[str]:
    return [m.body["text"] for m in messages if m.kind == "message" and isinstance(m.body, dict)]
