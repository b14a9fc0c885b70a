"""cluster_replicas = 2 with real nodes and a real etcd: commit pushes, their lag, and repair after a node is killed (C15)."""
from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest

from kvwire.types import Tier
from kvwire.v1 import admin_pb2 as apb
from tests.clusterproc import DATA_PATHS, ClusterProcs

pytestmark = pytest.mark.etcd

LOCAL = (Tier.HOST, Tier.SSD)


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def status(cluster: ClusterProcs, i: int):
    return cluster.cluster_status(i, local_only=True).nodes[0]


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Poll until predicate() holds; the time it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(what)
        time.sleep(0.05)
    return time.monotonic() - start


def test_r2_node_killed_after_the_lag_loses_nothing_and_repair_restores_two_copies(etcd, cluster_name, tmp_path, fingerprint) -> None:
    cap_mb_s = 4.0
    flags = {"cluster_replicas": 2, "cluster_copy_rate_mb_s": cap_mb_s, **DATA_PATHS["ucx"]}
    prefixes, per_prefix, size = 24, 4, 64 << 10
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3, flags=flags) as c:
        fp_keys, data = [], []
        clients = [c.client(0, fingerprint) for _ in range(4)]
        try:
            for p in range(prefixes):
                fp_keys.append(clients[0].block_keys(np.arange(16 * per_prefix) + p * 100_000))
                data.append(blocks(per_prefix, size, seed=p))

            def writer(w: int) -> None:  # four writers at once: the pushes run under load
                for p in range(w, prefixes, 4):
                    clients[w].put(fp_keys[p], data[p])

            threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for client in clients:
                client.close()
        total = prefixes * per_prefix
        wait_for(lambda: status(c, 0).replication_pending == 0 and c.counters(0).get("cluster_copies_sent", 0) == total, 10,
                 "every committed block pushed to its replica node")
        a = status(c, 0)
        assert 0 < a.replication_lag_p50_ms <= a.replication_lag_p99_ms < 5000
        assert c.counters(1).get("cluster_copies_taken", 0) + c.counters(2).get("cluster_copies_taken", 0) == total
        assert c.counters(0).get("cluster_copy_failures", 0) == 0
        with c.client(1, fingerprint) as b:  # each batch went whole to one replica node: on B all of it or none
            on_b = [{s.tier in LOCAL for s in b.status(keys)[0]} for keys in fp_keys]
            assert all(len(tiers) == 1 for tiers in on_b) and {True} in on_b and {False} in on_b
        c.nodes[0].proc.send_signal(signal.SIGKILL)
        c.nodes[0].proc.wait()
        c.wait_members(2, nodes=[1, 2])
        dropped = time.monotonic()
        with c.client(1, fingerprint) as b, c.client(2, fingerprint) as cc:
            def restored() -> bool:  # a Lookup does not fetch: tier HOST or SSD means a copy on that node itself
                return all(s.tier in LOCAL for client in (b, cc) for keys in fp_keys for s in client.status(keys)[0])

            took = wait_for(restored, 10, "two copies of every block again on the two nodes left")
            sent = [c.counters(i).get("cluster_copy_bytes_sent", 0) for i in (1, 2)]
            assert sum(sent) == total * size  # each block once, from the node left holding it to the other
            for node_sent in sent:  # each node's repair stayed under its rate cap (plus one burst of 1 MiB)
                assert node_sent <= cap_mb_s * 1e6 * (time.monotonic() - dropped + 0.25) + (1 << 20), (node_sent, took)
            assert sum(c.counters(i).get("cluster_repair_keys", 0) for i in (1, 2)) == total  # each key repaired by one home
            for client in (b, cc):  # 0 blocks lost: every one readable from each node left, byte-exact
                for keys, want in zip(fp_keys, data):
                    assert [bytes(memoryview(g)) for g in client.get(keys)] == [d.tobytes() for d in want]


