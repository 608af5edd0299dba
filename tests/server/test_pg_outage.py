"""PostgreSQL outage: a private PostgreSQL (initdb + pg_ctl into a temporary directory, on a
free loopback port) runs a store; it is stopped under the store's feet, and the store must
refuse with ``StoreUnavailable`` (the gateway answers UNAVAILABLE, retryable), write nothing
half-way, and recover by itself once PostgreSQL is back, without being reopened."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from medrelay_protocol.codes import ErrorCode
from medrelay_server.journal.verify import verify
from medrelay_server.store import messages
from medrelay_server.store import schema as t
from medrelay_server.store.base import AuditRecord, StoreUnavailable
from medrelay_server.store.sql import SqlStore

from .test_store_contract import NOW, ROOM, new_room, send

pytestmark = pytest.mark.postgres


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """One throwaway cluster, run as the ``postgres`` OS user when we are root."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]))
        assert bins, "PostgreSQL server binaries not found under /usr/lib/postgresql"
        self.bin = Path(bins[-1])
        self.base = Path(tempfile.mkdtemp(prefix="medrelay-pg-"))
        self.data = self.base / "data"
        self.port = _free_port()
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N"
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off"
        )
        log = str(self.base / "server.log")
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        """A crash, not a shutdown: connections die mid-flight."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.destroy()


async def _counts(store: SqlStore) -> tuple[int, int, int]:
    async with store.database.read() as conn:
        events = (await conn.execute(sa.select(sa.func.count()).select_from(t.events))).scalar()
        audit = (await conn.execute(sa.select(sa.func.count()).select_from(t.audit))).scalar()
        last = (await conn.execute(sa.select(t.rooms.c.last_seq))).scalar()
    return int(events or 0), int(audit or 0), int(last or 0)


async def test_outage_refuses_then_recovers(private_pg: PrivatePostgres) -> None:
    store = SqlStore(private_pg.url, schema="outage", node_id="node-1")
    await store.open()
    try:
        await new_room(store)
        await send(store, mid=b"a" * 16)
        before = await _counts(store)
        assert before == (3, 2, 3)

        private_pg.stop()
        for call in (
            send(store, mid=b"b" * 16),
            store.journal([AuditRecord("authenticate", "success", user="alice", ts=NOW)]),
            store.ping(),
            store.room_state(ROOM),
        ):
            with pytest.raises(StoreUnavailable) as info:
                await call
            assert info.value.code == ErrorCode.UNAVAILABLE and info.value.code.retryable

        private_pg.start()
        retried = await send(store, mid=b"b" * 16)  # the same store object, not reopened
        assert (retried.event.seq, retried.duplicate) == (4, False)
        assert await _counts(store) == (4, 3, 4)
        report = await verify(store.database, [], b"")
        assert report.ok, report.problems
    finally:
        await store.close()


async def test_crash_before_commit_writes_nothing(private_pg: PrivatePostgres) -> None:
    """PostgreSQL dies between the send's statements and its commit: the client gets
    UNAVAILABLE, and after recovery neither the envelope nor its audit record exists, the
    room's seq was not consumed and the chain head did not move."""
    store = SqlStore(private_pg.url, schema="crash", node_id="node-1")
    await store.open()
    try:
        await new_room(store)
        before = await _counts(store)
        with pytest.raises(StoreUnavailable):
            async with store.database.batch_write() as (conn, pg):
                await messages.append_message(
                    conn,
                    store.writer,
                    ROOM,
                    pg=pg,
                    user="alice",
                    device="alice-1",
                    mid=b"c" * 16,
                    envelope=b"ciphertext",
                    kind="message",
                    epoch=1,
                    allow_pending=False,
                    now=NOW,
                    audit=[AuditRecord("message", "success", user="alice")],
                )
                private_pg.stop()
        private_pg.start()
        assert await _counts(store) == before
        again = await send(store, mid=b"c" * 16)
        assert (again.event.seq, again.duplicate) == (3, False)
        assert (await verify(store.database, [], b"")).ok
    finally:
        await store.close()
