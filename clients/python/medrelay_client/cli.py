"""``medrelay-chat``: a terminal chat over the client library.

    medrelay-chat --user alice --room ward-7
    medrelay-chat --user bob --room ward-7      # then alice types: /add bob

Lines are sent as encrypted text; commands start with a slash (``/help``).

Another device of a user who already uses medrelay (a new laptop, a replacement phone) is
approved from a device the user already has. Started with an empty key directory, the chat
sees that the server already knows the user, shows a comparison code and waits; on the other
device the user types ``/approve CODE``. The user's identity key then reaches the new device
inside the user's encrypted key backup, and the chat continues as usual. ``--new-device``
insists on this: it never makes a new identity key (a server claiming the user is unknown
is then refused instead of believed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.crypto import SigningKey, fingerprint
from medrelay_protocol.enrolment import CodeMismatch, check_approval_code
from medrelay_protocol.errors import MedrelayError, RequestError
from medrelay_protocol.frames import DeviceRequest, Devices, Frame, GetDevices, PendingDevice
from medrelay_protocol.identity import DeviceCertificate

from .client import Client, Message
from .devtoken import dev_token
from .enrolment import DeviceEnrolment
from .keystore import KeyStore
from .transport import SessionClosed

HELP = """commands:
  /add USER [ROLE]   add a colleague (role: member, observer, device; default member)
  /remove USER       remove someone (owner only); the room key rotates at once
  /leave             leave the room
  /history [N]       show the last N messages (default 20)
  /file PATH         send a file (encrypted on this machine)
  /rooms             list your rooms
  /devices           your devices, and new devices of yours waiting for approval
  /approve CODE      approve your new device: type the 12-digit code its screen shows
                     (a code that does not match approves nothing)
  /quit              exit
