"""Is kvstore's data plane as fast as the systems people would use instead? kvstore beside Redis and Mooncake Store.

Every round measures, one after the other on this host (the order rotating by round, so a busy machine
skews each alike): kvstore (a real `kvstore serve`, clients as bench/throughput.py runs them: gRPC get/put
1 MiB, shm get 64 KiB and 1 MiB, shm put 1 MiB, UCX get 64 KiB and get/put 1 MiB over loopback TCP, 4-client shm get 1 MiB,
`contains` of 1024 keys), Redis 7 (its own redis-server; redis-py over TCP and a Unix socket, pipelined
SET/GET, EXISTS of 1024 keys in one pipeline), Mooncake Store embedded (the client holds the segment) and
standalone (a store process holds it, the client reaches it over loopback TCP; bench/peers_mooncake.py),
and the references: numpy memcpy of the same blocks, one loopback TCP stream, and bare grpcio moving them
(grpc_bare.py: the ceiling of any Python gRPC path here). Each system puts the same
working set once in calls of --call-mib and gets it back --passes times into resident buffers (peers_common.py).

Per round, a row per path: kvstore, the best peer on that path, the ratio, and a reference. At the end,
medians over rounds (ratios are medians of per-round ratios) and the targets with PASS/MISS. A peer that
cannot start here is reported absent with the reason; its ratios print as n/a.

    python bench/peers.py              # 5 rounds (tools/peers_env.sh installs the peers first)
    python bench/peers.py --quick      # 3 rounds, smaller working sets
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(1, str(BENCH_DIR.parent))

from peers_common import CONTAINS_BLOCK_BYTES, CONTAINS_KEYS, LoopShape, PeerAbsent, contains_ms, metric  # noqa: E402
from grpc_bare import bare_grpc_round  # noqa: E402
from throughput import KIB, MIB, UCX_SERVER_ENV, memcpy_reference, run_transport, tcp_reference  # noqa: E402

PEER_NAMES = ("redis", "mooncake-embedded", "mooncake-standalone")


@dataclass(frozen=True)
class PathRow:
    """One kvstore path, the peer measurements it is compared with, and the reference printed beside it."""

    label: str
    kvstore: str
    peers: tuple[str, ...]
    reference: str | None = None
    lower_is_better: bool = False  # ms (contains) rather than GB/s


@dataclass(frozen=True)
class Target:
    """kvstore / the best of `against` (per round, then the median over rounds) must reach `ratio`."""

    label: str
    kvstore: str
    against: tuple[str, ...]
    ratio: float
    lower_is_better: bool = False


PATHS = (
    # The gRPC rows' reference is grpcio itself moving the same blocks with no store behind it (grpc_bare.py): its ceiling here.
    PathRow("gRPC get 1 MiB", "kvstore-grpc get 1 MiB", ("redis-tcp get 1 MiB", "redis-unix get 1 MiB", "mooncake-standalone get 1 MiB"), "grpc-bare get 1 MiB"),
    PathRow("gRPC put 1 MiB", "kvstore-grpc put 1 MiB", ("redis-tcp put 1 MiB", "redis-unix put 1 MiB", "mooncake-standalone put 1 MiB"), "grpc-bare put 1 MiB"),
    PathRow("shm get 64 KiB", "kvstore-shm get 64 KiB", ("mooncake-embedded get 64 KiB", "redis-unix get 64 KiB"), "memcpy copy 64 KiB"),
    PathRow("shm get 1 MiB", "kvstore-shm get 1 MiB", ("mooncake-embedded get 1 MiB", "redis-unix get 1 MiB"), "memcpy copy 1 MiB"),
    PathRow("shm put 1 MiB", "kvstore-shm put 1 MiB", ("mooncake-embedded put 1 MiB", "redis-unix put 1 MiB"), "memcpy copy 1 MiB"),
    PathRow("UCX get 64 KiB", "kvstore-ucx get 64 KiB", ("mooncake-standalone get 64 KiB", "redis-tcp get 64 KiB"), "tcp recv 64 KiB"),
    # The remote bulk path beside gRPC (UCX over loopback TCP): what a remote client that can load UCX gets instead.
    PathRow("UCX get 1 MiB", "kvstore-ucx get 1 MiB", ("redis-tcp get 1 MiB", "mooncake-standalone get 1 MiB"), "tcp recv 1 MiB"),
    PathRow("UCX put 1 MiB", "kvstore-ucx put 1 MiB", ("redis-tcp put 1 MiB", "mooncake-standalone put 1 MiB"), "tcp recv 1 MiB"),
    PathRow("shm get 1MiB x4 clients", "kvstore-shm-x4 get 1 MiB", (), "memcpy copy 1 MiB"),
    PathRow("contains 1024 keys (ms)", "kvstore contains",
            ("mooncake-embedded contains", "mooncake-standalone contains", "redis-tcp contains", "redis-unix contains"), None, True),
)

TARGETS = (
    Target("gRPC get 1MiB >= 1.0x Redis TCP", "kvstore-grpc get 1 MiB", ("redis-tcp get 1 MiB",), 1.0),
    Target("gRPC put 1MiB >= 1.0x Redis TCP", "kvstore-grpc put 1 MiB", ("redis-tcp put 1 MiB",), 1.0),
    Target("shm get 1MiB >= 0.90x memcpy", "kvstore-shm get 1 MiB", ("memcpy copy 1 MiB",), 0.90),
    Target("shm get 64KiB >= 2x Mooncake embedded", "kvstore-shm get 64 KiB", ("mooncake-embedded get 64 KiB",), 2.0),
    Target("shm put 1MiB >= 1.0x Mooncake embedded", "kvstore-shm put 1 MiB", ("mooncake-embedded put 1 MiB",), 1.0),
    Target("UCX get 64KiB >= 1.2x Mooncake standalone", "kvstore-ucx get 64 KiB", ("mooncake-standalone get 64 KiB",), 1.2),
    Target("contains 1024 keys <= 1.0x Mooncake batch_is_exist", "kvstore contains",
           ("mooncake-embedded contains", "mooncake-standalone contains"), 1.0, True),
)


# ---- the systems ----------------------------------------------------------------------


def references_round(shape: LoopShape) -> dict[str, float]:
    args = shape.as_args()
    out = {}
    for size in (64 * KIB, MIB):
        out[metric("memcpy", "copy", size)] = memcpy_reference(size, args).gbps
        out[metric("tcp", "recv", size)] = tcp_reference(size, args).gbps
    out |= bare_grpc_round(MIB, shape)
    return out


class KVStoreSystem:
    """A real `kvstore serve`; data paths through bench/throughput.py's client processes, contains in process."""

    RUNS = (("shm", 1, (64 * KIB, MIB)), ("shm", 4, (MIB,)), ("grpc", 1, (MIB,)), ("ucx", 1, (64 * KIB, MIB)))

    def __init__(self, work_dir: Path, shape: LoopShape, with_ucx: bool) -> None:
        from tests.serverproc import ServerProc

        pool_mib = (4 * shape.working_set + 2 * CONTAINS_KEYS * CONTAINS_BLOCK_BYTES) * 2 >> 20
        self.server = ServerProc(work_dir / "data", flags={"host_memory": f"{pool_mib}MiB", "ssd_capacity": "1GiB", "persist_on_shutdown": False},
                                 env=UCX_SERVER_ENV)
        self.runs = [r for r in self.RUNS if with_ucx or r[0] != "ucx"]
        self.client = None

    def start(self) -> "KVStoreSystem":
        from kvclient import KVClient
        from tests.conftest import make_fingerprint

        self.server.start()
        self.client = KVClient(self.server.address, make_fingerprint(), tenant="bench-contains", transport="shm")
        return self

    def measure_round(self, round_idx: int, shape: LoopShape, contains_calls: int) -> dict[str, float]:
        import numpy as np

        out: dict[str, float] = {}
        for transport, clients, sizes in self.runs:
            system = f"kvstore-{transport}" + (f"-x{clients}" if clients > 1 else "")
            for row in run_transport(self.server.address, transport, clients, list(sizes), shape.as_args()):
                out[metric(system, row.op, row.block_bytes)] = row.gbps
        keys = self.client.block_keys(list(range((round_idx + 1) * 10**8, (round_idx + 1) * 10**8 + CONTAINS_KEYS * 16)))
        self.client.put(keys, [np.zeros(CONTAINS_BLOCK_BYTES, np.uint8)] * len(keys))
        out |= contains_ms("kvstore", self.client.contains, keys, contains_calls)
        self.client.delete(keys)
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.stop()


