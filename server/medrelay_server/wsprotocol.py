"""uvicorn's sans-I/O WebSocket protocol, with two changes for a node that holds thousands of
connections and reads a burst of small frames at a time.

* **Reading pauses on a backlog, not on every message.** Upstream pauses the socket's reads
  as soon as one message waits for the app and resumes them when the app has taken it: two
  ``epoll_ctl`` calls (about 5 µs) for every frame a client sends. Here reading pauses only
  when ``READ_AHEAD_MESSAGES`` messages or ``READ_AHEAD_BYTES`` bytes wait, and resumes when
  the app has taken them all. What a connection can hold unread stays bounded: the backlog
  limits, plus one message (at most ``ws_max_size``) and one read of the socket.
* **Keepalive pings are spread.** Upstream pings every ``ping_interval`` from the moment the
  connection opened, so connections opened in the same second (a reconnect storm, a ward's
  tablets) are pinged in the same instant for as long as they live, and their pongs come
  back together. Each ping here is due after a random 75-100% of the interval (never later
  than upstream's), so such a group spreads out over a few cycles.

The subclass reads uvicorn's protocol internals; ``pyproject.toml`` bounds the uvicorn
versions it was checked against, and ``tests/server/test_wsprotocol.py`` fails if they move.
"""

from __future__ import annotations

import random

from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

READ_AHEAD_MESSAGES = 32
READ_AHEAD_BYTES = 256 * 1024
PING_SPREAD = 0.25  # a ping is due after (1 - PING_SPREAD .. 1) x ping_interval


class RelayProtocol(WebSocketsSansIOProtocol):
    queued_bytes = 0
    """Bytes of the messages waiting for the application (each instance counts its own)."""

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past ``websocket.close``: dropped, reads stay on for the peer's close
        if self.curr_msg_data_type == "text":
            try:
                self.queue.put_nowait({"type": "websocket.receive", "text": data.decode()})
            except UnicodeDecodeError:
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        self.queued_bytes += len(data)
        if not self.read_paused and (
            self.queue.qsize() >= READ_AHEAD_MESSAGES or self.queued_bytes >= READ_AHEAD_BYTES
        ):
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> ASGIReceiveEvent:
        message = await self.queue.get()
        if message["type"] == "websocket.receive":
            body = message.get("bytes")
            if body is None:  # text: refused by the endpoint, so never the common path
                body = (message.get("text") or "").encode()
            self.queued_bytes -= len(body)
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        due = self.ping_interval * (1.0 - PING_SPREAD * random.random())  # noqa: S311 (jitter)
        self.ping_timer = self.loop.call_later(
            max(0.0, due - self.last_ping_rtt), self.send_keepalive_ping
        )
