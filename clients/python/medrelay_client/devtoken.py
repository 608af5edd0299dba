"""Fetch a token from a server's development issuer (``medrelay serve --dev-issuer``)."""

from __future__ import annotations

import asyncio
import json
import urllib.request


def http_base(ws_url: str) -> str:
    base = ws_url.replace("wss://", "https://").replace("ws://", "http://")
    return base[: -len("/ws")] if base.endswith("/ws") else base


def _fetch(ws_url: str, user: str, kind: str) -> str:
    req = urllib.request.Request(  # noqa: S310 - the URL is the user's own server
        http_base(ws_url) + "/dev/token",
        data=json.dumps({"user": user, "kind": kind}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310
        return str(json.loads(resp.read())["token"])


async def dev_token(ws_url: str, user: str, kind: str = "person") -> str:
    return await asyncio.to_thread(_fetch, ws_url, user, kind)
