"""Cluster failure modes with real nodes and a real etcd: a holder killed mid-transfer, a reader's node killed
mid-fetch, a stale directory entry, corrupt bytes at rest, zombie and stale-view peer calls, etcd gone,
drain, cluster-wide deletes, and host identity (a client never maps another node's pool or socket).
"""
from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from kvclient import KVClient
from kvclient.errors import BlockNotFoundError, UnavailableError
from kvwire.v1 import admin_pb2 as apb
from kvwire.v1 import admin_pb2_grpc as apb_grpc
from kvwire.v1 import peer_pb2 as ppb
from kvwire.v1 import peer_pb2_grpc as ppb_grpc
from tests.clusterproc import ADMIN_TOKEN, DATA_PATHS, PEER_TOKEN, TENANT_TOKENS, ClusterProcs
from tests.netns import Bridge, need_netns

pytestmark = pytest.mark.etcd

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[3]


def blocks(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def host_tier(stats) -> tuple[int, int]:
    """(used bytes, blocks) of a node's host tier."""
    (host,) = [t for t in stats.tiers if t.tier == 2]
    return host.used_bytes, host.blocks


def assert_no_leaked_slots(cluster: ClusterProcs, i: int, slot_bytes: int) -> None:
    """No pin, no lease, and every used host byte is a block's slot (nothing reserved and left behind)."""
    stats = cluster.store_stats(i)
    used, held = host_tier(stats)
    assert stats.pins_held == 0 and stats.leases_held == 0
    assert used == held * slot_bytes


@pytest.mark.parametrize("read,path", [("pin", "grpc"), ("get", "grpc"), ("pin", "ucx"), ("get", "ucx")])
def test_holder_killed_during_a_large_remote_read(etcd, cluster_name, tmp_path, fingerprint, read, path) -> None:
    """Complete verified data or a clean shorter prefix / miss within 1.5 s of the kill; nothing leaked on the reader."""
    flags = {"host_memory": "512MiB", "remote_fetch_deadline_ms": 5000, **DATA_PATHS[path]}
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, flags=flags) as cluster:
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint, timeout_s=20) as b:
            keys = a.block_keys(np.arange(16 * 32))
            data = blocks(32, 4 * MiB)
            a.put(keys, data)
            assert b.lookup(keys) == 32
            answer: dict = {}

            def reader() -> None:
                try:
                    if read == "pin":
                        with b.pin(keys, prefix=True) as pinned:
                            answer["n"] = len(pinned)
                    else:
                        answer["got"] = b.get(keys)
                except BlockNotFoundError as err:
                    answer["miss"] = err
                answer["at"] = time.monotonic()

            thread = threading.Thread(target=reader)
            thread.start()
            time.sleep(0.1)
            killed_at = time.monotonic()
            cluster.nodes[0].proc.send_signal(signal.SIGKILL)
            thread.join(10)
            assert not thread.is_alive()
            assert answer["at"] - killed_at < 1.5
            if "got" in answer:  # it all landed before the kill: complete and exact
                assert [bytes(memoryview(g)) for g in answer["got"]] == [d.tobytes() for d in data]
            elif "n" in answer:  # a clean shorter prefix: what was pinned is exact
                n = answer["n"]
                assert 0 <= n <= 32
                if n:
                    assert [bytes(memoryview(g)) for g in b.get(keys[:n])] == [d.tobytes() for d in data[:n]]
            else:
                assert isinstance(answer["miss"], BlockNotFoundError)
            landed = cluster.counters(1).get("remote_fetch_blocks", 0)
            started = time.monotonic()
            with b.pin(keys, prefix=True) as pinned:  # A may still be in B's view: it fails fast, nothing hangs
                assert len(pinned) == landed
            assert time.monotonic() - started < 1.5
            cluster.wait_members(1, timeout_s=4, nodes=[1])  # gone from B's view within the lease TTL (2 s) + 1 s
            assert b.lookup(keys) == landed  # what landed is whole and local; nothing is attributed to A any more
        assert_no_leaked_slots(cluster, 1, 4 * MiB)


