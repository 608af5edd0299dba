"""``medrelay audit ...`` end to end on the embedded default (a SQLite file in the data
directory, the signer in ``<data_dir>/anchor-signer/``, the witness beside the data dir)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from fhir.resources.R4B.bundle import Bundle
from medrelay_server.cli_audit import add_audit_parser
from medrelay_server.settings import Settings
from medrelay_server.store import schema as t
from medrelay_server.store.base import AuditRecord
from medrelay_server.store.sql import SqlStore

T = 1_800_000_000


def audit(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="medrelay")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *argv])
    return int(args.func(args))


def _populate(data_dir: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        store = SqlStore(Settings(data_dir=data_dir).resolved_database_url(), node_id="node-1")
        await store.open()
        try:
            await store.journal(
                [
                    AuditRecord("authenticate", "success", user="alice", device="a-1", ts=T),
                    AuditRecord("message", "success", user="alice", room="r", seq_from=3,
                                seq_to=3, mid=b"\xab" * 16, ts=T + 1),
                    AuditRecord("deliver", "success", user="bob", device="b-1", room="r",
                                seq_from=3, seq_to=4, ts=T + 2, ts_end=T + 3),
                    AuditRecord("receipt", "success", user="bob", device="b-1", room="r",
                                seq_from=1, seq_to=3, ts=T + 5),
                ]
            )  # fmt: skip
        finally:
            await store.close()

    asyncio.run(run())


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "medrelay-data"
    _populate(data)
    d = ["--data-dir", str(data)]

    assert audit("anchor", *d) == 0
    assert "anchor #1" in capsys.readouterr().out
    assert (tmp_path / "medrelay-data.witness" / "anchors.jsonl").exists()
    assert audit("anchor", *d) == 0
    assert "nothing to anchor" in capsys.readouterr().out

    assert audit("verify", *d) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "2 chains, 4 records, 1 witnessed anchors" in out

    assert audit("who-saw", "r", "ab" * 16, "--json", *d) == 0
    [line] = capsys.readouterr().out.splitlines()
    doc = json.loads(line)
    assert (doc["seq"], doc["device"], doc["via"]) == (3, "b-1", "deliver")
    assert (doc["delivered"], doc["acknowledged"]) == (
        "2027-01-15T08:00:02Z",
        "2027-01-15T08:00:05Z",
    )
    assert audit("who-saw", "r", "99", *d) == 0
    assert "0 devices" in capsys.readouterr().out
    assert audit("who-saw", "r", "cd" * 16, *d) == 2

    assert audit("trail", "--user", "bob", "--since", "2027-01-15T08:00:03Z", "--json", *d) == 0
    [receipt] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert (receipt["action"], receipt["node"], receipt["idx"]) == (
        "receipt",
        "node-1/deliveries",
        4,
    )

    out_file = tmp_path / "export.json"
    assert audit("export", "--format", "fhir", "--room", "r", "--output", str(out_file), *d) == 0
    bundle = Bundle.model_validate_json(out_file.read_text())
    assert len(bundle.entry or []) == 3

    async def tamper() -> None:
        store = SqlStore(Settings(data_dir=data).resolved_database_url(), node_id=None)
        await store.open()
        async with store.database.write() as conn:
            await conn.execute(
                sa.update(t.audit).where(t.audit.c.idx == 2).values(user_id="mallory")
            )
        await store.close()

    asyncio.run(tamper())
    capsys.readouterr()
    assert audit("verify", *d) == 1
    out = capsys.readouterr().out
    assert "FIRST BAD RECORD: EDITED: node-1/deliveries#2" in out
