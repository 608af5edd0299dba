"""``IdentityDb``: the register and the accounts, in the store's database.

It opens its own engine on the same URL (and PostgreSQL schema) as the ``SqlStore``, with
the same transaction discipline (:class:`medrelay_server.store.engine.Database`); the
tables are created by the store's migrations (``0003``), so the store is opened first, or
:meth:`IdentityDb.migrate` is called (the CLI does). Every method is one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..auth.errors import AuthReason, refuse
from ..store.engine import Database
from .importer import ACTIVE, RegisterEntry
from .schema import accounts, register_entries

LAPSED = "lapsed"
DEPROVISIONED = "deprovisioned"
REMOVED = "removed"
_REGISTER_FIELDS = (
    "name_en",
    "name_zh",
    "specialty",
    "reg_type",
    "qualification",
    "qualification_date",
    "status",
)


class ImportRefused(ValueError):
    """A full import that would deactivate too many registrations (a truncated file?)."""


@dataclass(frozen=True, slots=True)
class ImportReport:
    added: int
    updated: int
    unchanged: int
    deactivated: int


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    institution: str
    subject: str
    kind: str
    role: str | None
    registration_no: str | None
    ward: str | None
    status: str
    status_reason: str | None
    removal_pending: bool


def account_from_row(row: Any) -> Account:
    return Account(
        user=row.user_id,
        institution=row.institution,
        subject=row.subject,
        kind=row.kind,
        role=row.role,
        registration_no=row.registration_no,
        ward=row.ward,
        status=row.status,
        status_reason=row.status_reason,
        removal_pending=bool(row.removal_pending),
    )


def _register_entry(row: Any) -> RegisterEntry:
    return RegisterEntry(row.registration_no, *(getattr(row, f) for f in _REGISTER_FIELDS))


class IdentityDb:
    def __init__(self, url: str, *, schema: str | None = None) -> None:
        self.database = Database(url, schema=schema)

    def __repr__(self) -> str:
        return f"IdentityDb(schema={self.database.schema!r})"

    async def migrate(self) -> None:
        await self.database.migrate()

    async def close(self) -> None:
        await self.database.dispose()

    # register ---------------------------------------------------------------------------
    async def import_register(
        self,
        entries: Sequence[RegisterEntry],
        *,
        source: str,
        now: int,
        full: bool,
        max_deactivate: float = 0.05,
    ) -> ImportReport:
        """Upsert ``entries``. With ``full``, the file is the whole register: a number not
        in it becomes ``removed``; refused (:class:`ImportRefused`) when that would
        deactivate more than ``max_deactivate`` of the active registrations."""
        t = register_entries
        async with self.database.write() as conn:
            existing = {r.registration_no: r for r in await conn.execute(sa.select(t))}
            new = {e.registration_no: e for e in entries}
            inserts, updates, unchanged = [], [], 0
            for number, e in new.items():
                values = {f: getattr(e, f) for f in _REGISTER_FIELDS}
                old = existing.get(number)
                if old is None:
                    inserts.append({"registration_no": number, **values})
                elif any(getattr(old, f) != v for f, v in values.items()):
                    updates.append({"b_no": number, **values})
                else:
                    unchanged += 1
            gone = [n for n, r in existing.items() if full and n not in new and r.status != REMOVED]
            deactivating = sum(1 for u in updates if u["status"] != ACTIVE) + len(gone)
            active = sum(1 for r in existing.values() if r.status == ACTIVE)
            if active and deactivating > max_deactivate * active:
                raise ImportRefused(
                    f"the import would deactivate {deactivating} of {active} active "
                    "registrations; check the file, or pass --force"
                )
            stamp = {"updated_at": now, "source": source}
            if inserts:
                await conn.execute(sa.insert(t), [{**i, **stamp} for i in inserts])
            changed = [*updates, *({"b_no": n, "status": REMOVED} for n in gone)]
            for values in changed:
                number = values.pop("b_no")
                await conn.execute(
                    sa.update(t).where(t.c.registration_no == number).values(**values, **stamp)
                )
        return ImportReport(len(inserts), len(updates), unchanged, deactivating)

    async def registration(self, number: str) -> RegisterEntry | None:
        t = register_entries
        async with self.database.read() as conn:
            row = (await conn.execute(sa.select(t).where(t.c.registration_no == number))).first()
        return _register_entry(row) if row is not None else None

    # accounts ---------------------------------------------------------------------------
    async def sign_in_person(
        self,
        *,
        user: str,
        institution: str,
        subject: str,
        role: str | None,
        registration_no: str | None,
        requires_registration: bool,
        now: int,
    ) -> Account:
        """Record a person's sign-in, refusing a deprovisioned account and, for a doctor, a
        missing or inactive registration (``AccountRefused``). A lapsed account whose
        registration is active again is reactivated (it is not put back into rooms)."""
        a, r = accounts, register_entries
        what = "signin"
        async with self.database.write() as conn:
            row = (
                await conn.execute(sa.select(a).where(a.c.user_id == user).with_for_update())
            ).first()
            if row is not None and row.status == DEPROVISIONED:
                raise refuse(AuthReason.ACCOUNT_DISABLED, what=what, institution=institution)
            if requires_registration:
                if registration_no is None:
                    raise refuse(AuthReason.NOT_REGISTERED, what=what, institution=institution)
                entry = (
                    await conn.execute(
                        sa.select(r.c.status).where(r.c.registration_no == registration_no)
                    )
                ).first()
                if entry is None:
                    raise refuse(AuthReason.NOT_REGISTERED, what=what, institution=institution)
                if entry.status != ACTIVE:
                    raise refuse(
                        AuthReason.REGISTRATION_INACTIVE, what=what, institution=institution
                    )
            values: dict[str, Any] = {
                "role": role,
                "registration_no": registration_no if requires_registration else None,
                "last_signin_at": now,
            }
            if row is None:
                await conn.execute(
                    sa.insert(a).values(
                        user_id=user,
                        institution=institution,
                        subject=subject,
                        kind="person",
                        status=ACTIVE,
                        status_at=now,
                        removal_pending=False,
                        created_at=now,
                        **values,
                    )
                )
            else:
                if row.status != ACTIVE:
                    values |= {"status": ACTIVE, "status_reason": "signed in", "status_at": now}
                await conn.execute(sa.update(a).where(a.c.user_id == user).values(**values))
            row = (await conn.execute(sa.select(a).where(a.c.user_id == user))).one()
        return account_from_row(row)

    async def account(self, user: str) -> Account | None:
        async with self.database.read() as conn:
            row = (
                await conn.execute(sa.select(accounts).where(accounts.c.user_id == user))
            ).first()
        return account_from_row(row) if row is not None else None

    async def account_by_subject(self, institution: str, subject: str) -> Account | None:
        a = accounts
        async with self.database.read() as conn:
            row = (
                await conn.execute(
                    sa.select(a).where(a.c.institution == institution, a.c.subject == subject)
                )
            ).first()
        return account_from_row(row) if row is not None else None

    async def set_status(self, user: str, status: str, *, reason: str, now: int) -> bool:
        """Set an account's status and ask for its removal from every room (unless it is
        made active). False if there is no such account."""
        values: dict[str, Any] = {"status": status, "status_reason": reason, "status_at": now}
        if status != ACTIVE:
            values["removal_pending"] = True
        async with self.database.write() as conn:
            result = await conn.execute(
                sa.update(accounts).where(accounts.c.user_id == user).values(**values)
            )
        return bool(result.rowcount)

    async def request_removal(self, user: str, *, reason: str, now: int) -> None:
        async with self.database.write() as conn:
            await conn.execute(
                sa.update(accounts)
                .where(accounts.c.user_id == user)
                .values(removal_pending=True, status_reason=reason, status_at=now)
            )

    async def removal_done(self, user: str) -> None:
        async with self.database.write() as conn:
            await conn.execute(
                sa.update(accounts).where(accounts.c.user_id == user).values(removal_pending=False)
            )

    async def lapse_unregistered(self, now: int) -> list[str]:
        """Active doctor accounts whose registration is missing or no longer active become
        ``lapsed`` with a removal pending. Returns their user ids."""
        a, r = accounts, register_entries
        active_numbers = sa.select(r.c.registration_no).where(r.c.status == ACTIVE)
        async with self.database.write() as conn:
            rows = await conn.execute(
                sa.select(a.c.user_id).where(
                    a.c.status == ACTIVE,
                    a.c.registration_no.is_not(None),
                    a.c.registration_no.not_in(active_numbers),
                )
            )
            users = [row.user_id for row in rows]
            if users:
                await conn.execute(
                    sa.update(a)
                    .where(a.c.user_id.in_(users))
                    .values(
                        status=LAPSED,
                        status_reason="registration not active",
                        status_at=now,
                        removal_pending=True,
                    )
                )
        return users

    async def removal_candidates(self) -> list[Account]:
        """Accounts to take out of every room: a removal is pending, or the account may not
        sign in any more (it could have been re-added to a room since)."""
        a = accounts
        async with self.database.read() as conn:
            rows = await conn.execute(
                sa.select(a)
                .where(sa.or_(a.c.removal_pending == sa.true(), a.c.status != ACTIVE))
                .order_by(a.c.user_id)
            )
            return [account_from_row(row) for row in rows]
