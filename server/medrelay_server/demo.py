"""``medrelay demo``: two doctors and a bedside tablet in a ward room, printed as each sees it.

The demo composes the server and the Python client the way a test does; it imports the
client lazily so the server package does not depend on it otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any


def _show(who: str, m: Any) -> None:
    body = m.body
    if m.problem:
        text = m.problem
    elif isinstance(body, dict) and body.get("type") == "text":
        text = f"{m.sender_user}: {body['text']}"
    elif isinstance(body, dict) and body.get("type") == "vitals":
        text = f"{m.sender_user} (vitals): {body['summary']}"
    elif isinstance(body, dict) and body.get("type") == "notice":
        text = f"[roster] {body.get('action')} {body.get('user')}"
    else:
        text = repr(body)
    print(f"  {who:<12} sees seq {m.seq:>3}: {text}")


@contextlib.asynccontextmanager
async def _server(url: str | None, data_dir: Path) -> AsyncIterator[str]:
    if url is not None:
        yield url
        return
    from .app import create_app
    from .auth.dev import DevIssuer
    from .clock import SystemClock
    from .fanout.memory import InMemoryBroker
    from .serve import running
    from .settings import Settings
    from .store.sql import SqlStore

    await asyncio.to_thread(data_dir.mkdir, parents=True, exist_ok=True)
    settings = Settings(data_dir=data_dir, port=0, dev_issuer=True)
    app = create_app(
        settings,
        store=SqlStore(settings.resolved_database_url()),
        broker=InMemoryBroker(),
        clock=SystemClock(),
        identity=DevIssuer(),
    )
    async with running(app, settings) as server:
        yield server.url


async def _drain(who: str, client: Any, kinds: set[str], until_seq: int) -> None:
    while True:
        m = await client.next_message(timeout=10)
        if m.kind in kinds or m.problem:
            _show(who, m)
        if m.seq >= until_seq:
            return


async def run_demo(url: str | None, data_dir: Path) -> int:
    from medrelay_client.client import Client
    from medrelay_client.devtoken import dev_token
    from medrelay_client.keystore import KeyStore

    keys_dir = data_dir / "demo-keys"  # beside the demo's database, so reruns keep identities
    async with _server(url, data_dir) as ws_url:
        print(f"medrelay demo against {ws_url}")

        def make(user: str, kind: str = "person") -> Client:
            async def token() -> str:
                return await dev_token(ws_url, user, kind)

            return Client(ws_url, KeyStore.load_or_create(user, keys_dir / user), token, kind=kind)

        chan, wong, tablet = make("dr.chan"), make("dr.wong"), make("ward7-tablet", "tablet")
        for c in (chan, wong, tablet):
            await c.start()
        try:
            room = await chan.create_room()
            print(f"dr.chan opened ward room {room[:8]}…; adds dr.wong and the bed tablet")
            await chan.add(room, "dr.wong")
            await chan.add(room, "ward7-tablet", role="device")
            seq = await tablet.send_body(
                room,
                {
                    "type": "vitals",
                    "summary": "RR 24, SpO2 91%, HR 118, BP 98/60, T 38.4 -> NEWS2 8",
                },
                urgent_role="on-call medicine",
            )
            print("the tablet posted vitals as an urgent summon (encrypted on the tablet)")
            await _drain("dr.chan", chan, {"summon", "message", "roster"}, seq)
            seq = await chan.send_text(room, "Reviewing now. Start sepsis bundle, cultures x2.")
            await _drain("dr.wong", wong, {"summon", "message", "roster"}, seq)
            seq = await wong.send_text(room, "On my way, 5 minutes.")
            await _drain("dr.chan", chan, {"message"}, seq)
            print("dr.wong leaves; the next send by dr.chan commits a new epoch first")
            await wong.leave(room)
            seq = await chan.send_text(room, "Patient stable after fluids.")
            print(f"dr.chan's message got seq {seq}; dr.wong no longer receives the room")
            print("the tablet cannot read history:", await _history_refused(tablet, room))
        finally:
            for c in (chan, wong, tablet):
                await c.close()
    print("demo complete")
    return 0


async def _history_refused(client: Any, room: str) -> str:
    from medrelay_protocol.errors import RequestError

    try:
        await client.history(room)
    except RequestError as exc:
        return f"refused with {exc.code.name}"
    return "NOT refused (unexpected)"
