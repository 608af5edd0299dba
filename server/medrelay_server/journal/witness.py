"""Witnesses: independent copies of the signed anchors, outside the database, so a rebuilt,
truncated or partly deleted journal no longer matches what was witnessed.

* :class:`FileWitness`: an append-only JSON-lines file, one signed anchor per line, written
  once and never rewritten (``O_APPEND``, ``fsync``, an exclusive ``flock`` while appending).
  It checks each anchor's signature against the pinned key and that it extends the last line
  before appending. The embedded default keeps it beside the data directory
  (``<data_dir>.witness/anchors.jsonl``); production puts it on another host or on
  write-once storage, out of reach of the gateways' operating-system accounts.
* :class:`~medrelay_server.journal.syslog.SyslogWitness`: the hospital SIEM, over syslog
  on TLS (RFC 5424 messages, RFC 5425 framing).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path
from typing import Protocol

from .anchor import Anchor, AnchorLog, AnchorRejected, verify_signature

WITNESS_FILE = "anchors.jsonl"


def default_witness_path(data_dir: Path) -> Path:
    """``<data_dir>.witness/anchors.jsonl``: beside the data directory, not inside it."""
    return data_dir.with_name(data_dir.name + ".witness") / WITNESS_FILE


class Witness(Protocol):
    """Contract: ``publish`` returns only once the anchor is durably recorded by the
    witness (or was already); it raises on failure, and the anchor service retries later,
    in anchor order. Publishing the same anchor twice is harmless."""

    async def publish(self, anchor: Anchor) -> None: ...


class WitnessUnavailable(Exception):
    """The witness could not be reached or could not record the anchor."""


class FileWitness:
    def __init__(self, path: Path, public_key: bytes) -> None:
        self.path = path
        self._public_key = public_key
        self._log = AnchorLog()
        self._offset = 0  # bytes of the file already replayed into ``_log``

    def anchors(self) -> list[Anchor]:
        """Every witnessed anchor, in file order (not verified: the verifier does that)."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [Anchor.from_json(line) for line in lines if line.strip()]

    async def publish(self, anchor: Anchor) -> None:
        verify_signature(self._public_key, anchor)
        await asyncio.to_thread(self._append, anchor)

    def _append(self, anchor: Anchor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._catch_up(fd)
            line = (anchor.to_json() + "\n").encode("utf-8")
            if self._log.accept(anchor):
                os.write(fd, line)
                os.fsync(fd)
                self._offset += len(line)
        except OSError as exc:
            raise WitnessUnavailable(f"cannot append to {self.path}") from exc
        except AnchorRejected:
            raise
        finally:
            os.close(fd)

    def _catch_up(self, fd: int) -> None:
        """Replay lines appended since the last call (by us or another process), so each
        publish reads only what is new rather than the whole file."""
        size = os.fstat(fd).st_size
        if size < self._offset:
            raise AnchorRejected(f"{self.path} shrank: the witness file was rewritten")
        if size == self._offset:
            return
        new = os.pread(fd, size - self._offset, self._offset)
        complete = new[: new.rfind(b"\n") + 1]
        for line in complete.decode("utf-8").splitlines():
            if line.strip():
                self._log.accept(Anchor.from_json(line))
        self._offset += len(complete)
