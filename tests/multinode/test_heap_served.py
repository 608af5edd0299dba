"""``medrelay serve`` freezes its start-up heap out of the collector's reach and reports the
collector's pauses on ``/metrics`` (``server/medrelay_server/heap.py``)."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest

from scripts.cluster import Cluster

from ..polling import until
from .conftest import People

pytestmark = [pytest.mark.redis, pytest.mark.postgres]


def _metrics(cluster: Cluster, i: int) -> str:
    with urllib.request.urlopen(cluster.nodes[i].http + "/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _value(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found is not None, f"{name} not on /metrics"
    return float(found.group(1))


async def test_served_node_freezes_its_startup_heap(cluster: Cluster, people: People) -> None:
    text = await asyncio.to_thread(_metrics, cluster, 0)
    # SQLAlchemy, the server's modules and their imports: about 100,000 objects
    assert _value(text, "medrelay_gc_frozen_objects") > 50_000
    alice = await people.join("alice", cluster.url(0))
    room = await alice.create_room()
    assert room

    async def young_collections_timed() -> bool:
        text = await asyncio.to_thread(_metrics, cluster, 0)
        return _value(text, 'medrelay_gc_pause_seconds_count{generation="0"}') > 0

    await until(young_collections_timed, timeout=30)
