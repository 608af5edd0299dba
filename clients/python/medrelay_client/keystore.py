"""The device's key store: one JSON file per user, mode 0600, replaced atomically.

Holds the user identity key (made by the first device; a device approved later gets it from
the user's encrypted key backup), the backup key and version, the device signing key, the
current X25519 receiving key, and per room: the epoch secrets, the pinned roster (length,
head), the last seq processed and the message counter. Never logged; ``repr`` is redacted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrelay_protocol.crypto import ReceivingKey, SigningKey, device_id_for
from medrelay_protocol.errors import MedrelayError


class NoIdentity(MedrelayError):
    """This device does not hold the user's identity key (yet): approve it from another
    device of the user first (``medrelay_client.enrolment``)."""


@dataclass
class RoomKeys:
    epochs: dict[int, bytes] = field(default_factory=dict)
    heads: dict[int, bytes] = field(default_factory=dict)
    starts: dict[int, int] = field(default_factory=dict)
    """Epoch number -> seq of the rekey event that started it (for history grants)."""
    current: int = 0
    pinned_length: int = 0
    pinned_head: bytes = b""
    last_seq: int = 0
    counter: int = 0
    started_at: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "epochs": {str(k): v.hex() for k, v in self.epochs.items()},
            "heads": {str(k): v.hex() for k, v in self.heads.items()},
            "starts": {str(k): v for k, v in self.starts.items()},
            "current": self.current,
            "pinned_length": self.pinned_length,
            "pinned_head": self.pinned_head.hex(),
            "last_seq": self.last_seq,
            "counter": self.counter,
            "started_at": self.started_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoomKeys:
        return cls(
            epochs={int(k): bytes.fromhex(v) for k, v in data["epochs"].items()},
            heads={int(k): bytes.fromhex(v) for k, v in data["heads"].items()},
            starts={int(k): int(v) for k, v in data.get("starts", {}).items()},
            current=int(data["current"]),
            pinned_length=int(data["pinned_length"]),
            pinned_head=bytes.fromhex(data["pinned_head"]),
            last_seq=int(data["last_seq"]),
            counter=int(data["counter"]),
            started_at=int(data.get("started_at", 0)),
        )


class KeyStore:
    def __init__(
        self,
        path: Path | None,
        *,
        user: str,
        identity: SigningKey | None,
        device: SigningKey,
        receiving: ReceivingKey,
        rooms: dict[str, RoomKeys] | None = None,
        generation: str = "",
        receiving_since: int = 0,
        retired: list[tuple[ReceivingKey, int]] | None = None,
        backup_key: bytes | None = None,
        backup_version: int = 0,
        attestation: bytes | None = None,
    ) -> None:
        self.path = path
        self.user = user
        self._identity = identity
        self.backup_key = backup_key
        """The key the user's identity backup is sealed under (shared by approved devices)."""
        self.backup_version = backup_version
        """The backup version this device last stored or opened (0: none yet)."""
        self.attestation = attestation
        """The institution's attestation of the identity key (first device, at sign-in)."""
        self.device = device
        self.receiving = receiving
        self.rooms: dict[str, RoomKeys] = rooms or {}
        self.generation = generation
        self.receiving_since = receiving_since
        """When the current receiving key was made (Unix seconds); 0 = unknown (rotate)."""
        self.retired: list[tuple[ReceivingKey, int]] = retired or []
        """Earlier receiving keys with the time they are deleted: wraps made to them before
        the rotation still open until then, and never after (a stolen device later cannot)."""
        """The server's stream generation last seen (see ``Client._check_generation``)."""

    def __repr__(self) -> str:
        return f"KeyStore(user={self.user!r}, device={self.device_id!r}, keys=<redacted>)"

    @property
    def device_id(self) -> str:
        return device_id_for(self.device.public)

    @property
    def identity(self) -> SigningKey:
        """The user identity key; :class:`NoIdentity` on a device not yet approved."""
        if self._identity is None:
            raise NoIdentity("this device holds no identity key yet")
        return self._identity

    @identity.setter
    def identity(self, key: SigningKey) -> None:
        self._identity = key

    @property
    def has_identity(self) -> bool:
        return self._identity is not None

    @classmethod
    def create(cls, user: str, path: Path | None = None, *, with_identity: bool = True) -> KeyStore:
        """A new device's keys. The user's first device makes the identity key
        (``with_identity``); any later device is made without one and approved."""
        store = cls(
            path,
            user=user,
            identity=SigningKey.generate() if with_identity else None,
            device=SigningKey.generate(),
            receiving=ReceivingKey.generate(),
        )
        store.save()
        return store

    @classmethod
    def load_or_create(cls, user: str, directory: Path, *, with_identity: bool = True) -> KeyStore:
        path = directory / "keys.json"
        if not path.exists():
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            return cls.create(user, path, with_identity=with_identity)
        data = json.loads(path.read_text())
        identity = data.get("identity")
        backup_key = data.get("backup_key")
        attestation = data.get("attestation")
        return cls(
            path,
            user=data["user"],
            identity=SigningKey(bytes.fromhex(identity)) if identity else None,
            backup_key=bytes.fromhex(backup_key) if backup_key else None,
            backup_version=int(data.get("backup_version", 0)),
            attestation=bytes.fromhex(attestation) if attestation else None,
            device=SigningKey(bytes.fromhex(data["device"])),
            receiving=ReceivingKey(bytes.fromhex(data["receiving"])),
            rooms={k: RoomKeys.from_json(v) for k, v in data["rooms"].items()},
            generation=str(data.get("generation", "")),
            receiving_since=int(data.get("receiving_since", 0)),
            retired=[
                (ReceivingKey(bytes.fromhex(k)), int(until)) for k, until in data.get("retired", [])
            ],
        )

    def rotate_receiving(self, now: int, *, every: int, grace: int) -> bool:
        """Make a new receiving key once the current one is ``every`` seconds old, keeping
        the old private key for ``grace`` seconds; delete keys past their grace. Returns
        whether a new key was made (the caller then publishes a new bundle)."""
        self.retired = [(k, until) for k, until in self.retired if until > now]
        if self.receiving_since and now - self.receiving_since < every:
            self.save()
            return False
        if self.receiving_since:
            self.retired.append((self.receiving, now + grace))
        self.receiving = ReceivingKey.generate()
        self.receiving_since = now
        self.save()
        return True

    def receiving_keys(self) -> list[ReceivingKey]:
        """The current receiving key first, then the retired ones still in their grace."""
        return [self.receiving, *(k for k, _until in self.retired)]

    def room(self, room: str) -> RoomKeys:
        return self.rooms.setdefault(room, RoomKeys())

    def forget_room(self, room: str) -> None:
        """Wipe everything about a room (the user was removed or left): its epoch secrets,
        and the room itself from what this device resumes."""
        self.rooms.pop(room, None)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "user": self.user,
            "identity": self._identity.private_bytes().hex() if self._identity else None,
            "backup_key": self.backup_key.hex() if self.backup_key else None,
            "backup_version": self.backup_version,
            "attestation": self.attestation.hex() if self.attestation else None,
            "device": self.device.private_bytes().hex(),
            "receiving": self.receiving.private_bytes().hex(),
            "rooms": {k: v.to_json() for k, v in self.rooms.items()},
            "generation": self.generation,
            "receiving_since": self.receiving_since,
            "retired": [[k.private_bytes().hex(), until] for k, until in self.retired],
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
