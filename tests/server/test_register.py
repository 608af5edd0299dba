"""The Medical Council register: CSV parsing, import into SQLite and PostgreSQL (full and
partial, with the guard against a truncated file), sign-in accounts, the directory, and the
``medrelay register`` commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from medrelay_server.auth.errors import AuthError, AuthReason
from medrelay_server.cli_register import add_register_parser
from medrelay_server.register.db import IdentityDb, ImportRefused
from medrelay_server.register.directory import search
from medrelay_server.register.importer import (
    RegisterEntry,
    RegisterFormatError,
    parse_register_csv,
)
from medrelay_server.register.sessions import Sessions

from .conftest import StoreBackend

NOW = 1_800_000_000

HEADER = (
    "Registration No.,Name,Chinese Name,Speciality,Status,Type,Qualifications,Qualification Date"
)
CSV = (
    "\ufeff"
    + HEADER
    + """
M15833,CHAN Tai Man,陳大文,Cardiology,Active,full,"MBBS (HK)",1998-06-30
m20001 ,WONG Siu Ming,黃小明,Respiratory Medicine,,full,MBChB (CUHK),2004-07-01
L00042,LEE Ka Yan,,Paediatrics,lapsed,limited,,
,NO NUMBER,,,,,,
M15833,CHAN duplicate,,,,,,
M77777,HO Man,,,retired,,,