def test_reader_node_killed_mid_fetch_releases_the_holders_pins(etcd, cluster_name, tmp_path, fingerprint) -> None:
    flags = {"host_memory": "512MiB", "remote_fetch_deadline_ms": 5000}
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, flags=flags) as cluster:
        with cluster.client(0, fingerprint) as a:
            keys = a.block_keys(np.arange(16 * 32))
            a.put(keys, blocks(32, 4 * MiB))
            before = host_tier(cluster.store_stats(0))
            b = cluster.client(1, fingerprint, timeout_s=5)
            thread = threading.Thread(target=lambda: _quietly(lambda: b.pin(keys, prefix=True)))
            thread.start()
            time.sleep(0.1)
            cluster.nodes[1].proc.send_signal(signal.SIGKILL)
            thread.join(10)
            deadline = time.monotonic() + 2
            while cluster.store_stats(0).pins_held and time.monotonic() < deadline:
                time.sleep(0.05)
            stats = cluster.store_stats(0)
            assert stats.pins_held == 0 and host_tier(stats) == before
            assert a.get(keys[:2])  # A keeps serving
            b.close()


def _quietly(call) -> None:
    try:
        call()
    except Exception:
        pass


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_stale_directory_entry_is_repaired_and_reads_a_shorter_prefix(etcd, cluster_name, tmp_path, fingerprint, path) -> None:
    """A's removals are never announced (a test fault): B's directory answer is stale, the fetch finds the holder
    without the block (over UCX the holder refuses the chunk, and gRPC Fetch says where its run ends), the entry
    is repaired, and the engine sees a shorter prefix and no error."""
    env = {0: {"KVSTORE_TEST_DROP_REMOVED_ANNOUNCES": "1"}}
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, node_env=env, flags=DATA_PATHS[path]) as cluster:
        assert "announces no removals" in cluster.log(0)
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
            keys = a.block_keys(np.arange(16 * 8))
            data = blocks(8, 256 << 10)  # large enough that UCX receives them straight into pool slots
            a.put(keys, data)
            assert a.delete(keys[4:]) == 4  # gone from A; the directory is not told
            assert b.lookup(keys) == 8  # stale: the homes still name A for all eight
            with b.pin(keys, prefix=True) as pinned:
                assert len(pinned) == 4
            assert [bytes(memoryview(g)) for g in b.get(keys[:4])] == [d.tobytes() for d in data[:4]]
            counters = cluster.counters(1)
            assert counters["remote_fetch_not_found"] == 1
            deadline = time.monotonic() + 3
            while b.lookup(keys) != 4 and time.monotonic() < deadline:  # the repair runs off the reader's path
                time.sleep(0.05)
            assert b.lookup(keys) == 4  # keys[4] is no longer attributed to A
        repairs = sum(cluster.counters(i).get("directory_repairs", 0) for i in (0, 1))
        assert repairs >= 1
        assert_no_leaked_slots(cluster, 1, 256 << 10)  # slots reserved for the refused chunk went back


@pytest.mark.parametrize("path", sorted(DATA_PATHS))
def test_corrupt_bytes_at_rest_on_the_holder_are_never_returned(etcd, cluster_name, tmp_path, fingerprint, path) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, flags=DATA_PATHS[path]) as cluster:
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
            keys = a.block_keys(np.arange(16 * 8))
            data = blocks(8, 256 << 10)  # large enough that UCX receives them straight into pool slots
            a.put(keys, data)
            grant = a.control.pin(fingerprint.id, [k.digest for k in keys])
            a.control.unpin([grant.pin_id])
            (pool,) = Path("/dev/shm").glob(f"kvstore-{cluster.nodes[0].proc.pid}-*")
            with open(pool, "r+b") as f, mmap.mmap(f.fileno(), 0) as view:
                view[grant.offsets[2] + 1000] ^= 0xFF  # one flipped byte in A's copy of block 2
            with pytest.raises(BlockNotFoundError):
                b.get(keys)
            with b.pin(keys, prefix=True) as pinned:
                assert len(pinned) == 2
            got = b.get(keys[:2])
            assert [bytes(memoryview(g)) for g in got] == [d.tobytes() for d in data[:2]]
        assert cluster.counters(1)["remote_checksum_failures"] >= 2
        assert cluster.counters(1)["remote_fetch_blocks"] == 2
        assert_no_leaked_slots(cluster, 1, 256 << 10)  # the corrupt block's slot (and those after it) went back


