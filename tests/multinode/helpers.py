"""Sending under faults, as an application should: seal once, resubmit the identical bytes
(same mid) after an uncertain outcome, so a retry is stored once (idempotency)."""

from __future__ import annotations

import asyncio

from medrelay_client.client import Client
from medrelay_client.transport import SessionClosed
from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError

from .checker import Ledger

RETRY = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL_ERROR})


async def send_reliably(client: Client, room: str, text: str, ledger: Ledger) -> int:
    await client.wait_connected()
    sealed = await client.logic.seal(room, {"type": "text", "text": text})
    delay = 0.05
    while True:
        await client.wait_connected()
        try:
            seq = await client.logic.submit(room, sealed, urgent_role=None)
        except (SessionClosed, TimeoutError):
            continue
        except RequestError as exc:
            if exc.code in (ErrorCode.STALE_EPOCH, ErrorCode.REKEY_REQUIRED):
                await client.logic.refresh(room)  # refused, so not stored: reseal is safe
                sealed = await client.logic.seal(room, {"type": "text", "text": text})
                continue
            if exc.code not in RETRY:
                raise
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
            continue
        ledger.ack(room, seq, text)
        return seq


async def send_many(
    client: Client, room: str, prefix: str, n: int, ledger: Ledger, *, every: float = 0.0
) -> list[int]:
    seqs = []
    for i in range(n):
        seqs.append(await send_reliably(client, room, f"{prefix} #{i}", ledger))
        if every:
            await asyncio.sleep(every)
    return seqs
