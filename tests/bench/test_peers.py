"""bench/peers.py's pieces: the libcuda stand-in, the Redis and Mooncake adapters' round trips, absent peers, targets.

The peers are benchmark dependencies (tools/peers_env.sh), not the suite's: tests needing one skip without it.
"""
from __future__ import annotations

import ctypes
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH_DIR))

import peers  # noqa: E402
import peers_mooncake  # noqa: E402
import peers_redis  # noqa: E402
from peers_common import LoopShape, PeerAbsent  # noqa: E402
from throughput import KIB, MIB  # noqa: E402

pytestmark = pytest.mark.slow


def have_mooncake() -> bool:
    try:
        peers_mooncake.mooncake_dir()
        return True
    except PeerAbsent:
        return False


need_cc = pytest.mark.skipif(shutil.which("cc") is None or shutil.which("nm") is None, reason="needs a C compiler and nm")
need_redis = pytest.mark.skipif(shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None,
                                reason="no redis-server or redis-py (tools/peers_env.sh)")
need_mooncake = pytest.mark.skipif(not have_mooncake(), reason="mooncake-transfer-engine not installed (tools/peers_env.sh)")


@need_cc
def test_cuda_stub_exports_each_symbol_and_reports_no_device(tmp_path):
    symbols = ["cuInit", "cuMemCreate", "cuDevicePrimaryCtxRelease_v2"]
    stub_dir = peers_mooncake.build_cuda_stub(tmp_path / "stub", symbols)
    defined = subprocess.run(["nm", "-D", "--defined-only", str(stub_dir / "libcuda.so.1")], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[-1] for line in defined.splitlines() if line.split()[-1].startswith("cu")) == sorted(symbols)
    lib = ctypes.CDLL(str(stub_dir / "libcuda.so.1"))
    assert lib.cuInit(0) == peers_mooncake.CUDA_ERROR_NO_DEVICE


@need_cc
@need_mooncake
def test_cuda_stub_covers_what_mooncake_imports(tmp_path):
    files = peers_mooncake.native_files(peers_mooncake.mooncake_dir())
    symbols = peers_mooncake.undefined_driver_symbols(files)
    assert "cuInit" in symbols and not any(s.startswith("cuda") for s in symbols)
    stub = peers_mooncake.build_cuda_stub(tmp_path / "stub", symbols) / "libcuda.so.1"
    lib = ctypes.CDLL(str(stub))
    assert all(hasattr(lib, s) for s in symbols)


@need_redis
def test_redis_round_trip_through_the_adapter_is_byte_exact(tmp_path):
    server = peers_redis.RedisPeer(tmp_path / "redis").start()
    try:
        rng = np.random.default_rng(7)
        blocks = [rng.integers(0, 256, size, dtype=np.uint8) for size in (MIB, 64 * KIB, MIB)]
        for kind, adapter in server.adapters.items():
            keys = [f"{kind}-{i}" for i in range(len(blocks))]
            adapter.put(keys, blocks)
            outs = [np.zeros_like(b) for b in blocks]
            adapter.get(keys, outs)
            assert all(np.array_equal(a, b) for a, b in zip(outs, blocks)), kind
            assert adapter.contains(keys + ["missing"]) == [True, True, True, False]
            adapter.remove(keys)
            assert adapter.contains(keys) == [False] * len(keys)
        values = server.measure_round(0, (64 * KIB,), LoopShape(2 * MIB, MIB, 1), contains_calls=2)
        assert {"redis-tcp get 64 KiB", "redis-unix put 64 KiB", "redis-tcp contains"} <= values.keys()
    finally:
        server.stop()
    assert server.proc.poll() is not None


@need_mooncake
@pytest.mark.parametrize("layout", peers_mooncake.LAYOUTS)
def test_mooncake_round_moves_the_bytes(tmp_path, layout):
    peer = peers_mooncake.MooncakePeer(layout, tmp_path / layout, segment_bytes=64 * MIB)
    try:
        peer.start()
        values = peer.measure_round(0, (64 * KIB,), LoopShape(2 * MIB, MIB, 1), contains_calls=2)  # bytes are compared inside
    finally:
        peer.stop()
    assert {f"mooncake-{layout} put 64 KiB", f"mooncake-{layout} get 64 KiB", f"mooncake-{layout} contains"} == values.keys()
    assert all(v > 0 for v in values.values())
    assert all(p.poll() is not None for p in [peer.worker])


def test_a_peer_that_cannot_start_is_absent_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server to be found
    with pytest.raises(PeerAbsent, match="redis-server"):
        peers.start_peer("redis", tmp_path, LoopShape(MIB, MIB, 1))


def test_targets_take_the_median_of_per_round_ratios_against_the_best_named_peer():
    rounds = [
        {"kvstore contains": 1.0, "mooncake-embedded contains": 2.0, "mooncake-standalone contains": 0.5},
        {"kvstore contains": 1.0, "mooncake-embedded contains": 4.0},
        {"kvstore contains": 3.0, "mooncake-embedded contains": 1.0},
    ]
    # round 1 against the faster standalone (2.0), round 2 against embedded (0.25), round 3 (3.0): median 2.0
    assert peers.median_ratio(rounds, "kvstore contains", ("mooncake-embedded contains", "mooncake-standalone contains"), True) == 2.0
    assert peers.median_ratio([{"a": 1.0}], "a", ("absent",), False) is None


def test_the_bare_grpc_anchor_moves_the_blocks_it_was_given_back_byte_exact():
    """grpcio with no store behind it: what it is given comes back (put_get_gbps checks the bytes), at a rate."""
    from grpc_bare import bare_grpc_round

    got = bare_grpc_round(MIB, LoopShape(working_set=8 * MIB, call_bytes=4 * MIB, passes=1))
    assert set(got) == {"grpc-bare put 1 MiB", "grpc-bare get 1 MiB"} and all(v > 0 for v in got.values())