def start_peer(name: str, work_dir: Path, shape: LoopShape):
    if name == "redis":
        from peers_redis import RedisPeer

        return RedisPeer(work_dir / "redis").start()
    from peers_mooncake import MooncakePeer

    segment_bytes = 2 * shape.working_set + 2 * CONTAINS_KEYS * CONTAINS_BLOCK_BYTES + 64 * MIB
    return MooncakePeer(name.removeprefix("mooncake-"), work_dir / name, segment_bytes).start()


def peer_versions(peers: dict) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    out = {}
    if "redis" in peers:
        out["redis"] = f"redis-server {peers['redis'].version()}, redis-py {pkg('redis')}, hiredis {pkg('hiredis')}"
    for name in peers:
        if name.startswith("mooncake"):
            out[name] = f"mooncake-transfer-engine {pkg('mooncake-transfer-engine')}"
    return out


# ---- report ---------------------------------------------------------------------------


def best_of(values: dict[str, float], names: tuple[str, ...], lower_is_better: bool) -> str | None:
    present = [n for n in names if n in values]
    if not present:
        return None
    return (min if lower_is_better else max)(present, key=values.__getitem__)


def fmt(values: dict[str, float], name: str | None, lower_is_better: bool) -> str:
    if name is None or name not in values:
        return "n/a"
    unit = "ms" if lower_is_better else "GB/s"
    return f"{values[name]:.3f} {unit}" if lower_is_better else f"{values[name]:.2f} {unit}"


