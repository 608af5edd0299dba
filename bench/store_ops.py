"""Process CPU per store operation on the send and receipt paths, in process, no sockets.

    python -m bench.store_ops [--databases sqlite postgres] [--n 2000] [--profile]

Opens a fresh database (PostgreSQL: a throwaway schema in the ``test`` database), makes one
room with ten members, then times N calls of each operation the gateway makes per send and
per receipt, sequentially and with 32 sends in flight (the group commit's case), then
delivery's reads of ten events (a gap, a device's catch-up). Printed per
operation: wall µs and process CPU µs per call. Beside them, the bare floor: the same number
of ``SELECT 1`` round trips through the raw driver, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa
from medrelay_server.store.base import AuditRecord, Commit, MembershipChange
from medrelay_server.store.sql import SqlStore

NOW = 1_700_000_000
ROOM = "room-bench"
PG_URL = os.environ.get("BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


async def _room(store: SqlStore, members: int) -> None:
    await store.create_room(
        ROOM,
        genesis=b"genesis",
        head=b"head-1",
        owner="u0",
        sender_device="u0-1",
        manifest=b"manifest-1",
        wraps={"u0-1": b"wrap"},
        now=NOW,
        audit=[AuditRecord("room.create", "ok", user="u0")],
    )
    state = await store.room_state(ROOM)
    assert state is not None
    await store.commit(
        Commit(
            room=ROOM,
            expected_head=state.roster_head,
            expected_epoch=state.epoch,
            sender_user="u0",
            sender_device="u0-1",
            entry=b"entry-2",
            new_head=b"head-2",
            membership=MembershipChange(add={f"u{i}": "member" for i in range(1, members)}),
            manifest=b"manifest-2",
            wraps={f"u{i}-1": b"wrap" for i in range(members)},
            new_epoch=state.epoch + 1,
            pending_rekey=False,
        ),
        now=NOW + 1,
        audit=[],
    )


def _send(store: SqlStore, i: int, epoch: int) -> Awaitable[object]:
    return store.append_message(
        ROOM,
        user="u0",
        device="u0-1",
        mid=secrets.token_bytes(16),
        envelope=b"x" * 1100,
        kind="message",
        epoch=epoch,
        allow_pending=False,
        now=NOW + 2,
        audit=[AuditRecord("message", "ok", user="u0", device="u0-1", room=ROOM)],
    )


async def _timed(
    n: int, make: Callable[[int], Awaitable[object]], concurrency: int
) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    if concurrency == 1:
        for i in range(n):
            await make(i)
    else:
        for start in range(0, n, concurrency):
            await asyncio.gather(*(make(i) for i in range(start, min(n, start + concurrency))))
    return (time.perf_counter() - t0) / n * 1e6, (time.process_time() - c0) / n * 1e6


async def _bare_floor(store: SqlStore, n: int) -> tuple[float, float]:
    async with store.database.engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        if store.database.is_sqlite:

            async def one(_i: int) -> object:
                cur = await driver.execute("SELECT 1")  # type: ignore[union-attr]
                return await cur.fetchall()
        else:

            async def one(_i: int) -> object:
                return await driver.fetchval("SELECT 1")  # type: ignore[union-attr]

        return await _timed(n, one, 1)


async def run(
    url: str, schema: str | None, n: int, profile: Path | None
) -> list[tuple[str, float, float]]:
    store = SqlStore(url, schema=schema, node_id="bench-node")
    await store.open()
    try:
        await _room(store, 10)
        state = await store.room_state(ROOM)
        assert state is not None
        epoch = state.epoch
        out = [("bare driver round trip (SELECT 1)", *await _bare_floor(store, n))]
        out.append(
            ("member_role (read)", *await _timed(n, lambda i: store.member_role(ROOM, "u3"), 1))
        )
        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        out.append(
            ("append_message, one at a time", *await _timed(n, lambda i: _send(store, i, epoch), 1))
        )
        out.append(
            ("append_message, 32 in flight", *await _timed(n, lambda i: _send(store, i, epoch), 32))
        )
        if prof and profile:
            prof.disable()
            prof.dump_stats(str(profile))
        seq = [0]

        def receipt(i: int) -> Awaitable[object]:
            seq[0] += 1
            return store.record_receipt(ROOM, f"u{1 + i % 9}-1", seq[0], NOW + 3)

        out.append(("record_receipt (write)", *await _timed(n, receipt, 1)))
        out.append(
            ("receipt_of (read)", *await _timed(n, lambda i: store.receipt_of(ROOM, "u1-1"), 1))
        )
        # delivery's reads: a gap of ten events, and a device's catch-up of ten
        last = state.last_seq + 2 * n
        out.append(
            (
                "room_events (read, 10 events)",
                *await _timed(n, lambda i: store.room_events(ROOM, last - 10, limit=100), 1),
            )
        )
        out.append(
            (
                "events_after (read, 10 events)",
                *await _timed(
                    n,
                    lambda i: store.events_after(
                        ROOM, last - 10, user="u3", device="u3-1", limit=100
                    ),
                    1,
                ),
            )
        )
        return out
    finally:
        await store.close()


async def _pg_schema() -> str:
    from sqlalchemy.ext.asyncio import create_async_engine

    name = "bench_" + secrets.token_hex(4)
    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE SCHEMA "{name}"'))
    await engine.dispose()
    return name


async def _drop_schema(name: str) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(PG_URL)
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP SCHEMA "{name}" CASCADE'))
    await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgres"])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the sends to FILE")
    args = parser.parse_args()
    for db in args.databases:
        with tempfile.TemporaryDirectory() as tmp:
            if db == "sqlite":
                rows = asyncio.run(
                    run(f"sqlite+aiosqlite:///{Path(tmp) / 'b.db'}", None, args.n, args.profile)
                )
            else:
                schema = asyncio.run(_pg_schema())
                try:
                    rows = asyncio.run(run(PG_URL, schema, args.n, args.profile))
                finally:
                    asyncio.run(_drop_schema(schema))
        print(f"\n{db}, {args.n} calls each          wall µs/call   CPU µs/call")
        for name, wall, cpu in rows:
            print(f"  {name:<36} {wall:>10.0f}   {cpu:>10.0f}")
    if args.profile:
        pstats.Stats(str(args.profile)).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
