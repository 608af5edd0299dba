"""A lapsed registration, end to end through a real server and real clients: one re-check
run removes the doctor from every room, each removal signed by the external sender key that
room's genesis names, journaled, the room left pending a rekey; the next member send
commits a new epoch that the removed doctor never receives."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from medrelay_protocol.roster import verify_roster
from medrelay_protocol.roster_entry import decode_entry
from medrelay_server.register.importer import RegisterEntry

from .test_signin import REGISTER, Server, create_room_with_sender, next_from, serve

WONG = "clinic:dr-wong"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    async with serve(tmp_path) as s:
        yield s


def lapse(number: str) -> list[RegisterEntry]:
    out = []
    for e in REGISTER:
        out.append(
            RegisterEntry(
                e.registration_no,
                e.name_en,
                e.name_zh,
                e.specialty,
                status="lapsed" if e.registration_no == number else e.status,
            )
        )
    return out


async def test_lapsed_registration_removes_from_every_room(server: Server) -> None:
    chan = await server.signin(server.qmh)
    wong = await server.signin(server.clinic, sub="dr-wong", mchk_registration="M20001")
    chan_c, wong_c = await server.client(chan), await server.client(wong)
    # a QMH room, a room created under the clinic's key, and one with no external sender
    qmh_room = await create_room_with_sender(chan_c, server.sender_key("qmh"))
    clinic_room = await create_room_with_sender(chan_c, server.sender_key("clinic"))
    plain_room = await create_room_with_sender(chan_c, None)
    for room in (qmh_room, clinic_room, plain_room):
        await chan_c.add(room, WONG)
    await wong_c.send_text(qmh_room, "on my way")
    assert (await next_from(chan_c, WONG)).body["text"] == "on my way"

    store = server.store
    epochs = {}
    for room in (qmh_room, clinic_room):
        before = await store.room_state(room)
        assert before is not None
        epochs[room] = before.epoch
    rechecker = server.rechecker()
    quiet = await rechecker.run_once(int(time.time()))
    assert (quiet.lapsed, quiet.removed, quiet.failed) == ([], [], [])

    now = int(time.time())
    await server.stack.idb.import_register(
        lapse("M20001"), source="monthly.csv", now=now, full=True, max_deactivate=1.0
    )
    report = await rechecker.run_once(now)
    assert report.lapsed == [WONG]
    removed = {room: seq for user, room, seq in report.removed if user == WONG}
    assert set(removed) == {qmh_room, clinic_room}
    assert [(u, r) for u, r, _ in report.failed] == [(WONG, plain_room)]

    for room, institution in ((qmh_room, "qmh"), (clinic_room, "clinic")):
        assert await store.member_role(room, WONG) is None
        state = await store.room_state(room)
        assert state is not None and state.pending_rekey and state.epoch == epochs[room]
        entries = await store.roster_entries(room)
        last = decode_entry(entries[-1])
        assert (last.action, last.params, last.signer_user) == ("remove", {"user": WONG}, None)
        assert not verify_roster(entries, room=room).is_member(WONG)
        journal = [r for r in await store.audit_records(room=room) if r.target == WONG]
        assert [(r.action, r.user, r.detail) for r in journal][-1] == (
            "membership_change",
            f"institution:{institution}",
            "external remove",
        )
    # the room without an external sender cannot be changed by anyone but its members:
    # the removal stays pending, journaled once as a failure, and reported again next run
    assert await store.member_role(plain_room, WONG) == "member"
    failures = [r for r in await store.audit_records(room=plain_room) if r.outcome == "failure"]
    assert len(failures) == 1
    account = await server.stack.idb.account(WONG)
    assert account is not None and (account.status, account.removal_pending) == ("lapsed", True)
    again = await rechecker.run_once(int(time.time()))
    assert again.removed == [] and [r for _, r, _ in again.failed] == [plain_room]
    failures = [r for r in await store.audit_records(room=plain_room) if r.outcome == "failure"]
    assert len(failures) == 1

    # the lapsed doctor can neither refresh nor sign in again
    refresh = {"refresh_token": wong["refresh_token"]}
    assert await server.refused("/auth/refresh", refresh) == (401, "session_revoked")
    token = server.clinic.token(sub="dr-wong", mchk_registration="M20001")
    assert await server.refused("/auth/signin", {"id_token": token}) == (
        401,
        "registration_inactive",
    )

    # the next member send commits a new epoch first; the removed doctor never sees it
    seq = await chan_c.send_text(qmh_room, "new epoch, without dr wong")
    state = await store.room_state(qmh_room)
    new_epoch = epochs[qmh_room] + 1
    assert state is not None and (state.epoch, state.pending_rekey) == (new_epoch, False)
    assert seq > removed[qmh_room]
    assert not await store.visible(qmh_room, seq, WONG)
    keys = [r for r in await store.audit_records(room=qmh_room) if r.action == "key_rotation"]
    assert keys[-1].detail == f"epoch {new_epoch}" and keys[-1].user == "qmh:dr-chan"
    notices = []
    while True:
        try:
            m = await wong_c.next_message(timeout=2)
        except TimeoutError:
            break
        notices.append(m)
        assert m.seq <= removed.get(m.room, 10**9), m
    assert any(m.body == {"type": "notice", "action": "remove", "user": WONG} for m in notices)
