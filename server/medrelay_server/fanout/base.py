"""The ``Broker`` interface: the fast path between gateway nodes, never the source of truth.

Contract (every implementation, checked by ``tests/server/test_broker_contract.py``):

* **At most once, best effort.** A published payload reaches each current subscriber of its
  topic zero or one time. Loss is allowed: nodes detect gaps by seq and fill them from the
  store (I8), so nothing depends on the broker for durability.
* **Per-publisher order.** Payloads published by one node on one topic arrive at a
  subscriber in publish order. No order holds across publishers.
* **Opaque payloads.** Bytes in, the same bytes out; the broker never parses them.
* ``subscribe`` is reference-counted per topic and handler; ``unsubscribe`` stops delivery
  to that handler before it returns.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

Handler = Callable[[str, bytes], Awaitable[None]]


class Broker(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise if the broker cannot carry messages now (readiness)."""

    async def publish(self, topic: str, payload: bytes) -> None: ...

    async def subscribe(self, topic: str, handler: Handler) -> None: ...

    async def unsubscribe(self, topic: str, handler: Handler) -> None: ...
