"""medrelay wire helpers for the bench: tokens, the raw handshake, device registration, sealed
envelopes and pre-built ``send`` frames (the same steps as ``tests/integration/rawclient.py``,
on the bench's light WebSocket client)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass

import msgpack
from medrelay_protocol import SUBPROTOCOL, codec
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    aead_seal,
    device_id_for,
    message_key,
    pad,
    random_nonce,
    sign_with_label,
)
from medrelay_protocol.envelope import MESSAGE_LABEL, Envelope, MessageHeader
from medrelay_protocol.frames import (
    Challenge,
    Hello,
    Ok,
    RegisterDevice,
    Send,
    Sync,
    Synced,
    Welcome,
)
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate, sign_connect_proof

from .wsraw import WsClient, WsClosed, open_ws

BUNDLE_LIFETIME = 7 * 86400


class HandshakeFailed(Exception):
    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code


# --------------------------------------------------------------------------- tokens
async def _token_conn(
    host: str, port: int, jobs: list[tuple[str, str]], out: dict[str, str]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while jobs:
            user, kind = jobs.pop()
            body = json.dumps({"user": user, "kind": kind}).encode()
            writer.write(
                (
                    f"POST /dev/token HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            data = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"token for {user}: {head[:40]!r} {data[:80]!r}")
            out[user] = str(json.loads(data)["token"])
    finally:
        writer.close()


async def fetch_tokens(
    host: str, port: int, users: list[tuple[str, str]], *, concurrency: int = 4
) -> dict[str, str]:
    """Development tokens for ``(user, kind)`` pairs over a few keep-alive connections."""
    out: dict[str, str] = {}
    jobs = list(users)
    await asyncio.gather(
        *(_token_conn(host, port, jobs, out) for _ in range(min(concurrency, len(jobs) or 1)))
    )
    return out


# --------------------------------------------------------------------------- identities
@dataclass
class Identity:
    """What a load generator needs to act as one device of one user (picklable)."""

    user: str
    kind: str
    device_seed: bytes
    identity_seed: bytes = b""
    receiving_seed: bytes = b""

    @classmethod
    def new(cls, user: str, kind: str = "person") -> Identity:
        return cls(
            user,
            kind,
            SigningKey.generate().private_bytes(),
            SigningKey.generate().private_bytes(),
            ReceivingKey.generate().private_bytes(),
        )

    def device(self) -> SigningKey:
        return SigningKey(self.device_seed)

    @property
    def device_id(self) -> str:
        return device_id_for(self.device().public)


def decode(payload: bytes) -> dict[str, object]:
    """A server frame as a plain dict (no schema checks: the bench trusts its server)."""
    obj = msgpack.unpackb(payload, raw=False)
    assert isinstance(obj, dict)
    return obj


async def connect(
    host: str, port: int, ident: Identity, token: str, *, local: str | None = None
) -> tuple[WsClient, dict[str, object]]:
    """Open a socket and authenticate (challenge -> hello -> welcome)."""
    ws = await open_ws(
        host,
        port,
        "/ws",
        {"Sec-WebSocket-Protocol": SUBPROTOCOL, "Authorization": f"Bearer {token}"},
        local=local,
    )
    try:
        # like medrelay_client's Session.open: 10 s to open the socket (open_ws), then no
        # hurry for the challenge and the welcome (the server has its own 10 s for hello)
        challenge = codec.decode(await ws.recv(60.0), from_client=False)
        if not isinstance(challenge, Challenge):
            raise HandshakeFailed("expected challenge")
        key = ident.device()
        proof = sign_connect_proof(key, challenge.nonce, ident.user)
        ws.send(
            codec.encode(
                Hello(
                    rid="hello",
                    device=device_id_for(key.public),
                    device_key=key.public,
                    proof=proof,
                )
            )
        )
        reply = decode(await ws.recv(60.0))
    except WsClosed as exc:
        ws.abort()
        raise HandshakeFailed(str(exc), ws.close_code) from exc
    except BaseException:
        ws.abort()
        raise
    if reply.get("t") != Welcome.TYPE:
        ws.abort()
        code = reply.get("code") if reply.get("t") == "error" else ws.close_code
        raise HandshakeFailed(f"expected welcome, got {reply!r}", code)  # type: ignore[arg-type]
    return ws, reply


async def request(ws: WsClient, frame: object, timeout: float = 30.0) -> dict[str, object]:
    """Send a request frame and return the reply with its rid (pushed frames are dropped)."""
    rid = getattr(frame, "rid", None)
    ws.send(codec.encode(frame))  # type: ignore[arg-type]
    async with asyncio.timeout(timeout):
        while True:
            reply = decode(await ws.recv(timeout))
            if reply.get("rid") == rid:
                return reply


async def register(ws: WsClient, ident: Identity) -> None:
    now = int(time.time())
    identity = SigningKey(ident.identity_seed)
    device = ident.device()
    cert = DeviceCertificate.issue(identity, ident.user, device.public, ident.kind, now)
    bundle = DeviceBundle.issue(
        device, ReceivingKey(ident.receiving_seed).public, now + BUNDLE_LIFETIME
    )
    reply = await request(
        ws,
        RegisterDevice(
            rid="register", identity_key=identity.public, certificate=cert.raw, bundle=bundle.raw
        ),
    )
    if reply.get("t") != Ok.TYPE:
        raise HandshakeFailed(f"register refused: {reply!r}")


async def sync(ws: WsClient, rooms: dict[str, int], timeout: float = 60.0) -> dict[str, int]:
    reply = await request(ws, Sync(rid="sync", rooms=rooms), timeout)
    if reply.get("t") != Synced.TYPE:
        raise HandshakeFailed(f"sync refused: {reply!r}")
    heads = reply.get("heads")
    assert isinstance(heads, dict)
    return {str(k): int(v) for k, v in heads.items()}


# --------------------------------------------------------------------------- envelopes
def seal(
    device: SigningKey,
    room: str,
    *,
    epoch: int,
    roster_head: bytes,
    counter: int,
    body_size: int,
    secret: bytes | None = None,
    mid: bytes | None = None,
) -> tuple[bytes, bytes]:
    """A well-formed envelope (XChaCha20-Poly1305 + Ed25519, like ``seal_message``) whose
    padded body fills ``body_size`` bytes (a pad bucket: 256, 1024, ...). The epoch secret is
    random unless given: the server cannot tell, and the bench's receivers do not decrypt."""
    mid = mid or os.urandom(16)
    header = MessageHeader(
        room=room,
        epoch=epoch,
        roster_head=roster_head,
        sender_device=device_id_for(device.public),
        counter=counter,
        mid=mid,
    )
    header_bytes = header.encode()
    nonce = random_nonce()
    key = message_key(secret or os.urandom(32), room, epoch, roster_head)
    filler = os.urandom(max(0, body_size - 64))
    body = pack_body({"type": "vitals" if body_size <= 256 else "text", "data": filler})
    ct = aead_seal(key, nonce, pad(body), header_bytes)
    sig = sign_with_label(device, MESSAGE_LABEL, header_bytes, nonce, ct)
    return mid, Envelope(header_bytes, nonce, ct, sig).encode()


def send_frame(rid: str, room: str, mid: bytes, envelope: bytes) -> bytes:
    return codec.encode(Send(rid=rid, room=room, mid=mid, envelope=envelope))
