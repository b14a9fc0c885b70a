"""Hot prefixes with real nodes (design/cluster.md §3.10, test C16): read-through copies become holders and serve
the next readers, repeat reads are local, and a holder past peer_max_inflight refuses while the reader moves on.

Real `kvstore serve` processes on loopback joined through a real etcd; counters read through the admin API.
"""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from kvwire.defaults import AUTH_METADATA
from kvwire.keys import BlockKey
from kvwire.types import Tier
from kvwire.v1 import peer_pb2 as ppb
from kvwire.v1 import peer_pb2_grpc as ppb_grpc
from kvstore.index import tenant_tag
from tests.clusterproc import DATA_PATHS, PEER_TOKEN, ClusterProcs

pytestmark = pytest.mark.etcd


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def wait_announced(cluster: ClusterProcs, i: int, batches_before: int, timeout_s: float = 10) -> None:
    """Until node i's homes have acknowledged a batch sent since batches_before (its new copies are findable)."""
    deadline = time.monotonic() + timeout_s
    while cluster.counters(i).get("directory_batches_sent", 0) <= batches_before:
        assert time.monotonic() < deadline, f"node {i} announced nothing new"
        time.sleep(0.02)
    time.sleep(0.05)  # the pass that sent it may have more homes to hear back from


def breakers_closed(cluster: ClusterProcs, timeout_s: float = 10) -> None:
    """Until no node has a peer's breaker open: a call that ran out of time while the cluster started (a loaded
    box) opens one for 5 s, and reads would skip that holder meanwhile, which these tests do not measure."""
    deadline = time.monotonic() + timeout_s
    for i in range(len(cluster.nodes)):
        while any(p.state != "closed" for p in cluster.cluster_status(i, local_only=True).nodes[0].peers):
            assert time.monotonic() < deadline, f"node {i} keeps a breaker open"
            time.sleep(0.1)


def served_to(cluster: ClusterProcs, i: int) -> dict[str, tuple[int, int]]:
    """Node i's per-peer (bytes fetched from, bytes served to), as `kvstore-admin cluster` shows them."""
    me = cluster.cluster_status(i, local_only=True).nodes[0]
    return {p.peer: (p.bytes_fetched, p.bytes_served) for p in me.peers}


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_c16_a_hot_prefix_read_on_every_node_is_local_after_the_first_read_and_spread(
        etcd, cluster_name, tmp_path, fingerprint, path) -> None:
    """One prefix written on n0 and read by all four nodes, three rounds: each node fetches it once (the directory
    names the newest, least loaded copy first, so the copies chain instead of all coming from n0), every later read
    is a local hit, and the busiest node serves at most 1.5x the mean of the peer bytes served."""
    n_blocks, size = 16, 64 << 10
    with ClusterProcs(tmp_path, etcd, cluster_name, size=4, flags=DATA_PATHS[path]) as cluster:
        breakers_closed(cluster)
        clients = [cluster.client(i, fingerprint) for i in range(4)]
        try:
            keys = clients[0].block_keys(np.arange(16 * n_blocks))
            data = blocks(n_blocks, size)
            clients[0].put(keys, data)
            first_round: list[dict[str, int]] = []
            for round_ in range(3):
                for i in (1, 2, 3, 0):
                    before = cluster.counters(i).get("directory_batches_sent", 0)
                    got = clients[i].get(keys)
                    assert [bytes(memoryview(g)) for g in got] == [d.tobytes() for d in data]
                    if round_ == 0 and i != 0:
                        wait_announced(cluster, i, before)
                if round_ == 0:
                    first_round = [cluster.counters(i) for i in range(4)]
                    for i in range(4):  # every node answers from its own host tier now
                        assert [s.tier for s in clients[i].status(keys)[0]] == [Tier.HOST] * n_blocks
            after = [cluster.counters(i) for i in range(4)]
        finally:
            for client in clients:
                client.close()
        total = n_blocks * size
        for i in range(4):  # repeat reads were local: nothing more fetched or served by anyone
            for name in ("remote_fetch_bytes", "peer_served_bytes", "remote_locate_found"):
                assert after[i].get(name, 0) == first_round[i].get(name, 0), (i, name)
        assert [after[i].get("remote_fetch_bytes", 0) for i in range(4)] == [0, total, total, total]
        served = [after[i].get("peer_served_bytes", 0) for i in range(4)]
        assert sum(served) == 3 * total
        assert max(served) <= 1.5 * sum(served) / 4, served
        assert sum(c.get("remote_fetch_failures", 0) + c.get("remote_fetch_busy", 0) for c in after) == 0


