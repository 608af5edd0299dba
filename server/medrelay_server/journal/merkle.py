"""RFC 9162 (Certificate Transparency 2.0) Merkle trees, SHA-256: pure functions, no I/O.

* ``leaf_hash(d) = SHA-256(0x00 || d)``, ``node_hash(l, r) = SHA-256(0x01 || l || r)``,
  the empty tree's hash is ``SHA-256("")`` (§2.1.1).
* Proofs are generated (§2.1.3.1 PATH, §2.1.4.1 SUBPROOF) over any ``mth(lo, hi)``
  function: :func:`leaves_mth` for a full list of leaf hashes, :class:`Frontier.source` for
  an old tree known only by its compact range plus the leaves appended since (so the anchor
  service never reads the whole log to prove that it only grew).
* Proofs are verified exactly as §2.1.3.2 and §2.1.4.2 say; ``tests/vectors/merkle`` holds
  the transparency-dev test data they are checked against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

Mth = Callable[[int, int], bytes]


class ProofError(Exception):
    """A proof does not verify, or cannot be built from what is known."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def leaves_mth(leaves: Sequence[bytes]) -> Mth:
    """``mth(lo, hi)`` over leaf hashes (recursive; fine for the sizes a verifier handles)."""

    def mth(lo: int, hi: int) -> bytes:
        if hi - lo == 0:
            return EMPTY_ROOT
        if hi - lo == 1:
            return leaves[lo]
        k = _split(hi - lo)
        return node_hash(mth(lo, lo + k), mth(lo + k, hi))

    return mth


def root(leaves: Sequence[bytes]) -> bytes:
    return leaves_mth(leaves)(0, len(leaves))


def inclusion_proof(index: int, size: int, mth: Mth) -> list[bytes]:
    if not 0 <= index < size:
        raise ProofError("leaf index outside the tree")
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index - lo < k:
            proof.append(mth(lo + k, hi))
            hi = lo + k
        else:
            proof.append(mth(lo, lo + k))
            lo = lo + k
    return proof[::-1]


def consistency_proof(old_size: int, new_size: int, mth: Mth) -> list[bytes]:
    if not 0 < old_size <= new_size:
        raise ProofError("consistency needs 0 < old size <= new size")
    proof: list[bytes] = []
    lo, hi, m, complete = 0, new_size, old_size, True
    while True:
        n = hi - lo
        if m == n:
            if not complete:
                proof.append(mth(lo, hi))
            break
        k = _split(n)
        if m <= k:
            proof.append(mth(lo + k, hi))
            hi = lo + k
        else:
            proof.append(mth(lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    return proof[::-1]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root_hash: bytes
) -> None:
    """RFC 9162 §2.1.3.2; raises :class:`ProofError`."""
    _check_sizes(leaf, root_hash, *proof)
    if index >= size or index < 0:
        raise ProofError("leaf index outside the tree")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise ProofError("inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != root_hash:
        raise ProofError("inclusion proof does not verify")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2; raises :class:`ProofError`."""
    if old_size <= 0 or old_size > new_size:
        raise ProofError("consistency needs 0 < old size <= new size")
    if old_size == new_size:
        if proof or old_root != new_root:
            raise ProofError("equal sizes need an empty proof and equal roots")
        return
    _check_sizes(old_root, new_root, *proof)
    path = list(proof)
    if not path:
        raise ProofError("empty consistency proof")
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or fr != old_root or sr != new_root:
        raise ProofError("consistency proof does not verify")


def _check_sizes(*hashes: bytes) -> None:
    if any(len(h) != HASH_SIZE for h in hashes):
        raise ProofError("a hash is not 32 bytes")


class Frontier:
    """The compact range of a tree: the roots of its maximal perfect subtrees, left to right
    (one per set bit of ``size``). Enough to append leaves and compute the root, in O(log n)
    space, and, with the leaves appended since, to prove consistency from this size."""

    def __init__(self, size: int = 0, nodes: Sequence[bytes] = ()) -> None:
        if len(nodes) != size.bit_count():
            raise ValueError("a frontier has one node per set bit of its size")
        self.size = size
        self.nodes = list(nodes)

    def copy(self) -> Frontier:
        return Frontier(self.size, self.nodes)

    def append(self, leaf: bytes) -> None:
        self.nodes.append(leaf)
        size = self.size
        while size & 1:
            right = self.nodes.pop()
            self.nodes[-1] = node_hash(self.nodes[-1], right)
            size >>= 1
        self.size += 1

    def root(self) -> bytes:
        if not self.nodes:
            return EMPTY_ROOT
        r = self.nodes[-1]
        for h in reversed(self.nodes[:-1]):
            r = node_hash(h, r)
        return r

    def ranges(self) -> list[tuple[int, int]]:
        out, lo = [], 0
        for bit in reversed(range(self.size.bit_length())):
            if self.size >> bit & 1:
                out.append((lo, lo + (1 << bit)))
                lo += 1 << bit
        return out

    def source(self, new_leaves: Sequence[bytes]) -> Mth:
        """``mth`` over this tree followed by ``new_leaves``; raises ``ProofError`` for a
        subtree strictly inside one of the frontier's nodes (never needed by the proofs)."""
        known = dict(zip(self.ranges(), self.nodes, strict=True))
        base = self.size

        def mth(lo: int, hi: int) -> bytes:
            if (lo, hi) in known:
                return known[(lo, hi)]
            if lo >= base:
                return leaves_mth(new_leaves)(lo - base, hi - base)
            if hi - lo <= 1:
                raise ProofError("subtree not in the compact range")
            k = _split(hi - lo)
            return node_hash(mth(lo, lo + k), mth(lo + k, hi))

        return mth

    def pack(self) -> bytes:
        return b"".join(self.nodes)

    @classmethod
    def unpack(cls, size: int, packed: bytes) -> Frontier:
        nodes = [packed[i : i + HASH_SIZE] for i in range(0, len(packed), HASH_SIZE)]
        return cls(size, nodes)
