"""``medrelay-chat`` approves a user's new device: the new device shows a code, the user
types ``/approve CODE`` on a device they already use, the new device gets its certificate and
the identity key (from the encrypted backup) and goes on into the chat. A wrong code
approves nothing. Real server on port 0; each chat is ``cli.run`` with its terminal replaced
by a queue of typed lines and a transcript of what it printed."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from medrelay_client import cli
from medrelay_client.keystore import KeyStore

from .conftest import Harness

WAIT = 20.0  # seconds any one expected line may take before the test fails (never hangs)


class Transcript:
    """What one chat printed; :meth:`expect` waits (on the print itself, not a timer) for a
    line matching a pattern. Each line satisfies one expectation."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._used: set[int] = set()
        self._changed = asyncio.Event()

    def __call__(self, text: str) -> None:
        self.lines.extend(text.splitlines())
        self._changed.set()

    async def expect(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        regex = re.compile(pattern)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for i, line in enumerate(self.lines):
                        found = regex.search(line) if i not in self._used else None
                        if found is not None:
                            self._used.add(i)
                            return found
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            shown = "\n".join(self.lines)
            raise AssertionError(f"no line matching {pattern!r} in:\n{shown}") from None

    def printed(self, pattern: str) -> bool:
        return any(re.search(pattern, line) for line in self.lines)


class Chat:
    """One ``medrelay-chat`` session running in this event loop."""

    def __init__(self, h: Harness, user: str, room: str, keys_dir: Path, *extra: str) -> None:
        self.out = Transcript()
        self.keys_dir = keys_dir
        self.user = user
        self._typed: asyncio.Queue[str | None] = asyncio.Queue()
        url, where = h.server.url, str(keys_dir)
        args = cli.parse_args(
            ["--user", user, "--room", room, "--url", url, "--keys-dir", where, *extra]
        )
        self.task = asyncio.create_task(cli.run(args, lines=self._lines(), say=self.out))

    async def _lines(self) -> AsyncIterator[str]:
        while (line := await self._typed.get()) is not None:
            yield line + "\n"

    def type(self, line: str) -> None:
        self._typed.put_nowait(line)

    async def quit(self) -> int:
        self._typed.put_nowait(None)  # end of input, as Ctrl-D
        return await asyncio.wait_for(self.task, WAIT)

    def keys(self) -> KeyStore:
        return KeyStore.load_or_create(self.user, self.keys_dir / self.user, with_identity=False)


StartChat = Callable[..., Chat]


@pytest.fixture
async def chat(harness: Harness, tmp_path: Path) -> AsyncIterator[StartChat]:
    started: list[Chat] = []

    def start(user: str, room: str, device: str, *extra: str) -> Chat:
        c = Chat(harness, user, room, tmp_path / "devices" / device, *extra)
        started.append(c)
        return c

    yield start
    for c in started:  # a failed test leaves chats running: stop them before the server
        if not c.task.done():
            c.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the test has its verdict
            await asyncio.wait_for(c.task, WAIT)


def _other_code(code: str) -> str:
    """The same code with its last digit changed: what a mistyped or substituted code is."""
    return code[:-1] + str((int(code[-1]) + 1) % 10)


async def test_new_device_is_approved_with_the_code_and_reads_a_room(
    harness: Harness, chat: StartChat
) -> None:
    bob = chat("bob", "ward-7", "bob-phone")
    await bob.out.expect(r"^first device of bob")
    await bob.out.expect(r"^created room ward-7")

    phone = chat("alice", "alice-notes", "alice-phone")
    first = await phone.out.expect(r"^first device of alice: .*\(fingerprint ([\d ]+)\)")
    await phone.out.expect(r"^connected as alice")
    await phone.out.expect(r"^created room alice-notes")
    phone.type("/approve 1234 5678 9012")
    await phone.out.expect(r"no new device of yours is waiting for approval: nothing was approved")

    # the new laptop: an empty key directory; the server already knows alice
    laptop = chat("alice", "ward-7", "alice-laptop")
    code = (await laptop.out.expect(r"comparison code: (\d{4} \d{4} \d{4})$")).group(1)
    await laptop.out.expect(r"QR payload: +MRAPPROVE1:[0-9a-f]{64}$")
    await laptop.out.expect(rf"On a device you already use, type: +/approve {code}$")
    await laptop.out.expect(r"^Waiting for the approval")

    # the phone is told, and lists the request
    [record] = await harness.store.pending_requests("alice", int(time.time()))
    notice = await phone.out.expect(r"^-- new device ([0-9a-f]{8}) asks .*must match")
    assert notice.group(1) == record.device_id[:8]
    phone.type("/devices")
    await phone.out.expect(r"^your devices \(fingerprint ")
    await phone.out.expect(r"^  [0-9a-f]{8}  this device$")
    await phone.out.expect(rf"^  {record.device_id[:8]}  asked at ")

    # a wrong code: refused, nothing sent, nothing issued
    phone.type(f"/approve {_other_code(code)}")
    await phone.out.expect(r"^\(!\) CODE_MISMATCH: .*nothing was approved")
    again = await harness.store.get_request(record.id)
    assert again is not None and not again.approved
    assert await harness.store.get_device(record.device_id) is None
    assert "device_approve" not in [r.action for r in await harness.store.audit_records()]
    assert not laptop.out.printed(r"^approved")

    # the code read off the laptop's screen
    phone.type(f"/approve {code}")
    await phone.out.expect(rf"^approved device {record.device_id[:8]}: ")
    approved = await laptop.out.expect(r"^approved: .*\(fingerprint ([\d ]+),")
    assert approved.group(1) == first.group(1)
    await laptop.out.expect(r"^connected as alice")
    assert await harness.store.get_device(record.device_id) is not None
    phone.type("/devices")
    await phone.out.expect(rf"^  {record.device_id[:8]}  certified ")
    await phone.out.expect(r"^no new device is waiting for approval$")

    # and the laptop reads a room alice is added to
    await laptop.out.expect(r"^room ward-7 exists; waiting for a member to add you")
    bob.type("/add alice")
    await bob.out.expect(r"^added alice$")
    bob.type("hello to both of alice's devices")
    await laptop.out.expect(r"\] bob: hello to both of alice's devices$")

    for c in (laptop, phone, bob):
        assert await c.quit() == 0
    assert laptop.keys().identity.public == phone.keys().identity.public
    actions = [r.action for r in await harness.store.audit_records()]
    assert actions.count("device_approve") == 1
    secrets = []
    for c in (laptop, phone, bob):
        k = c.keys()
        secrets += [k.identity.private_bytes(), k.device.private_bytes()]
        secrets += [k.receiving.private_bytes(), k.backup_key or b""]
    for c in (laptop, phone, bob):  # codes are shown; no key material is
        printed = "\n".join(c.out.lines)
        assert not [s for s in secrets if s and s.hex() in printed]


async def test_new_device_flag_needs_a_device_to_approve_it(
    harness: Harness, chat: StartChat
) -> None:
    """``--new-device`` for a user the server does not know: refused, no identity made."""
    carol = chat("carol", "ward-7", "carol-laptop", "--new-device")
    assert await asyncio.wait_for(carol.task, WAIT) == 2
    await carol.out.expect(r"^\(!\) no device of carol is registered yet")
    assert not carol.keys().has_identity
    assert await harness.store.pending_requests("carol", int(time.time())) == []
