"""The identity-provider interface. OIDC issuers (per institution) plug in here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Principal:
    user: str
    institution: str
    kind: str  # "person" | "tablet"
    expires_at: int

    def __repr__(self) -> str:
        return (
            f"Principal(user={self.user!r}, institution={self.institution!r}, kind={self.kind!r})"
        )


class IdentityProvider(Protocol):
    def verify(self, token: str, now: int) -> Principal:
        """Return the principal, or raise ``RequestError`` with ``AUTH_FAILED`` or
        ``TOKEN_EXPIRED``. Never logs or echoes the token."""
