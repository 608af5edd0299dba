"""Room logic of the client: roster verification, rekeys, sealing and opening messages.

Every key decision rests on what this client verified itself: the roster chain (pinned by
length and head in the key store), device certificates checked under the identity keys the
roster pins, rekey manifests signed by a certified member device and their key commitments.
The server's word is used only for transport.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import ReceivingKey, decrypt_attachment, encrypt_attachment
from medrelay_protocol.envelope import Envelope, MessageHeader, open_message, seal_message
from medrelay_protocol.epoch_state import ReplayGuard, should_rotate
from medrelay_protocol.epochs import EpochId, RekeyManifest, build_rekey, open_rekey
from medrelay_protocol.errors import (
    BadSignature,
    DecryptionFailed,
    MedrelayError,
    NotAuthorised,
    ReplayDetected,
    RequestError,
    StaleEpoch,
)
from medrelay_protocol.frames import (
    Ack,
    BlobChunk,
    BlobGet,
    BlobPut,
    Commit,
    Committed,
    CreateRoom,
    Deliver,
    Devices,
    GetDevices,
    GetRoster,
    GrantHistory,
    History,
    HistoryPage,
    Ok,
    RegisterDevice,
    Roster,
    Send,
    Summon,
)
from medrelay_protocol.grants import HistoryGrant, build_grant
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate
from medrelay_protocol.policy import may_commit_epoch
from medrelay_protocol.roster import (
    RosterState,
    certified_devices,
    make_change,
    make_genesis,
    verify_entry,
    verify_roster,
)
from medrelay_protocol.roster_entry import decode_entry
from medrelay_protocol.verified import VerifiedDevices

from .keystore import KeyStore

Request = Callable[..., Awaitable[Any]]
T = TypeVar("T")
RECEIVING_KEY_ROTATION = 7 * 86400
"""A device makes a new X25519 receiving key weekly (at its next connect after that)."""
RECEIVING_KEY_GRACE = 14 * 86400
"""... and deletes the old private key this long after, so a device stolen later cannot
open wraps made to it."""
BUNDLE_LIFETIME = RECEIVING_KEY_ROTATION + 86400


@dataclass(frozen=True, slots=True, repr=False)
class Sealed:
    mid: bytes
    envelope: bytes


class RoomLogic:
    max_epoch_age = 7 * 86400
    """Rotate a room's epoch after this many seconds (timer rotation)."""
    max_epoch_messages = 1000
    """... or after this device sent this many messages in it (count rotation)."""

    def __init__(self, keys: KeyStore, request: Request, *, kind: str = "person") -> None:
        self.keys = keys
        self._request = request
        self.kind = kind
        self.rosters: dict[str, RosterState] = {}
        self.pending: dict[str, bool] = {}
        self._device_keys: dict[tuple[str, str], bytes] = {}
        self.devices_checked = VerifiedDevices()
        """Outcomes of certificate and bundle checks: a rekey checks only new devices."""
        self._replay: dict[str, ReplayGuard] = {}
        self._rids = itertools.count(1)
        self.cert: DeviceCertificate | None = None
        self.institution_keys: dict[str, bytes] | None = None
        """Institution id -> attestation key pinned at enrolment (``GET /institutions``):
        when set, an identity key is pinned into a roster only with a valid attestation."""
        self._epoch_changed = asyncio.Event()

    def rid(self) -> str:
        return f"l{next(self._rids)}"

    async def request(self, frame: Any, expect: type[Any]) -> Any:
        return await self._request(frame, expect)

    # registration and directory -------------------------------------------------------
    async def ensure_registered(self) -> None:
        now = int(time.time())
        k = self.keys
        self.cert = DeviceCertificate.issue(k.identity, k.user, k.device.public, self.kind, now)
        k.rotate_receiving(now, every=RECEIVING_KEY_ROTATION, grace=RECEIVING_KEY_GRACE)
        bundle = DeviceBundle.issue(
            k.device, k.receiving.public, k.receiving_since + BUNDLE_LIFETIME
        )
        await self.request(
            RegisterDevice(
                rid=self.rid(),
                identity_key=k.identity.public,
                certificate=self.cert.raw,
                bundle=bundle.raw,
                attestation=k.attestation,
            ),
            Ok,
        )

    async def roster(self, room: str) -> tuple[RosterState, Roster]:
        reply: Roster = await self.request(GetRoster(rid=self.rid(), room=room), Roster)
        rk = self.keys.room(room)
        pinned = (rk.pinned_length, rk.pinned_head) if rk.pinned_length else None
        state = verify_roster(reply.entries, pinned=pinned, room=room)
        rk.pinned_length, rk.pinned_head = state.length, state.head
        self.rosters[room] = state
        self.pending[room] = reply.pending_rekey
        return state, reply

    async def recipients(self, state: RosterState) -> dict[str, bytes]:
        """Certified devices of the roster's members -> receiving keys (never the server's
        word: certificates are checked under the identity keys the roster pins)."""
        return {d: pub for d, (_user, pub) in (await self.certified(state)).items()}

    async def certified(self, state: RosterState) -> dict[str, tuple[str, bytes]]:
        """Certified devices with an unexpired bundle: device id -> (user, receiving key)."""
        users = tuple(sorted(state.members))
        reply: Devices = await self.request(GetDevices(rid=self.rid(), users=users), Devices)
        now = int(time.time())
        certs = {u.user: list(u.certificates) for u in reply.users}
        checked = self.devices_checked
        certified = certified_devices(state, certs, now=now, verify=checked.certificate)
        out: dict[str, tuple[str, bytes]] = {}
        for u in reply.users:
            for raw in u.bundles:
                for cert in certified.values():
                    if cert.user_id != u.user:
                        continue
                    try:
                        b = checked.bundle(raw, cert.device_key, now=now)
                    except MedrelayError:
                        continue
                    out[b.device_id] = (u.user, b.receiving_key)
        return out

    # membership -------------------------------------------------------------------------
    async def create_room(
        self, room: str, *, external_sender: bytes | None = None, history: str = "joined"
    ) -> str:
        """Create a room owned by this user. ``external_sender`` is the institution's
        removal-only key (from ``GET /institutions``), named in the genesis."""
        assert self.cert is not None
        k, now = self.keys, int(time.time())
        genesis = make_genesis(
            room,
            k.user,
            k.identity,
            k.device,
            self.cert,
            external_sender=external_sender,
            history=history,
            issued_at=now,
        )
        state, _ = verify_entry(None, genesis)
        rekey = build_rekey(
            room=room,
            epoch_number=1,
            prev_epoch=None,
            roster_head=state.head,
            device_list_version=0,
            committer=k.device,
            recipients=await self.recipients(state),
        )
        await self.request(
            CreateRoom(
                rid=self.rid(),
                room=room,
                genesis=genesis,
                manifest=rekey.manifest,
                wraps=rekey.wraps,
            ),
            Committed,
        )
        self._keep_epoch(room, 1, state.head, rekey.secret, start=2)
        rk = k.room(room)
        rk.pinned_length, rk.pinned_head = state.length, state.head
        self.rosters[room] = state
        k.save()
        return room

    async def add(self, room: str, user: str, role: str, *, history_from_seq: int | None) -> int:
        reply: Devices = await self.request(GetDevices(rid=self.rid(), users=(user,)), Devices)
        identity = reply.users[0].identity_key if reply.users else None
        if identity is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"{user} has no registered identity")
        if self.institution_keys is not None:
            from .enrolment import verify_attestation

            verify_attestation(reply.users[0].attestation, user, identity, self.institution_keys)
        params: dict[str, Any] = {"user": user, "identity_key": identity, "role": role}
        if history_from_seq is not None:
            params["history_from_seq"] = history_from_seq
        seq = await self._change(room, "add", params, rekey=True)
        if history_from_seq is not None:
            await self.grant_history(room, user, history_from_seq, added_at=seq)
        return seq

    async def grant_history(self, room: str, user: str, from_seq: int, *, added_at: int) -> int:
        """Wrap the epoch secrets covering seqs [from_seq, added_at) to the newcomer's
        certified devices, taken from this client's own verified roster."""
        rk = self.keys.room(room)
        starts = sorted(rk.starts.items(), key=lambda kv: kv[1])
        covering: dict[int, tuple[bytes, bytes]] = {}
        for i, (number, start) in enumerate(starts):
            end = starts[i + 1][1] - 1 if i + 1 < len(starts) else added_at
            if start < added_at and end >= from_seq and number in rk.epochs:
                covering[number] = (rk.heads[number], rk.epochs[number])
        state, _ = await self.roster(room)  # verified, and now including the newcomer
        devices = {
            d: pub for d, (owner, pub) in (await self.certified(state)).items() if owner == user
        }
        if not covering or not devices:
            return 0
        grant = build_grant(
            room=room,
            grantee=user,
            from_seq=from_seq,
            granter=self.keys.device,
            epochs=covering,
            recipients=devices,
        )
        ack: Ack = await self.request(
            GrantHistory(rid=self.rid(), room=room, mid=os.urandom(16), grant=grant), Ack
        )
        return ack.seq

    async def remove(self, room: str, user: str) -> int:
        return await self._change(room, "remove", {"user": user}, rekey=True)

    async def revoke_device(self, room: str, device_id: str) -> int:
        params = {"user": self.keys.user, "device": device_id}
        return await self._change(room, "revoke_device", params, rekey=True)

    async def leave(self, room: str) -> int:
        return await self._change(room, "leave", {}, rekey=False)

    async def refresh(self, room: str) -> None:
        """Catch up the roster. If a removal is pending, commit the new epoch now (a member
        device does this transparently; tablets may not commit and wait for a member);
        otherwise wait until this device holds the room's current epoch key."""
        _state, info = await self.roster(room)
        if info.pending_rekey and self.kind != "tablet":
            await self._change(room, None, {}, rekey=True)
            return
        await self.await_epoch(room, target=info.epoch + (1 if info.pending_rekey else 0))

    async def _change(
        self, room: str, action: str | None, params: dict[str, Any], *, rekey: bool
    ) -> int:
        assert self.cert is not None
        for attempt in range(3):
            state, info = await self.roster(room)
            change = None
            new_state = state
            if action is not None:
                change = make_change(
                    state,
                    action,
                    params,
                    signer_user=self.keys.user,
                    device_key=self.keys.device,
                    device_cert=self.cert,
                    issued_at=int(time.time()),
                )
                new_state, _ = verify_entry(state, change)
            manifest, wraps, secret, epoch = None, None, b"", info.epoch + 1
            if rekey:
                rk = self.keys.room(room)
                prev = (
                    EpochId(info.epoch, rk.heads.get(info.epoch, b"\0" * 32))
                    if info.epoch
                    else None
                )
                built = build_rekey(
                    room=room,
                    epoch_number=epoch,
                    prev_epoch=prev,
                    roster_head=new_state.head,
                    device_list_version=info.device_list_version,
                    committer=self.keys.device,
                    recipients=await self.recipients(new_state),
                )
                manifest, wraps, secret = built.manifest, built.wraps, built.secret
            try:
                done: Committed = await self.request(
                    Commit(
                        rid=self.rid(), room=room, change=change, manifest=manifest, wraps=wraps
                    ),
                    Committed,
                )
            except RequestError as exc:
                retry = exc.code in (
                    ErrorCode.RECIPIENTS_MISMATCH,
                    ErrorCode.ROSTER_CONFLICT,
                    ErrorCode.STALE_EPOCH,
                )
                if retry and attempt < 2:
                    continue
                raise
            if rekey:
                self._keep_epoch(room, epoch, new_state.head, secret, start=done.seq)
            # the roster change comes first, then its rekey: return the change's own seq
            return done.seq - 1 if change is not None and manifest is not None else done.seq
        raise RequestError(ErrorCode.ROSTER_CONFLICT, "could not commit")  # pragma: no cover

    async def await_epoch(
        self, room: str, *, target: int | None = None, timeout: float = 15.0
    ) -> None:
        """Wait until this device holds epoch ``target`` (default: the room's current epoch)
        of the room; its wrap may still be on its way."""
        if target is None:
            _state, info = await self.roster(room)
            target = info.epoch
        async with asyncio.timeout(timeout):
            while self.keys.room(room).current < target:
                self._epoch_changed.clear()
                await self._epoch_changed.wait()

    def _keep_epoch(
        self, room: str, number: int, head: bytes, secret: bytes, start: int | None = None
    ) -> None:
        rk = self.keys.room(room)
        rk.epochs[number] = secret
        rk.heads[number] = head
        if start is not None:
            rk.starts[number] = start
        if number > rk.current:
            rk.current, rk.counter, rk.started_at = number, 0, int(time.time())
        self.pending[room] = False
        self.keys.save()
        self._epoch_changed.set()

    # messages ---------------------------------------------------------------------------
    async def seal(self, room: str, body: dict[str, Any], *, priority: str = "routine") -> Sealed:
        rk = self.keys.room(room)
        urgent_now = priority == "urgent" and rk.current > 0  # never blocked by a rekey
        if rk.current == 0 or (self.pending.get(room) and not urgent_now):
            await self.refresh(room)
        rk = self.keys.room(room)
        if (
            not urgent_now
            and self.kind != "tablet"
            and should_rotate(
                int(time.time()),
                rk.counter,
                started_at=rk.started_at or int(time.time()),
                max_age=self.max_epoch_age,
                max_messages=self.max_epoch_messages,
            )
        ):
            await self._change(room, None, {}, rekey=True)  # bound what one epoch key exposes
            rk = self.keys.room(room)
        mid = os.urandom(16)
        header = MessageHeader(
            room=room,
            epoch=rk.current,
            roster_head=rk.heads[rk.current],
            sender_device=self.keys.device_id,
            counter=rk.counter,
            mid=mid,
            priority=priority,
        )
        rk.counter += 1
        self.keys.save()
        env = seal_message(
            header, body, epoch_secret=rk.epochs[rk.current], device=self.keys.device
        )
        return Sealed(mid, env.encode())

    async def submit(
        self,
        room: str,
        sealed: Sealed,
        *,
        urgent_role: str | None,
        patient_tag: bytes | None = None,
    ) -> int:
        """Send a sealed envelope. ``patient_tag`` is the institution's HMAC of the patient
        id (computed by the caller with a key the server never sees), for the audit trail."""
        frame: Send | Summon
        if urgent_role is not None:
            frame = Summon(
                rid=self.rid(),
                room=room,
                mid=sealed.mid,
                envelope=sealed.envelope,
                role=urgent_role,
                patient_tag=patient_tag,
            )
        else:
            frame = Send(
                rid=self.rid(),
                room=room,
                mid=sealed.mid,
                envelope=sealed.envelope,
                patient_tag=patient_tag,
            )
        ack: Ack = await self.request(frame, Ack)
        return ack.seq

    async def process(self, ev: Deliver) -> tuple[Any, str | None]:
        if ev.kind == "roster":
            return await self._on_roster(ev)
        if ev.kind == "rekey":
            await self._on_rekey(ev)
            return None, None
        if ev.kind == "grant":
            return await self._on_grant(ev)
        return await self.decrypt_event(ev)

    async def _on_grant(self, ev: Deliver) -> tuple[Any, str | None]:
        grant = HistoryGrant.parse_unverified(ev.payload)
        if grant.grantee != self.keys.user:
            return None, None
        key = await self.device_key(ev.room, ev.user, ev.sender)
        grant = HistoryGrant.verify(ev.payload, key)
        secrets = self._with_receiving_keys(
            lambda key: grant.open(device_id=self.keys.device_id, receiving=key)
        )
        rk = self.keys.room(ev.room)
        for e in grant.epochs:
            if e.number in secrets and e.number not in rk.epochs:
                rk.epochs[e.number] = secrets[e.number]
                rk.heads[e.number] = e.roster_head
        self.keys.save()
        notice = {
            "type": "notice",
            "action": "history_grant",
            "user": ev.user,
            "from_seq": grant.from_seq,
        }
        return notice, None

    async def _on_roster(self, ev: Deliver) -> tuple[Any, str | None]:
        entry = decode_entry(ev.payload)
        target = entry.params.get("user") if entry.action != "leave" else entry.signer_user
        if entry.action == "genesis":
            target = entry.params.get("owner")
        notice = {"type": "notice", "action": entry.action, "user": target}
        if entry.action in ("remove", "leave") and target == self.keys.user:
            self.keys.forget_room(ev.room)
            self.rosters.pop(ev.room, None)
            return notice, None
        try:
            await self.roster(ev.room)
        except RequestError as exc:
            if exc.code != ErrorCode.FORBIDDEN:
                raise
        return notice, None

    async def _on_rekey(self, ev: Deliver) -> None:
        wrap = ev.wrap
        if wrap is None:
            return
        key = await self.device_key(ev.room, ev.user, ev.sender)
        manifest = RekeyManifest.verify(ev.payload, key)
        rk = self.keys.room(ev.room)
        if manifest.room != ev.room or manifest.committer_device != ev.sender:
            raise BadSignature("rekey relabelled: manifest names another room or committer")
        if manifest.epoch_number in rk.epochs and ev.sender == self.keys.device_id:
            return  # our own commit, already kept when the server acknowledged it
        if manifest.epoch_number <= rk.current:
            raise StaleEpoch(f"rekey for epoch {manifest.epoch_number} is not newer than ours")
        state = self.rosters.get(ev.room) or (await self.roster(ev.room))[0]
        committer = state.members.get(ev.user)
        if committer is None or not may_commit_epoch(committer.role):
            raise NotAuthorised("rekey by someone who may not commit epochs")
        secret = self._with_receiving_keys(
            lambda key: open_rekey(manifest, wrap, device_id=self.keys.device_id, receiving=key)
        )
        self._keep_epoch(ev.room, manifest.epoch_number, manifest.roster_head, secret, start=ev.seq)

    def _with_receiving_keys(self, open_with: Callable[[ReceivingKey], T]) -> T:
        """Try the current receiving key, then the retired ones still in their grace; the
        last failure is raised (one opaque DecryptionFailed if none opens)."""
        keys = self.keys.receiving_keys()
        for key in keys[:-1]:
            try:
                return open_with(key)
            except DecryptionFailed:
                continue
        return open_with(keys[-1])

    async def device_key(self, room: str, user: str, device: str) -> bytes:
        cached = self._device_keys.get((user, device))
        if cached is not None:
            return cached
        state = self.rosters.get(room)
        if state is None or user not in state.members:
            state, _ = await self.roster(room)
        member = state.members.get(user)
        if member is None:
            raise RequestError(ErrorCode.UNCERTIFIED_DEVICE, "sender is not a member")
        reply: Devices = await self.request(GetDevices(rid=self.rid(), users=(user,)), Devices)
        for u in reply.users:
            for raw in u.certificates:
                try:
                    cert = DeviceCertificate.verify(raw, member.identity_key)
                except MedrelayError:
                    continue
                if cert.user_id == user:
                    self._device_keys[(user, cert.device_id)] = cert.device_key
        found = self._device_keys.get((user, device))
        if found is None:
            raise RequestError(ErrorCode.UNCERTIFIED_DEVICE, "sender device is not certified")
        return found

    async def decrypt_event(self, ev: Deliver, *, live: bool = True) -> tuple[Any, str | None]:
        """Verify and decrypt one event. ``live`` applies the replay guard (a history page
        legitimately shows messages this device has already seen)."""
        if ev.kind not in ("message", "summon"):
            return {"type": "notice", "kind": ev.kind}, None
        env = Envelope.decode(ev.payload)
        header = env.header
        if header.room != ev.room or header.sender_device != ev.sender:
            # the server relabelled a message to another room or sender: never show it
            raise BadSignature("message relabelled: header names another room or sender")
        secret = self.keys.room(ev.room).epochs.get(header.epoch)
        if secret is None:
            return None, (
                f"undecryptable: no key for epoch {header.epoch} (withheld because you were not "
                "a member then, or its key has not reached this device)"
            )
        key = await self.device_key(ev.room, ev.user, header.sender_device)
        _, body = open_message(env, sender_key=key, epoch_secret=secret)
        if not live:
            return body, None
        guard = self._replay.setdefault(ev.room, ReplayGuard())
        try:
            guard.accept(header.sender_device, header.epoch, header.counter)
        except ReplayDetected:
            return None, "dropped: a replay of an earlier message"
        return body, None

    async def history(self, room: str, *, before: int, limit: int) -> tuple[Deliver, ...]:
        page: HistoryPage = await self.request(
            History(rid=self.rid(), room=room, before=before, limit=limit), HistoryPage
        )
        return page.events

    # attachments ------------------------------------------------------------------------
    async def upload(self, room: str, data: bytes) -> dict[str, Any]:
        blob = os.urandom(16)
        enc = encrypt_attachment(data, blob)
        last = len(enc.chunks) - 1
        for i, chunk in enumerate(enc.chunks):
            await self.request(
                BlobPut(rid=self.rid(), room=room, blob=blob, index=i, data=chunk, final=i == last),
                Ok,
            )
        return {
            "blob": blob,
            "key": enc.key,
            "header": enc.header,
            "size": enc.size,
            "chunks": len(enc.chunks),
        }

    async def download(self, body: dict[str, Any]) -> bytes:
        chunks = []
        for i in range(int(body["chunks"])):
            reply: BlobChunk = await self.request(
                BlobGet(rid=self.rid(), blob=body["blob"], index=i), BlobChunk
            )
            chunks.append(reply.data)
        return b"".join(decrypt_attachment(body["key"], body["header"], body["blob"], chunks))
