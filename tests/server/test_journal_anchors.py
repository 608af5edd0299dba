"""Anchors: the embedded signer's key file, signer and witness refusing anchors that do not
extend their log, the anchor service retrying a failed witness, inclusion proofs of a
witnessed head, and the syslog-over-TLS witness against a local TLS listener."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import ipaddress
import ssl
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from medrelay_server.journal import merkle
from medrelay_server.journal.anchor import Anchor, AnchorRejected, leaf_hash
from medrelay_server.journal.anchoring import AnchorService
from medrelay_server.journal.signer import FileKeySigner, read_public_key
from medrelay_server.journal.syslog import SyslogWitness
from medrelay_server.journal.witness import WitnessUnavailable

if TYPE_CHECKING:
    from .conftest import JournalEnv


def test_signer_key_file_is_private(tmp_path: Path) -> None:
    signer = FileKeySigner.in_data_dir(tmp_path)
    key = tmp_path / "anchor-signer" / "signing.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert read_public_key(key.parent) == signer.public_key()
    assert FileKeySigner.in_data_dir(tmp_path).public_key() == signer.public_key()
    assert key.read_text().strip() not in repr(signer)
    key.chmod(0o644)
    with pytest.raises(PermissionError):
        FileKeySigner.in_data_dir(tmp_path)


async def test_signer_and_witness_refuse_a_rewritten_log(journal_env: JournalEnv) -> None:
    await journal_env.records(journal_env.one, 3)
    first = await journal_env.anchors.anchor_now()
    await journal_env.records(journal_env.one, 2)
    second = await journal_env.anchors.anchor_now()
    assert first is not None and second is not None
    # four streams' heads in each anchor: node-1, node-2 and their delivery journals
    assert (second.anchor_no, second.prev_size, second.tree_size) == (2, 4, 8)
    assert second.consistency  # an RFC 9162 proof from #1's tree
    merkle.verify_consistency(4, 8, first.root, second.root, second.consistency)

    # the same anchor again is fine (a retry after a crash), for signer and witness
    await journal_env.signer.sign(second)
    await journal_env.witness.publish(second)
    assert len(journal_env.witness.anchors()) == 2

    forged_head = dataclasses.replace(second.heads[0], head_hash=b"\x00" * 32)
    rewritten = dataclasses.replace(second, anchor_no=3, heads=(forged_head, *second.heads[1:]))
    rewritten = dataclasses.replace(rewritten, prev_size=8, prev_root=second.root, tree_size=12)
    with pytest.raises(AnchorRejected):
        await journal_env.signer.sign(rewritten)
    skipped = dataclasses.replace(second, anchor_no=5)
    with pytest.raises(AnchorRejected):
        await journal_env.signer.sign(skipped)
    with pytest.raises(AnchorRejected):  # not signed by the pinned key
        await journal_env.witness.publish(dataclasses.replace(second, signature=b"\x01" * 64))
    assert len(journal_env.witness.anchors()) == 2


async def test_inclusion_proof_of_a_witnessed_head(journal_env: JournalEnv) -> None:
    await journal_env.records(journal_env.one, 2)
    await journal_env.records(journal_env.two, 1)
    await journal_env.anchors.anchor_now()
    await journal_env.records(journal_env.two, 1)
    await journal_env.anchors.anchor_now()
    witnessed = journal_env.witness.anchors()
    leaves = [leaf_hash(a.anchor_no, h) for a in witnessed for h in a.heads]
    last = witnessed[-1]
    assert merkle.root(leaves) == last.root
    index = 2  # node-2's head in anchor 1 (after node-1 and node-1/deliveries)
    proof = merkle.inclusion_proof(index, len(leaves), merkle.leaves_mth(leaves))
    merkle.verify_inclusion(index, last.tree_size, leaves[index], proof, last.root)


class FlakyWitness:
    def __init__(self) -> None:
        self.down = True
        self.seen: list[int] = []

    async def publish(self, anchor: Anchor) -> None:
        if self.down:
            raise WitnessUnavailable("SIEM unreachable")
        self.seen.append(anchor.anchor_no)


async def test_failed_witness_keeps_anchor_pending(journal_env: JournalEnv) -> None:
    flaky = FlakyWitness()
    service = AnchorService(
        journal_env.one, journal_env.signer, [journal_env.witness, flaky], journal_env.clock
    )
    await journal_env.records(journal_env.one, 1)
    with pytest.raises(WitnessUnavailable):
        await service.anchor_now()
    await journal_env.records(journal_env.one, 1)
    with pytest.raises(WitnessUnavailable):
        await service.anchor_now()
    flaky.down = False
    last = await service.anchor_now()
    assert last is not None and last.anchor_no == 2
    assert flaky.seen == [1, 2]
    assert [a.anchor_no for a in journal_env.witness.anchors()] == [1, 2]
    assert (await journal_env.verify()).ok


async def test_run_anchors_and_stops(journal_env: JournalEnv) -> None:
    await journal_env.records(journal_env.one, 1)
    service = AnchorService(
        journal_env.one, journal_env.signer, [journal_env.witness], journal_env.clock, interval=3600
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    await asyncio.wait_for(service.published.wait(), timeout=5)
    stop.set()
    await asyncio.wait_for(task, timeout=5)
    assert [a.anchor_no for a in journal_env.witness.anchors()] == [1]


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: with ``cryptography`` when it is installed,
    else with the ``openssl`` command."""
    cert_path, key_path = directory / "siem.crt", directory / "siem.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-days", "1", "-subj", "/CN=siem.test",
                "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(key_path), "-out", str(cert_path),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "siem.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_syslog_witness_over_tls(journal_env: JournalEnv, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = int((await reader.readuntil(b" "))[:-1])  # RFC 5425 octet counting
        received.put_nowait(await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        siem = SyslogWitness("127.0.0.1", port, cafile=cert, hostname="gw-1")
        service = AnchorService(
            journal_env.one, journal_env.signer, [journal_env.witness, siem], journal_env.clock
        )
        await journal_env.records(journal_env.one, 2)
        anchor = await service.anchor_now()
        assert anchor is not None
        message = await asyncio.wait_for(received.get(), timeout=5)
        header, _, body = message.partition(b" - anchor ")
        assert header.startswith(b"<110>1 ") and header.endswith(b" gw-1 medrelay")
        sd, _, payload = body.partition(b"] ")
        assert sd == b'[medrelay@32473 anchor="1" size="4" root="%s"' % anchor.root.hex().encode()
        assert Anchor.from_json(payload.decode()) == anchor

        untrusted = SyslogWitness("127.0.0.1", port)  # system CAs: the self-signed cert fails
        with pytest.raises(WitnessUnavailable):
            await untrusted.publish(anchor)
    finally:
        server.close()
        await server.wait_closed()


async def test_embedded_default_paths(journal_env: JournalEnv, tmp_path: Path) -> None:
    data = tmp_path / "medrelay-data"
    service = AnchorService.embedded(journal_env.one, data, journal_env.clock)
    await journal_env.records(journal_env.one, 1)
    anchor = await service.anchor_now()
    assert anchor is not None
    assert (data / "anchor-signer" / "signing.key").exists()
    assert (tmp_path / "medrelay-data.witness" / "anchors.jsonl").read_text().count("\n") == 1
