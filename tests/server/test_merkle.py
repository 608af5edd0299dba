"""RFC 9162 Merkle proofs: the transparency-dev vectors (``tests/vectors/merkle``, Apache-2.0)
for verification, and round trips for generation, including proofs built from a compact
range plus the leaves appended since (how the anchor service proves its log only grew)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from medrelay_server.journal import merkle
from medrelay_server.journal.merkle import Frontier, ProofError

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "merkle" / "testdata"


def _load(kind: str) -> list[tuple[str, dict[str, Any]]]:
    files = sorted((VECTORS / kind).rglob("*.json"))
    return [(str(f.relative_to(VECTORS)), json.loads(f.read_text())) for f in files]


def _b(value: str) -> bytes:
    return base64.b64decode(value)


INCLUSION = _load("inclusion")
CONSISTENCY = _load("consistency")


def test_vector_counts() -> None:
    assert len(INCLUSION) + len(CONSISTENCY) == 196
    assert sum(not v["wantErr"] for _, v in INCLUSION + CONSISTENCY) >= 10


@pytest.mark.parametrize(("name", "v"), INCLUSION, ids=[n for n, _ in INCLUSION])
def test_inclusion_vectors(name: str, v: dict[str, Any]) -> None:
    proof = [_b(p) for p in v["proof"] or []]

    def check() -> None:
        merkle.verify_inclusion(
            v["leafIdx"], v["treeSize"], _b(v["leafHash"]), proof, _b(v["root"])
        )

    if v["wantErr"]:
        with pytest.raises(ProofError):
            check()
    else:
        check()


@pytest.mark.parametrize(("name", "v"), CONSISTENCY, ids=[n for n, _ in CONSISTENCY])
def test_consistency_vectors(name: str, v: dict[str, Any]) -> None:
    proof = [_b(p) for p in v["proof"] or []]

    def check() -> None:
        merkle.verify_consistency(v["size1"], v["size2"], _b(v["root1"]), _b(v["root2"]), proof)

    if v["wantErr"]:
        with pytest.raises(ProofError):
            check()
    else:
        check()


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(b"leaf-%d" % i) for i in range(n)]


def test_known_roots() -> None:
    assert merkle.root([]) == merkle.EMPTY_ROOT
    one = merkle.leaf_hash(b"x")
    assert merkle.root([one]) == one
    a, b, c = _leaves(3)
    assert merkle.root([a, b, c]) == merkle.node_hash(merkle.node_hash(a, b), c)


@given(st.integers(1, 70), st.data())
def test_inclusion_round_trip(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    index = data.draw(st.integers(0, size - 1))
    mth = merkle.leaves_mth(leaves)
    proof = merkle.inclusion_proof(index, size, mth)
    merkle.verify_inclusion(index, size, leaves[index], proof, merkle.root(leaves))
    with pytest.raises(ProofError):
        merkle.verify_inclusion(index, size, merkle.leaf_hash(b"forged"), proof, mth(0, size))


@given(st.integers(1, 70), st.integers(0, 40))
def test_consistency_round_trip_from_frontier(old: int, grow: int) -> None:
    leaves = _leaves(old + grow)
    full = merkle.leaves_mth(leaves)
    frontier = Frontier()
    for leaf in leaves[:old]:
        frontier.append(leaf)
    assert frontier.root() == merkle.root(leaves[:old])
    packed = Frontier.unpack(old, frontier.pack())
    expected = merkle.consistency_proof(old, old + grow, full)
    assert merkle.consistency_proof(old, old + grow, packed.source(leaves[old:])) == expected
    merkle.verify_consistency(old, old + grow, full(0, old), full(0, old + grow), expected)
    if grow:
        with pytest.raises(ProofError):
            merkle.verify_consistency(old, old + grow, full(0, old), merkle.EMPTY_ROOT, expected)


def test_frontier_matches_root_at_every_size() -> None:
    leaves = _leaves(100)
    frontier = Frontier()
    for i, leaf in enumerate(leaves):
        frontier.append(leaf)
        assert frontier.size == i + 1
        assert frontier.root() == merkle.root(leaves[: i + 1])


def test_frontier_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        Frontier(3, [b"x" * 32])
