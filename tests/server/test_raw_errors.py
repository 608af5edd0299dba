"""``raw_errors``: statements sent straight to asyncpg fail like SQLAlchemy's do: a lost
connection or a retryable SQLSTATE is ``StoreUnavailable``; anything else passes through."""

from __future__ import annotations

import asyncpg
import pytest
from medrelay_server.store.base import StoreUnavailable
from medrelay_server.store.engine import raw_errors


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.ConnectionDoesNotExistError("gone"),
        asyncpg.exceptions.InterfaceError("closed"),
        asyncpg.exceptions.SerializationError("retry"),  # SQLSTATE 40001
        asyncpg.exceptions.DeadlockDetectedError("retry"),  # 40P01
        asyncpg.exceptions.AdminShutdownError("shutdown"),  # 57P01
        ConnectionResetError("reset"),
    ],
)
async def test_lost_or_retryable_is_unavailable(error: Exception) -> None:
    with pytest.raises(StoreUnavailable):
        async with raw_errors():
            raise error


@pytest.mark.parametrize(
    "error",
    [asyncpg.exceptions.UniqueViolationError("dup"), ValueError("not a database error")],
)
async def test_other_errors_pass_through(error: Exception) -> None:
    with pytest.raises(type(error)):
        async with raw_errors():
            raise error
