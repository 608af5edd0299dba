"""``medrelay``: serve (embedded default), demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from .settings import Settings


def build_app(settings: Settings):  # type: ignore[no-untyped-def]
    from .app import create_app
    from .auth.dev import DevIssuer
    from .clock import SystemClock
    from .fanout.memory import InMemoryBroker
    from .store.sql import SqlStore

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_app(
        settings,
        store=SqlStore(settings.resolved_database_url()),
        broker=InMemoryBroker(),
        clock=SystemClock(),
        identity=DevIssuer(),
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serve import uvicorn_config

    if not args.dev_issuer:
        print(
            "medrelay serve: no identity provider configured. For a local trial pass "
            "--dev-issuer (development tokens for any user name; never on a real network).",
            file=sys.stderr,
        )
        return 2
    settings = Settings(
        data_dir=Path(args.data_dir),
        database_url=args.database_url,
        host=args.host,
        port=args.port,
        dev_issuer=True,
    )
    app = build_app(settings)
    print(f"medrelay listening on ws://{args.host}:{args.port}/ws (data in {args.data_dir})")
    uvicorn.Server(uvicorn_config(app, settings)).run()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return asyncio.run(run_demo(args.url, Path(args.data_dir)))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="medrelay")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a gateway node")
    serve.add_argument("--data-dir", default="medrelay-data")
    serve.add_argument("--database-url", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8700)
    serve.add_argument("--dev-issuer", action="store_true", help="enable the development issuer")
    serve.set_defaults(func=_serve)
    demo = sub.add_parser("demo", help="two doctors and a tablet, on a server of its own")
    demo.add_argument("--url", default=None, help="use a running server instead of starting one")
    demo.add_argument("--data-dir", default="medrelay-data/demo")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
