"""``medrelay``: serve, demo, audit and register commands.

``serve`` is the composition of a node from flags and environment variables: the store
(SQLite file by default, PostgreSQL with ``--database-url``), the broker (in-process by
default, Redis with ``--broker-url``), and the identity provider (the development issuer
with ``--dev-issuer``, institutions' OIDC sign-in with ``--institutions``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from starlette.applications import Starlette

from .settings import DEFAULT_POOL_SIZE, POOL_OVERFLOW, Settings


def build_app(
    settings: Settings, *, instance_holder: str | None = None, freeze_heap: bool = False
) -> Starlette:
    """The node's app. ``instance_holder``: the holder id of this node instance's claim
    (``nodeinstance``), held by the caller for the life of the process. ``freeze_heap``: the
    process is this app's alone (``heap.py``)."""
    from .app import create_app
    from .auth.base import IdentityProvider
    from .auth.dev import DevIssuer
    from .clock import SystemClock
    from .devices_admin import retire_job
    from .fanout.base import Broker
    from .fanout.memory import InMemoryBroker
    from .gateway.connection import Connection
    from .gateway.context import Gateway
    from .journal.anchoring import AnchorService
    from .journal.retention import retention_job
    from .signin import IdentityStack, build_identity
    from .store.sql import SqlStore, lease_job

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    clock = SystemClock()
    broker: Broker
    if settings.broker_url:
        from .fanout.redis import RedisBroker

        broker = RedisBroker(settings.broker_url, node_id=settings.node_id)
    else:
        broker = InMemoryBroker()
    store = SqlStore(
        settings.resolved_database_url(),
        schema=settings.database_schema,
        node_id=settings.node_id,
        clock=clock,
        instance_holder=instance_holder,
        pool_size=settings.database_pool_size,
    )
    identity: IdentityProvider
    signin: IdentityStack | None = None
    if settings.institutions_file is not None:
        signin = build_identity(
            institutions_file=settings.institutions_file,
            data_dir=settings.data_dir,
            database_url=settings.resolved_database_url(),
            schema=settings.database_schema,
            store=store,
            clock=clock,
        )
        identity = signin.tokens
    else:
        identity = DevIssuer.from_file(
            settings.dev_key_file or settings.data_dir / "dev-issuer.key"
        )
    anchors = None
    if settings.anchor_interval_seconds > 0:
        anchors = AnchorService.embedded(
            store, settings.data_dir, clock, interval=settings.anchor_interval_seconds
        )
    jobs = [lease_job(store)]
    if settings.purge_interval_hours > 0:
        jobs.append(retention_job(store, settings, clock))

    def live() -> Iterable[Connection]:  # the gateway exists once create_app has returned
        gateway: Gateway = app.state.gateway
        return gateway.registry.all()

    jobs.append(retire_job(store, settings, clock, connections=live))
    app = create_app(
        settings,
        store=store,
        broker=broker,
        clock=clock,
        identity=identity,
        signin=signin,
        anchors=anchors,
        background=jobs,
        freeze_heap=freeze_heap,
    )
    return app


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .nodeinstance import NodeInstance, NodeInUse
    from .serve import uvicorn_config

    if not args.dev_issuer and not args.institutions:
        print(
            "medrelay serve: no identity provider configured. Pass --institutions FILE "
            "(see docs/identity.md), or for a local trial --dev-issuer (development tokens "
            "for any user name; never on a real network).",
            file=sys.stderr,
        )
        return 2
    if args.dev_issuer and args.institutions:
        print("medrelay serve: choose --dev-issuer or --institutions, not both", file=sys.stderr)
        return 2
    settings = Settings(
        data_dir=Path(args.data_dir),
        database_url=args.database_url,
        database_schema=args.database_schema,
        database_pool_size=args.database_pool_size,
        broker_url=args.broker_url,
        node_id=args.node_id,
        host=args.host,
        port=args.port,
        dev_issuer=args.dev_issuer,
        institutions_file=Path(args.institutions) if args.institutions else None,
        allowed_origins=tuple(o for o in args.allowed_origins.split(",") if o),
        purge_interval_hours=args.purge_interval_hours,
        anchor_interval_seconds=args.anchor_interval_seconds,
        dev_key_file=Path(args.dev_key_file) if args.dev_key_file else None,
        device_retire_after_seconds=args.device_retire_after_days * 86400,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:  # held until this process exits: a restart after a crash takes over its own lease
        instance = NodeInstance.claim(settings.data_dir, settings.node_id)
    except NodeInUse as exc:
        print(f"medrelay serve: {exc}", file=sys.stderr)
        return 1
    app = build_app(settings, instance_holder=instance.holder, freeze_heap=True)
    print(f"medrelay listening on ws://{args.host}:{args.port}/ws (data in {args.data_dir})")
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(args.url, Path(args.data_dir)))


def _new_generation(args: argparse.Namespace) -> int:
    from .store.sql import SqlStore

    async def run() -> str:
        settings = Settings(data_dir=Path(args.data_dir), database_url=args.database_url)
        store = SqlStore(
            settings.resolved_database_url(), schema=args.database_schema, node_id=None
        )
        await store.open()
        try:
            return await store.new_generation()
        finally:
            await store.close()

    default_db = Path(args.data_dir) / "medrelay.sqlite3"
    if not args.database_url and not default_db.exists():
        print(f"medrelay admin: no database at {default_db}", file=sys.stderr)
        return 2
    print(f"new stream generation {asyncio.run(run())}; clients will resynchronise")
    return 0


