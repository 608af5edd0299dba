"""Sends acknowledged per second through ``SqlStore.append_message``, with the audit
journal's hash chain on, beside the same run with journaling off.

    .venv/bin/python bench/journal_throughput.py [--url URL] [--seconds 5] [--senders 32]
                                                 [--rooms 16]

Each mode runs in a fresh PostgreSQL schema (dropped afterwards): ``--senders`` concurrent
senders, each posting to one of ``--rooms`` rooms in turn, for ``--seconds``; an append
counts when ``append_message`` returned (committed: envelope, audit record and chain head in
one transaction). "Journal off" is ``SqlStore(journal=False)``, which writes the audit row
unchained (no node-row lock, no hash): a bench-only mode that shows what the chain costs.
Both run with group commit (the default); a third run shows the chain without it.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

import sqlalchemy as sa
from medrelay_server.store.base import AuditRecord
from medrelay_server.store.sql import SqlStore
from sqlalchemy.ext.asyncio import create_async_engine

DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _room(store: SqlStore, room: str, now: int) -> None:
    await store.create_room(
        room,
        genesis=b"genesis",
        head=b"head",
        owner="alice",
        sender_device="alice-1",
        manifest=b"manifest",
        wraps={"alice-1": b"wrap"},
        now=now,
        audit=[AuditRecord("room_create", "success", user="alice")],
    )


async def run_mode(
    url: str, *, journal: bool, group_commit: bool, seconds: float, senders: int, rooms: int
) -> dict[str, float]:
    schema = "bench_" + secrets.token_hex(6)
    store = SqlStore(
        url, schema=schema, node_id="bench-1", journal=journal, group_commit=group_commit
    )
    await store.open()
    now = int(time.time())
    names = [f"room-{i}" for i in range(rooms)]
    for name in names:
        await _room(store, name, now)
    latencies: list[float] = []
    done = 0
    deadline = time.perf_counter() + seconds
    envelope = secrets.token_bytes(600)

    async def sender(i: int) -> None:
        nonlocal done
        n = 0
        while time.perf_counter() < deadline:
            n += 1
            mid = i.to_bytes(4, "big") + n.to_bytes(12, "big")
            room = names[(i + n) % rooms]
            start = time.perf_counter()
            await store.append_message(
                room,
                user="alice",
                device="alice-1",
                mid=mid,
                envelope=envelope,
                kind="message",
                epoch=1,
                allow_pending=False,
                now=now,
                audit=[AuditRecord("message", "success", user="alice", device="alice-1", mid=mid)],
            )
            latencies.append(time.perf_counter() - start)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(sender(i) for i in range(senders)))
    elapsed = time.perf_counter() - started
    await store.close()
    await _drop(url, schema)
    latencies.sort()
    return {
        "sends/s": done / elapsed,
        "sends": done,
        "p50 ms": statistics.median(latencies) * 1000,
        "p99 ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


async def _drop(url: str, schema: str) -> None:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    await engine.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--senders", type=int, default=32)
    parser.add_argument("--rooms", type=int, default=16)
    args = parser.parse_args()
    kw = {"seconds": args.seconds, "senders": args.senders, "rooms": args.rooms}
    modes = {
        "journal off": await run_mode(args.url, journal=False, group_commit=True, **kw),
        "journal on": await run_mode(args.url, journal=True, group_commit=True, **kw),
        "on, no group": await run_mode(args.url, journal=True, group_commit=False, **kw),
    }
    print(
        f"PostgreSQL, {args.senders} concurrent senders, {args.rooms} rooms, "
        f"{args.seconds:.0f} s per mode"
    )
    print(f"{'':<10}" + "".join(f"{name:>15}" for name in modes))
    for key in ("sends/s", "sends", "p50 ms", "p99 ms"):
        print(f"{key:<10}" + "".join(f"{m[key]:>15.1f}" for m in modes.values()))
    off, on = modes["journal off"], modes["journal on"]
    print(f"journal on / off: {on['sends/s'] / off['sends/s']:.2f} of the sends per second")


if __name__ == "__main__":
    asyncio.run(main())
