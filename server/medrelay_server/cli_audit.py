"""``medrelay audit ...``: verify, who-saw, trail, export, anchor, purge.

Wired into ``medrelay`` by ``add_audit_parser(subparsers)``. Every command takes
``--data-dir`` (default ``medrelay-data``: the SQLite file, the embedded signer in
``<data_dir>/anchor-signer/`` and the witness file in ``<data_dir>.witness/``) and
``--database-url`` (PostgreSQL in production; ``MEDRELAY_DATABASE_URL``). The read-only
commands open the store without a node id, so they never take a gateway's lease.
Exit codes: 0 success, 1 the journal failed verification, 2 bad usage or nothing found.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .clock import SystemClock
from .journal import fhir, queries
from .journal.chain import ChainEntry
from .journal.signer import SIGNER_DIR, read_public_key
from .journal.witness import FileWitness, default_witness_path
from .settings import Settings
from .store.sql import SqlStore

Command = Callable[[argparse.Namespace, SqlStore], Awaitable[int]]


def add_audit_parser(subparsers: Any) -> None:
    """Add ``audit`` and its commands to ``medrelay``'s sub-parsers."""
    audit = subparsers.add_parser("audit", help="verify, query and export the audit journal")
    commands = audit.add_subparsers(dest="audit_command", required=True)

    verify = _command(commands, "verify", "recompute every chain and anchor", _verify)
    verify.add_argument("--witness", help="witness file (default: beside the data directory)")
    verify.add_argument("--signer-key", help="anchor signer's public key (signing.pub)")

    who = _command(commands, "who-saw", "which devices received a message, and when", _who_saw)
    who.add_argument("room")
    who.add_argument("message", help="seq, or the message id (mid) in hex")
    who.add_argument("--json", action="store_true")

    trail = _command(commands, "trail", "journal records by user, room, time", _trail)
    _filters(trail)
    trail.add_argument("--json", action="store_true")

    export = _command(commands, "export", "export records as FHIR R4 AuditEvent", _export)
    export.add_argument("--format", choices=["fhir"], default="fhir")
    export.add_argument("--output", help="file to write (default: standard output)")
    _filters(export)

    anchor = _command(commands, "anchor", "anchor the chain heads now", _anchor)
    anchor.add_argument("--force", action="store_true", help="even if no head moved")

    purge = _command(commands, "purge", "delete what is past retention", _purge)
    purge.add_argument("--envelope-days", type=float, help="default room retention")
    purge.add_argument("--journal-days", type=float, help="journal retention")
    purge.add_argument("--node-id", default="maintenance", help="node id to journal under")


def _command(commands: Any, name: str, text: str, run: Command) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, help=text)
    parser.add_argument("--data-dir", default="medrelay-data")
    parser.add_argument("--database-url", default=os.environ.get("MEDRELAY_DATABASE_URL"))
    parser.add_argument("--schema", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=lambda args: asyncio.run(_with_store(args, run)))
    return parser


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", help="as actor or as target")
    parser.add_argument("--room")
    parser.add_argument("--since", type=_time, help="ISO 8601 time/date or Unix seconds")
    parser.add_argument("--until", type=_time, help="ISO 8601 time/date or Unix seconds")
    parser.add_argument("--limit", type=int)


def _time(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp())


async def _with_store(args: argparse.Namespace, run: Command) -> int:
    data_dir = Path(args.data_dir)
    url = Settings(data_dir=data_dir, database_url=args.database_url).resolved_database_url()
    node = getattr(args, "node_id", None) if run is _purge else None
    store = SqlStore(url, schema=args.schema, node_id=node)
    try:
        await store.open()
        return await run(args, store)
    finally:
        await store.close()


def _signer_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir) / SIGNER_DIR


async def _verify(args: argparse.Namespace, store: SqlStore) -> int:
    from .journal.verify import verify

    key = read_public_key(Path(args.signer_key) if args.signer_key else _signer_dir(args))
    path = Path(args.witness) if args.witness else default_witness_path(Path(args.data_dir))
    report = await verify(store.database, FileWitness(path, key).anchors(), key)
    print(
        f"{report.nodes} chains, {report.records} records, {report.anchors} witnessed anchors, "
        f"{report.unwitnessed} records after the newest witnessed head"
    )
    for note in report.notes:
        print(f"note: {note}")
    if report.ok:
        print("OK: every chain and anchor verifies")
        return 0
    print(f"FIRST BAD RECORD: {report.first}")
    for problem in report.problems:
        print(f"  {problem}")
    return 1


