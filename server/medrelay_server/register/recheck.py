"""The re-check job: whoever may no longer sign in leaves every room.

One :meth:`RegisterRechecker.run_once` does, in order:

1. **register**: every active doctor account whose registration is missing from the
   register or no longer ``active`` becomes ``lapsed`` (removal pending); its sessions are
   revoked, so it can neither refresh nor reconnect;
2. **revocations**: sessions revoked anywhere (another node, the CLI) within the last
   access-token lifetime are loaded into this node's :class:`MedrelayTokens`;
3. **removals**: for every account with a removal pending (lapse, deprovisioning,
   back-channel logout) or that may no longer sign in, and every room it is still a member
   of, a roster ``remove`` is signed with the external sender key named in *that room's*
   genesis (the key of the institution the room was created under, which need not be the
   doctor's own), built on the roster verified from the store, and applied through
   ``commit`` (``handlers.rooms.commit_external``: verified again, committed as a pending
   change at seq L, journaled, delivery to the removed user cut at L; the next member that
   sends commits the new epoch). A room whose roster moved meanwhile is retried. A room
   with no external sender, or whose key this process does not hold, is reported and the
   removal stays pending (and journaled as a failure), never silently dropped.

An account's pending removal is cleared only when no room is left to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Protocol

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.roster import verify_roster

from ..auth.tokens import MedrelayTokens
from ..clock import Clock
from ..institutions import Institutions, SignerUnavailable
from ..store.base import AuditRecord, Store
from .db import IdentityDb
from .sessions import Sessions

log = logging.getLogger(__name__)

ATTEMPTS = 3
DEFAULT_INTERVAL = 300


class CommitExternal(Protocol):
    """``handlers.rooms.commit_external`` with the gateway bound: returns the seq."""

    def __call__(self, room: str, change: bytes, *, institution: str) -> Awaitable[int]: ...


@dataclass
class RecheckReport:
    lapsed: list[str] = field(default_factory=list)
    removed: list[tuple[str, str, int]] = field(default_factory=list)
    """(user, room, seq of the removal)."""
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    """(user, room, why): the removal stays pending."""


class RegisterRechecker:
    def __init__(
        self,
        *,
        idb: IdentityDb,
        sessions: Sessions,
        store: Store,
        institutions: Institutions,
        commit: CommitExternal,
        tokens: MedrelayTokens | None = None,
    ) -> None:
        self.idb = idb
        self.sessions = sessions
        self.store = store
        self.institutions = institutions
        self.commit = commit
        self.tokens = tokens
        self._reported: set[tuple[str, str, str]] = set()

    async def run_once(self, now: int) -> RecheckReport:
        report = RecheckReport()
        report.lapsed = await self.idb.lapse_unregistered(now)
        for user in report.lapsed:
            await self._revoke_sessions(user, now)
        await self.store.journal(
            [
                AuditRecord(
                    "account_status", "success", target=u, detail="registration lapsed", ts=now
                )
                for u in report.lapsed
            ]
        )
        if self.tokens is not None:
            for family in await self.sessions.recently_revoked(now - self.tokens.access_ttl):
                self.tokens.revoke(family, until=now + self.tokens.access_ttl)
            self.tokens.forget_expired_revocations(now)
        for account in await self.idb.removal_candidates():
            if await self._remove_everywhere(account.user, now, report):
                if account.removal_pending:
                    await self.idb.removal_done(account.user)
        return report

    async def run_forever(self, clock: Clock, interval: float = DEFAULT_INTERVAL) -> None:
        """Run every ``interval`` seconds until cancelled; one failed run is logged and the
        next one tries again."""
        while True:
            try:
                report = await self.run_once(clock.now())
                if report.lapsed or report.removed or report.failed:
                    log.info(
                        "re-check: %d lapsed, %d removals, %d pending",
                        len(report.lapsed),
                        len(report.removed),
                        len(report.failed),
                    )
            except Exception:
                log.exception("re-check run failed")
            await asyncio.sleep(interval)

    async def _revoke_sessions(self, user: str, now: int) -> None:
        for revoked in await self.sessions.revoke_user(user):
            if self.tokens is not None:
                self.tokens.revoke(revoked.family, until=now + self.tokens.access_ttl)

    async def _remove_everywhere(self, user: str, now: int, report: RecheckReport) -> bool:
        done = True
        for state, _role in await self.store.rooms_for_user(user):
            outcome = await self._remove(user, state.room, now)
            if isinstance(outcome, int):
                report.removed.append((user, state.room, outcome))
            elif outcome is not None:
                done = False
                report.failed.append((user, state.room, outcome))
                await self._journal_failure(user, state.room, outcome, now)
        return done

    async def _remove(self, user: str, room: str, now: int) -> int | str | None:
        """The seq of the removal, None if the user is no longer in the roster, or why
        not."""
        for _attempt in range(ATTEMPTS):
            try:
                roster = verify_roster(await self.store.roster_entries(room), room=room)
            except MedrelayError:
                return "stored roster does not verify"
            if not roster.is_member(user):
                return None
            institution = self.institutions.by_external_key(roster.external_sender)
            if institution is None:
                return "room has no external sender of a configured institution"
            try:
                change = await institution.sender.sign_change(
                    roster, "remove", {"user": user}, issued_at=now
                )
                return await self.commit(room, change, institution=institution.id)
            except SignerUnavailable:
                return f"the external sender key of {institution.id} is held by its signer"
            except RequestError as exc:
                if exc.code not in (ErrorCode.ROSTER_CONFLICT, ErrorCode.STALE_EPOCH):
                    return f"refused: {exc.code.name}"
        return "roster kept changing"

    async def _journal_failure(self, user: str, room: str, why: str, now: int) -> None:
        """Once per process and cause, not on every run."""
        if (user, room, why) in self._reported:
            return
        self._reported.add((user, room, why))
        log.warning("re-check: cannot remove %s from room %s: %s", user, room, why)
        await self.store.journal(
            [
                AuditRecord(
                    "membership_change",
                    "failure",
                    room=room,
                    target=user,
                    detail=f"external remove pending: {why}"[:200],
                    ts=now,
                )
            ]
        )


def commit_via(gateway: object) -> CommitExternal:
    """``handlers.rooms.commit_external`` bound to the app's gateway (``app.state.gateway``)."""
    from ..gateway.context import Gateway
    from ..handlers.rooms import commit_external

    assert isinstance(gateway, Gateway)

    async def commit(room: str, change: bytes, *, institution: str) -> int:
        return await commit_external(gateway, room, change, institution=institution)

    return commit
