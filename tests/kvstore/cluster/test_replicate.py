"""The copy primitive (PeerService.Replicate, kvstore/cluster/replicator.py) with real nodes and a real etcd.

The test process joins the cluster as a member of its own (draining, so it is nobody's directory home) and
calls a node's PeerService the way another node's ClusterNode.request_copies does.
"""
from __future__ import annotations

import signal

import grpc
import numpy as np
import pytest

from kvstore.cluster.etcd import EtcdClient
from kvstore.cluster.membership import Membership, MemberSpec
from kvstore.index import tenant_tag
from kvstore.placement import checksum
from kvwire.types import Tier
from kvwire.v1 import peer_pb2 as ppb
from kvwire.v1 import peer_pb2_grpc as ppb_grpc
from tests.clusterproc import DATA_PATHS, PEER_TOKEN, ClusterProcs

pytestmark = pytest.mark.etcd


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


class Outsider:
    """A draining member in this process: peers admit its calls, no key is homed on it."""

    def __init__(self, cluster: ClusterProcs) -> None:
        self.cluster = cluster
        self.etcd = EtcdClient(cluster.etcd.endpoints)
        self.membership = Membership(self.etcd, cluster.name, MemberSpec("outsider", "127.0.0.1:1", "test-host-outsider"), 2.0)

    def __enter__(self) -> "Outsider":
        self.membership.start()
        self.membership.drain()
        self.cluster.wait_members(len(self.cluster.nodes) + 1)
        return self

    def __exit__(self, *exc) -> None:
        self.membership.close()
        self.etcd.close()

    def replicate(self, i: int, request: ppb.ReplicateRequest, timeout_s: float = 20) -> ppb.ReplicateResponse:
        view = self.membership.view()
        target = view.members[self.cluster.node_name(i)]
        request.envelope.CopyFrom(ppb.Envelope(sender="outsider", sender_incarnation=self.membership.incarnation,
                                               sender_view_revision=view.revision, target_incarnation=target.incarnation))
        with grpc.insecure_channel(self.cluster.nodes[i].address) as channel:
            return ppb_grpc.PeerServiceStub(channel).Replicate(request, timeout=timeout_s, metadata=(("authorization", f"Bearer {PEER_TOKEN}"),))


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_a_holder_asked_to_copy_its_blocks_to_a_peer(etcd, cluster_name, tmp_path, fingerprint, path) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, flags=DATA_PATHS[path]) as pair, Outsider(pair) as outsider, \
            pair.client(0, fingerprint) as a, pair.client(1, fingerprint) as b:
        keys = a.block_keys(np.arange(16 * 12))
        data = blocks(12, 256 << 10, seed=3)
        a.put(keys, data)
        skeys = [tenant_tag("alpha") + k.digest for k in keys]
        # n0 holds them: asked as the source, it has n1 take them (origin replica) and answers what n1 holds now.
        answer = outsider.replicate(0, ppb.ReplicateRequest(target="n1", origin="replica", skeys=skeys))
        assert sum(answer.held) == 12
        assert pair.counters(1)["cluster_copies_taken"] == 12 and pair.counters(0)["cluster_copies_sent"] == 12
        assert pair.counters(1)["cluster_copy_bytes_taken"] == pair.counters(0)["cluster_copy_bytes_sent"] == 12 * (256 << 10)
        assert [s.tier for s in b.status(keys)[0]] == [Tier.HOST] * 12  # local copies on n1, not remote
        before = pair.counters(1).get("remote_fetch_blocks", 0)
        # Again: nothing to copy, the same answer.
        assert sum(outsider.replicate(0, ppb.ReplicateRequest(target="n1", origin="replica", skeys=skeys)).held) == 12
        assert pair.counters(1)["cluster_copies_taken"] == 12 and pair.counters(1).get("remote_fetch_blocks", 0) == before
        # A group whose storage keys belong to another tenant than it names is refused, nothing copied.
        bad = ppb.CopyGroup(tenant="beta", fingerprint_id=fingerprint.id, skeys=skeys[:1], sizes=[256 << 10], checksums=[1])
        with pytest.raises(grpc.RpcError) as err:
            outsider.replicate(1, ppb.ReplicateRequest(source="n0", origin="spill", groups=[bad]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The copies outlive their source, byte-exact.
        pair.nodes[0].proc.send_signal(signal.SIGKILL)
        pair.nodes[0].proc.wait()
        got = b.get(keys)
        assert [bytes(memoryview(g)) for g in got] == [d.tobytes() for d in data]


def test_copies_of_blocks_the_source_lacks_stop_at_the_gap(etcd, cluster_name, tmp_path, fingerprint) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as pair, Outsider(pair) as outsider, pair.client(0, fingerprint) as a:
        keys = a.block_keys(np.arange(16 * 6))
        data = blocks(6, 8 << 10, seed=4)
        a.put(keys[:3], data[:3])
        skeys = [tenant_tag("alpha") + k.digest for k in keys]
        # The source describes only what it holds: 3 of 6.
        assert sum(outsider.replicate(0, ppb.ReplicateRequest(target="n1", skeys=skeys)).held) == 3
        # Told of blocks the source does not have (a stale claim), the target copies the run up to the gap.
        sizes, crcs = [8 << 10] * 6, [0] * 6
        crcs[:3] = [checksum(d.tobytes()) for d in data[:3]]
        group = ppb.CopyGroup(tenant="alpha", fingerprint_id=fingerprint.id, skeys=skeys, sizes=sizes, checksums=crcs)
        assert list(outsider.replicate(1, ppb.ReplicateRequest(source="n0", origin="spill", groups=[group])).held) == [3]
