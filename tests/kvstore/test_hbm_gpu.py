"""The HBM tier on a GPU: a real server with --hbm-memory, clients mapping its pool over CUDA IPC.

G1: a promoted block copied device to device out of the mapped pool is byte-exact, at the speed of an
in-process device-to-device copy. G2: hot blocks reach HBM, colder ones give way, and a block whose
HBM copy was dropped is still served from the host tier. IPC from other processes: each maps the pool
once. An engine's layer-by-layer load mixes blocks from HBM and from the host pool. G3: the server
SIGKILLed while an engine copies out of its HBM pool: the engine gets an error or a checksum failure,
or pages that are byte-exact, never other bytes; after a restart it loads again. G4: another process's UCX gets into
GPU memory are sent from the HBM copies (UCX_TLS with cuda_copy, cuda_ipc; needs ucxx).

    python -m pytest -q -m gpu tests/kvstore/test_hbm_gpu.py -s     # -s prints the bandwidths
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cupy = pytest.importorskip("cupy")

from kvclient import KVClient  # noqa: E402
from kvwire.types import PutOutcome, Tier  # noqa: E402
from tests.kvstore import hbm_gpu_worker as worker  # noqa: E402


def _cuda_devices() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or _cuda_devices() == 0, reason="needs a CUDA GPU"),
              pytest.mark.timeout(300)]

MIB = 1 << 20
MEMCPY_DEFAULT = 4


def wait_for(predicate, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def hbm_blocks(client: KVClient) -> int:
    return client.stats()["tiers"].get("hbm", {}).get("blocks", 0)


def make_hot(client: KVClient, keys, expect: int) -> None:
    """Two prefix pins (the policy's default threshold), then wait for the background worker's promotion."""
    for _ in range(2):
        with client.pin(keys, prefix=True):
            pass
    wait_for(lambda: hbm_blocks(client) >= expect, what=f"{expect} blocks in HBM")


def random_blocks(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def device_copy(pinned, i: int, device: int) -> torch.Tensor:
    out = torch.empty(pinned.slots[i].size_bytes, dtype=torch.uint8, device=f"cuda:{device}")
    cupy.cuda.runtime.memcpy(out.data_ptr(), pinned.device_ptr(i), out.numel(), MEMCPY_DEFAULT)
    return out


def timed_copies(dst: int, sources: list[int], size: int, device: int, repeats: int = 5) -> float:
    """GB/s of copying each source (size bytes) back to back into dst, median of repeats, after a warm-up."""
    stream = torch.cuda.Stream(device=f"cuda:{device}")
    runs = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for i, src in enumerate(sources):
            cupy.cuda.runtime.memcpyAsync(dst + i * size, src, size, MEMCPY_DEFAULT, stream.cuda_stream)
        end.record(stream)
        end.synchronize()
        runs.append(len(sources) * size / (start.elapsed_time(end) / 1000) / 1e9)
    return statistics.median(runs[1:])


@pytest.fixture(scope="module")
def hbm_server(tmp_path_factory):
    from tests.serverproc import ServerProc

    srv = ServerProc(tmp_path_factory.mktemp("hbm") / "data",
                     flags={"host_memory": "1GiB", "ssd_capacity": "4GiB", "hbm_memory": "512MiB", "lease_ttl_s": 10})
    srv.start()
    yield srv
    srv.stop()


def test_g1_hbm_round_trip_is_byte_exact_at_device_to_device_speed(hbm_server, fingerprint):
    n, size = 256, MIB
    blocks = random_blocks(n, size, seed=1)
    with KVClient(hbm_server.address, fingerprint, tenant="g1", transport="shm") as client:
        keys = client.block_keys(list(range(n * 16)))
        assert client.put(keys, blocks) == [PutOutcome.STORED] * n
        make_hot(client, keys, n)
        pool = client.hbm_pool()
        assert pool is not None and pool.size_bytes == 512 * MIB
        with KVClient(hbm_server.address, fingerprint, tenant="g1", transport="shm") as other:
            assert other.hbm_pool() is pool  # mapped once per process
        with client.pin(keys) as pinned:
            assert pinned.tiers == [Tier.HBM] * n and pinned.hbm is pool
            for i in (0, 1, n // 2, n - 1):
                assert torch.equal(device_copy(pinned, i, pool.device).cpu(), torch.from_numpy(blocks[i]))
            dst = torch.empty(n * size, dtype=torch.uint8, device=f"cuda:{pool.device}")
            ipc_gbps = timed_copies(dst.data_ptr(), [pinned.device_ptr(i) for i in range(n)], size, pool.device)
            local = torch.empty(pool.size_bytes, dtype=torch.uint8, device=f"cuda:{pool.device}")
            local_gbps = timed_copies(dst.data_ptr(), [local.data_ptr() + pinned.hbm_offset(i) for i in range(n)], size, pool.device)
            whole = torch.empty(pool.size_bytes, dtype=torch.uint8, device=f"cuda:{pool.device}")  # one copy of the whole pool
            whole_ipc_gbps = timed_copies(whole.data_ptr(), [pool.base_ptr], pool.size_bytes, pool.device)
            whole_local_gbps = timed_copies(whole.data_ptr(), [local.data_ptr()], pool.size_bytes, pool.device)
        stats = client.stats()
    print(f"\nG1: D2D out of the IPC-mapped HBM pool {ipc_gbps:.0f} GB/s, from an in-process allocation {local_gbps:.0f} GB/s "
          f"({ipc_gbps / local_gbps:.2f}x): {n} copies of {size >> 20} MiB; one {pool.size_bytes >> 20} MiB copy: "
          f"{whole_ipc_gbps:.0f} vs {whole_local_gbps:.0f} GB/s ({whole_ipc_gbps / whole_local_gbps:.2f}x)")
    # Speeds are printed, not asserted (targets live in bench/): 256 copies of 1 MiB are bound by the host's
    # launch rate, which swung 0.76x-1.19x between runs; the one large copy is the mapping's own speed.
    assert stats["counters"]["hbm_promotions"] >= n and stats["counters"].get("hbm_verify_failures", 0) == 0


def test_g2_hot_blocks_promote_and_a_dropped_hbm_copy_is_still_served_from_the_host(tmp_path, fingerprint):
    from tests.serverproc import ServerProc

    # 1 MiB blocks in 1 MiB slabs: an HBM tier of four slots; a window short enough to cool in the test.
    server = ServerProc(tmp_path / "data", flags={"host_memory": "64MiB", "max_block_bytes": "1MiB", "hbm_memory": "4MiB",
                                                  "hbm_promote_window_s": 1.0, "ssd_capacity": "256MiB"}).start()
    try:
        blocks = random_blocks(8, MIB, seed=2)
        with KVClient(server.address, fingerprint, tenant="g2", transport="shm") as client:
            keys = client.block_keys(list(range(8 * 16)))
            client.put(keys, blocks)
            with client.pin(keys[:4], prefix=True):
                pass
            time.sleep(0.3)
            assert hbm_blocks(client) == 0  # read once: not hot
            make_hot(client, keys[:4], 4)
            pool = client.hbm_pool()
            with client.pin(keys[:4]) as pinned:
                assert pinned.tiers == [Tier.HBM] * 4
                assert all(torch.equal(device_copy(pinned, i, pool.device).cpu(), torch.from_numpy(blocks[i])) for i in range(4))
            time.sleep(1.2)  # the first four cool
            for _ in range(2):
                with client.pin(keys[4:], prefix=True):
                    pass
            # Polled by Stats, which reads no block: a pin would warm the first four again.
            wait_for(lambda: client.stats()["counters"]["hbm_promotions"] >= 8, what="the second set to displace the first")
            with client.pin(keys) as pinned:
                assert pinned.tiers == [Tier.HOST] * 4 + [Tier.HBM] * 4
            with client.pin(keys[4:]) as pinned:
                assert all(torch.equal(device_copy(pinned, i, pool.device).cpu(), torch.from_numpy(blocks[4 + i])) for i in range(4))
            assert all(np.array_equal(a, b) for a, b in zip(client.get(keys[:4]), blocks[:4]))  # from the host tier
            counters = client.stats()["counters"]
            assert counters["hbm_evictions"] >= 4 and counters.get("evictions", 0) == 0
    finally:
        server.stop()


def load_in_worker(address: str, n: int, host_copy: str = "auto") -> list[dict]:
    """An engine process's load of the n-block prefix, the server left alone: its JSON lines."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.kvstore.hbm_gpu_worker", "load", address, str(n), "before"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "KVSTORE_HOST_COPY": host_copy})
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return [json.loads(line) for line in out.strip().splitlines()]


def put_engine_blocks(address: str, n: int, durable: bool = False) -> list:
    with KVClient(address, worker.fingerprint(), transport="shm") as client:
        keys = client.block_keys(worker.tokens(n))
        payload = worker.payload(n)
        assert client.put(keys, [b.contiguous().view(torch.uint8).numpy() for b in payload], durable=durable) == [PutOutcome.STORED] * n
        return keys


def test_other_processes_map_the_pool_and_copy_blocks_out(hbm_server):
    n = 16
    keys = put_engine_blocks(hbm_server.address, n)
    with KVClient(hbm_server.address, worker.fingerprint(), transport="shm") as client:
        make_hot(client, keys, hbm_blocks(client) + n)
        assert client.hbm_pool() is not None  # this process has the pool mapped too
    results = [subprocess.Popen([sys.executable, "-m", "tests.kvstore.hbm_gpu_worker", "read", hbm_server.address, str(n)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in results:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["mapped"] and got["tiers"] == ["HBM"] * n
        assert got["digests"] == got["checksums"]  # what each process copied out is what was committed


@pytest.mark.parametrize("host_copy, moved_by", [("auto", "kernel+d2d_kernel"), ("copy_engines", "copy_engines+d2d")])
def test_an_engine_load_mixes_blocks_from_hbm_and_from_the_host_pool(tmp_path, host_copy, moved_by):
    """Both ways each source can move: the gather kernel reading the host pool and the HBM pool, or the copy engines."""
    from tests.serverproc import ServerProc

    n = 32
    server = ServerProc(tmp_path / "data", flags={"host_memory": "256MiB", "hbm_memory": "64MiB", "ssd_capacity": "1GiB"}).start()
    try:
        keys = put_engine_blocks(server.address, n)
        with KVClient(server.address, worker.fingerprint(), transport="shm") as client:
            make_hot(client, keys[: n // 2], n // 2)  # the prefix's first half is hot; the second was read once
        lines = load_in_worker(server.address, n, host_copy)
        assert lines[0]["stage"] == "pinned" and lines[0]["in_hbm"] == n // 2
        result = lines[-1]
        assert result == {**result, "outcome": "loaded", "equal": True, "blocks": n, "hbm_blocks": n // 2, "checked_on": "gpu",
                          "host_copy": moved_by}
    finally:
        server.stop()


@pytest.mark.parametrize("waits", ["corrupt", "corrupt-nowait"])
def test_a_block_changed_in_the_hbm_pool_fails_the_engines_check_in_its_pages(tmp_path, waits):
    """A whole prefix out of HBM, one byte of its last block flipped there after the Pin: the checksum kernel run over
    the pages must catch it, also for a caller that goes straight to finish without waiting layer by layer."""
    from tests.serverproc import ServerProc

    n = 32
    server = ServerProc(tmp_path / "data", flags={"host_memory": "256MiB", "hbm_memory": "64MiB", "ssd_capacity": "1GiB"}).start()
    try:
        keys = put_engine_blocks(server.address, n)
        with KVClient(server.address, worker.fingerprint(), transport="shm") as client:
            make_hot(client, keys, n)
        proc = subprocess.Popen([sys.executable, "-m", "tests.kvstore.hbm_gpu_worker", "load", server.address, str(n), waits],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate("go\n", timeout=120)
        assert proc.returncode == 0, err[-2000:]
        lines = [json.loads(line) for line in out.strip().splitlines()]
        assert lines[0]["in_hbm"] == n
        assert lines[-1]["outcome"] == "error" and lines[-1]["type"] == "ChecksumMismatchError", lines[-1]
        assert lines[-1]["hbm_blocks"] == n
    finally:
        server.stop()


UCX_CUDA_TLS = "tcp,self,sm,cuda_copy,cuda_ipc"


def test_g4_ucx_gets_into_gpu_memory_are_sent_gpu_to_gpu_from_the_hbm_copies(tmp_path):
    """Another process's UCX gets landing in GPU memory: the server sends the blocks from their HBM copies (UCX's CUDA
    transports, one GPU here: cuda_ipc), byte-exact, and the same gets from the host copies are timed beside them;
    a byte flipped in an HBM copy fails the get's checksum."""
    from kvwire.ucxenv import import_ucxx
    from tests.serverproc import ServerProc

    if import_ucxx() is None:
        pytest.skip("ucxx not importable")
    n = 64
    env = {"UCX_TLS": UCX_CUDA_TLS, "UCX_NET_DEVICES": "lo", "UCX_WARN_UNUSED_ENV_VARS": "n"}
    server = ServerProc(tmp_path / "data", flags={"host_memory": "256MiB", "hbm_memory": "128MiB", "ssd_capacity": "1GiB",
                                                  "ucx_all_interfaces": True}, env=env).start()
    try:
        keys = put_engine_blocks(server.address, n)
        with KVClient(server.address, worker.fingerprint(), transport="shm") as client:
            make_hot(client, keys, n)
        proc = subprocess.run([sys.executable, "-m", "tests.kvstore.hbm_gpu_worker", "ucx", server.address, str(n)],
                              capture_output=True, text=True, timeout=180, env={**os.environ, **env})
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result.get("transport") == "ucx" and result["hbm_sends"], result
        assert result["equal"] and result["equal_host"], result
        assert (result["hbm_sent"], result["host_sent"]) == (6 * n, 0), result
        assert result["corrupt"] == "ChecksumMismatchError", result
        gbps = lambda ms: result["bytes"] / (ms / 1e3) / 1e9  # noqa: E731
        print(f"\nG4: UCX get of {n} x {result['bytes'] // n >> 10} KiB into GPU memory: from HBM {result['hbm_ms']:.2f} ms "
              f"({gbps(result['hbm_ms']):.1f} GB/s), from the host pool {result['host_ms']:.2f} ms ({gbps(result['host_ms']):.1f} GB/s)")
    finally:
        server.stop()


@pytest.mark.parametrize("when", ["before", "during"])
def test_g3_server_killed_during_a_device_to_device_load_never_yields_silent_wrong_data(tmp_path, when):
    from tests.serverproc import ServerProc

    n = 128  # 64 MiB of prefix
    server = ServerProc(tmp_path / "data", flags={"host_memory": "512MiB", "hbm_memory": "256MiB", "ssd_capacity": "2GiB"}).start()
    try:
        keys = put_engine_blocks(server.address, n, durable=True)
        with KVClient(server.address, worker.fingerprint(), transport="shm") as client:
            make_hot(client, keys, n)
        proc = subprocess.Popen([sys.executable, "-m", "tests.kvstore.hbm_gpu_worker", "load", server.address, str(n), when],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=30)[1][-2000:]
        first = json.loads(line)
        assert first["in_hbm"] == n, first
        server.stop(signal.SIGKILL)  # while the engine holds the pin, and (during) while its copies run
        out, err = proc.communicate("go\n", timeout=120)
        result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"outcome": "no answer", "stderr": err[-2000:]}
        print(f"\nG3 ({when} the copies): the engine saw {result}")
        assert proc.returncode == 0, err[-2000:]  # the engine process survives to say what happened
        if result["outcome"] == "loaded":
            assert result["equal"] is True and result["checked_on"] == "gpu"  # passed its check: the committed bytes
        else:
            assert result["outcome"] == "error"  # a clean error (a CUDA error, or ChecksumMismatchError)
        server.start()  # durable blocks come back from the ssd tier
        again = load_in_worker(server.address, n)[-1]
        assert again["outcome"] == "loaded" and again["equal"] is True, again
    finally:
        server.stop()
