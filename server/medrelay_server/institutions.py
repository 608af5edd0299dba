"""Institutions: their OIDC configuration and their *external sender* key.

The external sender key is the Ed25519 key a room's genesis names (``external_sender``): it
may sign exactly one kind of roster change, a removal (register lapse, deprovisioning,
back-channel logout, lost device). It belongs to the **institution**, not to medrelay: the
institution is the one that attests who its staff are, and a key the relay held for itself
would let the relay remove anyone from any room on its own say (I5 allows the server to
refuse, never to act). Clients therefore take the key from ``GET /institutions`` only to
show it, and put into a genesis the key of the institution whose staff the room serves.

Two ways to hold it:

* **embedded default** (:class:`FileExternalSender`): a 32-byte seed in
  ``<data_dir>/institutions/<id>/external_sender.key`` (mode 0600, created on first start,
  refused if group- or world-readable). Convenient on one machine; the gateway host then
  holds the key, which is exactly the risk above, so
* **production** configures ``external_sender_public`` only: the private key stays with the
  institution's own signer (an HSM or a signing service run by the hospital), and medrelay
  can only *ask* for a removal. :class:`PublicOnlyExternalSender` says so by refusing to
  sign; the re-check job then leaves the removal pending and reports it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from medrelay_protocol.crypto import KEY_SIZE, SigningKey
from medrelay_protocol.enrolment import IdentityAttestation
from medrelay_protocol.roster import make_external_change
from medrelay_protocol.roster_entry import RosterPosition

from .auth.files import create_private, read_private
from .auth.issuers import IssuerConfig


class SignerUnavailable(Exception):
    """This medrelay does not hold the institution's external sender key."""


class ExternalSender(Protocol):
    @property
    def public_key(self) -> bytes: ...

    async def sign_change(
        self,
        state: RosterPosition,
        action: str,
        params: Mapping[str, Any],
        *,
        issued_at: int,
    ) -> bytes:
        """A roster entry extending ``state``, signed by the external sender key; raises
        :class:`SignerUnavailable` when this process cannot sign."""

    async def attest(
        self, *, user_id: str, identity_key: bytes, institution: str, issued_at: int
    ) -> bytes:
        """An identity attestation (``enrolment.IdentityAttestation``) of a user's first
        identity key, signed at sign-in; :class:`SignerUnavailable` when this process
        cannot sign."""


class FileExternalSender:
    def __init__(self, key: SigningKey) -> None:
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> FileExternalSender:
        raw = read_private(path)
        if raw is None:
            create_private(path, SigningKey.generate().private_bytes().hex().encode() + b"\n")
            raw = read_private(path)
            assert raw is not None
        seed = bytes.fromhex(raw.decode("ascii").strip())
        if len(seed) != KEY_SIZE:
            raise ValueError(f"{path}: expected a 32-byte Ed25519 seed in hex")
        return cls(SigningKey(seed))

    def __repr__(self) -> str:
        return f"FileExternalSender(public={self.public_key.hex()[:16]}…)"

    @property
    def public_key(self) -> bytes:
        return self._key.public

    async def sign_change(
        self,
        state: RosterPosition,
        action: str,
        params: Mapping[str, Any],
        *,
        issued_at: int,
    ) -> bytes:
        return make_external_change(
            state, action, params, external_key=self._key, issued_at=issued_at
        )

    async def attest(
        self, *, user_id: str, identity_key: bytes, institution: str, issued_at: int
    ) -> bytes:
        return IdentityAttestation.issue(
            self._key,
            user_id=user_id,
            identity_key=identity_key,
            institution=institution,
            issued_at=issued_at,
        ).raw


class PublicOnlyExternalSender:
    def __init__(self, public_key: bytes) -> None:
        self._public = public_key

    def __repr__(self) -> str:
        return f"PublicOnlyExternalSender(public={self._public.hex()[:16]}…)"

    @property
    def public_key(self) -> bytes:
        return self._public

    async def sign_change(
        self,
        state: RosterPosition,
        action: str,
        params: Mapping[str, Any],
        *,
        issued_at: int,
    ) -> bytes:
        raise SignerUnavailable("the institution's signer holds this key")

    async def attest(
        self, *, user_id: str, identity_key: bytes, institution: str, issued_at: int
    ) -> bytes:
        raise SignerUnavailable("the institution's signer holds this key")


@dataclass(frozen=True, slots=True)
class Institution:
    config: IssuerConfig
    sender: ExternalSender

    @property
    def id(self) -> str:
        return self.config.id


class Institutions(Mapping[str, Institution]):
    """Institution id -> :class:`Institution`, plus lookup by external sender key."""

    def __init__(self, items: Sequence[Institution]) -> None:
        self._by_id = {i.id: i for i in items}
        self._by_key = {i.sender.public_key: i for i in items}
        if len(self._by_key) != len(self._by_id):
            raise ValueError("two institutions share an external sender key")

    @classmethod
    def from_config(cls, configs: Sequence[IssuerConfig]) -> Institutions:
        items = []
        for c in configs:
            sender: ExternalSender
            if c.external_sender_public is not None:
                sender = PublicOnlyExternalSender(c.external_sender_public)
            else:
                assert c.external_sender_key is not None
                sender = FileExternalSender.load_or_create(c.external_sender_key)
            items.append(Institution(c, sender))
        return cls(items)

    def __getitem__(self, ident: str) -> Institution:
        return self._by_id[ident]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def by_external_key(self, public_key: bytes | None) -> Institution | None:
        return self._by_key.get(public_key) if public_key is not None else None

    def public_listing(self) -> list[dict[str, str]]:
        """What ``GET /institutions`` serves: ids, names, issuers, external sender keys (the
        same key attests the institution's users' identity keys: ``attestation_key``)."""
        return [
            {
                "id": i.id,
                "name": i.config.name,
                "issuer": i.config.issuer,
                "external_sender": i.sender.public_key.hex(),
                "attestation_key": i.sender.public_key.hex(),
            }
            for i in self._by_id.values()
        ]
