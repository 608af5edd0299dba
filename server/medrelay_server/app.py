"""The composition root: the only place concrete classes are chosen (``create_app``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from .auth.base import IdentityProvider
from .auth.dev import DevIssuer
from .clock import Clock
from .delivery import Delivery, Registry
from .fanout.base import Broker
from .gateway.context import Gateway
from .gateway.endpoint import websocket_endpoint
from .handlers import HANDLERS
from .metrics import Metrics
from .settings import Settings
from .store.base import Store


def create_app(
    settings: Settings,
    *,
    store: Store,
    broker: Broker,
    clock: Clock,
    identity: IdentityProvider,
) -> Starlette:
    metrics = Metrics()
    registry = Registry()
    delivery = Delivery(
        store=store,
        broker=broker,
        registry=registry,
        replay_batch=settings.limits.replay_batch,
        on_delivered=lambda n: metrics.deliveries.inc(n),
    )
    gateway = Gateway(
        settings=settings,
        store=store,
        broker=broker,
        clock=clock,
        identity=identity,
        metrics=metrics,
        registry=registry,
        delivery=delivery,
        handlers=dict(HANDLERS),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        on_resync = getattr(broker, "on_resync", False)
        if on_resync is None:  # a broker that can lose messages tells us when to resync
            broker.on_resync = delivery.resync  # type: ignore[attr-defined]
        await broker.start()
        poller = asyncio.create_task(delivery.poll_forever(settings.limits.poll_interval))
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await delivery.close()
            await broker.close()
            await store.close()

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        checks: dict[str, str] = {}
        for name, probe in (("store", store.ping), ("broker", broker.ping)):
            try:
                await probe()
                checks[name] = "ok"
            except Exception:  # readiness reports, it does not raise
                checks[name] = "unavailable"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse(checks, status_code=200 if ok else 503)

    async def metrics_endpoint(request: Request) -> Response:
        metrics.queue_depth.set(sum(c.depth for c in registry.all()))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    routes: list[Route | WebSocketRoute] = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    if settings.dev_issuer and isinstance(identity, DevIssuer):
        routes.append(Route("/dev/token", _dev_token(identity, clock), methods=["POST"]))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app


def _dev_token(issuer: DevIssuer, clock: Clock):  # type: ignore[no-untyped-def]
    async def endpoint(request: Request) -> Response:
        try:
            body = await request.json()
            user = str(body["user"])
            kind = str(body.get("kind", "person"))
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": 'send {"user": name}'}, status_code=400)
        if not 0 < len(user) <= 128 or kind not in ("person", "tablet"):
            return JSONResponse({"error": "bad user or kind"}, status_code=400)
        return JSONResponse({"token": issuer.issue(user, clock.now(), kind=kind)})

    return endpoint