def stall_a_peer_slot(cluster: ClusterProcs, holder: int, as_node: int, fingerprint_id: bytes, keys: list[BlockKey]) -> tuple[grpc.Call, grpc.Channel]:
    """Hold one of the holder's peer transfer slots: a large Fetch (in node as_node's name, with the peer token) whose
    answer nobody reads, so the holder's stream blocks on flow control. Returns once a probe Fetch is refused as busy."""
    me = cluster.cluster_status(holder, local_only=True).nodes[0]
    incarnation = {m.name: m.incarnation for m in me.members}
    env = ppb.Envelope(sender=cluster.node_name(as_node), sender_incarnation=incarnation[cluster.node_name(as_node)],
                       sender_view_revision=me.view_revision, target_incarnation=incarnation[cluster.node_name(holder)])
    skeys = [tenant_tag("alpha") + k.digest for k in keys]
    # No BDP probing: the stream's receive window stays small, so an unread answer stops the holder's sends.
    channel = grpc.insecure_channel(cluster.nodes[holder].address, options=[("grpc.http2.bdp_probe", 0),
                                                                            ("grpc.max_receive_message_length", 64 << 20)])
    stub = ppb_grpc.PeerServiceStub(channel)
    metadata = ((AUTH_METADATA, f"Bearer {PEER_TOKEN}"),)
    stalled = stub.Fetch(ppb.FetchRequest(envelope=env, fingerprint_id=fingerprint_id, skeys=skeys), metadata=metadata, timeout=120)
    next(stalled)  # its first message: the holder's handler runs (and holds the slot) before any probe is sent
    deadline = time.monotonic() + 10
    while True:
        probe = stub.Fetch(ppb.FetchRequest(envelope=env, fingerprint_id=fingerprint_id, skeys=skeys[:1]), metadata=metadata, timeout=5)
        try:
            list(probe)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            return stalled, channel
        assert time.monotonic() < deadline, "the stalled Fetch never held the holder's slot"
        time.sleep(0.05)


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_a_holder_past_peer_max_inflight_refuses_and_the_reader_takes_another_holder(
        etcd, cluster_name, tmp_path, fingerprint, path) -> None:
    """peer_max_inflight = 1 and n1's slot held by a transfer that does not move: n2's reads of prefixes n0 and n1
    both hold are refused by n1 (RESOURCE_EXHAUSTED, over gRPC Fetch or the UCX peer get), land whole from n0,
    and count against no breaker; once n1's slot is free, n1 serves again."""
    flags = {**DATA_PATHS[path], "peer_max_inflight": 1, "remote_fetch_deadline_ms": 5000}  # (a loaded box: no deadline misses)
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3, flags=flags) as cluster, \
            cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b, cluster.client(2, fingerprint) as c:
        breakers_closed(cluster)
        stall_keys = a.block_keys(np.arange(16 * 16) + 10**6)
        a.put(stall_keys, blocks(16, 1 << 20, seed=99))
        prefixes = [a.block_keys(np.arange(16 * 4) + 1000 * p) for p in range(5)]
        payloads = [blocks(4, 64 << 10, seed=p) for p in range(5)]
        for keys, data in zip(prefixes, payloads):
            a.put(keys, data)
        before = cluster.counters(1).get("directory_batches_sent", 0)
        b.get(stall_keys)
        for keys in prefixes:
            b.get(keys)  # n0 and n1 hold every prefix now; n1's copy is the newest, so the homes name it first
        wait_announced(cluster, 1, before)
        stalled, channel = stall_a_peer_slot(cluster, 1, 0, fingerprint.id, stall_keys)
        try:
            refused_before = cluster.counters(1).get("peer_rejected_busy", 0)
            for keys, data in zip(prefixes[:4], payloads[:4]):
                assert [bytes(memoryview(g)) for g in c.get(keys)] == [d.tobytes() for d in data]
            mid = cluster.counters(2)
            assert mid.get("remote_fetch_busy", 0) >= 1  # n1 was asked first, refused, and n0 served
            assert cluster.counters(1).get("peer_rejected_busy", 0) - refused_before == mid["remote_fetch_busy"]
            assert mid.get("remote_fetch_failures", 0) == 0 and mid["remote_fetch_blocks"] == 16
            peers = served_to(cluster, 2)
            assert peers["n0"][0] == 4 * 4 * (64 << 10) and peers.get("n1", (0, 0))[0] == 0
            status = cluster.cluster_status(2, local_only=True).nodes[0]
            assert {p.peer: p.state for p in status.peers}.get("n1", "closed") == "closed"
        finally:
            stalled.cancel()
            channel.close()
        deadline = time.monotonic() + 10
        while True:  # the cancelled stream gives its slot back; n1 serves again
            data = c.get(prefixes[4])
            assert [bytes(memoryview(g)) for g in data] == [d.tobytes() for d in payloads[4]]
            if served_to(cluster, 2).get("n1", (0, 0))[0] > 0 or time.monotonic() > deadline:
                break
            c.delete(prefixes[4])  # not served by n1 yet (its slot still held): read it again
            time.sleep(0.1)
        assert served_to(cluster, 2)["n1"][0] == 4 * (64 << 10)


