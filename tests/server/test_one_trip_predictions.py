"""What a node remembers to plan one-trip batches (``store/onetrip.py``, ``Predictions``):
bounded, kept only for rooms and senders it read, moved on by the commits it hears and by
the state a missed call answers."""

from __future__ import annotations

from typing import Any

import pytest
from medrelay_server.store.onetrip import Predictions, _answered


def _send(room: str, user: str = "alice") -> dict[str, Any]:
    return {"room": room, "user": user}


def _learned(p: Predictions, room: str, last_seq: int = 5, **roles: str) -> None:
    members = {(room, user): role for user, role in (roles or {"alice": "owner"}).items()}
    p.learn({room: [last_seq, 1, False]}, members)


def test_only_rooms_and_members_read_are_predicted() -> None:
    p = Predictions()
    assert p.lookup([_send("r")]) is None
    _learned(p, "r", alice="owner", bob="member")
    assert p.lookup([_send("r"), _send("r", "bob")]) == (
        {"r": [5, 1, False]},
        {("r", "alice"): "owner", ("r", "bob"): "member"},
    )
    assert p.lookup([_send("r"), _send("r", "mallory")]) is None
    assert p.lookup([_send("r"), _send("other")]) is None


def test_a_read_replaces_the_rooms_members() -> None:
    p = Predictions()
    _learned(p, "r", alice="owner", bob="member")
    _learned(p, "r", 6, alice="owner")  # bob was removed
    assert p.lookup([_send("r", "bob")]) is None
    assert p.lookup([_send("r")]) == ({"r": [6, 1, False]}, {("r", "alice"): "owner"})


def test_an_older_read_does_not_move_the_seq_back() -> None:
    p = Predictions()
    _learned(p, "r", 9)
    _learned(p, "r", 7)
    assert p.lookup([_send("r")]) == ({"r": [9, 1, False]}, {("r", "alice"): "owner"})


def test_a_heard_commit_moves_the_seq_on() -> None:
    """A commit heard in a room (this node's or another's NOTIFY) moves the predicted seq
    on and keeps the epoch, pending flag and roles; an older one changes nothing."""
    p = Predictions()
    _learned(p, "r", 5)
    p.heard("r", 5)  # nothing new
    assert p.lookup([_send("r")]) == ({"r": [5, 1, False]}, {("r", "alice"): "owner"})
    p.heard("r", 9)
    p.heard("r", 7)  # heard late
    assert p.lookup([_send("r")]) == ({"r": [9, 1, False]}, {("r", "alice"): "owner"})
    p.sent({"r": 8})  # this node's own call, whose NOTIFY came first
    assert p.lookup([_send("r")]) == ({"r": [9, 1, False]}, {("r", "alice"): "owner"})
    p.heard("unknown", 3)
    assert p.lookup([_send("unknown")]) is None


def test_a_missed_call_answers_the_rooms_state() -> None:
    """The state a call answered replaces the prediction and keeps the roles; a room it
    does not know stays unknown; a later seq heard before the answer arrived is kept."""
    p = Predictions()
    _learned(p, "r", 5, alice="owner", bob="member")
    p.restate({"r": (6, 2, True), "other": (1, 1, False)})
    assert p.lookup([_send("r", "bob")]) == ({"r": [6, 2, True]}, {("r", "bob"): "member"})
    assert p.lookup([_send("other")]) is None
    p.heard("r", 8)  # a commit after the call's read, heard before its answer
    p.restate({"r": (7, 2, False)})
    assert p.lookup([_send("r")]) == ({"r": [8, 2, True]}, {("r", "alice"): "owner"})
    p.moved(["r"])  # unknown: any answer is news
    p.restate({"r": (3, 1, False)})
    assert p.lookup([_send("r")]) == ({"r": [3, 1, False]}, {("r", "alice"): "owner"})


def test_an_answer_missing_a_room_is_no_state() -> None:
    """A room whose row is gone leaves the answered arrays short: the call's answer is
    then no state at all (the rooms are read the usual way)."""
    assert _answered(["a", "b"], (1, [5], [1], [False])) is None
    assert _answered(["a"], (4, None, None, None)) is None
    assert _answered(["a", "b"], (1, [5, 9], [1, 2], [False, True])) == {
        "a": (5, 1, False),
        "b": (9, 2, True),
    }


def test_a_moved_room_is_read_again() -> None:
    p = Predictions()
    _learned(p, "r")
    p.moved(["r"])
    p.heard("r", 9)  # a room whose state is unknown stays unknown
    assert p.lookup([_send("r")]) is None
    _learned(p, "r", 6)
    assert p.lookup([_send("r")]) is not None


def test_moved_and_forgotten_rooms() -> None:
    p = Predictions()
    _learned(p, "a")
    _learned(p, "b")
    p.moved(["a"])
    p.forget(["b"])
    assert p.lookup([_send("a")]) is None and p.lookup([_send("b")]) is None
    assert len(p) == 1  # "a" keeps its roles for the next read


def test_bounded_least_recently_used_out() -> None:
    p = Predictions(max_rooms=3)
    for room in "abc":
        _learned(p, room)
    assert p.lookup([_send("a")]) is not None  # "a" used: "b" is now the oldest
    _learned(p, "d")
    assert len(p) == 3
    assert p.lookup([_send("b")]) is None
    assert all(p.lookup([_send(r)]) is not None for r in "acd")
    with pytest.raises(ValueError):
        Predictions(max_rooms=0)


def test_bounded_by_members_in_all() -> None:
    """Large rooms leave fewer rooms: the roles remembered stay within ``max_members``
    (the newest room is kept even if it alone is larger)."""
    p = Predictions(max_members=10)
    big = {f"u{i}": "member" for i in range(4)}
    for room in "abc":
        _learned(p, room, **big)
    assert len(p) == 2 and p.members == 8
    assert p.lookup([_send("a", "u0")]) is None
    _learned(p, "b", alice="owner")  # fewer members now
    assert p.members == 5
    p.forget(["b", "c"])
    assert len(p) == 0 and p.members == 0
    _learned(p, "huge", **{f"u{i}": "member" for i in range(12)})
    assert len(p) == 1 and p.members == 12
    with pytest.raises(ValueError):
        Predictions(max_members=0)
