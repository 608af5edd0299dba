"""Who is in which room: the same topology is built for medrelay (with identities and room
plans for set-up) and for the bare relay (group names only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .loadgen import MemberSpec, RoomSpec
from .mr import Identity
from .population import RoomPlan

CONSULT_BODY = 1024  # pad bucket of a 1 KiB encrypted envelope
VITALS_BODY = 256  # one set of observations


@dataclass
class Sizes:
    consult10_rooms: int
    consult50_rooms: int
    wards: int
    tablets_per_ward: int
    clinicians_per_ward: int
    removals: int
    steady_senders: int = 3


@dataclass
class Topology:
    medrelay: bool
    rooms: list[RoomSpec] = field(default_factory=list)
    members: list[MemberSpec] = field(default_factory=list)
    sets: dict[str, list[int]] = field(default_factory=dict)  # name -> member indexes
    room_sets: dict[str, list[int]] = field(default_factory=dict)  # name -> room indexes
    receivers: dict[int, int] = field(default_factory=dict)  # room -> receiving devices
    plans: list[RoomPlan] = field(default_factory=list)
    idents: dict[str, Identity] = field(default_factory=dict)
    revoker: str = ""

    def _room(self, name: str, set_name: str) -> int:
        self.rooms.append(RoomSpec(name))
        idx = len(self.rooms) - 1
        self.room_sets.setdefault(set_name, []).append(idx)
        return idx

    def _member(
        self,
        user: str,
        room: int,
        set_name: str,
        *,
        kind: str = "person",
        sends: bool = True,
        receives: bool = True,
        watch: bool = False,
    ) -> int:
        ident = None
        if self.medrelay:
            ident = self.idents[user] = Identity.new(user, kind)
        self.members.append(
            MemberSpec(user, [room], sends=sends, receives=receives, ident=ident, watch=watch)
        )
        idx = len(self.members) - 1
        self.sets.setdefault(set_name, []).append(idx)
        if receives:
            self.receivers[room] = self.receivers.get(room, 0) + 1
        return idx


def build(
    sizes: Sizes, *, medrelay: bool, consult: bool = True, extra: bool = True, prefix: str = ""
) -> Topology:
    """``consult``: the consult rooms (every database); ``extra``: wards and the revocation
    room (the primary database only). ``prefix`` goes before every consult room and user
    name: systems that share one Redis (``cluster``) must not share a broker topic, and
    medrelay's topics are named after rooms and users."""
    topo = Topology(medrelay)
    if consult:
        for size, count in ((10, sizes.consult10_rooms), (50, sizes.consult50_rooms)):
            for g in range(count):
                name = f"{prefix}consult{size}-{g}"
                room = topo._room(name, f"consult{size}")
                users = [f"{prefix}c{size}-{g}-{i}" for i in range(size)]
                for u in users:
                    topo._member(u, room, f"consult{size}")
                topo.plans.append(RoomPlan(name, users[0], [(u, "member") for u in users[1:]]))
    if not extra:
        return topo
    for w in range(sizes.wards):
        name = f"ward-{w}"
        room = topo._room(name, "wards")
        clinicians = [f"nurse-{w}-{j}" for j in range(sizes.clinicians_per_ward)]
        tablets = [f"bed-{w}-{k}" for k in range(sizes.tablets_per_ward)]
        for u in clinicians:
            topo._member(u, room, "clinicians", sends=False)
        for u in tablets:
            topo._member(u, room, "tablets", kind="tablet", receives=False)
        topo.plans.append(
            RoomPlan(
                name,
                clinicians[0],
                [(u, "member") for u in clinicians[1:]] + [(u, "device") for u in tablets],
            )
        )
    room = topo._room("revocation", "revocation")
    topo.revoker = "rv-owner"
    if medrelay:
        # the owner removes members with the real client, from the coordinator
        topo.idents[topo.revoker] = Identity.new(topo.revoker)
    else:
        topo._member(topo.revoker, room, "kicker", sends=False, receives=False)
    steady = [f"rv-steady-{i}" for i in range(sizes.steady_senders)]
    removable = [f"rv-gone-{k}" for k in range(sizes.removals)]
    for u in steady:
        topo._member(u, room, "steady")
    for u in removable:
        topo._member(u, room, "removable", sends=False, watch=True)
    topo.plans.append(
        RoomPlan("revocation", topo.revoker, [(u, "member") for u in steady + removable])
    )
    return topo
