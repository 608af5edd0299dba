"""The practitioner directory: search the register by name, specialty and institution.

Summoning uses it to find *whom* to add ("a cardiologist at Queen Mary"): each result is a
registered, active doctor with the medrelay user ids they sign in as (one per institution
account). Only active registrations are listed. Matching is a case-insensitive substring of
the English or Chinese name, or the exact registration number; LIKE wildcards in the query
are taken literally.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa

from ..store.engine import Database
from .importer import ACTIVE
from .schema import accounts, register_entries

MAX_RESULTS = 50
MIN_QUERY = 2


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    registration_no: str
    name_en: str
    name_zh: str | None
    specialty: str | None
    accounts: tuple[tuple[str, str], ...]
    """(user id, institution) of each active account bound to this registration."""

    def as_json(self) -> dict[str, object]:
        return {
            "registration_no": self.registration_no,
            "name_en": self.name_en,
            "name_zh": self.name_zh,
            "specialty": self.specialty,
            "accounts": [{"user": u, "institution": i} for u, i in self.accounts],
        }


def _like(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped.lower()}%"


async def search(
    database: Database,
    *,
    q: str | None = None,
    specialty: str | None = None,
    institution: str | None = None,
    limit: int = 20,
) -> list[DirectoryEntry]:
    """At least one criterion is required; ``q`` needs ``MIN_QUERY`` characters
    (``ValueError`` otherwise). With ``institution``, only doctors with an account there."""
    if not (q or specialty or institution):
        raise ValueError("give a name, a specialty or an institution")
    if q is not None and len(q.strip()) < MIN_QUERY:
        raise ValueError(f"a name query needs at least {MIN_QUERY} characters")
    r, a = register_entries, accounts
    query = sa.select(r).where(r.c.status == ACTIVE)
    if q:
        pattern = _like(q.strip())
        query = query.where(
            sa.or_(
                sa.func.lower(r.c.name_en).like(pattern, escape="\\"),
                sa.func.lower(sa.func.coalesce(r.c.name_zh, "")).like(pattern, escape="\\"),
                r.c.registration_no == q.strip().upper(),
            )
        )
    if specialty:
        query = query.where(
            sa.func.lower(sa.func.coalesce(r.c.specialty, "")).like(
                _like(specialty.strip()), escape="\\"
            )
        )
    if institution:
        there = sa.select(a.c.registration_no).where(
            a.c.institution == institution, a.c.status == ACTIVE
        )
        query = query.where(r.c.registration_no.in_(there))
    query = query.order_by(r.c.name_en, r.c.registration_no).limit(max(1, min(limit, MAX_RESULTS)))
    async with database.read() as conn:
        rows = list(await conn.execute(query))
        numbers = [row.registration_no for row in rows]
        bound: dict[str, list[tuple[str, str]]] = {}
        if numbers:
            found = await conn.execute(
                sa.select(a.c.registration_no, a.c.user_id, a.c.institution)
                .where(a.c.registration_no.in_(numbers), a.c.status == ACTIVE)
                .order_by(a.c.user_id)
            )
            for row in found:
                bound.setdefault(row.registration_no, []).append((row.user_id, row.institution))
    return [
        DirectoryEntry(
            registration_no=row.registration_no,
            name_en=row.name_en,
            name_zh=row.name_zh,
            specialty=row.specialty,
            accounts=tuple(bound.get(row.registration_no, ())),
        )
        for row in rows
    ]
