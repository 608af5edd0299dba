"""Private key files: created 0600 in a 0700 directory, written atomically, and refused
when group or others could read them (as ssh refuses a private key with loose permissions)."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class InsecureKeyFile(ValueError):
    pass


def read_private(path: Path) -> bytes | None:
    """The file's bytes, or None if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise InsecureKeyFile(f"{path}: readable by group or others; chmod 600 it")
        return f.read()


def create_private(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data``, mode 0600, atomically (never a half-written key) and
    only if it does not exist yet: when two processes race, the first key wins and both
    read it back."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
