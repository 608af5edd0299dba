"""PostgreSQL: one pooled connection kept out of the pool between uses.

The send batches' one-trip call (:mod:`.onetrip`) is one statement per batch, hundreds of
times a second under load, one at a time. Taking a connection from SQLAlchemy's pool and
giving it back costs about 110 µs of the event loop's CPU (two greenlet hops, the pool's
bookkeeping and events), more than the statement's own round trip. :class:`HeldConnection`
takes one connection from the pool at its first use and keeps it for the next ones.

* A connection that a use leaves closed or inside a transaction, or that a use left with an
  exception (a database error, a cancelled call: its state is then unknown), is invalidated
  and the next use takes another from the pool.
* A use that finds the held connection busy (a second batch in flight, ``depth`` 2) takes
  one from the pool for itself, as before: nobody waits for the held one.
* :meth:`close` gives it back to the pool (before the engine is disposed), at the end of
  a use still in progress; uses after it take their own from the pool.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .engine import Database, unavailable_on_db_error


class HeldConnection:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._conn: AsyncConnection | None = None
        self._pg: Any = None
        self._busy = False
        self._closed = False
        self.taken = 0
        """Connections taken from the pool for holding (1 unless one was lost)."""

    @property
    def held(self) -> bool:
        return self._conn is not None

    @contextlib.asynccontextmanager
    async def statement(self) -> AsyncIterator[Any]:
        """As :meth:`Database.statement`: an asyncpg connection outside any transaction."""
        if self._busy or self._closed:
            async with self._db.statement() as pg:
                yield pg
            return
        self._busy = True
        try:
            with unavailable_on_db_error():
                pg = await self._take()
                clean = False
                try:
                    yield pg
                    clean = True
                finally:
                    if not clean or pg.is_closed() or pg.is_in_transaction():
                        await self._drop()
                    elif self._closed:  # closed while this use ran: give it back now
                        await self._give_back()
        finally:
            self._busy = False

    async def _take(self) -> Any:
        if self._conn is None:
            conn = await self._db.connect_for_statements()
            try:
                self._pg = (await conn.get_raw_connection()).driver_connection
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
            self.taken += 1
        return self._pg

    async def _drop(self) -> None:
        conn, self._conn, self._pg = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        """Give the connection back to the pool (at the end of a use in progress, if one
        is); later uses take one from the pool each, as :meth:`Database.statement` does."""
        self._closed = True
        if not self._busy:
            await self._give_back()

    async def _give_back(self) -> None:
        conn, self._conn, self._pg = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
