"""Adding a device to a user: the new device asks, an existing device approves after the
user compared a code, and the identity key travels inside the user's encrypted key backup.

New device (B)::

    keys = KeyStore.load_or_create(user, directory, with_identity=False)
    enrolment = DeviceEnrolment(url, keys, token_provider)
    await enrolment.request()          # shows enrolment.code (or enrolment.qr) to the user
    await enrolment.wait_approved()    # registers; opens the backup: B now holds the identity
    await enrolment.close()
    client = Client(url, keys, token_provider); await client.start()

Existing device (A), a started :class:`~medrelay_client.client.Client`::

    pending = await client.wait_for_device_request()
    await client.approve_device(pending.request, code_the_user_typed)

A compares the code the user typed (read off B's screen) with the code of the device key the
server delivered; a server that put its own key in the request gives another code, and A
refuses (:class:`~medrelay_protocol.enrolment.CodeMismatch`) without issuing anything.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import SigningKey, device_id_for
from medrelay_protocol.enrolment import (
    BackupContents,
    IdentityAttestation,
    approval_code,
    approval_qr,
    check_approval_code,
    new_backup_key,
    open_backup,
    seal_backup,
    unwrap_backup_key,
    wrap_backup_key,
)
from medrelay_protocol.errors import BadSignature, DecryptionFailed, RequestError
from medrelay_protocol.frames import (
    ApprovalStatus,
    ApproveDevice,
    Backup,
    DeviceRequest,
    GetBackup,
    Ok,
    PendingDevice,
    PutBackup,
    RegisterDevice,
    RequestApproval,
)
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate

from .keystore import KeyStore
from .rooms import BUNDLE_LIFETIME, RECEIVING_KEY_GRACE, RECEIVING_KEY_ROTATION
from .transport import Session

Request = Callable[..., Awaitable[Any]]
RidFn = Callable[[], str]
Pending = DeviceRequest | PendingDevice


# ------------------------------------------------------------------ the approving device


async def ensure_backup(keys: KeyStore, request: Request, rid: RidFn) -> int:
    """Make sure the server holds a backup this device can open, sealing the identity key
    under this device's backup key (a new one if it has none). Returns its version.
    The put is compare-and-set: when another device moved the backup meanwhile, read again."""
    for _ in range(3):
        stored: Backup = await request(GetBackup(rid=rid()), Backup)
        if keys.backup_key is not None and stored.blob is not None:
            try:
                open_backup(
                    keys.backup_key, user_id=keys.user, version=stored.version, blob=stored.blob
                )
            except DecryptionFailed:
                pass
            else:
                keys.backup_version = stored.version
                keys.save()
                return stored.version
        if keys.backup_key is None:
            keys.backup_key = new_backup_key()
        version = stored.version + 1
        blob = seal_backup(
            keys.backup_key,
            user_id=keys.user,
            version=version,
            contents=BackupContents(identity_seed=keys.identity.private_bytes()),
        )
        try:
            await request(PutBackup(rid=rid(), version=version, blob=blob), Ok)
        except RequestError as exc:
            if exc.code == ErrorCode.BACKUP_CONFLICT:
                continue
            raise
        keys.backup_version = version
        keys.save()
        return version
    raise RequestError(ErrorCode.BACKUP_CONFLICT, "the key backup keeps moving")


async def approve(
    keys: KeyStore, request: Request, rid: RidFn, pending: Pending, code: str
) -> DeviceCertificate:
    """Approve a pending device after the user compared codes: check the code against the
    device key received (nothing is issued on a mismatch), check its bundle, then send its
    certificate and the backup key wrapped to its receiving key."""
    check_approval_code(code, keys.user, pending.device_key)
    if pending.device != device_id_for(pending.device_key):
        raise BadSignature("the request names another device id")
    now = int(time.time())
    bundle = DeviceBundle.verify(pending.bundle, pending.device_key, now=now)
    await ensure_backup(keys, request, rid)
    assert keys.backup_key is not None
    cert = DeviceCertificate.issue(keys.identity, keys.user, pending.device_key, "person", now)
    share = wrap_backup_key(
        keys.backup_key,
        user_id=keys.user,
        recipient_device=pending.device,
        recipient_public=bundle.receiving_key,
    )
    frame = ApproveDevice(
        rid=rid(), request=pending.request, certificate=cert.raw, backup_share=share
    )
    await request(frame, Ok)
    return cert


# ------------------------------------------------------------------------ the new device


class DeviceEnrolment:
    """The new device's side. Its keys have no identity key; after :meth:`wait_approved`
    they hold the identity key, the backup key, and the device is registered."""

    def __init__(
        self,
        url: str,
        keys: KeyStore,
        token_provider: Callable[[], Awaitable[str]],
        *,
        institution_keys: dict[str, bytes] | None = None,
    ) -> None:
        self.url = url
        self.keys = keys
        self.token_provider = token_provider
        self.institution_keys = institution_keys
        """Institution id -> pinned public key; when given, the identity key must carry a
        valid attestation from one of them (served by ``get_devices``)."""
        self.session: Session | None = None
        self.status: ApprovalStatus | None = None
        self._bundle: bytes = b""

    def __repr__(self) -> str:
        return f"DeviceEnrolment(user={self.keys.user!r}, device={self.keys.device_id!r})"

    @property
    def code(self) -> str:
        """The comparison code to show the user (twelve digits)."""
        return approval_code(self.keys.user, self.keys.device.public)

    @property
    def qr(self) -> str:
        """The QR payload to show instead (carries the whole digest)."""
        return approval_qr(self.keys.user, self.keys.device.public)

    @property
    def request_id(self) -> str | None:
        return self.status.request if self.status is not None else None

    async def pinned_identity(self) -> bytes | None:
        """Connect (the session :meth:`request` then uses) and ask which identity key the
        server has pinned for this user: ``None`` means no device of the user is registered
        yet. The server's word, used only to decide whether to ask for approval; what the
        device ends up trusting is still checked in :meth:`wait_approved`."""
        if self.session is None:
            self.session = await Session.open(self.url, await self.token_provider(), self.keys)
        return await pinned_identity(self.session, self.keys.user)

    async def request(self) -> ApprovalStatus:
        """Connect and ask the user's devices for approval (again: the same request)."""
        now = int(time.time())
        k = self.keys
        k.rotate_receiving(now, every=RECEIVING_KEY_ROTATION, grace=RECEIVING_KEY_GRACE)
        self._bundle = DeviceBundle.issue(
            k.device, k.receiving.public, k.receiving_since + BUNDLE_LIFETIME
        ).raw
        if self.session is None:
            self.session = await Session.open(self.url, await self.token_provider(), k)
        s = self.session
        frame = RequestApproval(rid=s.next_rid(), device_key=k.device.public, bundle=self._bundle)
        self.status = await s.request(frame, ApprovalStatus)
        return self.status

    async def wait_approved(self, timeout: float = 30) -> None:
        """Wait for the approval, then register and take the identity key from the backup."""
        if self.status is None or self.session is None:
            raise RuntimeError("call request() first")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.status.state != "approved":
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError("not approved in time")
            frame = await asyncio.wait_for(self.session.pushed.get(), left)
            if frame is None:
                raise self.session.closed or RuntimeError("closed")
            if isinstance(frame, ApprovalStatus) and frame.request == self.status.request:
                self.status = frame
        await self._complete(self.status)

    async def _complete(self, status: ApprovalStatus) -> None:
        assert self.session is not None
        s, k = self.session, self.keys
        if status.identity_key is None or status.certificate is None or not status.backup_share:
            raise BadSignature("incomplete approval")
        cert = DeviceCertificate.verify(status.certificate, status.identity_key)
        if (cert.user_id, cert.device_key) != (k.user, k.device.public):
            raise BadSignature("the certificate names another device")
        await self._check_attestation(status.identity_key)
        frame = RegisterDevice(
            rid=s.next_rid(),
            identity_key=status.identity_key,
            certificate=status.certificate,
            bundle=self._bundle,
        )
        await s.request(frame, Ok)
        backup_key = self._unwrap(status.backup_share)
        stored: Backup = await s.request(GetBackup(rid=s.next_rid()), Backup)
        if stored.blob is None:
            raise DecryptionFailed()
        contents = open_backup(backup_key, user_id=k.user, version=stored.version, blob=stored.blob)
        identity = SigningKey(contents.identity_seed)
        if identity.public != status.identity_key:
            raise BadSignature("the backup holds another identity key")
        k.identity = identity
        k.backup_key = backup_key
        k.backup_version = stored.version
        k.save()

    def _unwrap(self, share: bytes) -> bytes:
        k = self.keys
        for receiving in k.receiving_keys():
            try:
                return unwrap_backup_key(
                    share, user_id=k.user, device_id=k.device_id, receiving=receiving
                )
            except DecryptionFailed:
                continue
        raise DecryptionFailed()

    async def _check_attestation(self, identity_key: bytes) -> None:
        if self.institution_keys is None:
            return
        assert self.session is not None
        attestation = await fetch_attestation(self.session, self.keys.user)
        verify_attestation(attestation, self.keys.user, identity_key, self.institution_keys)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


