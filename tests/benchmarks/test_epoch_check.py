"""The bench's check when bedside vitals come back ``STALE_EPOCH``: which rooms' epochs
differ between the server's database and each load generator (``stats.epoch_mismatches``,
``db.room_epochs``)."""

from __future__ import annotations

import asyncpg
import pytest

from bench import db
from bench.stats import epoch_mismatches

ROOMS = ["ward-1", "ward-2", "ward-3"]


def test_only_rooms_whose_epochs_differ_are_named() -> None:
    server = {"ward-1": 4, "ward-2": 7, "ward-3": 2}
    generators = [[4, 7, 2], [4, 8, 2]]  # generator 2 counted one rekey too many in ward-2
    assert epoch_mismatches(server, ROOMS, generators) == [
        "ward-2: server 7; generator 1: 7, generator 2: 8"
    ]


def test_agreeing_epochs_name_nothing() -> None:
    server = {"ward-1": 4, "ward-2": 7, "ward-3": 2, "consult-9": 1}
    assert epoch_mismatches(server, ROOMS, [[4, 7, 2], [4, 7, 2]]) == []


def test_a_room_the_server_does_not_have_is_not_a_mismatch() -> None:
    assert epoch_mismatches({"ward-1": 1}, ROOMS, [[1, 5, 5]]) == []


def test_a_generator_that_reports_fewer_rooms_shows_none() -> None:
    assert epoch_mismatches({"ward-3": 2}, ROOMS, [[1, 1, 2], [1]]) == [
        "ward-3: server 2; generator 1: 2, generator 2: None"
    ]


@pytest.mark.postgres
async def test_room_epochs_reads_every_rooms_epoch_from_the_bench_database() -> None:
    name, _url = await db.create_database()
    try:
        conn = await asyncpg.connect(db.dsn_for(name))
        try:
            await conn.execute("CREATE TABLE rooms (room text PRIMARY KEY, epoch bigint)")
            await conn.executemany(
                "INSERT INTO rooms VALUES ($1, $2)", [("ward-1", 3), ("ward-2", 11)]
            )
        finally:
            await conn.close()
        assert await db.room_epochs(name) == {"ward-1": 3, "ward-2": 11}
    finally:
        await db.drop_database(name)
