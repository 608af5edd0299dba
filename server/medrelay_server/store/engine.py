"""Connections for :class:`~medrelay_server.store.sql.SqlStore`: engines, transactions,
error translation and migrations, for SQLite (aiosqlite) and PostgreSQL (asyncpg).

Transactions:

* PostgreSQL: writes lock the room row with ``SELECT ... FOR UPDATE`` (the queries do that);
  an optional schema name is put first on every connection's ``search_path`` (asyncpg
  ``server_settings``), so unqualified table names resolve into it. Tests use one fresh
  schema per test. Every session runs with ``plan_cache_mode = force_custom_plan``: a
  prepared statement (asyncpg's, or one in ``medrelay_send_batch``) otherwise switches to a
  generic plan after five executions and keeps it until the next ANALYZE, so a node that
  started on a young database went on scanning the whole ``events`` table for each batch's
  check for retried sends as the table grew. Planning each statement costs tens of
  microseconds (``tests/server/test_plan_cache.py``; ``docs/performance.md``, "Eighth
  round"). ``medrelay_send_batch`` carries its own settings (migration 0009): generic
  plans made with sequential scans priced out, so its ten statements are planned once per
  session and still use the indexes.
* SQLite: sqlite3's own transaction handling is switched off (``isolation_level = None``)
  and the ``begin`` event emits ``BEGIN IMMEDIATE`` for writes (taking the database write
  lock up front, so a read-then-write never fails to upgrade) and a plain ``BEGIN`` for
  reads. Writes inside one process also queue on an ``asyncio.Lock``, so concurrent writers
  wait in the event loop rather than on SQLite's busy handler; the busy timeout covers other
  processes. The database runs in WAL mode, so readers never block the writer.

Every database failure that means "cannot reach or use the database" becomes
``StoreUnavailable`` here, at the boundary (``raise ... from``); ``RequestError`` refusals pass
through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from ..settings import DEFAULT_POOL_SIZE, POOL_OVERFLOW
from .base import StoreUnavailable

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
_WRITE = "medrelay_write"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class Database:
    """One engine plus the transaction discipline of its dialect.

    ``write()`` yields a connection inside a transaction that commits on normal exit and
    rolls back on an exception. ``read()`` yields one in autocommit on PostgreSQL (each
    statement its own transaction) and inside a read transaction on SQLite. Sessions run
    READ COMMITTED whatever the server's default: the locking (room rows, the journal's
    node rows) and ``read()`` are built on each statement seeing what committed before it.
    """

    def __init__(
        self, url: str, *, schema: str | None = None, pool_size: int = DEFAULT_POOL_SIZE
    ) -> None:
        if pool_size < 1:
            raise ValueError("the connection pool needs at least one connection")
        parsed = make_url(url)
        driver = _DRIVERS.get(parsed.drivername)
        if driver is None:
            raise ValueError(f"unsupported database driver {parsed.drivername!r}")
        parsed = parsed.set(drivername=driver)
        self.is_sqlite = driver.startswith("sqlite")
        self.schema = schema
        if self.is_sqlite:
            if schema is not None:
                raise ValueError("schema is only supported on PostgreSQL")
            if parsed.database in (None, "", ":memory:") or "mode=memory" in str(parsed):
                raise ValueError("SQLite needs a database file (in-memory is not shared)")
            self.engine = create_async_engine(parsed)
            _install_sqlite_hooks(self.engine)
        else:
            if schema is not None and not _SCHEMA_NAME.fullmatch(schema):
                raise ValueError("schema must be a lowercase SQL identifier")
            settings = {
                "plan_cache_mode": "force_custom_plan",
                "default_transaction_isolation": "read committed",
            }
            if schema is not None:
                settings["search_path"] = schema
            connect_args: dict[str, Any] = {"server_settings": settings}
            self.engine = create_async_engine(
                parsed,
                connect_args=connect_args,
                pool_pre_ping=False,
                # the most recently used connection first: at low load one warm session
                # serves every transaction. In turn (the default), each of the pool's
                # sessions ran its first transactions cold, a new backend loading its
                # catalog caches and planning the statements afresh (the first send on a
                # session 27-54 ms, the next few 4-12 ms, then 3; "Sixth round")
                pool_use_lifo=True,
                pool_size=pool_size,
                max_overflow=POOL_OVERFLOW,
            )
        self._writer: AsyncEngine = self.engine.execution_options(**{_WRITE: True})
        self._reader: AsyncEngine | None = (
            None if self.is_sqlite else self.engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads. On PostgreSQL it is in autocommit: each statement is a
        transaction of its own, with its own snapshot, which is what READ COMMITTED gives
        each statement inside BEGIN and COMMIT too, less those two round trips (a
        one-statement read cost 870-940 µs of CPU that way, 456-474 µs without). Reads that
        need one state across statements use :meth:`snapshot`; locking reads belong in
        :meth:`write`. On SQLite, a read transaction (the ``begin`` hook)."""
        with unavailable_on_db_error():
            if self._reader is None:
                async with self.engine.begin() as conn:
                    yield conn
            else:
                async with self._reader.connect() as conn:
                    yield conn

    @contextlib.asynccontextmanager
    async def snapshot(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction that sees one consistent state across all its statements
        (PostgreSQL: REPEATABLE READ, read only; SQLite: a WAL read transaction), for
        readers such as the journal verifier that must not see half of a concurrent write."""
        with unavailable_on_db_error():
            async with self.engine.connect() as conn:
                if not self.is_sqlite:
                    await conn.execution_options(
                        isolation_level="REPEATABLE READ", postgresql_readonly=True
                    )
                async with conn.begin():
                    yield conn

    @contextlib.asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        with unavailable_on_db_error():
            if self._write_lock is None:
                async with self._writer.begin() as conn:
                    yield conn
            else:
                async with self._write_lock, self._writer.begin() as conn:
                    yield conn

    @contextlib.asynccontextmanager
    async def batch_write(self) -> AsyncIterator[tuple[AsyncConnection, Any]]:
        """A write transaction for the send path: ``(conn, pg)``. On SQLite ``pg`` is None
        and this is :meth:`write`. On PostgreSQL the transaction is asyncpg's own, on a
        connection from SQLAlchemy's pool: ``pg`` (the asyncpg connection) begins, runs and
        commits it, and ``conn`` must not run statements (SQLAlchemy does not know of the
        transaction). SQLAlchemy's BEGIN, first statement and COMMIT cost about 0.5 ms of
        CPU per transaction here, asyncpg's about 0.2 ms (``bench.store_ops``), and a send
        batch is a fixed handful of statements that SQLAlchemy only passed through.

        asyncpg errors become ``StoreUnavailable`` as :func:`raw_errors` says. A connection
        that is closed, or still inside a transaction after the block (a failed rollback),
        is invalidated, so the pool never hands it out again."""
        if self.is_sqlite:
            async with self.write() as conn:
                yield conn, None
            return
        with unavailable_on_db_error():
            async with self._writer.connect() as conn:
                pg: Any = (await conn.get_raw_connection()).driver_connection
                try:
                    async with raw_errors():
                        transaction = pg.transaction()
                        await transaction.start()
                    try:
                        yield conn, pg
                    except BaseException:
                        with contextlib.suppress(Exception):
                            await transaction.rollback()
                        raise
                    async with raw_errors():
                        await transaction.commit()
                finally:
                    if pg.is_closed() or pg.is_in_transaction():
                        await conn.invalidate()

    @contextlib.asynccontextmanager
    async def statement(self) -> AsyncIterator[Any]:
        """PostgreSQL only: an asyncpg connection from the pool outside any transaction, so
        each statement is a transaction of its own (one round trip, commit included). A
        connection closed, or left inside a transaction, is invalidated."""
        if self.is_sqlite:
            raise ValueError("PostgreSQL only")
        with unavailable_on_db_error():
            async with self._writer.connect() as conn:
                pg: Any = (await conn.get_raw_connection()).driver_connection
                try:
                    yield pg
                finally:
                    if pg.is_closed() or pg.is_in_transaction():
                        await conn.invalidate()

    async def connect_for_statements(self) -> AsyncConnection:
        """PostgreSQL only: a pooled connection to hold between statements
        (:class:`~.held.HeldConnection`); the caller closes it to give it back."""
        if self.is_sqlite:
            raise ValueError("PostgreSQL only")
        return await self._writer.connect()

    async def migrate(self) -> None:
        """Bring the schema to the newest revision, holding a migration lock (PostgreSQL:
        an advisory lock per schema; SQLite: the write lock) so concurrent starts are safe."""
        async with self.write() as conn:
            if not self.is_sqlite:
                key = f"medrelay-migrate:{self.schema or ''}"
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(sa.func.hashtext(key))))
                if self.schema is not None:
                    await conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"'))
            await conn.run_sync(_upgrade)

    async def listen(
        self, channel: str, callback: Callable[[str], None], stop: asyncio.Event
    ) -> None:
        """PostgreSQL only: call ``callback(payload)`` for every NOTIFY on ``channel`` until
        ``stop`` is set, reconnecting after a lost connection. Returns at once on SQLite
        (one process, nothing to hear)."""
        if self.is_sqlite:
            return
        delay = 0.5
        while not stop.is_set():
            try:
                async with self.engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    pg: Any = raw.driver_connection
                    lost = asyncio.Event()

                    def on_notify(_c: object, _pid: int, _channel: str, payload: str) -> None:
                        callback(payload)

                    await pg.add_listener(channel, on_notify)
                    pg.add_termination_listener(lambda _c, event=lost: event.set())
                    delay = 0.5
                    waiters = [
                        asyncio.ensure_future(stop.wait()),
                        asyncio.ensure_future(lost.wait()),
                    ]
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for w in waiters:
                            w.cancel()
                    if not lost.is_set():
                        with contextlib.suppress(Exception):
                            await pg.remove_listener(channel, on_notify)
            except Exception as exc:  # the database is away: try again with backoff
                log.warning("LISTEN %s lost (%s); retrying", channel, type(exc).__name__)
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, 10.0)

    async def dispose(self) -> None:
        await self.engine.dispose()


def _upgrade(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _install_sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            "PRAGMA foreign_keys=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and TimeoutError
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # connection pool exhausted
    sa_exc.DisconnectionError,
)


# SQLSTATE classes meaning "try again later": connection exception, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention.
_RETRYABLE_SQLSTATE_CLASSES = ("08", "40", "53", "57")


@contextlib.asynccontextmanager
async def raw_errors() -> AsyncIterator[None]:
    """Around statements sent straight to asyncpg (bypassing SQLAlchemy, so its error
    wrapping): a lost connection or a retryable SQLSTATE becomes ``StoreUnavailable``,
    like :func:`unavailable_on_db_error` does for SQLAlchemy's errors."""
    try:
        yield
    except OSError as exc:
        raise StoreUnavailable("database unavailable") from exc
    except Exception as exc:
        module = type(exc).__module__ or ""
        if not module.startswith("asyncpg"):
            raise
        sqlstate = str(getattr(exc, "sqlstate", None) or "")
        lost = type(exc).__name__ in _ASYNCPG_LOST
        if lost or sqlstate[:2] in _RETRYABLE_SQLSTATE_CLASSES:
            raise StoreUnavailable("database unavailable") from exc
        raise


_ASYNCPG_LOST = frozenset(
    {
        "ConnectionDoesNotExistError",
        "InterfaceError",
        "InternalClientError",
        "ConnectionFailureError",
    }
)


@contextlib.contextmanager
def unavailable_on_db_error() -> Iterator[None]:
    """Translate failures to reach (or keep using) the database into ``StoreUnavailable``."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise StoreUnavailable("database unavailable") from exc
    except sa_exc.DBAPIError as exc:
        sqlstate = str(getattr(exc.orig, "sqlstate", None) or "")
        if exc.connection_invalidated or sqlstate[:2] in _RETRYABLE_SQLSTATE_CLASSES:
            raise StoreUnavailable("database unavailable") from exc
        raise
