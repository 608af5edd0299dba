"""FHIR R4 export: journal records as ``AuditEvent`` resources in a ``collection`` Bundle.

Plain JSON dictionaries (no FHIR library at run time); ``tests/server/test_audit_export.py``
validates the output with ``fhir.resources``' R4B models, which are wire-compatible with R4
for AuditEvent. The mapping (``docs/audit.md`` has it as a table): ``type`` is a DICOM audit
code (http://dicom.nema.org/resources/ontology/DCM), ``subtype`` the medrelay action,
``action`` C/R/U/D/E, ``outcome`` 0/4/8, ``agent`` the user (requestor, with role and client
address), the device and the institution, ``source`` the gateway node (source type 4,
application server), ``entity`` the room (with the seq range and message id), the target
user or device, the patient tag (role 1, patient) when present, and the record's place in
its chain (node, index, hash), so an exported event can be traced back and verified.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from typing import Any

from .chain import ChainEntry

DCM = "http://dicom.nema.org/resources/ontology/DCM"
ACTION_SYSTEM = "urn:medrelay:audit-action"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"

# action -> (DCM code, display, FHIR AuditEvent.action)
ACTIONS: dict[str, tuple[str, str, str]] = {
    "authenticate": ("110114", "User Authentication", "E"),
    "message": ("110110", "Patient Record", "C"),
    "summon": ("110110", "Patient Record", "C"),
    "deliver": ("110106", "Export", "R"),
    "receipt": ("110106", "Export", "R"),
    "history_read": ("110112", "Query", "E"),
    "attachment_upload": ("110107", "Import", "C"),
    "attachment_download": ("110106", "Export", "R"),
    "room_create": ("110136", "Security Roles Changed", "C"),
    "membership_change": ("110136", "Security Roles Changed", "U"),
    "key_rotation": ("110137", "User Security Attributes Changed", "U"),
    "device_register": ("110137", "User Security Attributes Changed", "C"),
    "device_request": ("110137", "User Security Attributes Changed", "C"),
    "device_approve": ("110137", "User Security Attributes Changed", "U"),
    "device_revoke": ("110137", "User Security Attributes Changed", "D"),
    "device_retire": ("110137", "User Security Attributes Changed", "D"),
    "key_backup": ("110137", "User Security Attributes Changed", "U"),
    "retention_delete": ("110110", "Patient Record", "D"),
    "journal_cut": ("110101", "Audit Log Used", "D"),
    "journal_gap": ("110113", "Security Alert", "E"),
}
DEFAULT = ("110100", "Application Activity", "E")
OUTCOMES = {"success": "0", "ok": "0", "failure": "4", "refused": "4", "denied": "4"}


def instant(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ident(kind: str, value: str) -> dict[str, Any]:
    return {"identifier": {"system": f"urn:medrelay:{kind}", "value": value}}


def _agents(e: ChainEntry) -> list[dict[str, Any]]:
    r = e.record
    agents: list[dict[str, Any]] = []
    if r.user is not None:
        agent: dict[str, Any] = {"who": _ident("user", r.user), "requestor": True}
        if r.role is not None:
            agent["role"] = [{"text": r.role}]
        if r.address is not None or r.source is not None:
            agent["network"] = {"address": r.address or r.source, "type": "2"}
        agents.append(agent)
    if r.device is not None:
        agents.append(
            {
                "who": _ident("device", r.device),
                "requestor": r.user is None,
                "type": {"text": "device"},
            }
        )
    if r.institution is not None:
        agents.append({"who": _ident("institution", r.institution), "requestor": False})
    if not agents:
        agents.append({"who": {"display": f"medrelay node {e.node}"}, "requestor": False})
    return agents


def _detail(name: str, value: object) -> dict[str, str]:
    return {"type": name, "valueString": str(value)}


def _entities(e: ChainEntry) -> list[dict[str, Any]]:
    r = e.record
    system_object = {"system": ENTITY_TYPE, "code": "2", "display": "System Object"}
    person = {"system": ENTITY_TYPE, "code": "1", "display": "Person"}
    out: list[dict[str, Any]] = []
    if r.room is not None:
        details = [
            _detail(k, v)
            for k, v in (("seq_from", r.seq_from), ("seq_to", r.seq_to))
            if v is not None
        ]
        if r.mid is not None:
            details.append(_detail("mid", r.mid.hex()))
        room: dict[str, Any] = {"what": _ident("room", r.room), "type": system_object}
        if details:
            room["detail"] = details
        out.append(room)
    if r.target is not None:
        out.append({"what": _ident("target", r.target), "type": person})
    if r.patient_tag is not None:
        out.append(
            {
                "what": _ident("patient-tag", r.patient_tag.hex()),
                "type": person,
                "role": {"system": OBJECT_ROLE, "code": "1", "display": "Patient"},
            }
        )
    chain_details = [_detail("hash", e.hash.hex()), _detail("prev_hash", e.prev_hash.hex())]
    if r.detail is not None:
        chain_details.append(_detail("detail", r.detail))
    out.append(
        {
            "what": _ident("audit-record", f"{e.node}#{e.idx}"),
            "type": system_object,
            "detail": chain_details,
        }
    )
    return out


def audit_event(e: ChainEntry) -> dict[str, Any]:
    r = e.record
    code, display, action = ACTIONS.get(r.action, DEFAULT)
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": f"{re.sub(r'[^A-Za-z0-9.-]', '-', e.node)[:40]}-{e.idx}",
        "type": {"system": DCM, "code": code, "display": display},
        "subtype": [{"system": ACTION_SYSTEM, "code": r.action}],
        "action": action,
        "recorded": instant(r.ts),
        "outcome": OUTCOMES.get(r.outcome, "8" if r.outcome == "error" else "4"),
        "agent": _agents(e),
        "source": {
            "observer": {"identifier": {"system": "urn:medrelay:node", "value": e.node}},
            "type": [{"system": SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": _entities(e),
    }
    if r.ts_end is not None:
        event["period"] = {"start": instant(r.ts), "end": instant(r.ts_end)}
    if event["outcome"] != "0" and r.detail is not None:
        event["outcomeDesc"] = r.detail
    return event


def bundle(entries: Iterable[ChainEntry], *, now: int) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": instant(now),
        "entry": [{"resource": audit_event(e)} for e in entries],
    }