a new device of yours: start medrelay-chat there with an empty --keys-dir; it shows
the code to type here."""

Say = Callable[[str], None]
TokenProvider = Callable[[], Awaitable[str]]
Pending = DeviceRequest | PendingDevice


def _print(line: str) -> None:
    print(line, flush=True)


def render(m: Message) -> str:
    if m.problem:
        return f"[{m.seq}] (!) {m.problem}"
    body: Any = m.body
    if isinstance(body, dict):
        kind = body.get("type")
        if kind == "text":
            return f"[{m.seq}] {m.sender_user}: {body.get('text')}"
        if kind == "file":
            name, size = body.get("name"), body.get("size")
            return f"[{m.seq}] {m.sender_user} sent a file: {name} ({size} bytes)"
        if kind == "notice":
            return f"[{m.seq}] -- {body.get('action')} {body.get('user') or ''}".rstrip()
        if kind == "vitals":
            return f"[{m.seq}] {m.sender_user} vitals: {body.get('summary')}"
    return f"[{m.seq}] {m.sender_user}: {body!r}"


def _when(ts: int) -> str:
    """A server timestamp in local time (the date only when it is not today)."""
    t = time.localtime(ts)
    same_day = t[:3] == time.localtime()[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M", t)


def device_request_notice(p: Pending) -> str:
    return (
        f"-- new device {p.device[:8]} asks to become one of your devices "
        f"(asked at {_when(p.created_at)}, expires {_when(p.expires_at)}). If you are setting "
        "it up, type /approve and the 12-digit code shown on that device: the code must "
        "match. If you did not start a new device, do not approve."
    )


@dataclass
class ChatClient(Client):
    """The library client, telling the terminal when a new device of the user asks."""

    say: Say = _print
    _announced: set[str] = field(default_factory=set)

    async def _on_push(self, frame: Frame) -> None:
        await super()._on_push(frame)
        if isinstance(frame, DeviceRequest):
            self.announce(frame)

    def announce(self, pending: Pending) -> None:
        """One notice line per request (the new device asking again is not news)."""
        if pending.request not in self._announced:
            self._announced.add(pending.request)
            self.say(device_request_notice(pending))


# ------------------------------------------------------------------------ this device


async def open_device(
    args: argparse.Namespace, token: TokenProvider, say: Say = _print
) -> KeyStore | None:
    """This device's keys, ready for :meth:`Client.start`: the ones it has, a first device's
    (a new identity key), or a new device's after another device of the user approved it.
    ``None``: this device cannot go on (the reason was said)."""
    keys = await asyncio.to_thread(
        KeyStore.load_or_create, args.user, args.keys_path, with_identity=False
    )
    enrolment = DeviceEnrolment(args.url, keys, token)
    try:
        pinned = await enrolment.pinned_identity()
        if keys.has_identity:
            if pinned is not None and pinned != keys.identity.public:
                say(
                    f"(!) the keys in {args.keys_path} hold another identity key than the one "
                    f"registered for {args.user}: this device was never approved. Move that "
                    "directory away and start again to approve it from a device you already use."
                )
                return None
            if args.new_device:
                say("this device is one of your devices already; --new-device is not needed")
            return keys
        if pinned is None:
            if args.new_device:
                say(
                    f"(!) no device of {args.user} is registered yet, so none can approve this "
                    "one. Start without --new-device to make this your first device."
                )
                return None
            keys.identity = SigningKey.generate()
            await asyncio.to_thread(keys.save)
            say(
                f"first device of {args.user}: made your identity key "
                f"(fingerprint {fingerprint(keys.user, keys.identity.public)})"
            )
            return keys
        return keys if await enrol(enrolment, say) else None
    except RequestError as exc:
        say(f"(!) {exc.code.name}: {exc.message}")
        return None
    except SessionClosed as exc:
        say(f"(!) the server closed the connection ({exc.code}): {exc.reason}")
        return None
    except OSError as exc:
        say(f"(!) cannot reach {args.url}: {exc.strerror or type(exc).__name__}")
        return None
    finally:
        await enrolment.close()


async def enrol(enrolment: DeviceEnrolment, say: Say = _print) -> bool:
    """The new device's side: ask for approval, show the code, wait for the approval, take
    the certificate and the identity key from the backup. ``False``: not approved."""
    keys = enrolment.keys
    status = await enrolment.request()
    if status.state != "approved":
        say(
            f"{keys.user} already uses medrelay on another device: this device "
            f"({keys.device_id[:8]}) must be approved from it before it can read anything."
        )
        say(f"  comparison code: {enrolment.code}")
        say(f"  QR payload:      {enrolment.qr}")
        say(f"On a device you already use, type:  /approve {enrolment.code}")
        say(f"Waiting for the approval (this request expires at {_when(status.expires_at)}) ...")
    try:
        await enrolment.wait_approved(timeout=max(1.0, status.expires_at - time.time()))
    except TimeoutError:
        say(
            "(!) not approved in time: the request expired. Start medrelay-chat again to ask "
            "again (the code stays the same)."
        )
        return False
    except SessionClosed:
        say(
            "(!) the connection to the server was lost while waiting. Start medrelay-chat "
            "again (the code stays the same; an approval given meanwhile is kept)."
        )
        return False
    except MedrelayError as exc:
        say(
            f"(!) the approval could not be verified ({exc.code.name}); nothing was "
            "installed on this device. Start medrelay-chat again to ask again."
        )
        return False
    say(
        "approved: this device is now one of your devices (fingerprint "
        f"{fingerprint(keys.user, keys.identity.public)}, the same on all of them)"
    )
    return True


# ------------------------------------------------------------------ the user's devices


def _matching(pending: Iterable[Pending], user: str, typed: str) -> Pending | None:
    """The pending request whose code is the one the user typed (or scanned)."""
    for p in pending:
        try:
            check_approval_code(typed, user, p.device_key)
        except CodeMismatch:
            continue
        return p
    return None


async def approve(client: Client, typed: str, say: Say = _print) -> DeviceCertificate | None:
    """``/approve CODE``: approve the waiting device whose code the user typed. A code that
    matches none is refused and no approval is sent."""
    if not typed.strip():
        say("usage: /approve CODE   (the 12-digit code shown on your new device)")
        return None
    match = _matching(client.device_requests.values(), client.user, typed)
    if match is None:  # perhaps asked while this device was away: ask the server
        match = _matching((await client.list_device_requests()).values(), client.user, typed)
    if match is None:
        if not client.device_requests:
            say(
                "(!) no new device of yours is waiting for approval: nothing was approved. "
                "Start medrelay-chat on the new device first; it shows the code."
            )
        else:
            say(
                f"(!) {ErrorCode.CODE_MISMATCH.name}: that code matches no device waiting for "
                "approval, so nothing was approved. Check the code on the new device's "
                "screen and type it again; if they do not match, do not approve."
            )
        return None
    cert = await client.approve_device(match.request, typed)
    say(
        f"approved device {cert.device_id[:8]}: it is now one of your devices and receives "
        "your identity key through your encrypted key backup"
    )
    return cert


async def list_devices(client: Client, say: Say = _print) -> None:
    """``/devices``: the user's certified and revoked devices, and waiting requests."""
    await client.wait_connected()
    reply: Devices = await client.request(
        GetDevices(rid=client.rid(), users=(client.user,)), Devices
    )
    say(f"your devices (fingerprint {client.fingerprint}):")
    for mine in reply.users[:1]:
        for raw in mine.certificates:
            try:
                cert = DeviceCertificate.verify(raw, client.keys.identity.public)
            except MedrelayError:
                say("  ?         a certificate your identity key did not sign (ignored)")
                continue
            if cert.device_id == client.keys.device_id:
                say(f"  {cert.device_id[:8]}  this device")
            else:
                say(f"  {cert.device_id[:8]}  certified {_when(cert.issued_at)}")
        for device in mine.revoked:
            say(f"  {device[:8]}  revoked")
    pending = sorted(
        (await client.list_device_requests()).values(), key=lambda p: (p.created_at, p.request)
    )
    if not pending:
        say("no new device is waiting for approval")
        return
    say("waiting for approval (type /approve and the code shown on that device):")
    for p in pending:
        say(f"  {p.device[:8]}  asked at {_when(p.created_at)}, expires {_when(p.expires_at)}")


