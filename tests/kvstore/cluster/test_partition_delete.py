"""A tenant deleted while a node is partitioned (docs/cluster.md, C8): the delete answers within the lease TTL
naming the cut-off node; after the heal that node replays the tombstone before it rejoins, so 0 of the tenant's
blocks are readable anywhere, and with --secure a raw scan of its data dir and host pool finds none of them."""
from __future__ import annotations

import os
import time

import grpc
import numpy as np
import pytest

from kvclient.errors import BlockNotFoundError
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import kvstore_pb2 as pb
from kvwire.v1 import kvstore_pb2_grpc as pb_grpc
from tests.clusterproc import TENANT_TOKENS, ClusterProcs
from tests.kvstore.test_secure_delete import data_files, found
from tests.netns import Bridge, need_netns

pytestmark = pytest.mark.etcd


def random_blocks(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def host_pool(cluster: ClusterProcs, i: int) -> bytes:
    """The raw bytes of node i's shared-memory host pool (its name comes from DataPlane)."""
    with grpc.insecure_channel(cluster.nodes[i].address) as channel:
        reply = pb_grpc.KVStoreStub(channel).DataPlane(pb.DataPlaneRequest(), timeout=10,
                                                       metadata=(("authorization", f"Bearer {TENANT_TOKENS['beta']}"),))
    fd = os.open(f"/dev/shm/{reply.shm_name}", os.O_RDONLY)
    try:
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def test_a_tenant_deleted_while_a_node_is_partitioned_is_gone_everywhere_after_the_heal(make_etcd, cluster_name, tmp_path, fingerprint):
    need_netns()
    ttl = 2.0
    with Bridge() as bridge:
        etcd = make_etcd(host=bridge.root_address)
        with ClusterProcs(tmp_path, etcd, cluster_name, size=2, bridge=bridge) as cluster:
            with cluster.client(0, fingerprint, "alpha") as a_alpha, cluster.client(0, fingerprint, "beta") as a_beta, \
                    cluster.client(1, fingerprint, "alpha") as b_alpha:
                victims, keepers = random_blocks(6, 60_000, seed=1), random_blocks(4, 60_000, seed=2)
                victim_keys, keeper_keys = a_alpha.block_keys(np.arange(16 * 6)), a_beta.block_keys(np.arange(5000, 5000 + 16 * 4))
                a_alpha.put(victim_keys, victims)
                a_beta.put(keeper_keys, keepers)
                # Everything onto A's SSD tier, so the raw scan below reads LMDB files, not just memory.
                demoted = cluster._admin(0, "Evict", apb.EvictRequest(watermark=0.0001, tier=pb.TIER_HOST))
                assert demoted.demoted == 10
                assert len(b_alpha.get(victim_keys[:3])) == 3  # B holds copies of three
                assert all(found(victims, data_files(cluster.nodes[0].data_dir)))  # the scan is not vacuous
                old = cluster.incarnations(1)["n0"]

                bridge.isolate("n0")
                started = time.monotonic()
                report = cluster.delete(1, apb.BlockSelector(tenant="alpha"), secure=True)
                answered_s = time.monotonic() - started
                assert report.cluster_wide and list(report.unconfirmed_nodes) == ["n0"]
                assert answered_s <= ttl + 1, answered_s
                assert b_alpha.lookup(victim_keys) == 0
                with pytest.raises(BlockNotFoundError):
                    b_alpha.get(victim_keys[:1])

                bridge.heal()
                cluster.wait_members(2, timeout_s=10)
                assert cluster.incarnations(1)["n0"] > old
                # A applied the tombstone before it rejoined: nothing of alpha is readable anywhere.
                assert a_alpha.lookup(victim_keys) == 0 and b_alpha.lookup(victim_keys) == 0
                for client in (a_alpha, b_alpha):
                    for key in victim_keys:
                        with pytest.raises(BlockNotFoundError):
                            client.get([key])
                assert all(np.array_equal(x, y) for x, y in zip(a_beta.get(keeper_keys), keepers))  # another tenant's stay
                counters = cluster.counters(0)
                assert counters["tombstones_applied"] == 1 and counters["secure_deletes"] >= 1
                assert not any(found(victims, host_pool(cluster, 0)))
            data_dir = cluster.nodes[0].data_dir
            assert not any(found(victims, data_files(data_dir)))
            assert all(found(keepers, data_files(data_dir)))
            cluster.stop()
            assert not any(found(victims, data_files(data_dir)))  # nor in what the shutdown wrote