async def _who_saw(args: argparse.Namespace, store: SqlStore) -> int:
    async with store.database.read() as conn:
        if args.message.isdigit():
            seq: int | None = int(args.message)
        else:
            try:
                seq = await queries.seq_of_mid(conn, args.room, bytes.fromhex(args.message))
            except ValueError:
                print("message: give a seq or a hex mid", file=sys.stderr)
                return 2
        if seq is None:
            print(f"no message {args.message} in room {args.room}", file=sys.stderr)
            return 2
        sightings = await queries.who_saw(conn, args.room, seq)
    if args.json:
        for s in sightings:
            print(json.dumps({"room": args.room, "seq": seq, **_sighting(s)}))
        return 0
    print(f"room {args.room} seq {seq}: {len(sightings)} devices")
    for s in sightings:
        d = _sighting(s)
        print(
            f"  {s.device:<24} {s.user or '-':<16} {s.via:<13} "
            f"delivered {d['delivered'] or '-':<20} acknowledged {d['acknowledged'] or '-'}"
        )
    return 0


def _sighting(s: queries.Sighting) -> dict[str, Any]:
    return {
        "device": s.device,
        "user": s.user,
        "via": s.via,
        "delivered": None if s.delivered_at is None else fhir.instant(s.delivered_at),
        "acknowledged": None if s.acknowledged_at is None else fhir.instant(s.acknowledged_at),
    }


async def _select(args: argparse.Namespace, store: SqlStore) -> list[ChainEntry]:
    async with store.database.read() as conn:
        return await queries.trail(
            conn,
            user=args.user,
            room=args.room,
            since=args.since,
            until=args.until,
            limit=args.limit,
        )


async def _trail(args: argparse.Namespace, store: SqlStore) -> int:
    for e in await _select(args, store):
        r = e.record
        if args.json:
            print(json.dumps(_trail_doc(e)))
            continue
        seqs = "" if r.seq_from is None else f" seq {r.seq_from}-{r.seq_to}"
        print(
            f"{fhir.instant(r.ts)} {e.node}#{e.idx} {r.action} {r.outcome} "
            f"user={r.user or '-'} device={r.device or '-'} room={r.room or '-'}{seqs}"
            + (f" target={r.target}" if r.target else "")
            + (f" ({r.detail})" if r.detail else "")
        )
    return 0


def _trail_doc(e: ChainEntry) -> dict[str, Any]:
    r = e.record
    doc: dict[str, Any] = {"node": e.node, "idx": e.idx, "hash": e.hash.hex()}
    for name in r.__slots__:
        value = getattr(r, name)
        doc[name] = value.hex() if isinstance(value, bytes) else value
    return doc


async def _export(args: argparse.Namespace, store: SqlStore) -> int:
    bundle = fhir.bundle(await _select(args, store), now=SystemClock().now())
    text = json.dumps(bundle, indent=1)
    if args.output:
        await asyncio.to_thread(Path(args.output).write_text, text + "\n", encoding="utf-8")
        print(f"{len(bundle['entry'])} AuditEvents written to {args.output}")
    else:
        print(text)
    return 0


async def _anchor(args: argparse.Namespace, store: SqlStore) -> int:
    from .journal.anchoring import AnchorService

    service = AnchorService.embedded(store, Path(args.data_dir), SystemClock())
    anchor = await service.anchor_now(force=args.force)
    if anchor is None:
        print("nothing to anchor: no chain head moved since the last anchor")
    else:
        print(f"anchor #{anchor.anchor_no}: {anchor.tree_size} leaves, root {anchor.root.hex()}")
    return 0


async def _purge(args: argparse.Namespace, store: SqlStore) -> int:
    from .journal.retention import DAY, RetentionSettings, purge

    def seconds(days: float | None) -> int | None:
        return None if days is None else int(days * DAY)

    settings = RetentionSettings(seconds(args.envelope_days), seconds(args.journal_days))
    report = await purge(store, SystemClock().now(), settings)
    print(
        f"purged {report.events} events, {report.wraps} wraps, {report.blobs} blobs in "
        f"{report.rooms} rooms; {report.journal_records} journal records"
        + (f" (cut at anchor #{report.cut_at_anchor})" if report.cut_at_anchor else "")
    )
    return 0