def _revoke_device(args: argparse.Namespace) -> int:
    from medrelay_protocol.errors import RequestError

    from .clock import SystemClock
    from .devices_admin import admin_revoke
    from .store.base import NodeLeaseHeld

    default_db = Path(args.data_dir) / "medrelay.sqlite3"
    if not args.database_url and not default_db.exists():
        print(f"medrelay admin: no database at {default_db}", file=sys.stderr)
        return 2
    reason = args.reason.strip()
    if not 0 < len(reason) <= 200:
        print("medrelay admin: --reason must be 1 to 200 characters", file=sys.stderr)
        return 2
    url = Settings(data_dir=Path(args.data_dir), database_url=args.database_url)
    try:
        done = asyncio.run(
            admin_revoke(
                url.resolved_database_url(),
                args.device,
                reason=reason,
                now=SystemClock().now(),
                schema=args.database_schema,
                node_id=args.node_id,
            )
        )
    except RequestError as exc:
        print(f"medrelay admin: {exc.message or exc.code.name}", file=sys.stderr)
        return 1
    except NodeLeaseHeld as exc:
        print(f"medrelay admin: {exc} (another admin command? use --node-id)", file=sys.stderr)
        return 1
    if done is None:
        print(f"device {args.device} was already revoked; running nodes are told again")
        return 0
    print(
        f"device {done.device} of {done.user} revoked; {len(done.rooms)} rooms pending a rekey; "
        "running nodes close its connections"
    )
    return 0


def _add_admin(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ.get
    admin = sub.add_parser("admin", help="operator actions on the database")
    actions = admin.add_subparsers(dest="action", required=True)
    gen = actions.add_parser(
        "new-generation", help="after restoring a backup: make clients check for rollbacks"
    )
    gen.set_defaults(func=_new_generation)
    revoke = actions.add_parser(
        "revoke-device", help="revoke a lost or stolen device: cut off, rooms rekeyed"
    )
    revoke.add_argument("--device", required=True, help="the device id (as the user's app shows)")
    revoke.add_argument("--reason", default="revoked by an administrator")
    revoke.add_argument(
        "--node-id",
        default="admin",
        help="the journal writer stream of this command (never a running gateway's id)",
    )
    revoke.set_defaults(func=_revoke_device)
    for p in (gen, revoke):
        p.add_argument("--data-dir", default=env("MEDRELAY_DATA_DIR", "medrelay-data"))
        p.add_argument("--database-url", default=env("MEDRELAY_DATABASE_URL"))
        p.add_argument("--database-schema", default=env("MEDRELAY_DATABASE_SCHEMA"))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ.get
    serve = sub.add_parser("serve", help="run a gateway node")
    serve.add_argument("--data-dir", default=env("MEDRELAY_DATA_DIR", "medrelay-data"))
    serve.add_argument(
        "--database-url",
        default=env("MEDRELAY_DATABASE_URL"),
        help="SQLAlchemy URL (default: SQLite file in the data directory)",
    )
    serve.add_argument(
        "--database-schema",
        default=env("MEDRELAY_DATABASE_SCHEMA"),
        help="PostgreSQL schema for every table (created if missing)",
    )
    serve.add_argument(
        "--broker-url",
        default=env("MEDRELAY_BROKER_URL"),
        help="redis://host:port/0 for several nodes (default: in-process broker)",
    )
    serve.add_argument("--node-id", default=env("MEDRELAY_NODE_ID", "node-1"))
    serve.add_argument("--host", default=env("MEDRELAY_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(env("MEDRELAY_PORT", "8700")))
    serve.add_argument(
        "--institutions",
        default=env("MEDRELAY_INSTITUTIONS"),
        help="institutions file (OIDC issuers); see docs/identity.md",
    )
    serve.add_argument(
        "--allowed-origins",
        default=env("MEDRELAY_ALLOWED_ORIGINS", ""),
        help="comma-separated Origin values browsers may connect from",
    )
    serve.add_argument(
        "--purge-interval-hours",
        type=float,
        default=float(env("MEDRELAY_PURGE_INTERVAL_HOURS", "24")),
        help="retention purge period on this node; 0 disables (run it on one node only)",
    )
    serve.add_argument(
        "--database-pool-size",
        type=_positive_int,
        default=env("MEDRELAY_DATABASE_POOL_SIZE", str(DEFAULT_POOL_SIZE)),  # checked by type
        help=f"PostgreSQL connections kept open by this node, plus up to {POOL_OVERFLOW} in a"
        " burst",
    )
    serve.add_argument(
        "--anchor-interval-seconds",
        type=float,
        default=float(env("MEDRELAY_ANCHOR_INTERVAL_SECONDS", "60")),
        help="journal anchoring period on this node; 0 disables (one signer per deployment)",
    )
    serve.add_argument(
        "--dev-key-file",
        default=env("MEDRELAY_DEV_KEY_FILE"),
        help="development issuer key shared by nodes (default: in the data directory)",
    )
    serve.add_argument(
        "--device-retire-after-days",
        type=float,
        default=float(env("MEDRELAY_DEVICE_RETIRE_AFTER_DAYS", "90")),
        help="retire (revoke) devices unseen for this many days; 0 disables (same on every node)",
    )
    serve.add_argument("--dev-issuer", action="store_true", help="enable the development issuer")
    serve.set_defaults(func=_serve)


def main(argv: list[str] | None = None) -> int:
    from .cli_audit import add_audit_parser
    from .cli_register import add_register_parser

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="medrelay")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    demo = sub.add_parser("demo", help="two doctors and a tablet, on a server of its own")
    demo.add_argument("--url", default=None, help="use a running server instead of starting one")
    demo.add_argument("--data-dir", default="medrelay-data/demo")
    demo.set_defaults(func=_demo)
    add_audit_parser(sub)
    add_register_parser(sub)
    _add_admin(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
