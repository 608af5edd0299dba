"""Role predicates: every cell of the table in the policy module docstring."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from medrelay_protocol import policy
from medrelay_protocol.policy import DEVICE, MEMBER, OBSERVER, OWNER, ROLES

ONE_ROLE: dict[Callable[[str], bool], set[str]] = {
    policy.may_post: {OWNER, MEMBER, DEVICE},
    policy.may_summon: {OWNER, MEMBER, DEVICE},
    policy.may_receive: {OWNER, MEMBER, OBSERVER},
    policy.needs_epoch_key: {OWNER, MEMBER, OBSERVER, DEVICE},
    policy.may_read_history: {OWNER, MEMBER, OBSERVER},
    policy.may_commit_epoch: {OWNER, MEMBER},
    policy.may_change_role: {OWNER},
    policy.may_set_history: {OWNER},
}


@pytest.mark.parametrize("predicate", list(ONE_ROLE), ids=lambda f: f.__name__)
@pytest.mark.parametrize("role", [*ROLES, "admin", "", "OWNER"])
def test_single_role_predicates(predicate: Callable[[str], bool], role: str) -> None:
    assert predicate(role) is (role in ONE_ROLE[predicate])


def test_devices_post_but_neither_read_history_nor_receive_nor_commit() -> None:
    assert policy.may_post(DEVICE) and policy.needs_epoch_key(DEVICE)
    assert not policy.may_receive(DEVICE)
    assert not policy.may_read_history(DEVICE)
    assert not policy.may_commit_epoch(DEVICE)


@pytest.mark.parametrize("new_role", ROLES)
def test_owner_may_add_any_role(new_role: str) -> None:
    assert policy.may_add(OWNER, new_role)


@pytest.mark.parametrize(
    ("new_role", "allowed"), [(OWNER, False), (MEMBER, True), (OBSERVER, True), (DEVICE, False)]
)
def test_member_may_add_only_members_and_observers(new_role: str, allowed: bool) -> None:
    assert policy.may_add(MEMBER, new_role) is allowed


@pytest.mark.parametrize("signer", [OBSERVER, DEVICE, "stranger"])
@pytest.mark.parametrize("new_role", ROLES)
def test_others_may_add_nobody(signer: str, new_role: str) -> None:
    assert not policy.may_add(signer, new_role)


def test_nobody_may_add_an_unknown_role() -> None:
    assert not policy.may_add(OWNER, "superuser")


@pytest.mark.parametrize("signer", ROLES)
@pytest.mark.parametrize("target", ROLES)
def test_only_owners_remove(signer: str, target: str) -> None:
    assert policy.may_remove(signer, target) is (signer == OWNER)


def test_remove_of_unknown_role_is_refused() -> None:
    assert not policy.may_remove(OWNER, "ghost")


def test_is_role() -> None:
    assert all(policy.is_role(r) for r in ROLES)
    assert not policy.is_role("admin")
    assert not policy.is_role(1)
    assert not policy.is_role(None)