def test_a_client_never_maps_another_nodes_pool_or_socket(etcd, cluster_name, tmp_path, fingerprint, monkeypatch) -> None:
    """Two nodes on one box with distinct host ids: a client with node B's host id uses B's shm and local socket,
    and reaches A only over gRPC, even though A's pool and socket are on the same filesystem."""
    flags = {"host_memory": "64MiB"}
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, flags=flags) as cluster:
        monkeypatch.setenv("KVSTORE_HOST_ID", cluster.host_id(1))
        with KVClient(cluster.nodes[0].address, fingerprint, token=TENANT_TOKENS["alpha"]) as on_a, \
                KVClient(cluster.nodes[1].address, fingerprint, token=TENANT_TOKENS["alpha"]) as on_b:
            assert on_b.transport_choice.chosen == "shm" and on_b.transport_choice.control == "local"
            assert on_a.transport_choice.chosen == "grpc" and on_a.transport_choice.control == "grpc"
            assert any("host" in why for why in on_a.transport_choice.fallbacks)
            b_pool = on_b.control.data_plane().shm_name
            assert b_pool.startswith(f"kvstore-{cluster.nodes[1].proc.pid}-")
            keys = on_a.block_keys(np.arange(16 * 4))
            data = blocks(4, 32 << 10)
            on_a.put(keys, data)
            got = on_b.get(keys)  # fetched node to node, then read from B's own pool
            assert [bytes(memoryview(g)) for g in got] == [d.tobytes() for d in data]
            maps = Path("/proc/self/maps").read_text()
            assert f"kvstore-{cluster.nodes[0].proc.pid}-" not in maps
            assert b_pool in maps


def _peer_call(address: str, method: str, request, token: str = PEER_TOKEN):
    with grpc.insecure_channel(address) as channel:
        stub = ppb_grpc.PeerServiceStub(channel)
        return getattr(stub, method)(request, metadata=(("authorization", f"Bearer {token}"),), timeout=5)


def test_zombie_and_stale_view_peer_calls_are_refused(etcd, cluster_name, tmp_path, fingerprint) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as cluster:
        incarnations = cluster.incarnations(0)
        revision = cluster.cluster_status(0).nodes[0].view_revision
        address = cluster.nodes[0].address

        def locate(sender: str, sender_inc: int, target_inc: int, view_rev: int = revision):
            env = ppb.Envelope(sender=sender, sender_incarnation=sender_inc, sender_view_revision=view_rev, target_incarnation=target_inc)
            return _peer_call(address, "Locate", ppb.LocateRequest(envelope=env, fingerprint_id=fingerprint.id, skeys=[b"s" * 24]))

        assert not locate("n1", incarnations["n1"], incarnations["n0"]).found  # a live member's call is answered
        refused = [("n1", incarnations["n1"] - 1, incarnations["n0"], "PERMISSION_DENIED"),  # an old incarnation of n1
                   ("ghost", 7, incarnations["n0"], "PERMISSION_DENIED"),  # never a member
                   ("n1", incarnations["n1"], incarnations["n0"] - 1, "FAILED_PRECONDITION")]  # names an old n0
        for sender, sender_inc, target_inc, code in refused:
            with pytest.raises(grpc.RpcError) as err:
                locate(sender, sender_inc, target_inc)
            assert err.value.code().name == code
        # A sender claiming a newer view than the receiver's is given a second to show up, then refused.
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            locate("ghost", 9, incarnations["n0"], view_rev=revision + 1000)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and 0.9 < time.monotonic() - started < 3
        counters = cluster.counters(0)
        assert counters["peer_rejected_zombie"] == 3 and counters["peer_rejected_stale_view"] == 1


