"""The development issuer's key file: nodes started at once on one data directory race to
create it; every one must end up with the same complete key, and the file stays private."""

from __future__ import annotations

import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from medrelay_server.auth.dev import DevIssuer


def test_nodes_racing_to_create_the_key_share_one(tmp_path: Path) -> None:
    path = tmp_path / "shared" / "dev-issuer.key"
    with ThreadPoolExecutor(max_workers=8) as pool:
        issuers = list(pool.map(lambda _: DevIssuer.from_file(path), range(32)))
    token = issuers[0].issue("alice", 1_700_000_000)
    assert all(i.verify(token, 1_700_000_000).user == "alice" for i in issuers)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["dev-issuer.key"]  # nothing staged left
