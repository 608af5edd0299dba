"""Device registration and the key directory. The server stores what users' keys signed;
it cannot make a certificate or bundle itself."""

from __future__ import annotations

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.enrolment import IdentityAttestation
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import Devices, GetDevices, Ok, RegisterDevice, UserDevices
from medrelay_protocol.identity import DeviceBundle, DeviceCertificate

from ..gateway.connection import Connection
from ..gateway.context import Gateway
from ..store.base import DeviceRecord


async def handle_register_device(gw: Gateway, conn: Connection, frame: RegisterDevice) -> None:
    now = gw.clock.now()
    try:
        cert = DeviceCertificate.verify(frame.certificate, frame.identity_key)
        DeviceBundle.verify(frame.bundle, conn.device_key, now=now)
    except MedrelayError as exc:
        raise RequestError(ErrorCode.BAD_SIGNATURE, "certificate or bundle invalid") from exc
    if (cert.user_id, cert.device_id, cert.device_key) != (conn.user, conn.device, conn.device_key):
        raise RequestError(ErrorCode.FORBIDDEN, "certificate names another user or device")
    if (cert.kind == "tablet") != (conn.kind == "tablet"):
        raise RequestError(ErrorCode.FORBIDDEN, "device kind does not match the account")
    pinned = await gw.store.get_identity(conn.user)
    attestation = None
    if pinned is None:
        attestation = await _first_identity(gw, conn, frame, now)
    elif pinned != frame.identity_key:
        raise RequestError(ErrorCode.ALREADY_EXISTS, "identity key already pinned")
    await gw.store.put_identity(conn.user, frame.identity_key, now, attestation)
    await gw.store.put_device(
        DeviceRecord(
            user=conn.user,
            device_id=conn.device,
            signing_key=conn.device_key,
            certificate=frame.certificate,
            bundle=frame.bundle,
            kind=cert.kind,
            created_at=now,
        )
    )
    conn.registered = True
    await gw.store.journal([gw.audit(conn, "device_register", target=conn.device)])
    gw.reply(conn, Ok(rid=frame.rid))


async def _first_identity(
    gw: Gateway, conn: Connection, frame: RegisterDevice, now: int
) -> bytes | None:
    """The attestation a user's first identity key is pinned with: the one the device
    brings (made by its institution at sign-in), checked under the institution's key, or
    one the development issuer makes now. Without either: ``ATTESTATION_REQUIRED``."""
    institution = conn.institution or ""
    attester = gw.attesters.get(institution)
    if frame.attestation is not None:
        if attester is None:
            raise RequestError(ErrorCode.BAD_SIGNATURE, "no key to check this attestation")
        try:
            att = IdentityAttestation.verify(frame.attestation, attester.public_key)
        except MedrelayError as exc:
            raise RequestError(ErrorCode.BAD_SIGNATURE, "attestation invalid") from exc
        if (att.user_id, att.identity_key, att.institution) != (
            conn.user,
            frame.identity_key,
            institution,
        ):
            raise RequestError(ErrorCode.FORBIDDEN, "the attestation names another user or key")
        return frame.attestation
    if attester is not None and institution in gw.self_attesting:
        return await attester.attest(
            user_id=conn.user,
            identity_key=frame.identity_key,
            institution=institution,
            issued_at=now,
        )
    if gw.require_attestation:
        raise RequestError(
            ErrorCode.ATTESTATION_REQUIRED, "sign in again to have your identity key attested"
        )
    return None


async def handle_get_devices(gw: Gateway, conn: Connection, frame: GetDevices) -> None:
    users = sorted(set(frame.users))
    # one read for every user (a rekey of a room of 50 asks for all 50: one transaction
    # each for the identity and the attestation cost ~100 per request)
    records, identities = await gw.store.device_lists(users)
    by_user: dict[str, list[DeviceRecord]] = {}
    for record in records:
        by_user.setdefault(record.user, []).append(record)
    out = []
    for user in users:
        mine = by_user.get(user, [])
        identity_key, attestation = identities.get(user, (None, None))
        out.append(
            UserDevices(
                user=user,
                identity_key=identity_key,
                attestation=attestation,
                certificates=tuple(r.certificate for r in mine if not r.revoked)[:64],
                bundles=tuple(r.bundle for r in mine if not r.revoked)[:64],
                revoked=tuple(r.device_id for r in mine if r.revoked)[:256],
            )
        )
    gw.reply(conn, Devices(rid=frame.rid, users=tuple(out)))
