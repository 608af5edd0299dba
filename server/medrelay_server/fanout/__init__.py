"""Fan-out across gateway nodes: the ``Broker`` interface and its implementations."""

from .base import Broker, Handler
from .memory import InMemoryBroker

__all__ = ["Broker", "Handler", "InMemoryBroker"]