def test_drain_with_handoff_moves_sole_copies_then_leaves_and_loses_none(etcd, cluster_name, tmp_path, fingerprint) -> None:
    prefixes, per_prefix, size = 12, 4, 64 << 10
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3, flags=DATA_PATHS["ucx"]) as c:
        with c.client(0, fingerprint) as a, c.client(1, fingerprint) as b:
            fp_keys = [a.block_keys(np.arange(16 * per_prefix) + p * 100_000) for p in range(prefixes)]
            data = [blocks(per_prefix, size, seed=p) for p in range(prefixes)]
            for keys, want in zip(fp_keys, data):
                a.put(keys, want)
            b.get(fp_keys[0])  # a read-through copy on B: that prefix is not a sole copy on A any more
        sole = (prefixes - 1) * per_prefix
        drained = c._admin(0, "Drain", apb.DrainRequest(timeout_ms=2000, handoff=True), timeout_s=30)
        returned = time.monotonic()
        assert (drained.handed_off, drained.handoff_failed) == (sole, 0)
        # Peers dropped A when it left (before the answer): within a second of it, both see two members.
        c.wait_members(2, timeout_s=1.0, nodes=[1, 2])
        assert time.monotonic() - returned < 1.0
        assert c.counters(1).get("cluster_copies_taken", 0) + c.counters(2).get("cluster_copies_taken", 0) == sole
        c.nodes[0].proc.wait(timeout=30)  # the drained server exits
        with c.client(1, fingerprint) as b, c.client(2, fingerprint) as cc:
            for client in (b, cc):  # 0 sole copies lost: every block readable from the nodes left, byte-exact
                for keys, want in zip(fp_keys, data):
                    assert [bytes(memoryview(g)) for g in client.get(keys)] == [d.tobytes() for d in want]


def test_one_writer_with_small_tiers_spills_instead_of_evicting_and_stays_balanced(etcd, cluster_name, tmp_path, fingerprint) -> None:
    flags = {"host_memory": "32MiB", "ssd_capacity": "32MiB", "max_block_bytes": "1MiB", **DATA_PATHS["ucx"]}
    puts, per_put, size = 72, 4, 256 << 10  # 72 MiB from one writer on A: past A's 32 MiB, under the three nodes' 96
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3, flags=flags) as c:
        fp_keys, data = [], []
        with c.client(0, fingerprint) as a:
            for p in range(puts):
                keys = a.block_keys(np.arange(16 * per_put) + p * 100_000)
                want = blocks(per_put, size, seed=p)
                a.put(keys, want)
                fp_keys.append(keys)
                data.append(want)
                time.sleep(0.04)  # ~20 MB/s: under the copy rate cap (64 MB/s), as a writer that leaves spill time

        def used(i: int) -> float:
            s = status(c, i)
            return (s.capacity_bytes - s.free_bytes) / s.capacity_bytes

        wait_for(lambda: used(0) <= 0.9, 10, "A back under its high watermark")
        assert c.counters(0).get("cluster_spilled", 0) > 0
        assert c.counters(1).get("cluster_copies_taken", 0) + c.counters(2).get("cluster_copies_taken", 0) >= c.counters(0)["cluster_spilled"]
        assert [c.counters(i).get("cluster_sole_copies_evicted", 0) for i in range(3)] == [0, 0, 0]
        fill = [used(i) for i in range(3)]
        assert max(fill) / min(fill) <= 1.5, fill
        stored = sum(c.store_stats(i).blocks for i in range(3))
        assert stored >= puts * per_put  # nothing lost (spilled copies are moves: a block is on one node or more)
        with c.client(1, fingerprint) as b, c.client(2, fingerprint) as cc:
            for keys in fp_keys:  # every prefix found somewhere, whole
                assert b.status(keys)[1] == per_put
            for p in range(0, puts, 9):  # and a sample read back byte-exact
                assert [bytes(memoryview(g)) for g in cc.get(fp_keys[p])] == [d.tobytes() for d in data[p]]
