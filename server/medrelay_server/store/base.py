"""The store interface: the database is the one source of truth (I8).

Every implementation passes ``tests/server/test_store_contract.py``. Contract, for all
methods: a method either commits everything it was asked to write or nothing; it raises
``RequestError`` with a typed ``ErrorCode`` for refusals decided inside the transaction
(``FORBIDDEN``, ``NOT_FOUND``, ``ROSTER_CONFLICT``, ``STALE_EPOCH``, ``REKEY_REQUIRED``,
``IDEMPOTENCY_MISMATCH``, ``QUOTA_EXCEEDED``, ``ALREADY_EXISTS``) and ``StoreUnavailable`` when
the database cannot be reached (callers answer ``UNAVAILABLE``, retryable).

Ordering: seqs of a room are 1, 2, 3, ... without gaps, assigned from the room's counter row
under the room's lock, in commit order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import MedrelayError


class StoreUnavailable(MedrelayError):
    code = ErrorCode.UNAVAILABLE


class NodeFenced(StoreUnavailable):
    """This process no longer holds its node id's lease (another process took the id over,
    with a higher fencing token): its journal writes, and so its sends, are refused inside
    the transaction. Retryable for the client (another node will serve it); fatal for the
    node, which must be restarted under a node id it can lease."""


class NodeLeaseHeld(MedrelayError):
    """``open()`` found the node id leased by another live process (until ``until``)."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, node: str, until: int) -> None:
        super().__init__(f"node id {node!r} is leased by another process until {until}")
        self.node = node
        self.until = until


class JournalReadOnly(MedrelayError):
    """A store opened without a node id (the audit CLI) cannot append to the journal."""

    code = ErrorCode.INTERNAL_ERROR


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One journal record: who did what, where, with what outcome. Never content.

    Modelled on FHIR AuditEvent / IHE ATNA (``docs/audit.md`` has the mapping): actor
    (``user``, ``device``, ``role``, ``institution``), source (the node, which the journal
    adds, and the client ``address``), entity (``room``, ``seq_from``..``seq_to``, ``mid``,
    ``target``, ``patient_tag``: an HMAC under an institution key the server never holds).
    ``ts`` is when it happened; ``ts_end``, when set, closes a period (a batch of
    deliveries written over a flush interval). Times are Unix seconds.
    """

    action: str
    outcome: str
    user: str | None = None
    device: str | None = None
    room: str | None = None
    seq_from: int | None = None
    seq_to: int | None = None
    mid: bytes | None = None
    target: str | None = None
    source: str | None = None
    detail: str | None = None
    ts: int = 0
    ts_end: int | None = None
    role: str | None = None
    institution: str | None = None
    address: str | None = None
    patient_tag: bytes | None = None


@dataclass(frozen=True, slots=True, repr=False)
class StoredEvent:
    room: str
    seq: int
    kind: str  # "message" | "summon" | "roster" | "rekey"
    sender_device: str
    sender_user: str
    ts: int
    payload: bytes
    mid: bytes | None = None
    wrap: bytes | None = None  # filled per device by events_after/events_before for "rekey"

    def __repr__(self) -> str:
        return f"StoredEvent(room={self.room!r}, seq={self.seq}, kind={self.kind!r})"


@dataclass(frozen=True, slots=True)
class RoomState:
    room: str
    last_seq: int
    roster_head: bytes
    roster_length: int
    epoch: int
    pending_rekey: bool
    device_list_version: int
    created_at: int


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    user: str
    device_id: str
    signing_key: bytes
    certificate: bytes
    bundle: bytes
    kind: str
    revoked: bool = False
    created_at: int = 0
    last_seen: int | None = None


@dataclass(frozen=True, slots=True, repr=False)
class ApprovalRecord:
    """A new device's request for approval, and once approved what the approver sent."""

    id: str
    user: str
    device_id: str
    device_key: bytes
    bundle: bytes
    created_at: int
    expires_at: int
    certificate: bytes | None = None
    backup_share: bytes | None = None
    approved_by: str | None = None
    approved_at: int | None = None

    @property
    def approved(self) -> bool:
        return self.certificate is not None

    def __repr__(self) -> str:
        return (
            f"ApprovalRecord(id={self.id!r}, user={self.user!r}, device={self.device_id!r}, "
            f"approved={self.approved})"
        )


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """The effect of one verified roster entry on the membership table.

    ``add``: user -> role, opening an interval at the new seq (and a history grant interval
    ``[history_from_seq, seq)`` when given). ``remove``: users whose open interval is closed
    at the new seq (inclusive: they still receive the removal event itself). ``roles``:
    role changes for current members.
    """

    add: Mapping[str, str] = field(default_factory=dict)
    history_from_seq: Mapping[str, int] = field(default_factory=dict)
    remove: Sequence[str] = ()
    roles: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, repr=False)
