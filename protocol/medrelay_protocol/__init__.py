"""medrelay wire protocol: frames, codec, error codes, cryptography, epochs and roster.

This package is sans-I/O: it imports no asyncio, sockets, web framework, broker or
database. Server and clients both build on it; ``tests/protocol/test_purity.py`` enforces
the rule.
"""

PROTOCOL_VERSION = 1
SUBPROTOCOL = "medrelay.v1"

__all__ = ["PROTOCOL_VERSION", "SUBPROTOCOL"]
