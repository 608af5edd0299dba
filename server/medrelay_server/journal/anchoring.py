"""The anchor service: periodically (and on demand) appends every node's chain head to the
anchor log, has the tree head signed by the signer and pushes it to every witness.

Three steps, so that no database lock is held while a remote signer or witness answers:

1. one transaction reads the node registry (one consistent snapshot: each head was written
   in the same transaction as its records), appends one leaf per node to
   ``journal_leaves`` and records the new tree head (size, root, compact range) in
   ``journal_anchors``. Nothing is appended when no head moved since the last anchor,
   unless forced. Two nodes anchoring at once: the second loses the primary key race and
   does nothing.
2. every anchor not yet signed is signed, in order, with the consistency proof from the
   previous tree computed from that tree's compact range and the new leaves;
3. every anchor not yet published goes to every witness, in order, and is marked published
   when all took it. A failure leaves it pending for the next run (witnesses are
   idempotent), so a SIEM outage delays anchors but loses none.

``run`` also renews this node's lease, since an idle node writes nothing that would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from ..clock import Clock
from ..store import schema as t
from ..store.sql import SqlStore
from . import rows
from .anchor import Anchor, Head, leaf_hash
from .merkle import EMPTY_ROOT, Frontier, consistency_proof
from .signer import FileKeySigner, Signer
from .witness import FileWitness, Witness, default_witness_path

log = logging.getLogger(__name__)


class AnchorService:
    def __init__(
        self,
        store: SqlStore,
        signer: Signer,
        witnesses: Sequence[Witness],
        clock: Clock,
        *,
        interval: float = 60.0,
    ) -> None:
        self._store = store
        self._signer = signer
        self._witnesses = list(witnesses)
        self._clock = clock
        self._interval = interval
        self._lock = asyncio.Lock()
        self.published = asyncio.Event()
        """Set whenever an anchor reached every witness."""

    @classmethod
    def embedded(
        cls,
        store: SqlStore,
        data_dir: Path,
        clock: Clock,
        *,
        interval: float = 60.0,
        extra_witnesses: Sequence[Witness] = (),
    ) -> AnchorService:
        """The embedded default: the file-key signer in ``<data_dir>/anchor-signer/`` and
        the witness file beside the data directory, plus e.g. a ``SyslogWitness``."""
        signer = FileKeySigner.in_data_dir(data_dir)
        witness = FileWitness(default_witness_path(data_dir), signer.public_key())
        return cls(store, signer, [witness, *extra_witnesses], clock, interval=interval)

    async def anchor_now(self, *, force: bool = False) -> Anchor | None:
        """Anchor the current heads (if any moved, or ``force``), then sign and publish
        every pending anchor. Returns the newest anchor published, or None. Raises the
        first witness failure after trying every witness."""
        async with self._lock:
            await self._create(force=force)
            return await self._publish_pending()

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set: renew the lease, anchor, wait ``interval``. Errors are
        logged and retried on the next round; a fenced node stops anchoring."""
        while not stop.is_set():
            try:
                await self._store.renew_lease()
                await self.anchor_now()
            except Exception:
                log.exception("anchoring failed; retrying in %.0f s", self._interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)

    async def _create(self, *, force: bool) -> None:
        db = self._store.database
        try:
            async with db.write() as conn:
                last = await rows.last_anchor(conn)
                heads = [n.head() for n in await rows.nodes(conn)]
                if not heads:
                    return
                if last is not None and not force:
                    if await rows.leaves_of(conn, last.anchor_no) == heads:
                        return
                number = 1 if last is None else last.anchor_no + 1
                frontier = (
                    Frontier() if last is None else Frontier.unpack(last.tree_size, last.frontier)
                )
                start = frontier.size
                for head in heads:
                    frontier.append(leaf_hash(number, head))
                await conn.execute(
                    sa.insert(t.journal_leaves),
                    [_leaf_row(start + i, number, h) for i, h in enumerate(heads)],
                )
                await conn.execute(
                    sa.insert(t.journal_anchors).values(
                        anchor_no=number,
                        ts=self._clock.now(),
                        tree_size=frontier.size,
                        root=frontier.root(),
                        frontier=frontier.pack(),
                    )
                )
        except sa_exc.IntegrityError:
            log.info("another node created this anchor first")

    async def _publish_pending(self) -> Anchor | None:
        db = self._store.database
        async with db.read() as conn:
            pending = await rows.anchors(conn, unpublished=True)
        published = None
        for row in pending:
            anchor = await self._build(row)
            if row.signature is None:
                signature = await self._signer.sign(anchor)
                anchor = _with_signature(anchor, self._signer.key_id, signature)
                async with db.write() as conn:
                    await _update_anchor(
                        conn, row.anchor_no, key_id=anchor.key_id, signature=signature
                    )
            errors: list[Exception] = []
            for witness in self._witnesses:
                try:
                    await witness.publish(anchor)
                except Exception as exc:
                    log.warning("witness %r refused anchor #%d: %s", witness, row.anchor_no, exc)
                    errors.append(exc)
            if errors:
                raise errors[0]
            async with db.write() as conn:
                await _update_anchor(conn, row.anchor_no, published_at=self._clock.now())
            published = anchor
            self.published.set()
        return published

    async def _build(self, row: rows.AnchorRow) -> Anchor:
        async with self._store.database.read() as conn:
            heads = await rows.leaves_of(conn, row.anchor_no)
            prev = await rows.anchor(conn, row.anchor_no - 1)
        prev_size = 0 if prev is None else prev.tree_size
        proof: list[bytes] = []
        if prev is not None and prev_size:
            new_leaves = [leaf_hash(row.anchor_no, h) for h in heads]
            mth = Frontier.unpack(prev_size, prev.frontier).source(new_leaves)
            proof = consistency_proof(prev_size, row.tree_size, mth)
        return Anchor(
            anchor_no=row.anchor_no,
            ts=row.ts,
            tree_size=row.tree_size,
            root=row.root,
            prev_size=prev_size,
            prev_root=EMPTY_ROOT if prev is None else prev.root,
            heads=tuple(heads),
            consistency=tuple(proof),
            key_id=row.key_id or "",
            signature=row.signature or b"",
        )


def _with_signature(anchor: Anchor, key_id: str, signature: bytes) -> Anchor:
    return dataclasses.replace(anchor, key_id=key_id, signature=signature)


def _leaf_row(pos: int, anchor_no: int, head: Head) -> dict[str, object]:
    return {
        "pos": pos,
        "anchor_no": anchor_no,
        "node": head.node,
        "token": head.token,
        "registered_at": head.registered_at,
        "head_idx": head.head_idx,
        "head_hash": head.head_hash,
    }


async def _update_anchor(conn: AsyncConnection, anchor_no: int, **values: object) -> None:
    j = t.journal_anchors.c
    await conn.execute(
        sa.update(t.journal_anchors).where(j.anchor_no == anchor_no).values(**values)
    )
