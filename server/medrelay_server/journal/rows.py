"""Reading the journal's tables (node registry, chains, anchors and their leaves), for the
anchor service, the verifier, retention and the audit CLI. Each function takes an open
connection inside the caller's transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..store import schema as t
from ..store.audit import entry_of
from .anchor import Head
from .chain import ChainEntry

PAGE = 5000


@dataclass(frozen=True, slots=True)
class NodeRow:
    node: str
    token: int
    holder: str | None
    lease_until: int
    registered_at: int
    head_idx: int
    head_hash: bytes
    base_idx: int
    base_hash: bytes

    def head(self) -> Head:
        return Head(self.node, self.token, self.registered_at, self.head_idx, self.head_hash)


@dataclass(frozen=True, slots=True)
class AnchorRow:
    anchor_no: int
    ts: int
    tree_size: int
    root: bytes
    frontier: bytes
    key_id: str | None
    signature: bytes | None
    published_at: int | None


def _node_of(row: Any) -> NodeRow:
    return NodeRow(
        node=row.node,
        token=row.token,
        holder=row.holder,
        lease_until=row.lease_until,
        registered_at=row.registered_at,
        head_idx=row.head_idx,
        head_hash=bytes(row.head_hash),
        base_idx=row.base_idx,
        base_hash=bytes(row.base_hash),
    )


def _anchor_of(row: Any) -> AnchorRow:
    return AnchorRow(
        anchor_no=row.anchor_no,
        ts=row.ts,
        tree_size=row.tree_size,
        root=bytes(row.root),
        frontier=bytes(row.frontier),
        key_id=row.key_id,
        signature=None if row.signature is None else bytes(row.signature),
        published_at=row.published_at,
    )


async def nodes(conn: AsyncConnection) -> list[NodeRow]:
    query = sa.select(t.journal_nodes).order_by(t.journal_nodes.c.node)
    return [_node_of(r) for r in await conn.execute(query)]


async def entries(conn: AsyncConnection, node: str) -> AsyncIterator[ChainEntry]:
    """The node's chain in index order, read a page at a time."""
    a = t.audit.c
    after: int | None = None
    while True:
        query = sa.select(t.audit).where(a.node == node).order_by(a.idx).limit(PAGE)
        if after is not None:
            query = query.where(a.idx > after)
        rows = (await conn.execute(query)).all()
        for row in rows:
            yield entry_of(row)
        if len(rows) < PAGE:
            return
        after = rows[-1].idx


async def chained_nodes(conn: AsyncConnection) -> list[str]:
    """Every node id that has records, registered or not."""
    a = t.audit.c
    query = sa.select(a.node).where(a.node.is_not(None)).distinct().order_by(a.node)
    return list((await conn.execute(query)).scalars())


async def unchained_count(conn: AsyncConnection) -> int:
    query = sa.select(sa.func.count()).select_from(t.audit).where(t.audit.c.node.is_(None))
    return int((await conn.execute(query)).scalar_one())


async def anchors(conn: AsyncConnection, *, unpublished: bool = False) -> list[AnchorRow]:
    j = t.journal_anchors.c
    query = sa.select(t.journal_anchors).order_by(j.anchor_no)
    if unpublished:
        query = query.where(j.published_at.is_(None))
    return [_anchor_of(r) for r in await conn.execute(query)]


async def anchor(conn: AsyncConnection, anchor_no: int) -> AnchorRow | None:
    j = t.journal_anchors.c
    row = (
        await conn.execute(sa.select(t.journal_anchors).where(j.anchor_no == anchor_no))
    ).one_or_none()
    return None if row is None else _anchor_of(row)


async def last_anchor(conn: AsyncConnection) -> AnchorRow | None:
    j = t.journal_anchors.c
    query = sa.select(t.journal_anchors).order_by(j.anchor_no.desc()).limit(1)
    row = (await conn.execute(query)).one_or_none()
    return None if row is None else _anchor_of(row)


async def leaves_of(conn: AsyncConnection, anchor_no: int) -> list[Head]:
    """The heads anchor ``anchor_no`` appended, in leaf order."""
    j = t.journal_leaves.c
    query = sa.select(t.journal_leaves).where(j.anchor_no == anchor_no).order_by(j.pos)
    return [
        Head(r.node, r.token, r.registered_at, r.head_idx, bytes(r.head_hash))
        for r in await conn.execute(query)
    ]
