"""Sign-in sessions (rotating refresh tokens) and ward-tablet enrollments, stored hashed.

Refresh tokens (``mrrt1.<family>.<secret>``) rotate on every use: the presented token is
marked ``used`` and a new one is issued in the same family, all in one transaction. A used
token presented again means two parties hold the session (one of them a thief): the whole
family is revoked and both must sign in again (OAuth 2.0 Security BCP, refresh token
rotation). A family ends at ``family_expires_at`` whatever the rotations.

Enrollment credentials (``mrenr1.<id>.<secret>``) are issued by an administrator
(``medrelay register enroll-tablet``), shown once, and let a ward tablet sign in as a device
account (kind ``tablet``) until they expire or are revoked.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ..auth.errors import AuthReason, refuse
from ..auth.tokens import ENROLL_PREFIX, REFRESH_PREFIX, new_id, new_secret, secret_hash
from ..auth.tokens import split_credential as split
from ..store.engine import Database
from .db import DEPROVISIONED, Account, account_from_row
from .importer import ACTIVE
from .schema import accounts, auth_sessions, tablet_enrollments

REFRESH_TTL = 12 * 3600
"""A refresh token not used within a shift is dead."""
SESSION_TTL = 14 * 86400
ENROLLMENT_TTL = 365 * 86400
WARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")


@dataclass(frozen=True, slots=True, repr=False)
class Issued:
    """A new refresh token (shown to the client once) and its session id."""

    refresh_token: str
    family: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class Revoked:
    family: str
    user: str


class Sessions:
    def __init__(
        self,
        database: Database,
        *,
        refresh_ttl: int = REFRESH_TTL,
        session_ttl: int = SESSION_TTL,
    ) -> None:
        self.database = database
        self.refresh_ttl = refresh_ttl
        self.session_ttl = session_ttl

    # refresh tokens ---------------------------------------------------------------------
    async def start(self, user: str, *, idp_sid: str | None, now: int) -> Issued:
        family = new_id()
        async with self.database.write() as conn:
            return await self._insert(
                conn, family, user, idp_sid, now, family_expires_at=now + self.session_ttl
            )

    async def _insert(
        self,
        conn: Any,
        family: str,
        user: str,
        idp_sid: str | None,
        now: int,
        *,
        family_expires_at: int,
    ) -> Issued:
        token = f"{REFRESH_PREFIX}{family}.{new_secret()}"
        expires = min(now + self.refresh_ttl, family_expires_at)
        await conn.execute(
            sa.insert(auth_sessions).values(
                token_hash=secret_hash(token),
                family=family,
                user_id=user,
                idp_sid=idp_sid,
                issued_at=now,
                expires_at=expires,
                family_expires_at=family_expires_at,
                used=False,
                revoked=False,
            )
        )
        return Issued(token, family, expires)

    async def rotate(self, token: str, *, now: int) -> tuple[Issued, Account]:
        """Exchange a refresh token for a new one; refuses with ``refresh_invalid``,
        ``refresh_reused`` (and revokes the family), ``session_revoked``, ``expired`` or
        ``account_disabled``."""
        what = "refresh"
        if split(token, REFRESH_PREFIX) is None:
            raise refuse(AuthReason.REFRESH_INVALID, what=what)
        s, a = auth_sessions, accounts
        async with self.database.write() as conn:
            row = (
                await conn.execute(
                    sa.select(s).where(s.c.token_hash == secret_hash(token)).with_for_update()
                )
            ).first()
            if row is None:
                raise refuse(AuthReason.REFRESH_INVALID, what=what)
            if row.revoked:
                raise refuse(AuthReason.SESSION_REVOKED, what=what)
            if row.used:
                await conn.execute(
                    sa.update(s).where(s.c.family == row.family).values(revoked=True)
                )
                reused = refuse(AuthReason.REFRESH_REUSED, what=what)
            elif now >= row.expires_at:
                raise refuse(AuthReason.EXPIRED, what=what)
            else:
                reused = None
                account_row = (
                    await conn.execute(sa.select(a).where(a.c.user_id == row.user_id))
                ).first()
                if account_row is None or account_row.status != ACTIVE:
                    raise refuse(AuthReason.ACCOUNT_DISABLED, what=what)
                await conn.execute(
                    sa.update(s).where(s.c.token_hash == row.token_hash).values(used=True)
                )
                issued = await self._insert(
                    conn,
                    row.family,
                    row.user_id,
                    row.idp_sid,
                    now,
                    family_expires_at=row.family_expires_at,
                )
        if reused is not None:  # raised after the commit, so the revocation is kept
            raise reused
        return issued, account_from_row(account_row)

    async def revoke_user(self, user: str) -> list[Revoked]:
        return await self._revoke(auth_sessions.c.user_id == user)

    async def revoke_idp_session(self, institution: str, idp_sid: str) -> list[Revoked]:
        s, a = auth_sessions, accounts
        of_institution = sa.select(a.c.user_id).where(a.c.institution == institution)
        return await self._revoke(sa.and_(s.c.idp_sid == idp_sid, s.c.user_id.in_(of_institution)))

    async def _revoke(self, where: Any) -> list[Revoked]:
        s = auth_sessions
        async with self.database.write() as conn:
            rows = await conn.execute(
                sa.select(s.c.family, s.c.user_id)
                .where(where, s.c.revoked == sa.false())
                .distinct()
            )
            found = [Revoked(r.family, r.user_id) for r in rows]
            families = [r.family for r in found]
            if families:
                await conn.execute(
                    sa.update(s).where(s.c.family.in_(families)).values(revoked=True)
                )
        return found

    async def recently_revoked(self, since: int) -> list[str]:
        """Families revoked that issued a token since ``since`` (their access tokens may
        still be alive): other nodes load these into ``MedrelayTokens.revoke``."""
        s = auth_sessions
        async with self.database.read() as conn:
            rows = await conn.execute(
                sa.select(s.c.family)
                .where(s.c.revoked == sa.true(), s.c.issued_at >= since)
                .distinct()
            )
            return [r.family for r in rows]

    # tablets ----------------------------------------------------------------------------
    async def enroll_tablet(
        self, *, institution: str, ward: str, now: int, ttl: int = ENROLLMENT_TTL
    ) -> tuple[str, str]:
        """Create a tablet account bound to ``ward``; returns (user id, credential)."""
        if not WARD.fullmatch(ward):
            raise ValueError("ward must match [A-Za-z0-9][A-Za-z0-9._-]{0,31}")
        ident, secret = new_id(), new_secret()
        user = f"tablet:{institution}:{ward}:{ident[:8]}"
        async with self.database.write() as conn:
            await conn.execute(
                sa.insert(accounts).values(
                    user_id=user,
                    institution=institution,
                    subject=f"tablet:{ident}",
                    kind="tablet",
                    ward=ward,
                    status=ACTIVE,
                    status_at=now,
                    removal_pending=False,
                    created_at=now,
                )
            )
            await conn.execute(
                sa.insert(tablet_enrollments).values(
                    enrollment_id=ident,
                    secret_hash=secret_hash(secret),
                    user_id=user,
                    institution=institution,
                    ward=ward,
                    created_at=now,
                    expires_at=now + ttl,
                    revoked=False,
                )
            )
        return user, f"{ENROLL_PREFIX}{ident}.{secret}"

    async def check_enrollment(self, credential: str, *, now: int) -> Account:
        what = "enrollment"
        parts = split(credential, ENROLL_PREFIX)
        if parts is None:
            raise refuse(AuthReason.ENROLLMENT_INVALID, what=what)
        ident, secret = parts
        e, a = tablet_enrollments, accounts
        async with self.database.write() as conn:
            row = (await conn.execute(sa.select(e).where(e.c.enrollment_id == ident))).first()
            if row is None or not hmac.compare_digest(row.secret_hash, secret_hash(secret)):
                raise refuse(AuthReason.ENROLLMENT_INVALID, what=what)
            if row.revoked:
                raise refuse(AuthReason.ACCOUNT_DISABLED, what=what, institution=row.institution)
            if now >= row.expires_at:
                raise refuse(AuthReason.EXPIRED, what=what, institution=row.institution)
            account = (await conn.execute(sa.select(a).where(a.c.user_id == row.user_id))).one()
            if account.status != ACTIVE:
                raise refuse(AuthReason.ACCOUNT_DISABLED, what=what, institution=row.institution)
            await conn.execute(
                sa.update(a).where(a.c.user_id == row.user_id).values(last_signin_at=now)
            )
        return account_from_row(account)

    async def deprovision(self, user: str, *, reason: str, now: int) -> list[Revoked]:
        """Disable an account for good (a person who left, a lost or retired tablet): no
        sign-in, no refresh, enrollments revoked, removal from every room pending."""
        async with self.database.write() as conn:
            await conn.execute(
                sa.update(accounts)
                .where(accounts.c.user_id == user)
                .values(
                    status=DEPROVISIONED,
                    status_reason=reason,
                    status_at=now,
                    removal_pending=True,
                )
            )
            await conn.execute(
                sa.update(tablet_enrollments)
                .where(tablet_enrollments.c.user_id == user)
                .values(revoked=True)
            )
        return await self.revoke_user(user)
