"""What does cluster mode cost and deliver? Remote reads, fully remote lookups, commit visibility, local hits.

    python bench/cluster.py            # 3 nodes + 1 etcd on loopback, ~1 min on a 2-core box
    python bench/cluster.py --quick

Real processes: one etcd (tests/etcdproc.py) and three `kvstore serve` nodes (tests/clusterproc.py) with
distinct host ids, plus a plain server with cluster mode off as the anchor for local hits. Each row is a
ratio to an anchor measured in the same run:

- remote get: a client of node B (on B's host: shm) gets blocks only node A holds (B fetches them from A
  over gRPC Fetch, checks and stores them, then serves them); anchors: the same client's get of blocks
  already local (shm), and a client on another host getting the same blocks straight from A (gRPC), and
  raw TCP over loopback (one socket, the same bytes).
- 512-key prefix lookup, fully remote (3 nodes): B's Lookup of a chain A holds (Locate at each key's homes).
- put + announce: the put's answer waits for the directory homes' acknowledgement (cluster_announce_wait_ms);
  anchor: the same put on the cluster-off server. Visibility: lookups on B right after each put returns.
- local hits: Lookup and Pin of blocks the node holds, cluster mode on vs off.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvclient import KVClient  # noqa: E402
from tests.clusterproc import TENANT_TOKENS, ClusterProcs, write_token_files  # noqa: E402
from tests.conftest import make_fingerprint  # noqa: E402
from tests.etcdproc import EtcdCluster  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

MiB = 1 << 20


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) * 1000


def timed(call, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t0)
    return out


def raw_tcp_gbps(nbytes: int) -> float:
    """One loopback TCP stream moving nbytes: the floor any network data path sits on."""
    payload = memoryview(bytearray(4 * MiB))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(4 * MiB)
        got = 0
        while got < nbytes:
            got += conn.recv_into(buf)
        conn.sendall(b"k")
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    client = socket.create_connection(server.getsockname())
    t0 = time.perf_counter()
    sent = 0
    while sent < nbytes:
        client.sendall(payload)
        sent += len(payload)
    client.recv(1)
    elapsed = time.perf_counter() - t0
    client.close()
    thread.join()
    server.close()
    return nbytes / elapsed / 1e9


def client_on(host_id: str, address: str, fingerprint, **kw) -> KVClient:
    """A client that believes it runs on host_id (shm and the local socket only where that is the server's host)."""
    old = os.environ.get("KVSTORE_HOST_ID")
    os.environ["KVSTORE_HOST_ID"] = host_id
    try:
        return KVClient(address, fingerprint, token=TENANT_TOKENS["alpha"], **kw)
    finally:
        if old is None:
            os.environ.pop("KVSTORE_HOST_ID", None)
        else:
            os.environ["KVSTORE_HOST_ID"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rounds = 3 if args.quick else 8
    lookups = 100 if args.quick else 400
    fp = make_fingerprint()
    rng = np.random.default_rng(0)
    base = Path(tempfile.mkdtemp(prefix="kvstore-bench-cluster-"))
    flags = {"host_memory": "1GiB", "ssd_capacity": "2GiB", "remote_fetch_deadline_ms": 10000}
    rows: list[tuple[str, str, str]] = []
    with EtcdCluster(base / "etcd", members=1) as etcd, ClusterProcs(base / "nodes", etcd, "bench", size=3, flags=flags) as cluster:
        a_addr, b_addr = cluster.nodes[0].address, cluster.nodes[1].address
        writer = client_on(cluster.host_id(0), a_addr, fp)
        reader = client_on(cluster.host_id(1), b_addr, fp)  # B's own host: shm
        direct = client_on("elsewhere", a_addr, fp)  # another host reading A directly (gRPC)
        n_blocks, block = 32, MiB

        # ---- remote get vs local get vs direct get from the holder --------------------------------
        remote_s, local_s, direct_s = [], [], []
        for r in range(rounds):
            keys = writer.block_keys(np.arange(16 * n_blocks) + 10_000 * (r + 1))
            writer.put(keys, [rng.integers(0, 256, block, dtype=np.uint8) for _ in range(n_blocks)])
            t0 = time.perf_counter()
            reader.get(keys)  # fetched A -> B, then out of B's pool
            remote_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            reader.get(keys)  # local now
            local_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            direct.get(keys)
            direct_s.append(time.perf_counter() - t0)
        nbytes = n_blocks * block
        gbps = lambda s: nbytes / statistics.median(s) / 1e9  # noqa: E731
        tcp = raw_tcp_gbps(nbytes * 2)
        rows += [
            ("remote get, 32 x 1 MiB (B fetches from A, serves over shm)", f"{gbps(remote_s):.2f} GB/s", "1.00"),
            ("  local get on B after the fetch (shm)", f"{gbps(local_s):.2f} GB/s", f"{gbps(local_s) / gbps(remote_s):.2f}x remote"),
            ("  direct get from the holder A, another host (gRPC)", f"{gbps(direct_s):.2f} GB/s", f"remote = {gbps(remote_s) / gbps(direct_s):.2f}x of it"),
            ("  raw TCP, one loopback stream", f"{tcp:.2f} GB/s", f"remote = {gbps(remote_s) / tcp:.2f}x of it"),
        ]

        # ---- 512-key prefix lookup, fully remote (3 nodes) -----------------------------------------
        chain = writer.block_keys(np.arange(16 * 512) + 900_000)
        writer.put(chain, [rng.integers(0, 256, 1024, dtype=np.uint8) for _ in range(512)])
        assert reader.lookup(chain) == 512
        remote_lookup = timed(lambda i: reader.lookup(chain), lookups)
        local_chain = reader.block_keys(np.arange(16 * 512) + 950_000)
        reader.put(local_chain, [rng.integers(0, 256, 1024, dtype=np.uint8) for _ in range(512)])
        local_lookup = timed(lambda i: reader.lookup(local_chain), lookups)
        rows += [
            ("512-key prefix lookup, fully remote: p50", f"{pct(remote_lookup, 50):.2f} ms", f"{pct(remote_lookup, 50) / pct(local_lookup, 50):.1f}x local"),
            ("512-key prefix lookup, fully remote: p99", f"{pct(remote_lookup, 99):.2f} ms", f"{pct(remote_lookup, 99) / pct(local_lookup, 99):.1f}x local"),
            ("  512-key prefix lookup, local (anchor): p50", f"{pct(local_lookup, 50):.2f} ms", ""),
        ]

        # ---- put + announce, and visibility right after -------------------------------------------
        puts, seen = [], 0
        for i in range(lookups):
            keys = writer.block_keys(np.arange(64) + 2_000_000 + 100 * i)
            payload = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(4)]
            t0 = time.perf_counter()
            writer.put(keys, payload)
            puts.append(time.perf_counter() - t0)
            seen += reader.lookup(keys) == 4

        # ---- the cluster-off anchor: same puts, same local hits --------------------------------------
        tokens, _ = write_token_files(base / "plain-auth")
        plain = ServerProc(base / "plain", flags={"insecure_no_auth": False, "tokens_file": tokens, "ucx": False, **flags},
                           env={"KVSTORE_HOST_ID": "plain-host"}).start()
        try:
            solo = client_on("plain-host", plain.address, fp)
            plain_puts = []
            for i in range(lookups):
                keys = solo.block_keys(np.arange(64) + 2_000_000 + 100 * i)
                payload = [rng.integers(0, 256, 4096, dtype=np.uint8) for _ in range(4)]
                t0 = time.perf_counter()
                solo.put(keys, payload)
                plain_puts.append(time.perf_counter() - t0)
            solo.put(local_chain, [rng.integers(0, 256, 1024, dtype=np.uint8) for _ in range(512)])
            off_lookup = timed(lambda i: solo.lookup(local_chain), lookups)
            off_pin = timed(lambda i: solo.pin(local_chain[:64]).release(), lookups)
            on_pin = timed(lambda i: reader.pin(local_chain[:64]).release(), lookups)
            solo.close()
        finally:
            plain.stop()
        rows += [
            ("put of 4 x 4 KiB, cluster on (waits for the homes): p50", f"{pct(puts, 50):.2f} ms", f"+{pct(puts, 50) - pct(plain_puts, 50):.2f} ms vs off"),
            ("put of 4 x 4 KiB, cluster on: p99", f"{pct(puts, 99):.2f} ms", f"+{pct(puts, 99) - pct(plain_puts, 99):.2f} ms vs off"),
            ("  put of 4 x 4 KiB, cluster off (anchor): p50", f"{pct(plain_puts, 50):.2f} ms", ""),
            ("lookup on another node right after the put returns", f"{seen}/{lookups} full prefix", ""),
            ("local-hit 512-key lookup, cluster on: p50", f"{pct(local_lookup, 50):.3f} ms", f"{pct(local_lookup, 50) / pct(off_lookup, 50):.2f}x off"),
            ("local-hit 64-block pin, cluster on: p50", f"{pct(on_pin, 50):.3f} ms", f"{pct(on_pin, 50) / pct(off_pin, 50):.2f}x off"),
            ("  local-hit 512-key lookup / 64-block pin, cluster off (anchors): p50", f"{pct(off_lookup, 50):.3f} / {pct(off_pin, 50):.3f} ms", ""),
        ]
        for c in (writer, reader, direct):
            c.close()
    width = max(len(r[0]) for r in rows)
    print(f"{'measure'.ljust(width)}  {'value':>22}  ratio")
    for name, value, ratio in rows:
        print(f"{name.ljust(width)}  {value:>22}  {ratio}")


if __name__ == "__main__":
    main()
