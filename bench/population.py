"""Untimed set-up on medrelay: users with registered devices, rooms created by their owners
with a signed genesis and a rekey, members added one signed change + rekey at a time.

Owners use the real client library (``medrelay_client.Client``), which builds and verifies
every roster entry and rekey manifest; everyone else only registers its device over a raw
socket (their own ``Client`` would re-verify the roster on every change, which is set-up cost
the bench does not need). Load generators later act as these devices over raw sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass, field

from medrelay_client.client import Client
from medrelay_client.keystore import KeyStore
from medrelay_client.transport import SessionClosed
from medrelay_protocol.crypto import ReceivingKey, SigningKey

from .mr import Identity, connect, fetch_tokens, register


@dataclass
class RoomPlan:
    room: str
    owner: str
    members: list[tuple[str, str]]  # (user, role), the owner excluded


@dataclass
class RoomReady:
    room: str
    epoch: int
    head: bytes
    members: list[str] = field(default_factory=list)


def quiet_client_noise() -> None:
    """A closed client leaves a request future failed with ``SessionClosed`` that nobody
    awaits; asyncio would print it at collection. Not a bench problem: keep the log clean."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if isinstance(context.get("exception"), SessionClosed):
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def keystore_for(ident: Identity) -> KeyStore:
    return KeyStore(
        None,
        user=ident.user,
        identity=SigningKey(ident.identity_seed),
        device=ident.device(),
        receiving=ReceivingKey(ident.receiving_seed),
    )


async def register_all(
    host: str, port: int, idents: list[Identity], tokens: dict[str, str], *, concurrency: int = 32
) -> None:
    sem = asyncio.Semaphore(concurrency)

    async def one(ident: Identity) -> None:
        async with sem:
            ws, _ = await connect(host, port, ident, tokens[ident.user])
            try:
                await register(ws, ident)
            finally:
                ws.close()

    await asyncio.gather(*(one(i) for i in idents))


async def owner_client(
    url: str, ident: Identity, token: str, keys: KeyStore | None = None
) -> Client:
    async def provider() -> str:
        return token

    client = Client(url, keys or keystore_for(ident), provider, kind=ident.kind)
    await client.start()
    return client


async def build_rooms(
    host: str,
    port: int,
    idents: dict[str, Identity],
    tokens: dict[str, str],
    plans: list[RoomPlan],
    *,
    concurrency: int = 6,
    keystores: dict[str, KeyStore] | None = None,
) -> dict[str, RoomReady]:
    """Create every planned room (rooms of one owner in order, owners concurrently). The
    owners' key stores (epoch secrets, pinned rosters) go into ``keystores``."""
    url = f"ws://{host}:{port}/ws"
    by_owner: dict[str, list[RoomPlan]] = defaultdict(list)
    for plan in plans:
        by_owner[plan.owner].append(plan)
    out: dict[str, RoomReady] = {}
    sem = asyncio.Semaphore(concurrency)

    async def owner_rooms(owner: str, mine: list[RoomPlan]) -> None:
        async with sem:
            client = await owner_client(url, idents[owner], tokens[owner])
            if keystores is not None:
                keystores[owner] = client.keys
            try:
                for plan in mine:
                    await client.create_room(plan.room)
                    for user, role in plan.members:
                        await client.add(plan.room, user, role)
                    rk = client.keys.room(plan.room)
                    out[plan.room] = RoomReady(
                        plan.room,
                        rk.current,
                        rk.heads[rk.current],
                        [owner, *(u for u, _ in plan.members)],
                    )
            finally:
                await client.close()

    await asyncio.gather(*(owner_rooms(o, m) for o, m in by_owner.items()))
    return out


async def populate(
    host: str,
    port: int,
    idents: dict[str, Identity],
    plans: list[RoomPlan],
    keystores: dict[str, KeyStore] | None = None,
) -> tuple[dict[str, str], dict[str, RoomReady], dict[str, float]]:
    """Tokens for every identity, every device registered, every room built. Returns the
    tokens, the rooms, and how long each phase took."""
    quiet_client_noise()
    timing: dict[str, float] = {}
    t0 = time.monotonic()
    tokens = await fetch_tokens(host, port, [(i.user, i.kind) for i in idents.values()])
    timing["tokens"] = time.monotonic() - t0
    t0 = time.monotonic()
    await register_all(host, port, list(idents.values()), tokens)
    timing["register"] = time.monotonic() - t0
    t0 = time.monotonic()
    rooms = await build_rooms(host, port, idents, tokens, plans, keystores=keystores)
    timing["rooms"] = time.monotonic() - t0
    return tokens, rooms, timing
