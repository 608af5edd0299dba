"""Alembic environment for medrelay.

The server runs migrations itself: ``SqlStore.open()`` builds a ``Config`` in code and passes
its open connection (already inside a transaction holding the migration lock) as
``config.attributes["connection"]``. Run from the command line (``alembic -c
server/medrelay_server/alembic.ini upgrade head``) the database URL comes from
``-x url=...``, else ``MEDRELAY_DATABASE_URL``, else ``sqlalchemy.url`` in the ini file.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine


def _migrate(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


async def _migrate_url(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_migrate)
    finally:
        await engine.dispose()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    url = url or os.environ.get("MEDRELAY_DATABASE_URL")
    url = url or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set MEDRELAY_DATABASE_URL")
    return url


given = context.config.attributes.get("connection")
if context.is_offline_mode():
    context.configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif isinstance(given, Connection):
    _migrate(given)
else:
    asyncio.run(_migrate_url(_url()))