def test_a_prefix_looked_up_past_hot_threshold_is_pushed_to_more_nodes_up_to_hot_replicas(
        etcd, cluster_name, tmp_path, fingerprint) -> None:
    """Lookups on n1 of a prefix only n0 holds are Locates at its keys' homes; past hot_threshold the homes have two
    more nodes take copies from n0 (the copy primitive), all of the prefix to the same nodes, and no more than
    hot_replicas nodes hold it however long the lookups go on."""
    flags = {"hot_threshold": 4, "hot_replicas": 3}
    n_blocks, size = 8, 64 << 10
    with ClusterProcs(tmp_path, etcd, cluster_name, size=4, flags=flags) as cluster:
        breakers_closed(cluster)
        clients = [cluster.client(i, fingerprint) for i in range(4)]
        try:
            keys = clients[0].block_keys(np.arange(16 * n_blocks))
            data = blocks(n_blocks, size, seed=7)
            clients[0].put(keys, data)

            def holders() -> list[int]:
                return [i for i in range(4) if [s.tier for s in clients[i].status(keys)[0]] == [Tier.HOST] * n_blocks]

            deadline = time.monotonic() + 15
            while len(holding := holders()) < 3:
                assert time.monotonic() < deadline, f"only nodes {holding} hold the hot prefix"
                assert clients[1].lookup(keys) == n_blocks
                time.sleep(0.05)
            for _ in range(20):  # still hot: no more copies past hot_replicas
                clients[1].lookup(keys)
            time.sleep(0.5)
            assert holders() == holding and 0 in holding
            for i in holding:  # the copies are whole and right
                assert [bytes(memoryview(g)) for g in clients[i].get(keys)] == [d.tobytes() for d in data]
            counters = [cluster.counters(i) for i in range(4)]
        finally:
            for client in clients:
                client.close()
        assert sum(c.get("directory_hot_pushes", 0) for c in counters) >= 2
        assert sum(c.get("directory_hot_push_failures", 0) for c in counters) == 0
        assert counters[0]["peer_served_bytes"] == 2 * n_blocks * size  # each copy came from n0, once
