"""``audit verify``: recompute every chain and every anchor, against the witness.

1. The witness's anchors (trusted only as far as they check out): each signed by the pinned
   key, numbered 1, 2, 3, ..., each tree exactly the previous plus the heads it lists (the
   compact range is replayed) and its RFC 9162 consistency proof valid.
2. The database's copy of the anchors and leaves must equal the witnessed ones.
3. Every node the witness ever saw must still be registered, with the same registration.
4. Each chain, record by record from its base: no gap in the indexes, each hash equal to
   the recomputed one, each record linking to the one before, and, where the witness holds
   a head for an index, the same hash there; the chain must reach the newest witnessed
   head, and the registry's head must be its last record. A retention cut's base must be a
   witnessed head.

The first failing record of each chain is named with a diagnosis (edited, deleted,
inserted, moved, rewritten, truncated); a chain is not walked past its first failure, where
everything after would fail for the same reason. Records after the newest witnessed head
are protected by the chain alone until the next anchor; the report counts them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from ..store.engine import Database
from . import rows
from .anchor import Anchor, AnchorLog, AnchorRejected, Head, verify_signature
from .chain import ChainEntry

WINDOW = 64


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    message: str
    node: str | None = None
    idx: int | None = None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(slots=True)
class Report:
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nodes: int = 0
    records: int = 0
    anchors: int = 0
    unwitnessed: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        """The first bad record (the first problem naming one), else the first problem."""
        named = [p for p in self.problems if p.idx is not None]
        candidates = named or self.problems
        return candidates[0] if candidates else None


@dataclass(slots=True)
class _Witnessed:
    anchors: list[Anchor]
    heads: dict[str, list[tuple[int, Head]]]  # node -> [(anchor_no, head)] in anchor order


async def verify(db: Database, witnessed: Sequence[Anchor], public_key: bytes) -> Report:
    report = Report()
    trusted = _check_witness(witnessed, public_key, report)
    async with db.snapshot() as conn:
        await _check_anchor_tables(conn, trusted, report)
        registry = {n.node: n for n in await rows.nodes(conn)}
        await _check_registry(registry, trusted, report)
        names = sorted(set(registry) | set(await rows.chained_nodes(conn)))
        report.nodes = len(names)
        for name in names:
            node = registry.get(name)
            if node is None:
                report.problems.append(
                    Problem(
                        "UNREGISTERED",
                        f"records of node {name!r}, which is not in the registry",
                        name,
                    )
                )
                continue
            await _ChainWalk(node, trusted.heads.get(name, []), report).run(
                rows.entries(conn, name)
            )
        unchained = await rows.unchained_count(conn)
        if unchained:
            report.problems.append(
                Problem("UNCHAINED", f"{unchained} journal rows belong to no chain (inserted)")
            )
    if not witnessed:
        report.notes.append("the witness holds no anchor: only the chains themselves were checked")
    return report


def _check_witness(anchors: Sequence[Anchor], public_key: bytes, report: Report) -> _Witnessed:
    log = AnchorLog()
    trusted: list[Anchor] = []
    heads: dict[str, list[tuple[int, Head]]] = {}
    for anchor in anchors:
        try:
            verify_signature(public_key, anchor)
            if not log.accept(anchor):
                raise AnchorRejected(f"anchor #{anchor.anchor_no} appears twice")
        except AnchorRejected as exc:
            report.problems.append(Problem("WITNESS", f"{exc}; later anchors are not trusted"))
            break
        trusted.append(anchor)
        for head in anchor.heads:
            heads.setdefault(head.node, []).append((anchor.anchor_no, head))
    report.anchors = len(trusted)
    return _Witnessed(trusted, heads)


async def _check_anchor_tables(conn: AsyncConnection, w: _Witnessed, report: Report) -> None:
    for anchor in w.anchors:
        row = await rows.anchor(conn, anchor.anchor_no)
        if row is None:
            report.problems.append(
                Problem(
                    "ANCHOR_MISSING", f"witnessed anchor #{anchor.anchor_no} is not in the journal"
                )
            )
        elif (row.tree_size, row.root) != (anchor.tree_size, anchor.root) or tuple(
            await rows.leaves_of(conn, anchor.anchor_no)
        ) != anchor.heads:
            report.problems.append(
                Problem(
                    "ANCHOR_MISMATCH",
                    f"anchor #{anchor.anchor_no} in the journal differs from the witness's",
                )
            )
    last = await rows.last_anchor(conn)
    newest = w.anchors[-1].anchor_no if w.anchors else 0
    if last is not None and last.anchor_no > newest:
        report.notes.append(
            f"anchors #{newest + 1}..#{last.anchor_no} are not witnessed yet (or were refused)"
        )


async def _check_registry(registry: dict[str, rows.NodeRow], w: _Witnessed, report: Report) -> None:
    for name, seen in sorted(w.heads.items()):
        anchor_no, head = seen[-1]
        node = registry.get(name)
        if node is None:
            report.problems.append(
                Problem(
                    "NODE_MISSING",
                    f"node {name!r} (head #{head.head_idx} witnessed in anchor #{anchor_no}) "
                    "is gone from the registry: its whole chain was deleted",
                    name,
                    head.head_idx if head.head_idx else None,
                )
            )
        elif node.registered_at != head.registered_at or node.token < head.token:
            report.problems.append(
                Problem(
                    "REGISTRY", f"registry row of {name!r} differs from anchor #{anchor_no}", name
                )
            )


class _ChainWalk:
    def __init__(self, node: rows.NodeRow, heads: list[tuple[int, Head]], report: Report) -> None:
        self.node = node
        self.name = node.node
        self.report = report
        self.witnessed = {
            h.head_idx: (n, h.head_hash) for n, h in heads if h.head_idx > node.base_idx
        }
        self.top = max((h.head_idx for _, h in heads), default=0)
        self.recent: deque[ChainEntry] = deque(maxlen=WINDOW)
        if node.base_idx and not any(
            h.head_idx == node.base_idx and h.head_hash == node.base_hash for _, h in heads
        ):
            self._problem(
                "BASE_UNANCHORED",
                node.base_idx,
                "the chain's base (retention cut) is not a witnessed head",
            )

    def _problem(self, kind: str, idx: int | None, message: str) -> None:
        where = f"{self.name}#{idx}: " if idx is not None else f"{self.name}: "
        self.report.problems.append(Problem(kind, where + message, self.name, idx))

    async def run(self, entries: AsyncIterator[ChainEntry]) -> None:
        expected, prev = self.node.base_idx + 1, self.node.base_hash
        async for e in entries:
            self.report.records += 1
            if e.idx != expected:
                self._gap(e, expected)
                return
            if e.recomputed() != e.hash:
                await self._diagnose(e, entries)
                return
            if e.prev_hash != prev:
                self._problem("EDITED", e.idx - 1, f"rewritten: #{e.idx} links to another hash")
                return
            seen = self.witnessed.get(e.idx)
            if seen is not None and seen[1] != e.hash:
                self._problem(
                    "REWRITTEN",
                    e.idx,
                    f"differs from the head witnessed in anchor #{seen[0]}: the journal was "
                    "rebuilt or rewritten at or before this record",
                )
                return
            self.recent.append(e)
            prev, expected = e.hash, e.idx + 1
        self._end(expected - 1, prev)

    def _end(self, last: int, last_hash: bytes) -> None:
        if self.top > last:
            self._problem(
                "TRUNCATED",
                last + 1,
                f"the chain ends at #{last} but the witness holds its head at #{self.top}",
            )
        elif self.node.head_idx > last:
            self._problem(
                "TRUNCATED",
                last + 1,
                f"the chain ends at #{last} but its head is #{self.node.head_idx}",
            )
        elif (self.node.head_idx, self.node.head_hash) != (last, last_hash):
            self._problem("HEAD_MISMATCH", last, "the registry's chain head is not the last record")
        else:
            self.report.unwitnessed += max(0, last - max(self.top, self.node.base_idx))

    def _gap(self, e: ChainEntry, expected: int) -> None:
        if e.idx < expected:
            self._problem("INSERTED", e.idx, "a record at or below the chain's base or a duplicate")
        else:
            span = f"#{expected}" if e.idx == expected + 1 else f"#{expected}..#{e.idx - 1}"
            self._problem("MISSING", expected, f"{span} deleted (the next record is #{e.idx})")

    async def _diagnose(self, e: ChainEntry, entries: AsyncIterator[ChainEntry]) -> None:
        ahead: list[ChainEntry] = []
        async for nxt in entries:
            ahead.append(nxt)
            if len(ahead) >= WINDOW:
                break
        window = {x.hash: x.idx for x in [*self.recent, *ahead]}
        written = _written_as(e)
        p = e.idx
        if written is None:
            self._problem("EDITED", p, "the record does not match its hash (edited)")
        elif written == p - 1 and len(self.recent) >= 2 and e.prev_hash == self.recent[-2].hash:
            self._problem(
                "INSERTED",
                p - 1,
                f"inserted: #{p} (written as #{written}) links past it to #{p - 2}",
            )
        elif written > p and e.prev_hash not in window:
            self._problem(
                "MISSING", p, f"the record written as #{p} was deleted and later ones renumbered"
            )
        else:
            self._problem(
                "REORDERED", p, f"holds the record written as #{written} (records reordered)"
            )


def _written_as(e: ChainEntry) -> int | None:
    """The index this record's hash was computed for, if it is near another position."""
    for idx in range(max(1, e.idx - WINDOW), e.idx + WINDOW + 1):
        if idx != e.idx and e.recomputed(idx) == e.hash:
            return idx
    return None
