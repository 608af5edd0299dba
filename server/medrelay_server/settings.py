"""Server settings: one frozen object built by the CLI (or tests) and passed to create_app."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_POOL_SIZE = 15
"""PostgreSQL connections a node keeps open. Under load a node runs two send batches, the
delivery journal's flush, receipts, catch-up and gap reads at once; SQLAlchemy's default
(5 kept, 10 more opened and closed on demand) made an overloaded node open and close 90-110
sessions a window, each a backend fork and asyncpg's set-up (docs/performance.md, "Fifth
round")."""
POOL_OVERFLOW = 5
"""Connections opened beyond the pool in a burst, closed again when returned."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 512 * 1024
    outbound_queue: int = 1024
    sends_per_second: float = 20.0
    send_burst: int = 40
    frames_per_second: float = 200.0
    frame_burst: int = 400
    connections_per_device: int = 3
    handshake_seconds: float = 10.0
    reauth_grace_seconds: float = 30.0
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    max_blob_bytes: int = 64 * 1024 * 1024
    max_room_blob_bytes: int = 1024 * 1024 * 1024
    history_page: int = 200
    replay_batch: int = 200
    poll_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("medrelay-data")
    database_url: str | None = None
    database_schema: str | None = None
    database_pool_size: int = DEFAULT_POOL_SIZE
    """PostgreSQL connections this node keeps open (plus up to 5 in a burst)."""
    broker_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8700
    dev_issuer: bool = False
    node_id: str = "node-1"
    allowed_origins: tuple[str, ...] = ()
    institutions_file: Path | None = None
    recheck_interval: float = 300.0
    envelope_retention_days: float | None = 90.0
    """Ciphertext, wraps and attachments older than this are deleted (per-room overrides)."""
    journal_retention_days: float | None = 7 * 365.0
    purge_interval_hours: float = 24.0
    """How often this node runs the retention purge; 0 disables it (run it on one node)."""
    anchor_interval_seconds: float = 60.0
    """How often this node signs and witnesses the journal heads; 0 disables (in a cluster
    one anchoring process signs for all nodes, with the key kept off the gateways)."""
    dev_key_file: Path | None = None
    device_retire_after_seconds: float = 90 * 86_400.0
    """A device neither connected nor seen for this long is retired (revoked, its rooms
    pending a rekey); 0 disables. Use the same value on every node."""
    device_check_interval_seconds: float = 30.0
    """How often this node closes live connections of devices revoked elsewhere (the bound
    when the revocation's PostgreSQL NOTIFY did not reach it, and on SQLite)."""
    limits: Limits = field(default_factory=Limits)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'medrelay.sqlite3'}"