def test_etcd_down_nodes_serve_local_only_then_recover(make_etcd, cluster_name, tmp_path, fingerprint) -> None:
    """All of etcd gone: every node fences; the strict node refuses reads, the default one serves its local
    blocks, neither accepts a peer call; when etcd is back they rejoin and remote reads work again."""
    etcd = make_etcd()
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2, node_flags={0: {"cluster_strict_fence": True}}) as cluster:
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
            keys = a.block_keys(np.arange(16 * 4))
            a.put(keys, blocks(4, 4096))
            assert len(b.get(keys[:2])) == 2  # B holds copies of the first two
            old = cluster.incarnations(0)
            for member in etcd.members:
                member.pause()
            try:
                deadline = time.monotonic() + 5
                while not all(cluster.cluster_status(i).nodes[0].fenced for i in (0, 1)):
                    assert time.monotonic() < deadline, "nodes did not fence within the lease TTL"
                    time.sleep(0.1)
                with pytest.raises(UnavailableError):
                    a.lookup(keys)  # strict: no reads while fenced
                assert b.lookup(keys) == 2  # default: local blocks only, nothing from the (fenced) cluster
                env = ppb.Envelope(sender="n0", sender_incarnation=old["n0"], sender_view_revision=1 << 40, target_incarnation=old["n1"])
                with pytest.raises(grpc.RpcError) as err:
                    _peer_call(cluster.nodes[1].address, "Locate", ppb.LocateRequest(envelope=env, fingerprint_id=fingerprint.id, skeys=[b"s" * 24]))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert cluster.counters(1)["peer_rejected_fenced"] >= 1
            finally:
                for member in etcd.members:
                    member.resume()
            cluster.wait_members(2, timeout_s=10)
            new = cluster.incarnations(0)
            assert new["n0"] > old["n0"] and new["n1"] > old["n1"]
            deadline = time.monotonic() + 5
            while b.lookup(keys) != 4:  # the rejoined holder resynced its directory entries
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert len(b.get(keys)) == 4 and a.lookup(keys) == 4


def test_drain_leaves_the_cluster_at_once(etcd, cluster_name, tmp_path, fingerprint) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as cluster:
        with grpc.insecure_channel(cluster.nodes[0].address) as channel:
            started = time.monotonic()
            apb_grpc.AdminStub(channel).Drain(apb.DrainRequest(timeout_ms=100), metadata=(("authorization", f"Bearer {ADMIN_TOKEN}"),), timeout=10)
        cluster.wait_members(1, timeout_s=2, nodes=[1])
        assert time.monotonic() - started < 2  # not a lease TTL (2 s) after the drain: the lease was revoked
        assert cluster.nodes[0].proc.wait(10) == 0


def test_admin_delete_is_applied_on_every_node(etcd, cluster_name, tmp_path, fingerprint) -> None:
    with ClusterProcs(tmp_path, etcd, cluster_name, size=2) as cluster:
        with cluster.client(0, fingerprint, "alpha") as a, cluster.client(1, fingerprint, "alpha") as b, \
                cluster.client(0, fingerprint, "beta") as other:
            keys = a.block_keys(np.arange(16 * 6))
            a.put(keys, blocks(6, 4096))
            other.put(keys, blocks(6, 4096, seed=9))
            assert len(b.get(keys[:3])) == 3  # B holds copies of three
            report = cluster.delete(1, apb.BlockSelector(tenant="alpha"))
            assert report.cluster_wide and list(report.unconfirmed_nodes) == [] and report.deleted == 3
            assert a.lookup(keys) == 0 and b.lookup(keys) == 0
            with pytest.raises(BlockNotFoundError):
                b.get(keys[:1])
            assert other.lookup(keys) == 6  # another tenant's blocks of the same chain stay
            local = cluster.delete(1, apb.BlockSelector(tier=2))  # by tier: this node's copies only
            assert not local.cluster_wide