# ------------------------------------------------------------------------ the chat


async def _printer(client: Client, room: str, say: Say = _print) -> None:
    async for m in client.messages():
        if m.room == room:
            say(render(m))


async def _command(client: Client, room: str, line: str, say: Say = _print) -> bool:
    parts = line.split()
    cmd, args = parts[0], parts[1:]
    if cmd == "/quit":
        return False
    if cmd == "/help":
        say(HELP)
    elif cmd == "/add" and args:
        await client.add(room, args[0], args[1] if len(args) > 1 else "member")
        say(f"added {args[0]}")
    elif cmd == "/remove" and args:
        await client.remove(room, args[0])
        say(f"removed {args[0]}")
    elif cmd == "/leave":
        await client.leave(room)
        say("you left the room")
        return False
    elif cmd == "/history":
        for m in await client.history(room, limit=int(args[0]) if args else 20):
            say(render(m))
    elif cmd == "/file" and args:
        data = await asyncio.to_thread(Path(args[0]).read_bytes)
        await client.send_file(room, data, name=Path(args[0]).name, mime="application/octet-stream")
    elif cmd == "/rooms":
        for name, role in (await client.rooms()).items():
            say(f"{name}  ({role})")
    elif cmd == "/devices":
        await list_devices(client, say)
    elif cmd == "/approve":
        await approve(client, " ".join(args), say)
    else:
        say(HELP)
    return True


async def _join(client: Client, room: str, say: Say = _print) -> None:
    if room in await client.rooms():
        return
    try:
        await client.create_room(room)
        say(f"created room {room}; add colleagues with /add USER")
    except RequestError as exc:
        if exc.code != ErrorCode.ALREADY_EXISTS:
            raise
        say(f"room {room} exists; waiting for a member to add you (/add {client.user})")
        async for m in client.messages():
            if m.room == room:
                say(render(m))
                return


async def _stdin_lines() -> AsyncIterator[str]:
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        yield line


async def run(
    args: argparse.Namespace,
    *,
    token: TokenProvider | None = None,
    lines: AsyncIterator[str] | None = None,
    say: Say = _print,
) -> int:
    """The chat: ``token`` defaults to the server's development issuer, ``lines`` to the
    terminal, ``say`` to printing."""

    async def dev() -> str:
        return await dev_token(args.url, args.user)

    tokens = token or dev
    keys = await open_device(args, tokens, say)
    if keys is None:
        return 2
    client = ChatClient(args.url, keys, tokens, say=say)
    await client.start()
    say(f"connected as {args.user} (device {keys.device_id[:8]}); /help for commands")
    try:
        for pending in (await client.list_device_requests()).values():
            client.announce(pending)
        await _join(client, args.room, say)
        printer = asyncio.create_task(_printer(client, args.room, say))
        try:
            async for raw in lines if lines is not None else _stdin_lines():
                line = raw.strip()
                if not line:
                    continue
                try:
                    if line.startswith("/"):
                        if not await _command(client, args.room, line, say):
                            break
                    else:
                        await client.send_text(args.room, line)
                except MedrelayError as exc:
                    say(f"(!) {exc.code.name}: {exc.message}")
        finally:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
    finally:
        await client.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="medrelay-chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--user", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--url", default="ws://127.0.0.1:8700/ws")
    parser.add_argument("--keys-dir", default="~/.medrelay")
    parser.add_argument(
        "--new-device",
        action="store_true",
        help="this is another device of a user who already uses medrelay: have it approved "
        "from a device you already use, never make a new identity key (without the flag, a "
        "new key directory does this whenever the server already knows the user)",
    )
    args = parser.parse_args(argv)
    args.keys_path = Path(args.keys_dir).expanduser() / args.user
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
