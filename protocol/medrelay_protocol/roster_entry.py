"""Wire format of one roster entry: strict decoding, field bounds, signing and chaining.

``entry = body || signature``, where::

    body      = msgpack [1, room, index, prev_head, action, params, signer, issued_at]
    signer    = {"user": user_id, "device_cert": DeviceCertificate.raw}  (a member device)
              | {"external": true}                              (the institution's key)
    signature = SignWithLabel(key, "roster-change", body)
    head      = BLAKE2b-256(prev_head, body, signature; person "mr-roster-head")

The genesis entry has index 0 and ``prev_head`` = 32 zero bytes. This module only checks
that an entry is well formed; whether it is authentic and authorised against the roster so
far is :func:`medrelay_protocol.roster.verify_entry`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from .canonical import pack_body, unpack_body
from .crypto import KEY_SIZE, SIGNATURE_SIZE, SigningKey, blake2b_256, sign_with_label
from .errors import FrameTooLarge, MalformedFrame, UnsupportedVersion
from .identity import MAX_USER_ID, DeviceCertificate
from .policy import is_role

ROSTER_LABEL: Final = "roster-change"
HEAD_PERSON: Final = b"mr-roster-head"
GENESIS_PREV: Final = bytes(32)
MAX_ROOM_ID: Final = 64
MAX_ENTRY_SIZE: Final = 4096
MAX_CERT_SIZE: Final = 1024
HISTORY_VISIBILITIES: Final[tuple[str, ...]] = ("none", "joined", "shared")

GENESIS: Final = "genesis"
ADD: Final = "add"
REMOVE: Final = "remove"
LEAVE: Final = "leave"
ROLE: Final = "role"
HISTORY: Final = "history"
REVOKE_DEVICE: Final = "revoke_device"
ACTIONS: Final[tuple[str, ...]] = (GENESIS, ADD, REMOVE, LEAVE, ROLE, HISTORY, REVOKE_DEVICE)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _user_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_USER_ID


def _key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_SIZE


def is_device_id(value: object) -> bool:
    """Device ids are 32 lowercase hex characters (see :func:`crypto.device_id_for`)."""
    return (
        isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)
    )


Check = Callable[[object], bool]

# action -> {param: (required, check)}; any other key is refused.
_PARAMS: Final[Mapping[str, Mapping[str, tuple[bool, Check]]]] = {
    GENESIS: {
        "owner": (True, _user_id),
        "identity_key": (True, _key),
        "external_sender": (False, _key),
        "history": (True, lambda v: v in HISTORY_VISIBILITIES),
    },
    ADD: {
        "user": (True, _user_id),
        "identity_key": (True, _key),
        "role": (True, is_role),
        "history_from_seq": (False, _is_int),
    },
    REMOVE: {"user": (True, _user_id)},
    LEAVE: {},
    ROLE: {"user": (True, _user_id), "role": (True, is_role)},
    HISTORY: {"visibility": (True, lambda v: v in HISTORY_VISIBILITIES)},
    REVOKE_DEVICE: {"user": (True, _user_id), "device": (True, is_device_id)},
}


def check_params(action: str, params: object) -> dict[str, Any]:
    """Refuse unknown actions, missing or unknown keys and out-of-bounds values."""
    schema = _PARAMS.get(action)
    if schema is None:
        raise MalformedFrame("roster: unknown action")
    if not isinstance(params, dict):
        raise MalformedFrame("roster: params must be a map")
    if set(params) - set(schema):
        raise MalformedFrame("roster: unknown parameter")
    for name, (required, check) in schema.items():
        if name not in params:
            if required:
                raise MalformedFrame(f"roster: missing parameter {name}")
        elif not check(params[name]):
            raise MalformedFrame(f"roster: bad parameter {name}")
    return params


@dataclass(frozen=True, slots=True, repr=False)
class DecodedEntry:
    """A well-formed but not yet verified entry. ``signer_user`` is None for the external
    sender, in which case ``cert_raw`` is None too."""

    room: str
    index: int
    prev_head: bytes
    action: str
    params: dict[str, Any]
    signer_user: str | None
    cert_raw: bytes | None
    issued_at: int
    body: bytes
    signature: bytes

    @property
    def head(self) -> bytes:
        return entry_head(self.prev_head, self.body, self.signature)

    def __repr__(self) -> str:
        return f"DecodedEntry(room={self.room!r}, index={self.index}, action={self.action!r})"


def entry_head(prev_head: bytes, body: bytes, signature: bytes) -> bytes:
    return blake2b_256(prev_head, body, signature, person=HEAD_PERSON)


def _signer(value: object) -> tuple[str | None, bytes | None]:
    if not isinstance(value, dict):
        raise MalformedFrame("roster: signer must be a map")
    if value == {"external": True} and value["external"] is True:
        return None, None
    if set(value) != {"user", "device_cert"}:
        raise MalformedFrame("roster: bad signer")
    user, cert = value["user"], value["device_cert"]
    if not _user_id(user) or not isinstance(cert, bytes) or len(cert) > MAX_CERT_SIZE:
        raise MalformedFrame("roster: bad signer")
    return user, cert


def decode_entry(raw: bytes) -> DecodedEntry:
    """Strictly decode ``raw``; raises :class:`MalformedFrame` (or a subclass of
    :class:`FrameError`) for anything that is not a well-formed entry."""
    if not isinstance(raw, bytes):
        raise MalformedFrame("roster: entry must be bytes")
    if len(raw) > MAX_ENTRY_SIZE:
        raise FrameTooLarge("roster: entry too large")
    if len(raw) <= SIGNATURE_SIZE:
        raise MalformedFrame("roster: entry too short")
    body, signature = raw[:-SIGNATURE_SIZE], raw[-SIGNATURE_SIZE:]
    fields = unpack_body(body, max_size=MAX_ENTRY_SIZE)
    if not isinstance(fields, list) or len(fields) != 8:
        raise MalformedFrame("roster: bad shape")
    version, room, index, prev_head, action, params, signer, issued_at = fields
    if version != 1:
        raise UnsupportedVersion("roster: unsupported entry version")
    if not isinstance(room, str) or not 0 < len(room) <= MAX_ROOM_ID:
        raise MalformedFrame("roster: bad room")
    if not _is_int(index) or not _is_int(issued_at) or not _key(prev_head):
        raise MalformedFrame("roster: bad field")
    if not isinstance(action, str):
        raise MalformedFrame("roster: bad action")
    checked = check_params(action, params)
    signer_user, cert_raw = _signer(signer)
    return DecodedEntry(
        room, index, prev_head, action, checked, signer_user, cert_raw, issued_at, body, signature
    )


def sign_entry(
    *,
    room: str,
    index: int,
    prev_head: bytes,
    action: str,
    params: Mapping[str, Any],
    signer: Mapping[str, Any],
    issued_at: int,
    key: SigningKey,
) -> bytes:
    """Encode and sign one entry. Checks nothing about authority: run ``verify_entry`` on the
    result (the server will)."""
    body = pack_body([1, room, index, prev_head, action, dict(params), dict(signer), issued_at])
    return body + sign_with_label(key, ROSTER_LABEL, body)


class RosterPosition(Protocol):
    """Where a change applies: a verified ``RosterState`` is one."""

    @property
    def room(self) -> str: ...
    @property
    def length(self) -> int: ...
    @property
    def head(self) -> bytes: ...


# ---------------------------------------------------------------------------------------
# Builders. They sign; they do not judge. Run verify_entry on the result to learn the new
# state (and to refuse locally what the server would refuse).


def make_genesis(
    room: str,
    owner_user: str,
    identity_key: SigningKey,
    device_key: SigningKey,
    device_cert: DeviceCertificate,
    *,
    external_sender: bytes | None,
    history: str,
    issued_at: int,
) -> bytes:
    params: dict[str, Any] = {
        "owner": owner_user,
        "identity_key": identity_key.public,
        "history": history,
    }
    if external_sender is not None:
        params["external_sender"] = external_sender
    return sign_entry(
        room=room,
        index=0,
        prev_head=GENESIS_PREV,
        action=GENESIS,
        params=params,
        signer={"user": owner_user, "device_cert": device_cert.raw},
        issued_at=issued_at,
        key=device_key,
    )


def make_change(
    state: RosterPosition,
    action: str,
    params: Mapping[str, Any],
    *,
    signer_user: str,
    device_key: SigningKey,
    device_cert: DeviceCertificate,
    issued_at: int,
) -> bytes:
    return sign_entry(
        room=state.room,
        index=state.length,
        prev_head=state.head,
        action=action,
        params=params,
        signer={"user": signer_user, "device_cert": device_cert.raw},
        issued_at=issued_at,
        key=device_key,
    )


def make_external_change(
    state: RosterPosition,
    action: str,
    params: Mapping[str, Any],
    *,
    external_key: SigningKey,
    issued_at: int,
) -> bytes:
    return sign_entry(
        room=state.room,
        index=state.length,
        prev_head=state.head,
        action=action,
        params=params,
        signer={"external": True},
        issued_at=issued_at,
        key=external_key,
    )