# ------------------------------------------------------------------ attestations


async def fetch_attestation(session: Session, user: str) -> bytes | None:
    from medrelay_protocol.frames import Devices, GetDevices

    reply: Devices = await session.request(
        GetDevices(rid=session.next_rid(), users=(user,)), Devices
    )
    return reply.users[0].attestation if reply.users else None


async def pinned_identity(session: Session, user: str) -> bytes | None:
    """The identity key the server has pinned for ``user`` (``None``: none yet). Works on a
    session of a device that is not registered yet."""
    from medrelay_protocol.frames import Devices, GetDevices

    reply: Devices = await session.request(
        GetDevices(rid=session.next_rid(), users=(user,)), Devices
    )
    return reply.users[0].identity_key if reply.users else None


def verify_attestation(
    raw: bytes | None, user: str, identity_key: bytes, institution_keys: dict[str, bytes]
) -> IdentityAttestation:
    """The user's identity key is the one their institution attested (under the key this
    client pinned for that institution); :class:`BadSignature` otherwise."""
    if raw is None:
        raise BadSignature("no attestation for this identity key")
    claimed = IdentityAttestation.parse_unverified(raw)
    public = institution_keys.get(claimed.institution)
    if public is None:
        raise BadSignature("attested by an institution this client does not know")
    att = IdentityAttestation.verify(raw, public)
    if (att.user_id, att.identity_key) != (user, identity_key):
        raise BadSignature("the attestation names another user or key")
    return att
