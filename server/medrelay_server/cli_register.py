"""``medrelay register ...``: the Medical Council register, the re-check, tablets, accounts.

::

    medrelay register import REGISTER.csv [--partial] [--force]
    medrelay register recheck --institutions institutions.toml
    medrelay register enroll-tablet --institution qmh --ward 7B [--days 365]
    medrelay register deprovision USER [--reason "left the hospital"]

Each command opens the database itself (running migrations first), so it works with or
without a server running against the same database. ``recheck`` commits its removals to the
database and publishes them on the configured broker; a running node that does not share
that broker picks them up at its next poll of the room's last seq (I8).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from .clock import SystemClock


def add_register_parser(subparsers: Any) -> None:
    """Add ``register`` and its subcommands to ``medrelay``'s argparse subparsers."""
    register = subparsers.add_parser("register", help="register import, re-check, tablets")
    sub = register.add_subparsers(dest="register_command", required=True)

    imp = sub.add_parser("import", help="import the Medical Council register from CSV")
    imp.add_argument("csv", type=Path)
    imp.add_argument(
        "--partial",
        action="store_true",
        help="the file updates some entries (default: it is the whole register, and "
        "numbers missing from it are marked removed)",
    )
    imp.add_argument(
        "--force", action="store_true", help="import even if it deactivates more than 5%%"
    )
    imp.set_defaults(func=_import)

    recheck = sub.add_parser("recheck", help="lapse and remove doctors no longer registered")
    recheck.add_argument("--institutions", type=Path, default=_env_path("MEDRELAY_INSTITUTIONS"))
    recheck.add_argument("--broker-url", default=os.environ.get("MEDRELAY_BROKER_URL"))
    recheck.add_argument(
        "--node-id",
        default="register-recheck",
        help="the journal writer stream of this run (never a running gateway's id)",
    )
    recheck.set_defaults(func=_recheck)

    tablet = sub.add_parser("enroll-tablet", help="enroll a bedside tablet for a ward")
    tablet.add_argument("--institution", required=True)
    tablet.add_argument("--ward", required=True)
    tablet.add_argument("--days", type=int, default=365)
    tablet.add_argument("--institutions", type=Path, default=_env_path("MEDRELAY_INSTITUTIONS"))
    tablet.set_defaults(func=_enroll)

    dep = sub.add_parser("deprovision", help="disable an account; removes it from every room")
    dep.add_argument("user")
    dep.add_argument("--reason", default="deprovisioned by an administrator")
    dep.set_defaults(func=_deprovision)

    for p in (imp, recheck, tablet, dep):
        p.add_argument("--data-dir", type=Path, default=Path("medrelay-data"))
        p.add_argument("--database-url", default=os.environ.get("MEDRELAY_DATABASE_URL"))


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _database_url(args: argparse.Namespace) -> str:
    from .settings import Settings

    args.data_dir.mkdir(parents=True, exist_ok=True)
    return Settings(data_dir=args.data_dir, database_url=args.database_url).resolved_database_url()


async def _open_db(args: argparse.Namespace) -> Any:
    from .register.db import IdentityDb

    idb = IdentityDb(_database_url(args))
    await idb.migrate()
    return idb


def _import(args: argparse.Namespace) -> int:
    from .register.db import ImportRefused
    from .register.importer import RegisterFormatError, parse_register_csv

    try:
        parsed = parse_register_csv(args.csv.read_bytes())
    except (OSError, RegisterFormatError) as exc:
        print(f"medrelay register import: {exc}", file=sys.stderr)
        return 2
    for line in parsed.skipped:
        print(f"skipped {line}", file=sys.stderr)
    for line in parsed.warnings[:20]:
        print(f"warning {line}", file=sys.stderr)

    async def run() -> int:
        idb = await _open_db(args)
        try:
            report = await idb.import_register(
                parsed.entries,
                source=args.csv.name,
                now=SystemClock().now(),
                full=not args.partial,
                max_deactivate=1.0 if args.force else 0.05,
            )
        except ImportRefused as exc:
            print(f"medrelay register import: {exc}", file=sys.stderr)
            return 1
        finally:
            await idb.close()
        print(
            f"imported {len(parsed.entries)} entries: {report.added} added, {report.updated} "
            f"updated, {report.unchanged} unchanged, {report.deactivated} deactivated; "
            f"{len(parsed.skipped)} rows skipped"
        )
        return 0

    return asyncio.run(run())


