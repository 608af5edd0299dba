"""Anchor signers. The signing key must not live on the gateways: a gateway that could sign
could also re-sign a rewritten journal. In production the signer is a separate process (or
an HSM / KMS behind one) that the gateways ask over a local socket; the embedded default,
:class:`FileKeySigner`, keeps the key in ``<data_dir>/anchor-signer/`` (mode 0600), which
is good enough for one machine and documented as such (``docs/audit.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

from medrelay_protocol.crypto import KEY_SIZE, SigningKey

from .anchor import Anchor, AnchorLog, AnchorRejected, sign_anchor
from .merkle import Frontier

SIGNER_DIR = "anchor-signer"
KEY_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"
STATE_FILE = "last-anchor.json"


def key_id_of(public_key: bytes) -> str:
    return hashlib.blake2b(public_key, digest_size=8).hexdigest()


class Signer(Protocol):
    """Signs anchors' tree heads.

    Contract: ``sign`` refuses (``AnchorRejected``) an anchor that does not extend the last
    one it signed (the next number, and heads that appended to its previous tree give the
    new root), so a compromised gateway cannot obtain a signature over a rewritten history;
    signing the last anchor again returns a valid signature (a retry after a crash).
    """

    @property
    def key_id(self) -> str: ...

    def public_key(self) -> bytes: ...

    async def sign(self, anchor: Anchor) -> bytes: ...


class FileKeySigner:
    """The embedded default: an Ed25519 key in ``directory/signing.key`` (created 0600 in a
    0700 directory on first use), its public half in ``signing.pub`` (hex, for verifiers),
    and the last anchor signed in ``last-anchor.json`` (with the compact range of its
    tree), which is what lets it refuse anchors that do not extend its log."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._key = _load_or_create_key(directory)
        self._log = AnchorLog()
        self._state = directory / STATE_FILE
        if self._state.exists():
            self._log = _load_state(self._state)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> FileKeySigner:
        return cls(data_dir / SIGNER_DIR)

    @property
    def key_id(self) -> str:
        return key_id_of(self._key.public)

    def public_key(self) -> bytes:
        return self._key.public

    async def sign(self, anchor: Anchor) -> bytes:
        if self._log.accept(anchor):
            _write_atomic(self._state, _dump_state(self._log), mode=0o600)
        return sign_anchor(self._key, anchor)

    def __repr__(self) -> str:
        return f"FileKeySigner({str(self._dir)!r}, key_id={self.key_id})"


def read_public_key(path: Path) -> bytes:
    """A verifier's pinned key: ``signing.pub`` (hex) or a directory holding it."""
    if path.is_dir():
        path = path / PUBLIC_FILE
    key = bytes.fromhex(path.read_text().strip())
    if len(key) != KEY_SIZE:
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def _load_or_create_key(directory: Path) -> SigningKey:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / KEY_FILE
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (chmod 600)")
        return SigningKey(bytes.fromhex(path.read_text().strip()))
    key = SigningKey.generate()
    _write_atomic(path, key.private_bytes().hex() + "\n", mode=0o600)
    _write_atomic(directory / PUBLIC_FILE, key.public.hex() + "\n", mode=0o644)
    return key


def _dump_state(log: AnchorLog) -> str:
    assert log.last is not None
    doc = {
        "anchor": log.last.to_json(),
        "frontier": [n.hex() for n in log.frontier.nodes],
    }
    return json.dumps(doc)


def _load_state(path: Path) -> AnchorLog:
    try:
        doc = json.loads(path.read_text())
        last = Anchor.from_json(doc["anchor"])
        nodes = [bytes.fromhex(n) for n in doc["frontier"]]
    except (KeyError, ValueError) as exc:
        raise AnchorRejected(f"{path}: unreadable signer state") from exc
    log = AnchorLog()
    log.last = last
    log.frontier = Frontier(last.tree_size, nodes)
    return log


def _write_atomic(path: Path, text: str, *, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