"""
)


def test_parse_register_csv() -> None:
    parsed = parse_register_csv(CSV.encode())
    assert [e.registration_no for e in parsed.entries] == ["M15833", "M20001", "L00042"]
    chan, wong, lee = parsed.entries
    assert chan == RegisterEntry(
        "M15833",
        "CHAN Tai Man",
        "陳大文",
        "Cardiology",
        "full",
        "MBBS (HK)",
        "1998-06-30",
        "active",
    )
    assert wong.status == "active" and wong.active  # an empty status means listed, so active
    assert lee.status == "lapsed" and not lee.active and lee.name_zh is None
    assert len(parsed.skipped) == 3  # no number, duplicate, unknown status
    assert any("duplicate" in s for s in parsed.skipped)
    assert parsed.warnings == []  # L00042 looks like a number: letter + 5 digits


def test_parse_refuses_what_is_not_a_register() -> None:
    with pytest.raises(RegisterFormatError, match="missing column"):
        parse_register_csv(b"name,specialty\nCHAN,Cardiology\n")
    with pytest.raises(RegisterFormatError, match="UTF-8"):
        parse_register_csv("registration_no,name\nM1,陳".encode("big5"))
    with pytest.raises(RegisterFormatError, match="empty"):
        parse_register_csv(b"")
    parsed = parse_register_csv(b"reg_no,name\nX-1,SOMEONE\nM12345," + b"A" * 300 + b"\n")
    assert [e.registration_no for e in parsed.entries] == ["X-1"]
    assert parsed.warnings == ["line 2: unusual registration number format"]
    assert parsed.skipped == ["line 3: name_en longer than 256 characters"]


@pytest.fixture
async def idb(store_backend: StoreBackend) -> IdentityDb:
    await store_backend.open()  # runs the migrations, 0003 included
    db = IdentityDb(store_backend.url, schema=store_backend.schema)
    yield db  # type: ignore[misc]
    await db.close()


def entries(n: int, *, lapsed: frozenset[int] = frozenset()) -> list[RegisterEntry]:
    return [
        RegisterEntry(
            f"M{i:05d}",
            f"DOCTOR {i}",
            specialty="Cardiology" if i % 2 else "Surgery",
            status="lapsed" if i in lapsed else "active",
        )
        for i in range(1, n + 1)
    ]


async def test_import_full_and_partial(idb: IdentityDb) -> None:
    report = await idb.import_register(entries(40), source="a.csv", now=NOW, full=True)
    assert (report.added, report.updated, report.unchanged, report.deactivated) == (40, 0, 0, 0)
    again = await idb.import_register(entries(40), source="b.csv", now=NOW + 1, full=True)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 40)
    # one lapse and one number gone: 2 of 40 deactivated (5%), allowed
    report = await idb.import_register(
        entries(39, lapsed=frozenset({7})), source="c.csv", now=NOW + 2, full=True
    )
    assert (report.updated, report.deactivated) == (1, 2)
    gone = await idb.registration("M00040")
    assert gone is not None and gone.status == "removed"
    # a truncated file would deactivate half the register: refused, nothing written
    with pytest.raises(ImportRefused):
        await idb.import_register(entries(20), source="cut.csv", now=NOW + 3, full=True)
    still = await idb.registration("M00030")
    assert still is not None and still.active
    # a partial update touches only what it names
    partial = [RegisterEntry("M00007", "DOCTOR 7", specialty="Cardiology")]
    report = await idb.import_register(partial, source="d.csv", now=NOW + 4, full=False)
    assert (report.updated, report.deactivated) == (1, 0)
    back = await idb.registration("M00007")
    assert back is not None and back.active
    assert (await idb.registration("M00030")) is not None


async def test_sign_in_person_and_lapse(idb: IdentityDb) -> None:
    await idb.import_register(entries(3), source="a.csv", now=NOW, full=True)
    doctor = await idb.sign_in_person(
        user="qmh:chan",
        institution="qmh",
        subject="chan",
        role="doctor",
        registration_no="M00001",
        requires_registration=True,
        now=NOW,
    )
    assert (doctor.status, doctor.registration_no, doctor.removal_pending) == (
        "active",
        "M00001",
        False,
    )
    assert await idb.lapse_unregistered(NOW) == []
    await idb.import_register(
        entries(3, lapsed=frozenset({1})), source="b.csv", now=NOW + 1, full=True, max_deactivate=1
    )
    assert await idb.lapse_unregistered(NOW + 2) == ["qmh:chan"]
    account = await idb.account("qmh:chan")
    assert account is not None and (account.status, account.removal_pending) == ("lapsed", True)
    assert [a.user for a in await idb.removal_candidates()] == ["qmh:chan"]
    with pytest.raises(AuthError) as info:
        await idb.sign_in_person(
            user="qmh:chan",
            institution="qmh",
            subject="chan",
            role="doctor",
            registration_no="M00001",
            requires_registration=True,
            now=NOW + 3,
        )
    assert info.value.reason is AuthReason.REGISTRATION_INACTIVE


async def test_sessions_rotate_and_tablets(idb: IdentityDb) -> None:
    sessions = Sessions(idb.database, refresh_ttl=100, session_ttl=1000)
    await idb.sign_in_person(
        user="qmh:ho",
        institution="qmh",
        subject="ho",
        role="nurse",
        registration_no=None,
        requires_registration=False,
        now=NOW,
    )
    issued = await sessions.start("qmh:ho", idp_sid="idp-1", now=NOW)
    assert issued.expires_at == NOW + 100
    nxt, account = await sessions.rotate(issued.refresh_token, now=NOW + 50)
    assert account.user == "qmh:ho" and nxt.family == issued.family
    with pytest.raises(AuthError) as info:
        await sessions.rotate(nxt.refresh_token, now=NOW + 151)
    assert info.value.reason is AuthReason.EXPIRED
    revoked = await sessions.revoke_idp_session("qmh", "idp-1")
    assert [r.family for r in revoked] == [issued.family]
    assert await sessions.recently_revoked(NOW) == [issued.family]

    user, credential = await sessions.enroll_tablet(institution="qmh", ward="ICU-1", now=NOW)
    tablet = await sessions.check_enrollment(credential, now=NOW + 10)
    assert (tablet.user, tablet.kind, tablet.ward) == (user, "tablet", "ICU-1")
    with pytest.raises(ValueError, match="ward"):
        await sessions.enroll_tablet(institution="qmh", ward="bed 12; drop", now=NOW)
    await sessions.deprovision(user, reason="lost", now=NOW + 20)
    with pytest.raises(AuthError) as info:
        await sessions.check_enrollment(credential, now=NOW + 30)
    assert info.value.reason is AuthReason.ACCOUNT_DISABLED


async def test_directory_search(idb: IdentityDb) -> None:
    await idb.import_register(
        [
            RegisterEntry("M00001", "CHAN Tai Man", "陳大文", "Cardiology"),
            RegisterEntry("M00002", "CHAN Siu Wai", None, "Surgery"),
            RegisterEntry("M00003", "100% REAL_NAME", None, None),
            RegisterEntry("M00004", "CHAN Lapsed", None, "Cardiology", status="lapsed"),
        ],
        source="a.csv",
        now=NOW,
        full=True,
    )
    await idb.sign_in_person(
        user="qmh:chan",
        institution="qmh",
        subject="chan",
        role="doctor",
        registration_no="M00001",
        requires_registration=True,
        now=NOW,
    )
    db = idb.database
    assert [e.registration_no for e in await search(db, q="chan")] == ["M00002", "M00001"]
    [chan] = await search(db, q="大文")
    assert chan.accounts == (("qmh:chan", "qmh"),)
    assert [e.registration_no for e in await search(db, q="m00002")] == ["M00002"]
    assert [e.registration_no for e in await search(db, specialty="cardio")] == ["M00001"]
    assert [e.registration_no for e in await search(db, institution="qmh")] == ["M00001"]
    assert [e.registration_no for e in await search(db, q="0%")] == ["M00003"]
    assert await search(db, q="_e") == []  # wildcards are literal
    with pytest.raises(ValueError):
        await search(db)
    with pytest.raises(ValueError):
        await search(db, q="c")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="medrelay")
    add_register_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_register_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    csv_path = tmp_path / "register.csv"
    csv_path.write_text(CSV, encoding="utf-8")
    assert _cli(["register", "import", str(csv_path), *data]) == 0
    out = capsys.readouterr()
    assert "3 added" in out.out and "skipped line" in out.err
    csv_path.write_text("registration_no,name\nM15833,CHAN Tai Man\n", encoding="utf-8")
    assert _cli(["register", "import", str(csv_path), *data]) == 1  # would deactivate 1 of 2
    assert "--force" in capsys.readouterr().err
    assert _cli(["register", "import", str(csv_path), "--partial", *data]) == 0
    assert _cli(["register", "enroll-tablet", "--institution", "qmh", "--ward", "7B", *data]) == 0
    out = capsys.readouterr().out
    user = out.split("tablet account: ")[1].split()[0]
    assert "mrenr1." in out and user.startswith("tablet:qmh:7B:")
    assert _cli(["register", "deprovision", user, *data]) == 0
    assert "deprovisioned" in capsys.readouterr().out
    assert _cli(["register", "deprovision", "nobody", *data]) == 1
    bad_ward = ["register", "enroll-tablet", "--institution", "qmh", "--ward", "a b", *data]
    assert _cli(bad_ward) == 2
    institutions = tmp_path / "institutions.json"
    institutions.write_text(
        '{"institution": [{"id": "qmh", "name": "Q", "issuer": "https://q", "audience": "m",'
        ' "jwks": {"keys": []}}]}'
    )
    assert _cli(["register", "recheck", "--institutions", str(institutions), *data]) == 0
    assert f"removed {user}" not in capsys.readouterr().out  # a tablet in no room
    key = tmp_path / "data" / "institutions" / "qmh" / "external_sender.key"
    assert key.stat().st_mode & 0o777 == 0o600
