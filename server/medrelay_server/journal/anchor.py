"""Anchors: signed RFC 9162 tree heads over the append-only log of chain heads.

Each anchor appends one leaf per registered node (its fencing token, registration time and
chain head: index and hash) to a Merkle log, and the signer signs
``SignWithLabel(key, "audit-anchor", anchor_no, ts, tree_size, root)``. An anchor carries
the heads it appended and the RFC 9162 consistency proof from the previous anchor, so a
witness that kept the previous tree's compact range (:class:`AnchorLog`) checks that the new
tree is exactly the old one plus these heads, and one that kept only the previous signed
root checks the proof. Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from medrelay_protocol.crypto import SigningKey, encode_field, sign_with_label, verify_with_label
from medrelay_protocol.errors import BadSignature, MedrelayError

from . import merkle
from .merkle import Frontier

SIGN_LABEL = "audit-anchor"
LEAF_LABEL = b"medrelay-anchor-leaf/1"
VERSION = 1


class AnchorRejected(MedrelayError):
    """A signer or witness refused an anchor that does not extend the log it has seen."""


@dataclass(frozen=True, slots=True)
class Head:
    """One node's entry in the registry and its chain head, as anchored."""

    node: str
    token: int
    registered_at: int
    head_idx: int
    head_hash: bytes


def leaf_data(anchor_no: int, head: Head) -> bytes:
    fields = (
        LEAF_LABEL,
        anchor_no,
        head.node,
        head.token,
        head.registered_at,
        head.head_idx,
        head.head_hash,
    )
    return b"".join(encode_field(f) for f in fields)


def leaf_hash(anchor_no: int, head: Head) -> bytes:
    return merkle.leaf_hash(leaf_data(anchor_no, head))


@dataclass(frozen=True, slots=True)
class Anchor:
    anchor_no: int
    ts: int
    tree_size: int
    root: bytes
    prev_size: int
    prev_root: bytes
    heads: tuple[Head, ...]
    consistency: tuple[bytes, ...] = ()
    key_id: str = ""
    signature: bytes = field(default=b"", repr=False)

    def signed_fields(self) -> tuple[int, int, int, bytes]:
        return (self.anchor_no, self.ts, self.tree_size, self.root)

    def leaves(self) -> list[bytes]:
        return [leaf_hash(self.anchor_no, h) for h in self.heads]

    def to_json(self) -> str:
        doc: dict[str, Any] = {
            "v": VERSION,
            "anchor": self.anchor_no,
            "ts": self.ts,
            "size": self.tree_size,
            "root": self.root.hex(),
            "prev_size": self.prev_size,
            "prev_root": self.prev_root.hex(),
            "consistency": [p.hex() for p in self.consistency],
            "heads": [
                {
                    "node": h.node,
                    "token": h.token,
                    "registered_at": h.registered_at,
                    "idx": h.head_idx,
                    "hash": h.head_hash.hex(),
                }
                for h in self.heads
            ],
            "key_id": self.key_id,
            "sig": self.signature.hex(),
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Anchor:
        try:
            d = json.loads(text)
            if d["v"] != VERSION:
                raise AnchorRejected("unknown anchor version")
            heads = tuple(
                Head(h["node"], h["token"], h["registered_at"], h["idx"], bytes.fromhex(h["hash"]))
                for h in d["heads"]
            )
            return cls(
                anchor_no=int(d["anchor"]),
                ts=int(d["ts"]),
                tree_size=int(d["size"]),
                root=bytes.fromhex(d["root"]),
                prev_size=int(d["prev_size"]),
                prev_root=bytes.fromhex(d["prev_root"]),
                heads=heads,
                consistency=tuple(bytes.fromhex(p) for p in d["consistency"]),
                key_id=str(d["key_id"]),
                signature=bytes.fromhex(d["sig"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AnchorRejected("malformed anchor") from exc


def sign_anchor(key: SigningKey, anchor: Anchor) -> bytes:
    return sign_with_label(key, SIGN_LABEL, *anchor.signed_fields())


def verify_signature(public_key: bytes, anchor: Anchor) -> None:
    """Raises :class:`AnchorRejected` unless ``public_key`` signed this tree head."""
    try:
        verify_with_label(public_key, SIGN_LABEL, anchor.signature, *anchor.signed_fields())
    except BadSignature as exc:
        raise AnchorRejected(f"anchor #{anchor.anchor_no}: bad signature") from exc


def check_consistency(prev: Anchor | None, anchor: Anchor) -> None:
    """Check ``anchor``'s own link to ``prev`` (the anchor before it): numbering, sizes and
    the RFC 9162 consistency proof. Raises :class:`AnchorRejected`."""
    prev_no, prev_size = (0, 0) if prev is None else (prev.anchor_no, prev.tree_size)
    prev_root = merkle.EMPTY_ROOT if prev is None else prev.root
    n = anchor.anchor_no
    if n != prev_no + 1:
        raise AnchorRejected(f"anchor #{n} follows #{prev_no}")
    if (anchor.prev_size, anchor.prev_root) != (prev_size, prev_root):
        raise AnchorRejected(f"anchor #{n} does not name #{prev_no}'s tree as its previous")
    if anchor.tree_size != prev_size + len(anchor.heads):
        raise AnchorRejected(f"anchor #{n}: tree size does not match its heads")
    if prev_size:
        try:
            merkle.verify_consistency(
                prev_size, anchor.tree_size, prev_root, anchor.root, anchor.consistency
            )
        except merkle.ProofError as exc:
            raise AnchorRejected(f"anchor #{n} is not consistent with #{prev_no}") from exc


class AnchorLog:
    """What a signer or witness remembers of the log: the last anchor and the compact range
    of its tree. ``accept`` admits only the next anchor whose heads, appended to that tree,
    give its root (or, idempotently, the last anchor again)."""

    def __init__(self) -> None:
        self.last: Anchor | None = None
        self.frontier = Frontier()

    def accept(self, anchor: Anchor) -> bool:
        """True if ``anchor`` is new and now recorded, False if it is the last one again."""
        if self.last is not None and anchor.anchor_no == self.last.anchor_no:
            if anchor.signed_fields() != self.last.signed_fields():
                raise AnchorRejected(f"anchor #{anchor.anchor_no} differs from the one seen")
            return False
        check_consistency(self.last, anchor)
        frontier = self.frontier.copy()
        for leaf in anchor.leaves():
            frontier.append(leaf)
        if frontier.root() != anchor.root:
            raise AnchorRejected(f"anchor #{anchor.anchor_no}: heads do not give its root")
        self.last, self.frontier = anchor, frontier
        return True
