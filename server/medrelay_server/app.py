"""The composition root: the only place concrete classes are chosen (``create_app``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from .auth.base import IdentityProvider
from .auth.dev import INSTITUTION as DEV_INSTITUTION
from .auth.dev import DevIssuer
from .clock import Clock
from .delivery import Delivery, Registry
from .fanout.base import Broker
from .gateway.context import Gateway, journal_fanout
from .gateway.direct import CaptureProtocol
from .gateway.endpoint import websocket_endpoint
from .handlers import HANDLERS
from .heap import HeapWatch
from .journal.anchoring import AnchorService
from .journal.delivery import DeliveryJournal
from .metrics import Metrics
from .register.recheck import commit_via
from .settings import Settings
from .signin import IdentityStack
from .store.base import Store

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    store: Store,
    broker: Broker,
    clock: Clock,
    identity: IdentityProvider,
    signin: IdentityStack | None = None,
    anchors: AnchorService | None = None,
    background: Sequence[Callable[[asyncio.Event], Coroutine[Any, Any, None]]] = (),
    freeze_heap: bool = False,
) -> Starlette:
    """Build the app. ``identity`` checks bearer tokens; ``signin`` (institutions' OIDC
    sign-in, token refresh, the practitioner register and its re-check job) is optional:
    the embedded default runs the development issuer instead. ``anchors`` periodically
    signs the journal's chain heads and pushes them to the witnesses (and renews this
    node's journal lease). ``background`` jobs (e.g. the retention purge) run until the
    event they are given is set at shutdown. ``freeze_heap``: once started, freeze the
    start-up heap out of the garbage collector's reach (``heap.py``); process-wide, so only
    the process's entry point sets it."""
    metrics = Metrics()
    observe_batches = getattr(store, "observe_send_batches", None)
    if observe_batches is not None:  # where a send's store time goes (group commit's stages)
        observe_batches(metrics.observe_send_batch)
    heap = HeapWatch(metrics.gc_pauses, metrics.gc_frozen)
    registry = Registry()
    journal = DeliveryJournal(store, clock)
    delivery = Delivery(
        store=store,
        broker=broker,
        registry=registry,
        replay_batch=settings.limits.replay_batch,
        on_delivered=lambda n: metrics.deliveries.inc(n),
        on_gap_read=lambda reason: metrics.gap_reads.labels(reason=reason).inc(),
        on_written=journal_fanout(journal, clock),
    )
    bound_batches = getattr(store, "bound_send_batches", None)
    if bound_batches is not None:  # a batch's events go out in one pass of the loop
        bound_batches(delivery.local_fanout)
    gateway = Gateway(
        settings=settings,
        store=store,
        broker=broker,
        clock=clock,
        identity=identity,
        metrics=metrics,
        registry=registry,
        delivery=delivery,
        journal=journal,
        handlers=dict(HANDLERS),
    )
    if signin is not None:  # institutions vouch for their users' first identity keys
        gateway.attesters.update({i.id: i.sender for i in signin.institutions.values()})
        gateway.require_attestation = True
    if isinstance(identity, DevIssuer):  # the development issuer is its own institution
        gateway.attesters[DEV_INSTITUTION] = identity
        gateway.self_attesting = frozenset({DEV_INSTITUTION})
        gateway.require_attestation = True

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        on_resync = getattr(broker, "on_resync", False)
        if on_resync is None:  # a broker that can lose messages tells us when to resync
            broker.on_resync = delivery.on_broker_reconnect  # type: ignore[attr-defined]
        await broker.start()
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(delivery.poll_forever(settings.limits.poll_interval)),
            asyncio.create_task(journal.run()),
        ]
        if anchors is not None:
            tasks.append(asyncio.create_task(anchors.run(stop)))
        tasks.extend(asyncio.create_task(job(stop)) for job in background)
        listen = getattr(store, "listen", None)
        if listen is not None:  # PostgreSQL NOTIFY: a wake-up that does not need the broker
            tasks.append(asyncio.create_task(listen(delivery.notify, stop)))
        if signin is not None:
            rechecker = signin.rechecker(store, commit_via(gateway))
            tasks.append(
                asyncio.create_task(rechecker.run_forever(clock, settings.recheck_interval))
            )
        try:  # inside the try: a failed freeze still stops the tasks and removes the timer
            heap.install()
            if freeze_heap:
                log.info("start-up heap frozen: %d objects", heap.freeze_startup())
            yield
        finally:
            heap.remove()
            stop.set()
            await delivery.close()
            try:
                await journal.close()  # clean shutdown: every delivery record is written
            except Exception:
                log.exception("could not flush the delivery journal at shutdown")
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if signin is not None:
                await signin.close()
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
    if signin is not None:
        routes.extend(signin.routes())
    if settings.dev_issuer and isinstance(identity, DevIssuer):
        routes.append(Route("/dev/token", _dev_token(identity, clock), methods=["POST"]))
        if signin is None:
            routes.append(Route("/institutions", _dev_institutions(identity), methods=["GET"]))
    # outermost: records uvicorn's own send for the fan-out's direct writes (gateway/direct.py)
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[Middleware(CaptureProtocol)])
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


def _dev_institutions(issuer: DevIssuer):  # type: ignore[no-untyped-def]
    """``GET /institutions`` of the embedded default: the development institution, whose key
    attests identity keys (clients pin it at enrolment, as they would a hospital's)."""

    async def endpoint(request: Request) -> Response:
        entry = {
            "id": DEV_INSTITUTION,
            "name": "development issuer",
            "issuer": "dev",
            "attestation_key": issuer.public_key.hex(),
        }
        return JSONResponse({"institutions": [entry]})

    return endpoint