def _institutions(args: argparse.Namespace) -> Any:
    from .auth.issuers import load_issuers
    from .institutions import Institutions

    if args.institutions is None:
        raise SystemExit("pass --institutions FILE (or set MEDRELAY_INSTITUTIONS)")
    return Institutions.from_config(load_issuers(args.institutions, data_dir=args.data_dir))


def _recheck(args: argparse.Namespace) -> int:
    from .app import create_app
    from .auth.tokens import MedrelayTokens
    from .fanout.base import Broker
    from .fanout.memory import InMemoryBroker
    from .register.recheck import RegisterRechecker, commit_via
    from .register.sessions import Sessions
    from .settings import Settings
    from .store.sql import SqlStore

    institutions = _institutions(args)
    url = _database_url(args)

    async def run() -> int:
        from .register.db import IdentityDb

        store = SqlStore(url, node_id=args.node_id)
        broker: Broker
        if args.broker_url:
            from .fanout.redis import RedisBroker

            broker = RedisBroker(args.broker_url, node_id="register-recheck")
        else:
            broker = InMemoryBroker()
        tokens = MedrelayTokens.from_file(args.data_dir / "token_keys.json")
        settings = Settings(data_dir=args.data_dir, database_url=url)
        clock = SystemClock()
        app = create_app(settings, store=store, broker=broker, clock=clock, identity=tokens)
        idb = IdentityDb(url)
        await store.open()
        await broker.start()
        try:
            rechecker = RegisterRechecker(
                idb=idb,
                sessions=Sessions(idb.database),
                store=store,
                institutions=institutions,
                commit=commit_via(app.state.gateway),
                tokens=tokens,
            )
            report = await rechecker.run_once(clock.now())
        finally:
            await app.state.gateway.delivery.close()
            await broker.close()
            await store.close()
            await idb.close()
        for user in report.lapsed:
            print(f"lapsed {user}")
        for user, room, seq in report.removed:
            print(f"removed {user} from room {room} at seq {seq}")
        for user, room, why in report.failed:
            print(f"PENDING {user} in room {room}: {why}")
        return 1 if report.failed else 0

    return asyncio.run(run())


def _enroll(args: argparse.Namespace) -> int:
    from .register.sessions import Sessions

    if args.institutions is not None and args.institution not in _institutions(args):
        print(f"unknown institution {args.institution!r}", file=sys.stderr)
        return 2
    if not 1 <= args.days <= 3650:
        print("--days must be between 1 and 3650", file=sys.stderr)
        return 2

    async def run() -> int:
        idb = await _open_db(args)
        try:
            user, credential = await Sessions(idb.database).enroll_tablet(
                institution=args.institution,
                ward=args.ward,
                now=SystemClock().now(),
                ttl=args.days * 86400,
            )
        except ValueError as exc:
            print(f"medrelay register enroll-tablet: {exc}", file=sys.stderr)
            return 2
        finally:
            await idb.close()
        print(f"tablet account: {user}")
        print(f"enrollment credential (shown once; enter it on the tablet): {credential}")
        return 0

    return asyncio.run(run())


def _deprovision(args: argparse.Namespace) -> int:
    from .register.sessions import Sessions

    async def run() -> int:
        idb = await _open_db(args)
        try:
            if await idb.account(args.user) is None:
                print(f"no account {args.user!r}", file=sys.stderr)
                return 1
            revoked = await Sessions(idb.database).deprovision(
                args.user, reason=args.reason, now=SystemClock().now()
            )
        finally:
            await idb.close()
        print(
            f"{args.user}: deprovisioned, {len(revoked)} sessions revoked; removal from every "
            "room at the next re-check"
        )
        return 0

    return asyncio.run(run())
