"""The remote tier with real nodes: two or three `kvstore serve` processes on loopback joined through a real etcd.

A client talks only to its own node; a block put on node A is found and fetched by node B (tier REMOTE on
B's first lookup, HOST once fetched), byte-exact, under the caller's tenant only.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from kvclient.errors import BlockNotFoundError, PermissionDeniedError, UnauthenticatedError
from kvwire.types import BlockState, LeaseOutcome, Tier
from tests.clusterproc import PEER_TOKEN, TENANT_TOKENS, ClusterProcs
from tests.conftest import make_fingerprint

pytestmark = pytest.mark.etcd


@pytest.fixture
def pair(etcd, cluster_name, tmp_path):
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as cluster:
        yield cluster


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def test_put_on_a_read_on_b(pair, fingerprint) -> None:
    a, b = pair.client(0, fingerprint), pair.client(1, fingerprint)
    keys = a.block_keys(np.arange(16 * 8))
    data = blocks(8, 64 << 10)
    a.put(keys, data)
    first, prefix = b.status(keys)
    assert prefix == 8 and [s.state for s in first] == [BlockState.PRESENT] * 8
    assert [s.tier for s in first] == [Tier.REMOTE] * 8
    got = b.get(keys)
    for want, have in zip(data, got):
        assert bytes(memoryview(have)) == want.tobytes()
    assert [s.tier for s in b.status(keys)[0]] == [Tier.HOST] * 8
    assert pair.counters(1)["remote_fetch_blocks"] == 8
    assert pair.counters(0)["peer_served_blocks"] == 8
    a.close()
    b.close()
