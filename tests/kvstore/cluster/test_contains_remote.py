"""KVClient.contains in cluster mode: a block a live peer holds under the caller's tenant is present, found
without fetching it, and never under another tenant (Store.contains walks like Store.lookup, then asks peers)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.clusterproc import ClusterProcs

pytestmark = pytest.mark.etcd


def test_contains_counts_peers_blocks_of_the_callers_tenant_only(etcd, cluster_name, tmp_path, fingerprint) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as pair:
        with pair.client(0, fingerprint, tenant="alpha") as a, pair.client(1, fingerprint, tenant="alpha") as b, \
                pair.client(1, fingerprint, tenant="beta") as other:
            keys = a.block_keys(np.arange(16 * 6))
            a.put([keys[i] for i in (0, 1, 3)], [np.full(4096, i, np.uint8) for i in (0, 1, 3)])
            b.put([keys[4]], [np.full(4096, 4, np.uint8)])
            assert b.contains(keys) == [True, True, False, True, True, False]
            assert a.contains(keys) == [True, True, False, True, True, False]
            assert other.contains(keys) == [False] * 6
        assert pair.counters(1).get("remote_fetch_blocks", 0) == 0  # asked where, never fetched