def ratio(values: dict[str, float], num: str, den: str | None) -> float | None:
    if den is None or num not in values or den not in values or values[den] == 0:
        return None
    return values[num] / values[den]


def fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def print_paths(title: str, values: dict[str, float], ratio_of: Callable[[str, str | None], float | None]) -> None:
    print(f"\n{title}")
    print(f"  {'path':<26}{'kvstore':>13}   {'best peer':<40}{'ratio':>7}   {'reference':<30}{'ratio':>7}")
    for path in PATHS:
        peer = best_of(values, path.peers, path.lower_is_better)
        peer_text = f"{peer.split(' ')[0]} {fmt(values, peer, path.lower_is_better)}" if peer else ("n/a (absent)" if path.peers else "(no peer)")
        ref_text = f"{path.reference.split(' ')[0]} {fmt(values, path.reference, False)}" if path.reference else ""
        ref_ratio = fmt_ratio(ratio_of(path.kvstore, path.reference)) if path.reference else ""
        print(f"  {path.label:<26}{fmt(values, path.kvstore, path.lower_is_better):>13}   {peer_text:<40}"
              f"{fmt_ratio(ratio_of(path.kvstore, peer)):>7}   {ref_text:<30}{ref_ratio:>7}")


def median_ratio(rounds: list[dict[str, float]], num: str, den_names: tuple[str, ...], lower_is_better: bool) -> float | None:
    """Per round: kvstore over the best of den_names in that round; then the median over rounds that had both."""
    per_round = []
    for values in rounds:
        den = best_of(values, den_names, lower_is_better)
        r = ratio(values, num, den)
        if r is not None:
            per_round.append(r)
    return statistics.median(per_round) if per_round else None


def medians(rounds: list[dict[str, float]]) -> dict[str, float]:
    names = {name for values in rounds for name in values}
    return {name: statistics.median(v[name] for v in rounds if name in v) for name in names}


def print_targets(rounds: list[dict[str, float]]) -> None:
    print("\ntargets (median over rounds of the per-round ratio):")
    for target in TARGETS:
        r = median_ratio(rounds, target.kvstore, target.against, target.lower_is_better)
        if r is None:
            verdict = "n/a (not measured; see absent below)"
        else:
            met = r <= target.ratio if target.lower_is_better else r >= target.ratio
            verdict = f"{r:6.2f}x  {'PASS' if met else 'MISS'}"
        print(f"  {target.label:<52} {verdict}")
    for op in ("get", "put"):  # how far grpcio alone gets on this host: the part of a gRPC miss no store code can close
        ceiling = median_ratio(rounds, f"grpc-bare {op} 1 MiB", ("redis-tcp " + op + " 1 MiB",), False)
        if ceiling is not None:
            print(f"  {'  (ceiling: bare grpcio ' + op + ' 1MiB / Redis TCP)':<52} {ceiling:6.2f}x")


