"""How fast do blocks move, per transport? put/get GB/s and per-call p50/p99 against memcpy and raw loopback TCP.

Starts its own server (tests/serverproc.py), then for each transport (shm, ucx,
grpc), block size (64 KiB, 1 MiB, 4 MiB) and client count (1, 4 processes):
every client puts its own working set in calls of --call-mib, then gets it back
--passes times into preallocated buffers (the engine's paged cache, in real use).
GB/s is all clients' bytes over the wall time from the first start to the last
finish; p50/p99 are per call. The references are measured in the same run:
memcpy (numpy copy of the same blocks, one core) and raw loopback TCP (Python
sockets, sendall/recv_into of the same blocks). The UCX server gets UCX_TLS=tcp,self
so the ucx rows really are loopback TCP, not shared memory.

Last, the control plane: median round trip of a 1-key Lookup and of a 460-key Pin
(with the deferred unpin the next Pin carries, as a stream of engine prefix loads
sends them) over gRPC and over the server's local control socket, in alternating rounds.

    python bench/throughput.py                  # full table, a few minutes on 2 cores
    python bench/throughput.py --quick          # smaller working sets, 1 MiB blocks only
    python bench/throughput.py --control-only   # just the control-plane round trips
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvwire.ucxenv import import_ucxx  # noqa: E402
from tests.serverproc import ServerProc  # noqa: E402

KIB, MIB = 1 << 10, 1 << 20
UCX_SERVER_ENV = {"UCX_TLS": "tcp,self", "UCX_NET_DEVICES": "lo", "KVSTORE_UCX_ALL_INTERFACES": "true"}


@dataclass(frozen=True)
class Row:
    transport: str
    op: str
    block_bytes: int
    clients: int
    gbps: float
    p50_ms: float
    p99_ms: float


def percentile_ms(latencies: list[float], q: float) -> float:
    return float(np.percentile(np.array(latencies) * 1000, q)) if latencies else float("nan")


def blocks_for(block_bytes: int, working_set: int, seed: int) -> list[np.ndarray]:
    n = max(1, working_set // block_bytes)
    data = np.random.default_rng(seed).integers(0, 256, n * block_bytes, dtype=np.uint8)
    return [data[i * block_bytes : (i + 1) * block_bytes] for i in range(n)]


# ---- client worker processes ---------------------------------------------------------


def client_worker(idx: int, address: str, transport: str, sizes: list[int], args: dict, barrier, results) -> None:
    from kvclient import KVClient
    from tests.conftest import make_fingerprint

    with KVClient(address, make_fingerprint(), tenant=f"bench-{idx}", transport=transport) as client:
        if client.stats()["client"]["transport"] != transport:
            raise SystemExit(f"asked for {transport}, got {client.stats()['client']}")
        for size in sizes:
            blocks = blocks_for(size, args["working_set"], seed=idx)
            per_call = max(1, args["call_bytes"] // size)
            keys = client.block_keys(list(range(idx * 10**7, idx * 10**7 + len(blocks) * 16)))
            outs = [np.ones(size, np.uint8) for _ in blocks]  # resident, like an engine's paged cache
            for op, passes in (("put", 1), ("get", args["passes"])):
                latencies = []
                barrier.wait()
                start = time.time()
                for _ in range(passes):
                    for lo in range(0, len(blocks), per_call):
                        t0 = time.perf_counter()
                        if op == "put":
                            client.put(keys[lo : lo + per_call], blocks[lo : lo + per_call])
                        else:
                            client.get(keys[lo : lo + per_call], out=outs[lo : lo + per_call])
                        latencies.append(time.perf_counter() - t0)
                results.put((size, op, start, time.time(), passes * len(blocks) * size, latencies))
            if not all(np.array_equal(a, b) for a, b in zip(outs, blocks)):
                raise SystemExit(f"{transport} returned different bytes")
            client.delete(keys)
            barrier.wait()


def run_transport(address: str, transport: str, clients: int, sizes: list[int], args: dict) -> list[Row]:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=client_worker, args=(i, address, transport, sizes, args, barrier, results)) for i in range(clients)]
    for p in procs:
        p.start()
    rows = []
    for size in sizes:
        for op in ("put", "get"):
            got = [results.get(timeout=600) for _ in range(clients)]
            assert all(g[0] == size and g[1] == op for g in got), "workers out of step"
            wall = max(g[3] for g in got) - min(g[2] for g in got)
            lat = [x for g in got for x in g[5]]
            rows.append(Row(transport, op, size, clients, sum(g[4] for g in got) / wall / 1e9, percentile_ms(lat, 50), percentile_ms(lat, 99)))
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise RuntimeError(f"{transport} worker exited with {p.exitcode}")
    return rows


# ---- references -----------------------------------------------------------------------


def memcpy_reference(block_bytes: int, args: dict) -> Row:
    src = blocks_for(block_bytes, args["working_set"], seed=99)
    dst = [np.ones_like(b) for b in src]
    per_call = max(1, args["call_bytes"] // block_bytes)
    latencies = []
    start = time.perf_counter()
    for _ in range(args["passes"]):
        for lo in range(0, len(src), per_call):
            t0 = time.perf_counter()
            for s, d in zip(src[lo : lo + per_call], dst[lo : lo + per_call]):
                np.copyto(d, s)
            latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return Row("memcpy", "copy", block_bytes, 1, args["passes"] * len(src) * block_bytes / wall / 1e9, percentile_ms(latencies, 50), percentile_ms(latencies, 99))


def _tcp_sender(port_queue, block_bytes: int, args: dict) -> None:
    src = blocks_for(block_bytes, args["working_set"], seed=98)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_queue.put(server.getsockname()[1])
        conn, _ = server.accept()
        with conn:
            per_call = max(1, args["call_bytes"] // block_bytes)
            while conn.recv(1):  # one byte asks for one call's worth of blocks
                lo = int.from_bytes(conn.recv(8), "little")
                for block in src[lo : lo + per_call]:
                    conn.sendall(block)


def tcp_reference(block_bytes: int, args: dict) -> Row:
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    sender = ctx.Process(target=_tcp_sender, args=(ports, block_bytes, args), daemon=True)
    sender.start()
    n = max(1, args["working_set"] // block_bytes)
    dst = [memoryview(np.ones(block_bytes, np.uint8)) for _ in range(n)]
    per_call = max(1, args["call_bytes"] // block_bytes)
    latencies = []
    with socket.create_connection(("127.0.0.1", ports.get(timeout=60))) as conn:
        start = time.perf_counter()
        for _ in range(args["passes"]):
            for lo in range(0, n, per_call):
                t0 = time.perf_counter()
                conn.sendall(b"x" + lo.to_bytes(8, "little"))
                for view in dst[lo : lo + per_call]:
                    got = 0
                    while got < block_bytes:
                        got += conn.recv_into(view[got:])
                latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
    sender.join(10)
    return Row("tcp-loopback", "recv", block_bytes, 1, args["passes"] * n * block_bytes / wall / 1e9, percentile_ms(latencies, 50), percentile_ms(latencies, 99))


# ---- control plane --------------------------------------------------------------------

CONTROL_PIN_KEYS = 460  # a 7360-token prefix in 16-token blocks
CONTROL_CONTAINS_KEYS = 1024  # the first CONTROL_PIN_KEYS present, the rest not
CONTROL_PATHS = ("grpc", "local")


def control_round_trips(address: str, rounds: int = 5, calls: int = 200) -> dict[tuple[str, str], float]:
    """Median ms per call, by (call, control path): two clients, the same blocks, rounds alternating between them."""
    from kvclient import KVClient
    from tests.conftest import make_fingerprint

    clients = {path: KVClient(address, make_fingerprint(), tenant="bench-control", transport="shm", local_control=path == "local") for path in CONTROL_PATHS}
    try:
        for path, client in clients.items():
            if client.stats()["client"]["control"] != path:
                raise SystemExit(f"asked for control over {path}, got {client.stats()['client']}")
        keys = clients["grpc"].block_keys(list(range(CONTROL_PIN_KEYS * 16)))
        probe = clients["grpc"].block_keys(list(range(CONTROL_CONTAINS_KEYS * 16)))  # its first CONTROL_PIN_KEYS are keys
        clients["grpc"].put(keys, [np.full(4 * KIB, i % 251, np.uint8) for i in range(len(keys))])
        digests = [k.digest for k in keys]
        samples: dict[tuple[str, str], list[float]] = {}

        def lookup(client) -> None:
            client.lookup(keys[:1])

        def pin(client) -> None:
            client.pin(digests).release()  # deferred: the next Pin drops it

        def contains(client) -> None:
            client.contains(probe)

        def prefix(client) -> None:
            client.lookup(probe)

        for _ in range(rounds):
            for path, client in clients.items():
                for name, call in (("lookup", lookup), ("pin", pin), ("contains", contains), ("prefix", prefix)):
                    for i in range(calls + 10):  # the first few warm caches and connections
                        t0 = time.perf_counter()
                        call(client)
                        if i >= 10:
                            samples.setdefault((name, path), []).append(time.perf_counter() - t0)
        clients["grpc"].delete(keys)
    finally:
        for client in clients.values():
            client.close()
    return {key: statistics.median(values) * 1000 for key, values in samples.items()}


def print_control(medians: dict[tuple[str, str], float]) -> None:
    print("\ncontrol round trips (median ms per call, 1 client on the server's host):")
    for name, label in (("lookup", "Lookup, 1 key"), ("pin", f"Pin+deferred unpin, {CONTROL_PIN_KEYS} keys"),
                        ("contains", f"contains, {CONTROL_CONTAINS_KEYS} keys"), ("prefix", f"prefix lookup, {CONTROL_CONTAINS_KEYS} keys")):
        grpc_ms, local_ms = medians[(name, "grpc")], medians[(name, "local")]
        print(f"  {label:<30} grpc {grpc_ms:6.3f}   local socket {local_ms:6.3f}   ({grpc_ms / local_ms:4.1f}x)")


# ---- report ---------------------------------------------------------------------------


def size_label(n: int) -> str:
    return f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def print_table(rows: list[Row]) -> None:
    print(f"\n{'transport':<13}| {'op':<5}| {'block size':>10} | {'clients':>7} | {'GB/s':>7} | {'p50 ms':>8} | {'p99 ms':>8}")
    print("-" * 75)
    for r in rows:
        print(f"{r.transport:<13}| {r.op:<5}| {size_label(r.block_bytes):>10} | {r.clients:>7} | {r.gbps:>7.2f} | {r.p50_ms:>8.2f} | {r.p99_ms:>8.2f}")


def find(rows: list[Row], transport: str, op: str, size: int, clients: int = 1) -> Row | None:
    return next((r for r in rows if (r.transport, r.op, r.block_bytes, r.clients) == (transport, op, size, clients)), None)


def print_ratios(rows: list[Row], adjacent: dict[str, Row]) -> None:
    """Reference rows measured right before each transport's runs, so a busy machine skews both sides alike."""
    print("\nratios (1 MiB blocks, 1 client, same run; references re-measured just before each transport):")
    checks = [
        ("shm get / memcpy", find(rows, "shm", "get", MIB), adjacent.get("shm-memcpy"), 0.70),
        ("ucx get / raw loopback TCP", find(rows, "ucx", "get", MIB), adjacent.get("ucx-tcp"), 0.60),
        ("shm get / grpc get", find(rows, "shm", "get", MIB), find(rows, "grpc", "get", MIB), 3.0),
        ("ucx get / grpc get", find(rows, "ucx", "get", MIB), find(rows, "grpc", "get", MIB), 3.0),
        ("shm put / grpc put", find(rows, "shm", "put", MIB), find(rows, "grpc", "put", MIB), 3.0),
        ("ucx put / grpc put", find(rows, "ucx", "put", MIB), find(rows, "grpc", "put", MIB), 3.0),
        # the fallback at least as fast as Redis over TCP: Redis's own ratios on a 2-core host (pipelined 1 MiB values)
        ("grpc get / raw loopback TCP", find(rows, "grpc", "get", MIB), adjacent.get("grpc-tcp"), 0.36),
        ("grpc put / raw loopback TCP", find(rows, "grpc", "put", MIB), adjacent.get("grpc-tcp"), 0.67),
    ]
    for name, num, den, target in checks:
        if num is None or den is None:
            print(f"  {name:<28} n/a (not measured)")
            continue
        ratio = num.gbps / den.gbps
        print(f"  {name:<28} {ratio:6.2f}  (target >= {target:g}: {'met' if ratio >= target else 'NOT met'})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 MiB blocks only, smaller working sets")
    parser.add_argument("--transports", default="shm,ucx,grpc")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--working-set-mib", type=int, default=None, help="bytes each client stores per block size (default 128, quick 64)")
    parser.add_argument("--call-mib", type=int, default=32, help="bytes per put/get call; latency percentiles are per call")
    parser.add_argument("--passes", type=int, default=None, help="get passes over the working set (default 8, quick 6); the first pass is the cold one")
    parser.add_argument("--control-only", action="store_true", help="only the control-plane round trips (gRPC vs local socket)")
    opts = parser.parse_args(argv)
    sizes = [MIB] if opts.quick else [64 * KIB, MIB, 4 * MIB]
    args = {
        "working_set": (opts.working_set_mib or (64 if opts.quick else 128)) * MIB,
        "call_bytes": opts.call_mib * MIB,
        "passes": opts.passes or (6 if opts.quick else 8),
    }
    transports = [] if opts.control_only else [t for t in opts.transports.split(",") if t]
    if "ucx" in transports and import_ucxx() is None:
        print("ucxx not importable: skipping the ucx rows")
        transports.remove("ucx")
    clients = [int(c) for c in opts.clients.split(",")]

    rows = [] if opts.control_only else [memcpy_reference(s, args) for s in sizes] + [tcp_reference(s, args) for s in sizes]
    adjacent: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="kvstore-bench-") as tmp:
        pool_bytes = max(clients) * args["working_set"] * 2
        srv = ServerProc(Path(tmp) / "data", flags={"host_memory": f"{pool_bytes >> 20}MiB", "ssd_capacity": "1GiB", "persist_on_shutdown": False}, env=UCX_SERVER_ENV)
        srv.start()
        try:
            for transport in transports:
                adjacent[f"{transport}-memcpy"], adjacent[f"{transport}-tcp"] = memcpy_reference(MIB, args), tcp_reference(MIB, args)
                for n in clients:
                    t0 = time.perf_counter()
                    rows += run_transport(srv.address, transport, n, sizes, args)
                    print(f"  {transport} x{n}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            control = control_round_trips(srv.address)  # after the data plane, so it cannot disturb those numbers
        finally:
            srv.stop()
    if opts.control_only:
        print_control(control)
        return 0
    print(f"\nworking set {args['working_set'] >> 20} MiB per client, {args['call_bytes'] >> 20} MiB per call, {args['passes']} get passes; p50/p99 are per call")
    print_table(rows)
    for name, ref in sorted(adjacent.items()):
        print(f"  reference before {name.split('-')[0]:<5}: {ref.transport:<13} {ref.gbps:6.2f} GB/s")
    print_ratios(rows, adjacent)
    print_control(control)
    return 0


if __name__ == "__main__":
    sys.exit(main())
