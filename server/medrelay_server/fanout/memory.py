"""In-process broker for the embedded default and unit tests."""

from __future__ import annotations

import logging

from .base import Handler

log = logging.getLogger(__name__)


class InMemoryBroker:
    """Delivers synchronously in publish order to every handler subscribed to the topic."""

    def __init__(self) -> None:
        self._subs: dict[str, list[Handler]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._subs.clear()

    async def ping(self) -> None:
        return None

    async def publish(self, topic: str, payload: bytes) -> None:
        for handler in list(self._subs.get(topic, ())):
            try:
                await handler(topic, payload)
            except Exception:  # one failing subscriber must not starve the others
                log.exception("broker handler failed for topic %s", topic)

    async def subscribe(self, topic: str, handler: Handler) -> None:
        self._subs.setdefault(topic, []).append(handler)

    async def unsubscribe(self, topic: str, handler: Handler) -> None:
        handlers = self._subs.get(topic)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._subs[topic]
