"""Who may do what in a room: pure predicates over room roles.

The roster (:mod:`medrelay_protocol.roster`) asks these questions when it verifies a signed
membership change, and the server asks the same ones on every request, so clients and server
can never disagree about authority.

======================  =====  ======  ========  ======
action                  owner  member  observer  device
======================  =====  ======  ========  ======
post messages           yes    yes     no        yes
summon a specialist     yes    yes     no        yes
receive room messages   yes    yes     yes       no
hold the epoch key      yes    yes     yes       yes
read history            yes    yes     yes       no
commit an epoch         yes    yes     no        no
add a member            any    member,  no       no
                        role   observer
remove a member         any    no      no        no
change a role           yes    no      no        no
set history visibility  yes    no      no        no
leave (self)            yes    yes     yes       yes
======================  =====  ======  ========  ======

Decisions worth stating:

* ``device`` is the role of a bedside tablet account (bound to a ward). It pushes vitals and
  raises summons, so it must hold the current epoch key (:func:`needs_epoch_key`), but it is
  not delivered room messages (:func:`may_receive`): a ward tablet is a shared screen and
  clinical conversation must not land on it. It still receives the membership events and
  rekey manifests (with its own wrap) it needs to keep posting, and the server's acks of its
  own sends. It may not read history or commit epochs (ARCHITECTURE §5.5): after a removal a
  tablet waits for a member device to commit the new epoch; urgent pages need no key.
* Observers hold keys and read, but do not commit epochs: committing decides who gets the
  next key, which is a member's responsibility.
* Leaving is always allowed and is not a "remove"; whether the last owner may leave is a
  roster rule (it may not), not a role rule.

Unknown roles are refused everywhere (every predicate returns ``False``).
"""

from __future__ import annotations

from typing import Final

OWNER: Final = "owner"
MEMBER: Final = "member"
OBSERVER: Final = "observer"
DEVICE: Final = "device"
ROLES: Final[tuple[str, ...]] = (OWNER, MEMBER, OBSERVER, DEVICE)

_POSTERS: Final = frozenset({OWNER, MEMBER, DEVICE})
_READERS: Final = frozenset({OWNER, MEMBER, OBSERVER})
_COMMITTERS: Final = frozenset({OWNER, MEMBER})
_MEMBER_MAY_ADD: Final = frozenset({MEMBER, OBSERVER})


def is_role(value: object) -> bool:
    return isinstance(value, str) and value in ROLES


def may_post(role: str) -> bool:
    return role in _POSTERS


def may_summon(role: str) -> bool:
    return role in _POSTERS


def may_receive(role: str) -> bool:
    """Whether room message envelopes are delivered to this role's devices."""
    return role in _READERS


def needs_epoch_key(role: str) -> bool:
    """Whether rekeys must wrap the epoch secret to this role's devices (everyone who posts
    or reads)."""
    return role in _POSTERS or role in _READERS


def may_read_history(role: str) -> bool:
    return role in _READERS


def may_commit_epoch(role: str) -> bool:
    return role in _COMMITTERS


def may_add(signer_role: str, new_role: str) -> bool:
    if not is_role(new_role):
        return False
    if signer_role == OWNER:
        return True
    return signer_role == MEMBER and new_role in _MEMBER_MAY_ADD


def may_remove(signer_role: str, target_role: str) -> bool:
    """Removing someone else; leaving is a separate action that is always allowed."""
    return signer_role == OWNER and is_role(target_role)


def may_change_role(signer_role: str) -> bool:
    return signer_role == OWNER


def may_set_history(role: str) -> bool:
    return role == OWNER