# ---- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 32 MiB working sets, 3 get passes")
    parser.add_argument("--rounds", type=int, default=None, help="default 5, quick 3")
    parser.add_argument("--working-set-mib", type=int, default=None, help="bytes each client stores per block size (default 64, quick 32)")
    parser.add_argument("--call-mib", type=int, default=32, help="bytes per put/get call (one pipeline, one batch)")
    parser.add_argument("--passes", type=int, default=None, help="get passes over the working set (default 5, quick 3)")
    parser.add_argument("--contains-calls", type=int, default=30, help="timed contains calls per round (median)")
    parser.add_argument("--peers", default=",".join(PEER_NAMES), help=f"comma list of {', '.join(PEER_NAMES)}")
    opts = parser.parse_args(argv)
    unknown = set(opts.peers.split(",")) - set(PEER_NAMES) - {""}
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEER_NAMES)}")
    rounds = opts.rounds or (3 if opts.quick else 5)
    shape = LoopShape((opts.working_set_mib or (32 if opts.quick else 64)) * MIB, opts.call_mib * MIB, opts.passes or (3 if opts.quick else 5))

    from kvwire.ucxenv import import_ucxx

    with_ucx = import_ucxx() is not None
    absent: dict[str, str] = {} if with_ucx else {"kvstore ucx": "ucxx not importable"}
    peers: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="kvstore-peers-") as tmp:
        work_dir = Path(tmp)
        kvstore = KVStoreSystem(work_dir / "kvstore", shape, with_ucx).start()
        try:
            for name in [p for p in opts.peers.split(",") if p]:
                try:
                    peers[name] = start_peer(name, work_dir, shape)
                except Exception as e:  # whatever stops a peer here makes it absent, with the reason, never the run
                    absent[name] = str(e) if isinstance(e, PeerAbsent) else f"{type(e).__name__}: {e}"
            print(f"working set {shape.working_set >> 20} MiB per client and block size, {shape.call_bytes >> 20} MiB per call, "
                  f"{shape.passes} get passes; {rounds} rounds")
            for name, text in peer_versions(peers).items():
                print(f"  {name:<20} {text}")
            for name, reason in absent.items():
                print(f"  {name:<20} ABSENT: {reason}")
            results = run_rounds(rounds, shape, opts.contains_calls, kvstore, peers, absent)
        finally:
            for peer in peers.values():
                peer.stop()
            kvstore.stop()
    mid = medians(results)
    print_paths(f"medians over {len(results)} rounds (ratios: median of per-round ratios)", mid,
                lambda num, den: median_ratio(results, num, (den,), False) if den else None)
    print_targets(results)
    for name, reason in absent.items():
        print(f"  absent: {name}: {reason}")
    return 0


def run_rounds(rounds: int, shape: LoopShape, contains_calls: int, kvstore: KVStoreSystem, peers: dict, absent: dict[str, str]) -> list[dict[str, float]]:
    results = []
    for round_idx in range(rounds):
        steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
            ("references", lambda: references_round(shape)),
            ("kvstore", lambda: kvstore.measure_round(round_idx, shape, contains_calls)),
        ] + [(name, lambda p=peer: p.measure_round(round_idx, (64 * KIB, MIB), shape, contains_calls)) for name, peer in peers.items()]
        shift = round_idx % len(steps)
        values: dict[str, float] = {}
        t0 = time.perf_counter()
        for name, step in steps[shift:] + steps[:shift]:
            if name in absent:
                continue
            if name in ("references", "kvstore"):
                values |= step()  # the subject and its anchors: a failure here is the bench's to report loudly
                continue
            try:
                values |= step()
            except Exception as e:  # a peer that fails mid-run drops out with its reason; the run goes on
                absent[name] = f"failed in round {round_idx + 1}: {type(e).__name__}: {e}"
        results.append(values)
        print_paths(f"round {round_idx + 1}/{rounds} ({time.perf_counter() - t0:.0f} s)", values, lambda num, den: ratio(values, num, den))
        sys.stdout.flush()
    return results


if __name__ == "__main__":
    sys.exit(main())
