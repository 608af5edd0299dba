"""Load-generator processes: each holds a share of the simulated devices on raw sockets and
obeys commands from the coordinator over a pipe.

A worker keeps its costs small so the server, not the generator, is what is measured:
envelopes are sealed and frames built (and masked) before a timed window opens; during it
the worker only writes prepared bytes on schedule (open loop: it never waits for an ack to
send the next) and, for each frame received, unpacks it and appends (key, time) to arrays.
Latency is joined afterwards by the coordinator: send times by key against arrival times.

Keys: medrelay ``room_index << 40 | seq`` (the seq comes back in the sender's ack); the bare
relay ``group_index << 40 | sender << 20 | counter`` (carried in the frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import multiprocessing as mp
import os
import random
import struct
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack
from medrelay_protocol import codec
from medrelay_protocol.crypto import SigningKey
from medrelay_protocol.epochs import RekeyManifest
from medrelay_protocol.errors import MedrelayError
from medrelay_protocol.frames import Receipt

from . import mr
from .wsraw import WsClient, client_frame, open_ws


def epoch_of(manifest: bytes) -> int:
    """The epoch a rekey event's manifest starts (0 if it does not parse). Taken from the
    manifest, not counted: a rekey delivered twice (a replay after a resume) or late names
    an epoch the room has already passed."""
    try:
        return RekeyManifest.parse_unverified(manifest).epoch_number
    except (MedrelayError, ValueError, TypeError):
        return 0


KEY_SHIFT = 40
RECEIPT_INTERVAL = 1.0  # seconds between a device's cumulative receipts for a room
RECEIPT_TICK = 0.01  # how often the receipt timer looks for devices due


@dataclass
class RoomSpec:
    name: str
    epoch: int = 0
    head: bytes = b"\0" * 32


@dataclass
class MemberSpec:
    """One simulated device. ``rooms`` are room indexes; it sends into ``rooms[0]``."""

    name: str
    rooms: list[int]
    sends: bool = True
    receives: bool = True
    ident: mr.Identity | None = None
    watch: bool = False


@dataclass
class Member:
    idx: int
    spec: MemberSpec
    ws: WsClient | None = None
    last_seq: dict[int, int] = field(default_factory=dict)
    receipted: dict[int, int] = field(default_factory=dict)
    counter: int = 0
    inflight: int = 0
    skipped: int = 0
    resumed_at: float = 0.0
    last_error: str = ""
    device: SigningKey | None = None


class Worker:
    def __init__(self, pipe: Pipe, wid: int) -> None:
        self.pipe = pipe
        self.wid = wid
        self.system = ""
        self.host = "127.0.0.1"
        self.port = 0
        self.rooms: list[RoomSpec] = []
        self.room_index: dict[str, int] = {}
        self.members: list[Member] = []
        self.tokens: dict[str, str] = {}
        self.receipt_interval = RECEIPT_INTERVAL
        self.idle: list[WsClient] = []
        self._reset_records()
        self._send_no = 0
        self._storm: asyncio.Event | None = None
        self._backoff = (0.2, 10.0)
        self._commands: set[asyncio.Task[None]] = set()
        self._plan: list[tuple[float, int, bytes, int, int]] = []
        self._gated: set[int] = set()
        self._kicked = asyncio.Event()

    def _reset_records(self) -> None:
        self.arr_k = array("q")
        self.arr_t = array("d")
        self.ack_i = array("q")
        self.ack_k = array("q")
        self.sent_t: dict[int, float] = {}
        self.watched: list[tuple[int, int, int, float]] = []
        self.errors: Counter[int] = Counter()
        self.last_arrival = 0.0
        self.receipts_sent = 0

    # ----------------------------------------------------------------- command loop
    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(self.pipe.fileno(), ready.set)
        receipts = asyncio.create_task(self._receipt_loop())
        try:
            while True:
                await ready.wait()
                ready.clear()
                while self.pipe.poll():
                    cmd: dict[str, Any] = self.pipe.recv()
                    op = cmd.pop("op")
                    if op == "exit":
                        return
                    task = asyncio.create_task(self._run_command(cmd.pop("id"), op, cmd))
                    self._commands.add(task)
                    task.add_done_callback(self._commands.discard)
        finally:
            receipts.cancel()
            for m in self.members:
                if m.ws is not None:
                    m.ws.abort()
            for ws in self.idle:
                ws.abort()

    async def _run_command(self, cid: int, op: str, args: dict[str, Any]) -> None:
        """Commands run concurrently (a kick or a removal happens during a timed window);
        each reply carries the command's id."""
        try:
            result = await getattr(self, f"op_{op}")(**args)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["id"] = cid
        self.pipe.send(result)

    # ----------------------------------------------------------------- set-up
    async def op_setup(
        self,
        system: str,
        port: int,
        rooms: list[RoomSpec],
        members: list[MemberSpec],
        tokens: dict[str, str],
        receipt_interval: float = RECEIPT_INTERVAL,
    ) -> dict[str, Any]:
        self.system, self.port, self.rooms = system, port, rooms
        self.room_index = {r.name: i for i, r in enumerate(rooms)}
        self.tokens = tokens
        self.receipt_interval = receipt_interval
        base = len(self.members)
        for i, spec in enumerate(members):
            m = Member(base + i, spec)
            if spec.ident is not None:
                m.device = spec.ident.device()
            self.members.append(m)
        return {"members": len(self.members)}

    async def op_set_receipts(self, interval: float) -> dict[str, Any]:
        self.receipt_interval = interval
        return {}

    async def op_connect(self, concurrency: int = 32) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        t0 = time.monotonic()

        async def one(m: Member) -> None:
            if m.ws is not None and not m.ws.is_closed:
                return
            async with sem:
                try:
                    await self._open(m)
                except Exception as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1

        await asyncio.gather(*(one(m) for m in self.members))
        up = sum(1 for m in self.members if m.ws is not None and not m.ws.is_closed)
        return {"up": up, "failures": dict(failures), "seconds": time.monotonic() - t0}

    async def _open(self, m: Member) -> None:
        spec = m.spec
        if self.system == "medrelay":
            assert spec.ident is not None
            try:
                ws, _ = await mr.connect(
                    self.host, self.port, spec.ident, self.tokens[spec.ident.user]
                )
            except mr.HandshakeFailed as exc:
                if exc.code is None:  # refused with a reason: maybe a restarted dev issuer
                    raise
                await self._refresh_token(spec.ident)
                ws, _ = await mr.connect(
                    self.host, self.port, spec.ident, self.tokens[spec.ident.user]
                )
            try:
                names = {self.rooms[r].name: m.last_seq.get(r, 0) for r in spec.rooms}
                try:
                    heads = await mr.sync(ws, names)
                except mr.HandshakeFailed:
                    # removed from a room it names (revocation): the server refuses the
                    # whole sync; resume the rooms it is still in instead
                    heads = await mr.sync(ws, {})
            except BaseException:
                ws.abort()
                raise
            for name, seq in heads.items():
                r = self.room_index.get(name)
                if r is not None:
                    m.last_seq[r] = max(m.last_seq.get(r, 0), seq)
        else:
            ws = await open_ws(self.host, self.port, "/")
            group = self.rooms[spec.rooms[0]].name.encode()
            suffix = b"" if spec.receives else b"|s"
            join = b"JOIN" + group + b"|" + spec.name.encode() + suffix
            ws.send(join)
            reply = await ws.recv()
            if reply != join:
                ws.abort()
                raise RuntimeError("join not echoed")
        ws.on_frame = self._on_frame_for(m)
        m.ws = ws
        m.resumed_at = time.monotonic()
        if self._storm is not None:
            asyncio.get_running_loop().create_task(self._watch_closed(m, ws))

    async def _refresh_token(self, ident: mr.Identity) -> None:
        """A restarted dev issuer has a new key: fetch this user's token again (the
        server's ``/dev/token`` stands in for the identity provider)."""
        got = await mr.fetch_tokens(self.host, self.port, [(ident.user, ident.kind)])
        self.tokens.update(got)

    # ----------------------------------------------------------------- receiving
    def _on_frame_for(self, m: Member) -> Any:
        unpackb = msgpack.unpackb
        room_index = self.room_index
        last_seq = m.last_seq
        watch = m.spec.watch
        idx = m.idx

        if self.system != "medrelay":
            unpack = struct.Struct("!Q").unpack_from

            def on_bare(payload: bytes, t: float) -> None:
                if payload[:4] == b"DATA":
                    self.arr_k.append(unpack(payload, 4)[0])
                    self.arr_t.append(t)
                    self.last_arrival = t
                elif payload[:4] == b"KICK":
                    self._kicked.set()

            return on_bare

        def on_frame(payload: bytes, t: float) -> None:
            d = unpackb(payload)
            typ = d["t"]
            if typ == "deliver":
                r = room_index.get(d["room"], 0)
                seq = d["seq"]
                self.arr_k.append((r << KEY_SHIFT) | seq)
                self.arr_t.append(t)
                self.last_arrival = t
                if seq > last_seq.get(r, 0):
                    last_seq[r] = seq
                if d["kind"] == "rekey":  # a replayed rekey names an epoch already known
                    room = self.rooms[r]
                    room.epoch = max(room.epoch, epoch_of(d["payload"]))
                if watch:
                    self.watched.append((idx, r, seq, t))
            elif typ == "ack":
                rid = d["rid"]
                if rid[:1] == "b":
                    m.inflight -= 1
                    self.ack_i.append(int(rid[1:]))
                    self.ack_k.append((room_index.get(d["room"], 0) << KEY_SHIFT) | d["seq"])
            elif typ == "error":
                if str(d.get("rid", ""))[:1] == "b":
                    m.inflight -= 1
                self.errors[int(d["code"])] += 1

        return on_frame

    async def _receipt_loop(self) -> None:
        """Cumulative receipts ("up to seq N"), one per room per interval when it moved.

        Each device keeps its own period (0.5 to 1.5 intervals) from its own random phase,
        as independent devices do. One timer for all of a generator's devices (before 29
        November) sent a receipt from every one of its ~225 devices in the same instant,
        a burst no population makes, and the sends behind it waited for it."""
        due: list[tuple[float, int]] = []  # a heap of (next receipt time, member index)
        known = 0
        while True:
            await asyncio.sleep(RECEIPT_TICK)
            interval = self.receipt_interval
            if self.system != "medrelay" or not interval:
                continue
            now = time.monotonic()
            if known > len(self.members):  # the members were closed: start again
                due, known = [], 0
            while known < len(self.members):  # members joined since: a random phase each
                heapq.heappush(due, (now + interval * random.random(), known))
                known += 1
            while due and due[0][0] <= now:
                _, i = heapq.heappop(due)
                heapq.heappush(due, (now + interval * (0.5 + random.random()), i))
                self._send_receipts(self.members[i])

    def _send_receipts(self, m: Member) -> None:
        ws = m.ws
        if ws is None or ws.is_closed or not m.spec.receives:
            return
        for r, seq in m.last_seq.items():
            if m.receipted.get(r, 0) < seq:
                m.receipted[r] = seq
                ws.send(codec.encode(Receipt(room=self.rooms[r].name, seq=seq)))
                self.receipts_sent += 1

    # ----------------------------------------------------------------- a timed window
    async def op_prepare(self, streams: list[dict[str, Any]], duration: float) -> dict[str, Any]:
        """Build this window's frames. Each stream is ``{"members": [index, ...], "rate":
        messages/s per member, "body_size": bytes, "live": bool, "gated": bool}``; a live
        stream is sealed at send time with the room's epoch of that moment (rooms whose
        epoch changes during the window: revocation), the others are sealed and framed now.
        A gated member skips a send while its previous one is unacknowledged (a bedside
        tablet on the client library: one reading in flight, the next one replaces it)."""
        t0 = time.monotonic()
        plan: list[tuple[float, int, bytes, int, int]] = []
        self._gated = set()
        for stream in streams:
            rate = float(stream["rate"])
            if rate <= 0:
                continue
            period = 1.0 / rate
            for idx in stream["members"]:
                m = self.members[idx]
                m.inflight = m.skipped = 0
                if stream.get("gated") and self.system == "medrelay":
                    self._gated.add(idx)
                t = random.uniform(0, period)
                while t < duration:
                    no = self._send_no
                    self._send_no += 1
                    size = int(stream["body_size"])
                    live = stream.get("live") and self.system == "medrelay"
                    frame = b"" if live else self._frame(m, no, size)
                    plan.append((t, idx, frame, no, size))
                    t += period
        plan.sort(key=lambda p: p[0])
        self._plan = plan
        # the window's frames and the clients are live until op_run ends: out of the
        # collector's reach, so that no full collection pauses this process mid-window
        gc.collect()
        gc.freeze()
        return {"frames": len(plan), "seconds": time.monotonic() - t0}

    def _frame(self, m: Member, no: int, body_size: int) -> bytes:
        r = m.spec.rooms[0]
        room = self.rooms[r]
        m.counter += 1
        if self.system == "medrelay":
            assert m.device is not None
            mid, env = mr.seal(
                m.device,
                room.name,
                epoch=room.epoch,
                roster_head=room.head,
                counter=m.counter,
                body_size=body_size,
            )
            return client_frame(mr.send_frame(f"b{no}", room.name, mid, env))
        key = (
            (r << KEY_SHIFT)
            | ((m.idx + self.wid * 65536) % (1 << 20)) << 20
            | (m.counter % (1 << 20))
        )
        return client_frame(b"DATA" + struct.pack("!Q", key) + os.urandom(body_size))

    async def op_run(
        self, start_at: float, duration: float, quiet: float = 0.3, max_drain: float = 3.0
    ) -> dict[str, Any]:
        """Send the prepared frames on schedule from ``start_at`` (monotonic, shared by every
        process on the machine), then, from the end of the window (``start_at + duration``,
        whether or not this worker sends at all), record until arrivals go quiet."""
        self._reset_records()
        plan = self._plan
        members = self.members
        sent_t = self.sent_t
        gated = self._gated
        clock = time.monotonic
        await asyncio.sleep(max(0.0, start_at - clock()))
        i, n = 0, len(plan)
        late = 0.0
        first = last = 0.0
        while i < n:
            now = clock()
            due = start_at + plan[i][0]
            if due > now:
                await asyncio.sleep(due - now)
                continue
            if not first:
                first = now
            while i < n and start_at + plan[i][0] <= now:
                _, midx, frame, no, size = plan[i]
                m = members[midx]
                ws = m.ws
                if midx in gated and m.inflight > 0:
                    m.skipped += 1
                elif ws is not None and not ws.is_closed:
                    ws.write(frame or self._frame(m, no, size))
                    m.inflight += 1
                    sent_t[no] = now
                late = max(late, now - (start_at + plan[i][0]))
                i += 1
            last = now
        if self.system != "medrelay":
            self._bare_keys(plan)
        await asyncio.sleep(max(0.0, start_at + duration - clock()))
        end = clock()
        while True:
            await asyncio.sleep(quiet / 3)
            now = clock()
            if now - end > max_drain:
                break
            acked = self.system != "medrelay" or len(self.ack_i) + self._refused() >= len(sent_t)
            if now - max(self.last_arrival, end) >= quiet and acked:
                break
        self._plan = []
        gc.unfreeze()
        return self._records(first, last, late)

    def _refused(self) -> int:
        return sum(self.errors.values())

    def _bare_keys(self, plan: list[tuple[float, int, bytes, int, int]]) -> None:
        """Bare relay keys sit inside the (masked) frame: rebuild send times by key."""
        by_no = self.sent_t
        self.sent_t = {}
        for _, _, frame, no, _ in plan:
            if no in by_no:
                self.sent_t[self._bare_key_of(frame)] = by_no[no]

    @staticmethod
    def _bare_key_of(frame: bytes) -> int:
        n = frame[1] & 0x7F
        hl = 2 if n < 126 else 4 if n == 126 else 10
        mask = frame[hl : hl + 4]
        head = bytes(b ^ mask[i % 4] for i, b in enumerate(frame[hl + 4 : hl + 16]))
        return int(struct.unpack_from("!Q", head, 4)[0])

    def _records(self, first: float, last: float, late: float) -> dict[str, Any]:
        if self.system == "medrelay":
            sends = {
                k: self.sent_t[i]
                for i, k in zip(self.ack_i, self.ack_k, strict=True)
                if i in self.sent_t
            }
        else:
            sends = self.sent_t
        return {
            "sent": len(self.sent_t),
            "acked": len(sends),
            "send_k": array("q", sends.keys()).tobytes(),
            "send_t": array("d", sends.values()).tobytes(),
            "arr_k": self.arr_k.tobytes(),
            "arr_t": self.arr_t.tobytes(),
            "errors": dict(self.errors),
            "watched": list(self.watched),
            "first": first,
            "last": last,
            "late": late,
            "closed": sum(1 for m in self.members if m.ws is None or m.ws.is_closed),
            "skipped": sum(m.skipped for m in self.members),
            "receipts": self.receipts_sent,
        }

    async def op_state(self) -> dict[str, Any]:
        return {
            "epochs": [r.epoch for r in self.rooms],
            "closed": sum(1 for m in self.members if m.ws is None or m.ws.is_closed),
            "errors": dict(self.errors),
        }

    # ----------------------------------------------------------------- bare relay kicks
    async def op_kick(self, by: int, target: str) -> dict[str, Any]:
        m = self.members[by]
        assert m.ws is not None
        t0 = time.monotonic()
        self._kicked.clear()
        m.ws.send(b"KICK" + target.encode())
        await asyncio.wait_for(self._kicked.wait(), 10.0)
        return {"t_req": t0, "t_ack": time.monotonic()}

    # ----------------------------------------------------------------- idle connections
    async def op_hold(
        self, count: int, users: list[tuple[str, str]], concurrency: int = 64, first_ip: int = 2
    ) -> dict[str, Any]:
        """Open ``count`` idle connections (medrelay: authenticated, each its own device;
        bare: joined to a group of ten). ``users`` are (user, token) pairs shared round-robin."""
        sem = asyncio.Semaphore(concurrency)
        failures: Counter[str] = Counter()
        t0 = time.monotonic()
        base = len(self.idle)

        async def one(i: int) -> None:
            async with sem:
                local = f"127.0.0.{first_ip + (i % 8)}"
                try:
                    if self.system == "medrelay":
                        user, token = users[i % len(users)]
                        ident = mr.Identity(user, "person", SigningKey.generate().private_bytes())
                        ws, _ = await mr.connect(self.host, self.port, ident, token, local=local)
                    else:
                        ws = await _bare_join(self.host, self.port, local, i, self.wid)
                    self.idle.append(ws)
                except Exception as exc:
                    failures[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1

        await asyncio.gather(*(one(base + i) for i in range(count)))
        return {
            "open": sum(1 for w in self.idle if not w.is_closed),
            "failures": dict(failures),
            "seconds": time.monotonic() - t0,
        }

    async def op_idle_check(self) -> dict[str, Any]:
        return {"open": sum(1 for w in self.idle if not w.is_closed), "total": len(self.idle)}

    async def op_drop_idle(self) -> dict[str, Any]:
        for ws in self.idle:
            ws.abort()  # RST: no TIME_WAIT left on the loopback port range
        n = len(self.idle)
        self.idle = []
        await asyncio.sleep(0.2)
        return {"dropped": n}

    # ----------------------------------------------------------------- reconnect storm
    async def op_arm_storm(self, base: float = 0.2, cap: float = 10.0) -> dict[str, Any]:
        """From now on a dropped member reconnects with jittered exponential backoff (as
        ``medrelay_client.Client`` does) and resumes (medrelay: sync from its last seq)."""
        self._storm = asyncio.Event()
        self._backoff = (base, cap)
        for m in self.members:
            if m.ws is not None:
                asyncio.get_running_loop().create_task(self._watch_closed(m, m.ws))
        return {}

    async def _watch_closed(self, m: Member, ws: WsClient) -> None:
        await ws.closed_fut
        if self._storm is None or m.ws is not ws:
            return
        m.resumed_at = 0.0
        base, cap = self._backoff
        attempt = 0
        while self._storm is not None:
            attempt += 1
            ceiling = min(cap, base * 2 ** min(attempt, 10))
            await asyncio.sleep(random.uniform(base / 2, ceiling))
            try:
                await self._open(m)
                return
            except Exception as exc:
                m.last_error = f"{type(exc).__name__}: {str(exc)[:80]}"
                continue

    async def op_storm_wait(self, limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if all(m.resumed_at and m.ws is not None and not m.ws.is_closed for m in self.members):
                break
            await asyncio.sleep(0.02)
        self._storm = None
        times = [m.resumed_at for m in self.members if m.resumed_at]
        why = Counter(m.last_error or "never reconnected" for m in self.members if not m.resumed_at)
        return {"resumed": times, "total": len(self.members), "failures": dict(why)}

    async def op_close_all(self) -> dict[str, Any]:
        for m in self.members:
            if m.ws is not None:
                m.ws.abort()
                m.ws = None
        self.members = []
        return {}


async def _bare_join(host: str, port: int, local: str, i: int, wid: int) -> WsClient:
    ws = await open_ws(host, port, "/", local=local)
    join = f"JOINidle-{wid}-{i // 10}|idle-{wid}-{i}".encode()
    ws.send(join)
    if await ws.recv() != join:
        ws.abort()
        raise RuntimeError("join not echoed")
    return ws


def worker_main(pipe: Pipe, wid: int) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Worker(pipe, wid).serve())


class WorkerHandle:
    """The coordinator's end of one worker process."""

    def __init__(self, wid: int) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, wid), daemon=True)
        self.proc.start()
        child.close()
        self.wid = wid
        self._ids = 0
        self._stash: dict[int, dict[str, Any]] = {}

    def send(self, op: str, **kw: Any) -> int:
        self._ids += 1
        self.pipe.send({"op": op, "id": self._ids, **kw})
        return self._ids

    def recv(self, cid: int, timeout: float = 600.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while cid not in self._stash:
            if not self.pipe.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"worker {self.wid} did not answer in {timeout:.0f} s")
            reply: dict[str, Any] = self.pipe.recv()
            self._stash[int(reply.pop("id"))] = reply
        result = self._stash.pop(cid)
        if "error" in result:
            raise RuntimeError(f"worker {self.wid}: {result['error']}")
        return result

    def call(self, op: str, timeout: float = 600.0, **kw: Any) -> dict[str, Any]:
        return self.recv(self.send(op, **kw), timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("exit")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def call_all(
    workers: list[WorkerHandle], op: str, timeout: float = 600.0, **kw: Any
) -> list[dict[str, Any]]:
    ids = [w.send(op, **kw) for w in workers]
    return [w.recv(i, timeout) for w, i in zip(workers, ids, strict=True)]