class Commit:
    """An atomic roster change and/or rekey. Applied only if the room's roster head is still
    ``expected_head`` and its epoch is still ``expected_epoch`` (compare-and-set), and, when
    ``device_list_version`` is given, the room's device list version is still that one
    (``RECIPIENTS_MISMATCH``: the recipients check outside the transaction is stale)."""

    room: str
    expected_head: bytes
    expected_epoch: int
    sender_user: str
    sender_device: str
    entry: bytes | None = None
    new_head: bytes | None = None
    membership: MembershipChange | None = None
    manifest: bytes | None = None
    wraps: Mapping[str, bytes] = field(default_factory=dict)
    new_epoch: int | None = None
    pending_rekey: bool = False
    device_list_version: int | None = None
    revoke_device: tuple[str, str] | None = None
    """(user, device) a verified ``revoke_device`` entry revokes: marked revoked in the device
    directory in the same transaction, so a crash cannot leave it usable."""
    external: bool = False
    """Signed by the institution's external sender key (removals only, never with a rekey):
    the sender is not a room member, so the membership re-check does not apply."""


@dataclass(frozen=True, slots=True)
class AppendResult:
    event: StoredEvent
    duplicate: bool


class Store(Protocol):
    """Durable state of medrelay. See the module docstring for the shared contract."""

    async def open(self) -> None:
        """Create the schema if needed (migrations) and connect."""

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless a round trip to the database succeeds."""

    # identities and devices -------------------------------------------------------------
    async def put_identity(
        self, user: str, identity_key: bytes, now: int, attestation: bytes | None = None
    ) -> None:
        """Pin a user's identity key the first time (with the institution's attestation of
        it, kept and served beside it); a different key later raises ``ALREADY_EXISTS``
        (changing an identity key is an administrator action)."""

    async def get_identity(self, user: str) -> bytes | None: ...

    async def get_attestation(self, user: str) -> bytes | None:
        """The attestation stored with the pinned identity key, if any."""

    # device approvals and key backups (``store/enrolment.py``) ---------------------------
    async def request_approval(
        self,
        *,
        request_id: str,
        user: str,
        device_id: str,
        device_key: bytes,
        bundle: bytes,
        now: int,
        ttl: int,
        max_pending: int,
    ) -> ApprovalRecord:
        """The live request of (user, device) or a new one with ``request_id``; the user must
        have a pinned identity key (``FORBIDDEN``); at most ``max_pending`` unapproved live
        requests per user (``TOO_MANY_REQUESTS``)."""

    async def pending_requests(self, user: str, now: int) -> list[ApprovalRecord]: ...

    async def get_request(self, request_id: str) -> ApprovalRecord | None: ...

    async def approve_request(
        self,
        *,
        user: str,
        request_id: str,
        certificate: bytes,
        backup_share: bytes,
        approver: str,
        now: int,
    ) -> ApprovalRecord:
        """``UNKNOWN_REQUEST`` / ``REQUEST_EXPIRED`` / ``ALREADY_EXISTS``."""

    async def put_backup(
        self, user: str, *, version: int, blob: bytes, device: str, now: int
    ) -> None:
        """Compare-and-set on ``version`` (stored + 1, else ``BACKUP_CONFLICT``)."""

    async def get_backup(self, user: str) -> tuple[int, bytes] | None: ...

    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or refresh (certificate, bundle) of a device; the signing key of an
        existing device id never changes. Increments ``device_list_version`` of every room
        in which the user is a current member when the device is new."""

    async def get_device(self, device_id: str) -> DeviceRecord | None: ...

    async def devices_for(self, users: Sequence[str]) -> list[DeviceRecord]: ...

    async def device_lists(
        self, users: Sequence[str]
    ) -> tuple[list[DeviceRecord], dict[str, tuple[bytes, bytes | None]]]:
        """What a client needs to check these users' devices, read together: every device
        of theirs (``devices_for``), and each one's pinned identity key with its
        attestation (users without one are absent)."""

    async def touch_device(self, device_id: str, now: int) -> None:
        """Record that a connection of the device opened or closed at ``now``."""

    async def unseen_devices(self, before: int, *, limit: int) -> list[DeviceRecord]:
        """Unrevoked devices last seen (or, never seen, created) before ``before``."""

    # rooms and membership ---------------------------------------------------------------
    async def create_room(
        self,
        room: str,
        *,
        genesis: bytes,
        head: bytes,
        owner: str,
        sender_device: str,
        manifest: bytes,
        wraps: Mapping[str, bytes],
        now: int,
        audit: Sequence[AuditRecord],
    ) -> list[StoredEvent]:
        """Create a room: seq 1 is the genesis roster event, seq 2 the first rekey (epoch 1).
        Raises ``ALREADY_EXISTS`` if the room id is taken."""

    async def room_state(self, room: str) -> RoomState | None: ...

    async def roster_entries(self, room: str) -> list[bytes]: ...

    async def member_role(self, room: str, user: str) -> str | None:
        """The user's role while a current member, else None."""

    async def members(self, room: str) -> dict[str, str]: ...

    async def rooms_for_user(self, user: str) -> list[tuple[RoomState, str]]: ...

    async def last_seqs(self, room_ids: Sequence[str]) -> dict[str, int]:
        """Each named room's last seq, for every one that exists, in one read."""

    async def current_rooms(self, users: Sequence[str]) -> dict[str, set[str]]:
        """The rooms each named user is a current member of, in one read (a user in no
        room is left out)."""

    async def commit(
        self, commit: Commit, *, now: int, audit: Sequence[AuditRecord]
    ) -> list[StoredEvent]:
        """Apply a commit in one transaction: lock the room, compare-and-set the roster head
        and epoch (``ROSTER_CONFLICT`` / ``STALE_EPOCH``), re-check that the sender is a
        current member (``FORBIDDEN``), append the roster event (if ``entry``) then the rekey
        event (if ``manifest``, with its wraps), update membership intervals, epoch and
        pending flag, and write ``audit``. Returns the stored events in seq order."""

    async def append_message(
        self,
        room: str,
        *,
        user: str,
        device: str,
        mid: bytes,
        envelope: bytes,
        kind: str,
        epoch: int,
        allow_pending: bool,
        now: int,
        audit: Sequence[AuditRecord],
    ) -> AppendResult:
        """Store one envelope under the next seq. Inside the transaction: the user must be a
        current member with a role that may post (``FORBIDDEN``); ``epoch`` must be the
        room's current epoch (``STALE_EPOCH``); a pending rekey refuses it with
        ``REKEY_REQUIRED`` unless ``allow_pending``. Idempotent on (room, device, mid): a
        byte-identical retry returns the original event with ``duplicate=True``; different
        bytes raise ``IDEMPOTENCY_MISMATCH``. ``audit`` is written in the same transaction."""

    async def events_after(
        self, room: str, after_seq: int, *, user: str, device: str, limit: int
    ) -> list[StoredEvent]:
        """Events with seq > after_seq in seq order, at most ``limit``, only those inside the
        user's membership intervals (or history grants); rekey events carry ``device``'s
        own wrap (None if it has none)."""

    async def events_before(
        self, room: str, before_seq: int, *, user: str, device: str, limit: int
    ) -> list[StoredEvent]:
        """Like ``events_after`` but the ``limit`` newest events with seq < before_seq
        (``before_seq`` 0 means from the end), returned in ascending seq order."""

    async def room_events(self, room: str, after_seq: int, *, limit: int) -> list[StoredEvent]:
        """Unfiltered events with seq > after_seq in seq order (no wraps): a node uses this
        to fill a gap in its own ordered view of the room before filtering per device."""

    async def visible(self, room: str, seq: int, user: str) -> bool:
        """Whether ``seq`` of ``room`` lies inside one of ``user``'s intervals or grants."""

    async def record_receipt(self, room: str, device: str, seq: int, now: int) -> int:
        """Advance the device's cumulative receipt (never backwards); returns the new value."""

    async def receipt_of(self, room: str, device: str) -> int: ...

    # attachments ------------------------------------------------------------------------
    async def put_chunk(
        self,
        room: str,
        blob: bytes,
        index: int,
        data: bytes,
        final: bool,
        *,
        user: str,
        now: int,
        max_blob_bytes: int,
        max_room_bytes: int,
    ) -> None:
        """Store chunk ``index`` of ``blob`` bound to ``room``. Chunks arrive in order
        (index == chunks stored so far; a re-put of an existing index with identical bytes
        is accepted for resumption); a blob bound to another room, a put after ``final``, or
        exceeding a size limit raises (``FORBIDDEN`` / ``INVALID_FIELD`` /
        ``QUOTA_EXCEEDED``)."""

    async def get_chunk(self, blob: bytes, index: int) -> tuple[str, bytes, bool] | None:
        """(room, data, final) or None."""

    async def blob_status(self, blob: bytes) -> tuple[str, int, bool] | None:
        """(room, chunks stored, complete) or None: lets an upload resume."""

    async def delete_room_blobs_before(self, room: str, ts: int) -> int: ...

    # journal ----------------------------------------------------------------------------
    async def journal(
        self,
        records: Sequence[AuditRecord],
        *,
        receipts: Sequence[tuple[str, str, int, int]] = (),
        seen: Sequence[tuple[str, int]] = (),
    ) -> None:
        """Append records outside a send (connections, auth outcomes, deliveries), and in
        the same transaction move devices' cumulative receipts ``(room, device, seq, ts)``
        forward (never backward) and record devices as seen ``(device, ts)``."""

    async def audit_records(self, *, room: str | None = None) -> list[AuditRecord]: ...
