"""C20: a slow link between holder and reader (network namespaces, a tbf rate cap on the holder's leg).

Node A holds a long prefix; A's link is capped at 100 Mbit/s (and 20), so the whole prefix takes seconds to cross. A
prefix Pin on node B must come back by the fetch deadline (remote_fetch_deadline_ms) with the leading run that
landed by then: never an error, never a partial block, and more than nothing (the remote tier's fetch sizes
its requests to what the link delivers, so progress lands as it goes rather than in one message that misses
the deadline). The blocks it returns read back byte-exact.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from tests.clusterproc import DATA_PATHS, ClusterProcs
from tests.netns import Bridge, need_netns

pytestmark = pytest.mark.etcd

BLOCK_BYTES = 1 << 20
BLOCKS = 48  # 48 MiB: ~4 s at 100 Mbit/s
DEADLINE_MS = 1000
SLACK_S = 0.6  # the Pin's own round trips, the locate, and this box's load


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("rate, at_least", [("100mbit", 4), ("20mbit", 1)])
@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_a_prefix_pin_over_a_slow_link_returns_what_landed_by_the_deadline(make_etcd, cluster_name, tmp_path, fingerprint, path,
                                                                           rate, at_least) -> None:
    need_netns()
    with Bridge() as bridge:
        etcd = make_etcd(host=bridge.root_address)
        flags = {**DATA_PATHS[path], "remote_fetch_deadline_ms": DEADLINE_MS, "host_memory": "160MiB", "max_block_bytes": "1MiB"}
        with ClusterProcs(tmp_path, etcd, cluster_name, size=2, bridge=bridge, flags=flags) as cluster:
            with cluster.client(0, fingerprint, transport="grpc") as a, cluster.client(1, fingerprint, transport="grpc") as b:
                keys = a.block_keys(np.arange(16 * BLOCKS))
                data = blocks(BLOCKS, BLOCK_BYTES, seed=20)
                a.put(keys, data)
                assert b.lookup(keys) == BLOCKS
                bridge.rate_limit("n0", rate)
                started = time.monotonic()
                with b.pin(keys, prefix=True) as pinned:
                    took = time.monotonic() - started
                    landed = len(pinned)
                assert took <= DEADLINE_MS / 1000 + SLACK_S, f"the prefix pin took {took:.2f} s"
                # 100 Mbit/s is ~12 MiB/s, 20 Mbit/s ~2.4: about a deadline's worth landed, not all of it and not nothing.
                assert at_least <= landed < BLOCKS, landed
                got = b.get(keys[:landed])  # local copies now
                assert [bytes(memoryview(g)) for g in got] == [d.tobytes() for d in data[:landed]]
                stats = cluster.counters(1)
                assert stats["remote_fetch_blocks"] == landed and stats.get("remote_checksum_failures", 0) == 0
                if path == "ucx":
                    assert stats["remote_fetch_ucx_blocks"] == landed
