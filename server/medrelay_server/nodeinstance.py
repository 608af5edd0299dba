"""This machine's claim on a node id: what lets ``medrelay serve`` restart at once after a
crash instead of waiting for the dead process's journal lease to expire.

A node's journal lease (``store/audit.py``) names its holder. A process that died without
releasing it (``kill -9``, OOM, power loss) leaves the lease live for up to its length (60 s),
and a new process with the same ``--node-id`` was refused (``NodeLeaseHeld``) until then:
a supervisor restarting the node looped for a minute while its clients waited.

:meth:`NodeInstance.claim` takes an exclusive ``flock`` on ``node-<id>.lock`` in the data
directory and keeps it for the life of the process; the kernel releases it when the process
dies, however it dies. The file also holds a random holder id, created once and reused by
every later process of this node on this data directory. A process that holds the lock and
finds the lease held by that same holder id therefore knows the previous holder is dead, and
takes the lease over at once (with the next fencing token, as for any takeover). A second
live process for the same node id and data directory is refused at the lock, before it
touches the database. Another machine (another data directory) has another holder id and
still waits for the lease, as before. The lock file must be on a local file system (``flock``
over NFS is not reliable).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
from pathlib import Path

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


def _file_part(node_id: str) -> str:
    """The node id itself when it is a plain file name, else a readable part and a digest
    of the exact id (so two ids never share a claim)."""
    safe = _SAFE.sub("_", node_id)
    if safe == node_id and node_id not in ("", ".", ".."):
        return node_id
    return f"{safe[:40]}-{hashlib.sha256(node_id.encode()).hexdigest()[:16]}"


class NodeInUse(Exception):
    """Another live process runs this node id on this data directory."""


class NodeInstance:
    def __init__(self, fd: int, holder: str, path: Path) -> None:
        self._fd = fd
        self.holder = holder
        self.path = path

    def __repr__(self) -> str:
        return f"NodeInstance(path={str(self.path)!r})"

    @classmethod
    def claim(cls, data_dir: Path, node_id: str) -> NodeInstance:
        path = data_dir / f"node-{_file_part(node_id)}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeInUse(
                f"node id {node_id!r} is already served from {data_dir} by a live process"
            ) from None
        try:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            if not re.fullmatch(r"[0-9a-f]{16,64}", holder):
                holder = secrets.token_hex(16)
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode("ascii") + b"\n", 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, holder, path)

    def close(self) -> None:
        """Release the claim (process exit does the same)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