def test_a_dead_directory_home_does_not_hide_blocks(etcd, cluster_name, tmp_path, fingerprint) -> None:
    """Three nodes: a reader asks one home per key; when that home is dead (still in the view), it asks the
    key's other home, so every block A holds is still found, before the view has dropped the dead one."""
    from kvstore.cluster.remote_tier import SETTLE_S

    with ClusterProcs(tmp_path, etcd, cluster_name, size=3) as cluster:
        started = time.monotonic()
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
            keys = a.block_keys(np.arange(16 * 64))
            a.put(keys, blocks(64, 1024))
            time.sleep(max(0.0, SETTLE_S + 0.2 - (time.monotonic() - started)))  # past the settle window: one home a key
            cluster.nodes[2].proc.send_signal(signal.SIGKILL)
            assert b.lookup(keys) == 64
            assert cluster.counters(1)["remote_locate_errors"] >= 1  # C was asked, failed, and its keys went to A
            assert len(b.get(keys)) == 64


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_a_partitioned_node_fences_keeps_its_local_clients_and_comes_back(make_etcd, cluster_name, tmp_path, fingerprint, strict) -> None:
    """Node A cut off from its peers and from etcd (network namespaces, silent drops): A fences within the lease
    TTL; the others drop A within TTL + 1 s; A's own clients are still served (refused in strict mode); after the
    heal A rejoins with a new incarnation and its blocks are found from the other nodes within 5 s."""
    need_netns()
    ttl = 2.0
    with Bridge() as bridge:
        etcd = make_etcd(host=bridge.root_address)
        node_flags = {0: {"cluster_strict_fence": strict}}
        with ClusterProcs(tmp_path, etcd, cluster_name, size=3, bridge=bridge, node_flags=node_flags) as cluster:
            with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
                keys = a.block_keys(np.arange(16 * 6))
                a.put(keys, blocks(6, 8192, seed=5))
                assert b.lookup(keys) == 6
                old = cluster.incarnations(1)["n0"]
                ns = cluster.namespace(0)
                reader = subprocess.Popen(ns.command([sys.executable, "-m", "tests.kvstore.cluster.ns_reader", "--address", cluster.nodes[0].address,
                                                      "--token", TENANT_TOKENS["alpha"], "--admin-token", ADMIN_TOKEN, "--blocks", "6",
                                                      "--size", "8192", "--seed", "5"]),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                          env={**os.environ, "PYTHONPATH": str(ROOT), "KVSTORE_HOST_ID": cluster.host_id(0)})
                cut_at = time.monotonic()
                bridge.isolate("n0")
                cluster.wait_members(2, timeout_s=ttl + 3, nodes=[1, 2])
                dropped_after = time.monotonic() - cut_at
                out, err = reader.communicate(timeout=30)
                seen = json.loads(out.strip().splitlines()[-1])
                assert seen["fenced_at"] is not None, err
                assert seen["fenced_at"] - cut_at <= ttl
                assert dropped_after <= ttl + 1
                assert seen["transport"] == "shm"  # a client of A's own host
                if strict:
                    assert seen["lookup"] == "FencedError" and seen["get"] == "FencedError"  # an UnavailableError
                else:
                    assert seen["lookup"] == 6 and seen["get"] is True
                healed_at = time.monotonic()
                bridge.heal()
                cluster.wait_members(3, timeout_s=10)
                assert cluster.incarnations(1)["n0"] > old
                while b.lookup(keys) != 6:
                    assert time.monotonic() - healed_at < 5, "A's blocks not findable again within 5 s of the heal"
                    time.sleep(0.05)
                assert len(b.get(keys)) == 6


def test_a_stopped_holder_is_dropped_then_rejoins_as_a_new_incarnation(etcd, cluster_name, tmp_path, fingerprint) -> None:
    """SIGSTOP past the lease TTL: the holder is gone from every view within TTL + 1 s and readers fall back at
    once; on SIGCONT it fences, rejoins with a new incarnation, and a call carrying its old incarnation is refused."""
    ttl = 2.0
    with ClusterProcs(tmp_path, etcd, cluster_name, size=3) as cluster:
        with cluster.client(0, fingerprint) as a, cluster.client(1, fingerprint) as b:
            keys = a.block_keys(np.arange(16 * 4))
            a.put(keys, blocks(4, 4096))
            old = cluster.incarnations(1)
            holder = cluster.nodes[0].proc
            holder.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                cluster.wait_members(2, timeout_s=ttl + 2, nodes=[1, 2])
                assert time.monotonic() - stopped_at <= ttl + 1
                started = time.monotonic()
                assert b.lookup(keys) == 0  # nothing is attributed to the stopped holder any more
                with pytest.raises(BlockNotFoundError):
                    b.get(keys)
                assert time.monotonic() - started < 1.0
            finally:
                holder.send_signal(signal.SIGCONT)
            cluster.wait_members(3, timeout_s=10)
            new = cluster.incarnations(1)
            assert new["n0"] > old["n0"] and cluster.counters(0)["cluster_fences"] >= 1
            deadline = time.monotonic() + 5
            while b.lookup(keys) != 4:  # the new incarnation resynced its blocks to their homes
                assert time.monotonic() < deadline
                time.sleep(0.05)
            env = ppb.Envelope(sender="n0", sender_incarnation=old["n0"], sender_view_revision=1, target_incarnation=new["n1"])
            with pytest.raises(grpc.RpcError) as err:
                _peer_call(cluster.nodes[1].address, "Locate", ppb.LocateRequest(envelope=env, fingerprint_id=fingerprint.id, skeys=[b"s" * 24]))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert cluster.counters(1)["peer_rejected_zombie"] >= 1
