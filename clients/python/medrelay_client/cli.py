"""``medrelay-chat``: a terminal chat over the client library.

    medrelay-chat --user alice --room ward-7
    medrelay-chat --user bob --room ward-7      # then alice types: /add bob

Lines are sent as encrypted text; commands start with a slash (``/help``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from medrelay_protocol.codes import ErrorCode
from medrelay_protocol.errors import RequestError

from .client import Client, Message
from .devtoken import dev_token
from .keystore import KeyStore

HELP = """commands:
  /add USER [ROLE]   add a colleague (role: member, observer, device; default member)
  /remove USER       remove someone (owner only); the room key rotates at once
  /leave             leave the room
  /history [N]       show the last N messages (default 20)
  /file PATH         send a file (encrypted on this machine)
  /rooms             list your rooms
  /quit              exit"""


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


async def _printer(client: Client, room: str) -> None:
    async for m in client.messages():
        if m.room == room:
            print(render(m), flush=True)


async def _command(client: Client, room: str, line: str) -> bool:
    parts = line.split()
    cmd, args = parts[0], parts[1:]
    if cmd == "/quit":
        return False
    if cmd == "/help":
        print(HELP)
    elif cmd == "/add" and args:
        await client.add(room, args[0], args[1] if len(args) > 1 else "member")
        print(f"added {args[0]}")
    elif cmd == "/remove" and args:
        await client.remove(room, args[0])
        print(f"removed {args[0]}")
    elif cmd == "/leave":
        await client.leave(room)
        print("you left the room")
        return False
    elif cmd == "/history":
        for m in await client.history(room, limit=int(args[0]) if args else 20):
            print(render(m))
    elif cmd == "/file" and args:
        data = await asyncio.to_thread(Path(args[0]).read_bytes)
        await client.send_file(room, data, name=Path(args[0]).name, mime="application/octet-stream")
    elif cmd == "/rooms":
        for name, role in (await client.rooms()).items():
            print(f"{name}  ({role})")
    else:
        print(HELP)
    return True


async def _join(client: Client, room: str) -> None:
    if room in await client.rooms():
        return
    try:
        await client.create_room(room)
        print(f"created room {room}; add colleagues with /add USER")
    except RequestError as exc:
        if exc.code != ErrorCode.ALREADY_EXISTS:
            raise
        print(f"room {room} exists; waiting for a member to add you (/add {client.user})")
        async for m in client.messages():
            if m.room == room:
                print(render(m))
                return


async def run(args: argparse.Namespace) -> int:
    keys = await asyncio.to_thread(KeyStore.load_or_create, args.user, args.keys_path)

    async def token() -> str:
        return await dev_token(args.url, args.user)

    client = Client(args.url, keys, token)
    await client.start()
    print(f"connected as {args.user} (device {keys.device_id[:8]}); /help for commands")
    try:
        await _join(client, args.room)
        printer = asyncio.create_task(_printer(client, args.room))
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not await _command(client, args.room, line):
                        break
                else:
                    await client.send_text(args.room, line)
            except RequestError as exc:
                print(f"(!) {exc.code.name}: {exc.message}")
        printer.cancel()
    finally:
        await client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medrelay-chat", description=__doc__)
    parser.add_argument("--user", required=True)
    parser.add_argument("--room", required=True)
    parser.add_argument("--url", default="ws://127.0.0.1:8700/ws")
    parser.add_argument("--keys-dir", default="~/.medrelay")
    args = parser.parse_args(argv)
    args.keys_path = Path(args.keys_dir).expanduser() / args.user
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
