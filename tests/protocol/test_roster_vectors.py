"""Check tests/vectors/medrelay-roster-vectors.json against the library.

Every entry and the manifest are rebuilt from the documented wire format (``pack_body`` and
``sign_with_label`` directly, not through the builders) and compared byte for byte; then the
chain is verified from genesis and every wrap is opened.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from medrelay_protocol.canonical import pack_body
from medrelay_protocol.crypto import (
    ReceivingKey,
    SigningKey,
    blake2b_256,
    key_commitment,
    sign_with_label,
)
from medrelay_protocol.epochs import EpochId, RekeyManifest, build_rekey, open_rekey
from medrelay_protocol.identity import DeviceCertificate
from medrelay_protocol.roster import verify_entry, verify_roster

ROOT = Path(__file__).resolve().parent.parent.parent
VECTORS: dict[str, Any] = json.loads(
    (ROOT / "tests" / "vectors" / "medrelay-roster-vectors.json").read_text(encoding="utf-8")
)
ROOM = VECTORS["room"]
PEOPLE = VECTORS["people"]
EXTERNAL = SigningKey(bytes.fromhex(VECTORS["external_sender_seed"]))
BYTE_PARAMS = {"identity_key", "external_sender"}


def _device(name: str) -> SigningKey:
    return SigningKey(bytes.fromhex(PEOPLE[name]["device_seed"]))


def _cert(name: str) -> DeviceCertificate:
    identity = SigningKey(bytes.fromhex(PEOPLE[name]["identity_seed"]))
    return DeviceCertificate.issue(
        identity, name, _device(name).public, "person", VECTORS["issued_at"]
    )


def test_people_keys_and_certificates() -> None:
    for name, person in PEOPLE.items():
        identity = SigningKey(bytes.fromhex(person["identity_seed"]))
        assert identity.public.hex() == person["identity_public"]
        assert _device(name).public.hex() == person["device_public"]
        cert = _cert(name)
        assert cert.raw.hex() == person["device_cert"]
        assert cert.device_id == person["device_id"]
        assert DeviceCertificate.verify(cert.raw, identity.public).user_id == name
        receiving = ReceivingKey(bytes.fromhex(person["receiving_private"]))
        assert receiving.public.hex() == person["receiving_public"]


@pytest.mark.parametrize("vector", VECTORS["roster"], ids=lambda v: f"{v['index']}-{v['action']}")
def test_entry_rebuilt_from_the_wire_format(vector: dict[str, Any]) -> None:
    params = {k: bytes.fromhex(v) if k in BYTE_PARAMS else v for k, v in vector["params"].items()}
    prev = VECTORS["roster"][vector["index"] - 1]["head"] if vector["index"] else "00" * 32
    if vector["signer"] == "external":
        signer: dict[str, Any] = {"external": True}
        key = EXTERNAL
    else:
        signer = {"user": vector["signer"], "device_cert": _cert(vector["signer"]).raw}
        key = _device(vector["signer"])
    body = pack_body(
        [1, ROOM, vector["index"], bytes.fromhex(prev), vector["action"], params, signer,
         vector["issued_at"]]
    )  # fmt: skip
    signature = sign_with_label(key, "roster-change", body)
    assert (body + signature).hex() == vector["entry"]
    head = blake2b_256(bytes.fromhex(prev), body, signature, person=b"mr-roster-head")
    assert head.hex() == vector["head"]


def test_chain_verifies_to_the_recorded_heads() -> None:
    entries = [bytes.fromhex(v["entry"]) for v in VECTORS["roster"]]
    state = None
    for raw, vector in zip(entries, VECTORS["roster"], strict=True):
        state, entry = verify_entry(state, raw)
        assert state.head.hex() == entry.head.hex() == vector["head"]
        assert entry.action == vector["action"]
    final = verify_roster(entries, room=ROOM)
    assert final.length == VECTORS["final"]["length"]
    assert final.head.hex() == VECTORS["final"]["head"]
    assert sorted(final.members) == VECTORS["final"]["members"]


def test_rekey_rebuilt_from_inputs() -> None:
    r = VECTORS["rekey"]
    committer = _device(r["committer"])
    recipients = {
        p["device_id"]: ReceivingKey(bytes.fromhex(p["receiving_private"])).public
        for p in PEOPLE.values()
    }
    nonces = {p["device_id"]: bytes.fromhex(p["wrap_nonce"]) for p in PEOPLE.values()}
    rekey = build_rekey(
        room=ROOM,
        epoch_number=r["epoch_number"],
        prev_epoch=EpochId.decode(bytes.fromhex(r["prev_epoch"])),
        roster_head=bytes.fromhex(r["roster_head"]),
        device_list_version=r["device_list_version"],
        committer=committer,
        recipients=recipients,
        secret=bytes.fromhex(r["secret"]),
        ephemeral=ReceivingKey(bytes.fromhex(r["ephemeral_private"])),
        nonces=nonces,
    )
    assert rekey.manifest.hex() == r["manifest"]
    assert {d: w.hex() for d, w in rekey.wraps.items()} == r["wraps"]


def test_manifest_rebuilt_from_the_wire_format_and_opened() -> None:
    r = VECTORS["rekey"]
    secret, head = bytes.fromhex(r["secret"]), bytes.fromhex(r["roster_head"])
    commitment = key_commitment(secret, ROOM, r["epoch_number"], head)
    assert commitment.hex() == r["key_commitment"]
    committer = _device(r["committer"])
    committer_id = PEOPLE[r["committer"]]["device_id"]
    fields: tuple[Any, ...] = (
        ROOM, r["epoch_number"], bytes.fromhex(r["prev_epoch"]), head, r["device_list_version"],
        committer_id, bytes.fromhex(r["ephemeral_public"]), commitment,
    )  # fmt: skip
    assert blake2b_256(*fields, person=b"mr-rekey-ctx").hex() == r["context_hash"]
    hashes = {
        d: blake2b_256(bytes.fromhex(w), person=b"mr-wrap-hash") for d, w in r["wraps"].items()
    }
    assert {d: h.hex() for d, h in hashes.items()} == r["wrap_hashes"]
    body = pack_body([1, *fields, [[d, hashes[d]] for d in sorted(hashes)]])
    assert (body + sign_with_label(committer, "rekey-manifest", body)).hex() == r["manifest"]

    manifest = RekeyManifest.verify(bytes.fromhex(r["manifest"]), committer.public)
    assert manifest.context_hash.hex() == r["context_hash"]
    for person in PEOPLE.values():
        device = person["device_id"]
        receiving = ReceivingKey(bytes.fromhex(person["receiving_private"]))
        wrap = bytes.fromhex(r["wraps"][device])
        assert open_rekey(manifest, wrap, device_id=device, receiving=receiving) == secret


def test_vector_file_matches_the_generator() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_roster_vectors.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
