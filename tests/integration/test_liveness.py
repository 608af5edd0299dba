"""Ping/pong liveness: a peer that stops answering pings is closed and forgotten.

The client here is a bare TCP socket driven by the websockets sans-I/O protocol, so it
completes the handshake and then never writes again: the pongs it owes are never sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from medrelay_client.keystore import KeyStore
from medrelay_protocol import SUBPROTOCOL, codec
from medrelay_protocol.frames import Challenge, Welcome
from medrelay_server.settings import Limits
from websockets.client import ClientProtocol
from websockets.frames import Close, Opcode
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from .rawclient import hello_for
from .test_gateway_bad_input import harness_with

FAST_PINGS = Limits(ping_interval=0.2, ping_timeout=0.3)


async def test_silent_peer_is_closed_by_keepalive(tmp_path: Path) -> None:
    async with harness_with(tmp_path, FAST_PINGS) as h:
        keys = KeyStore.create("alice")
        proto = ClientProtocol(parse_uri(h.server.url), subprotocols=[Subprotocol(SUBPROTOCOL)])
        request = proto.connect()
        request.headers["Authorization"] = f"Bearer {h.token('alice')}"
        proto.send_request(request)
        reader, writer = await asyncio.open_connection("127.0.0.1", h.server.port)
        writer.write(b"".join(proto.data_to_send()))
        frames: list[bytes] = []
        close: Close | None = None
        pings = 0
        async with asyncio.timeout(10):
            while True:
                data = await reader.read(65536)
                if not data:
                    proto.receive_eof()
                    break
                proto.receive_data(data)
                for event in proto.events_received():
                    if getattr(event, "opcode", None) == Opcode.BINARY:
                        frames.append(event.data)  # type: ignore[union-attr]
                        reply = codec.decode(event.data, from_client=False)  # type: ignore[union-attr]
                        if isinstance(reply, Challenge):
                            hello = hello_for(keys, reply.nonce)
                            proto.send_binary(codec.encode(hello))
                            writer.write(b"".join(proto.data_to_send()))  # the last write
                        else:
                            assert isinstance(reply, Welcome)
                    elif getattr(event, "opcode", None) == Opcode.PING:
                        pings += 1  # the pong is queued in the protocol and never written
                    elif getattr(event, "opcode", None) == Opcode.CLOSE:
                        close = Close.parse(event.data)  # type: ignore[union-attr]
        writer.close()
        assert pings >= 1
        assert close is not None and close.code == 1011  # keepalive ping timeout
        async with httpx.AsyncClient(base_url=h.server.http, timeout=10) as http:
            async with asyncio.timeout(10):
                while True:  # the server forgets the connection once its handler returns
                    text = (await http.get("/metrics")).text
                    if "medrelay_connections 0.0" in text:
                        break
                    await asyncio.sleep(0.05)
