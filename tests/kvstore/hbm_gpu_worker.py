"""Child process for the HBM tier's GPU tests: another process mapping the server's HBM pool over CUDA IPC.

    python -m tests.kvstore.hbm_gpu_worker read ADDRESS N        D2D-copy N pinned blocks out of the mapped pool
    python -m tests.kvstore.hbm_gpu_worker load ADDRESS N WHEN   an engine's layer-by-layer load of an N-block prefix
    python -m tests.kvstore.hbm_gpu_worker load ADDRESS N corrupt[-nowait]   the same, one byte of the last block
        flipped in the HBM pool once pinned (nowait: no wait_for_layer calls, straight to finish)

    python -m tests.kvstore.hbm_gpu_worker ucx ADDRESS N          UCX gets of N blocks into GPU memory (the server sends
        them from HBM), timed against the same gets sent from the host pool; then one byte flipped in the HBM copy

`load` prints one JSON line once its prefix is pinned ("pinned") or, with WHEN = during, once its first
layers' copies are enqueued ("started"); it then waits for a line on stdin (the test kills the server
meanwhile) before it finishes the load, and prints the outcome: the pages byte-equal to the blocks put,
or the error raised. Every line is JSON; the process ends with os._exit, never waiting on a dead server.
"""
from __future__ import annotations

import json
import os
import sys

import torch

from kvwire.types import Tier
from tests.conftest import make_fingerprint

LAYERS, HEADS, HEAD_DIM, BLOCK_TOKENS = 8, 8, 128, 16  # 512 KiB blocks in float16


def fingerprint():
    return make_fingerprint(model="hbm-gpu", num_layers=LAYERS, num_kv_heads=HEADS, head_dim=HEAD_DIM,
                            block_tokens=BLOCK_TOKENS, dtype="float16")


def tokens(num_blocks: int) -> list[int]:
    """A prompt whose full blocks are num_blocks (one token more: a prefill loads all of them)."""
    return [(7 * i + 3) % 251 for i in range(num_blocks * BLOCK_TOKENS + 1)]


def payload(num_blocks: int) -> torch.Tensor:
    """The blocks the test puts: [n, layers, 2, block_tokens, heads, head_dim] float16, on the host."""
    generator = torch.Generator().manual_seed(1234)
    return torch.randn((num_blocks, LAYERS, 2, BLOCK_TOKENS, HEADS, HEAD_DIM), generator=generator).to(torch.float16)


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def read(address: str, num_blocks: int) -> dict:
    import cupy
    import xxhash
    from cupy.cuda import runtime

    from kvclient import KVClient

    with KVClient(address, fingerprint(), transport="shm") as client:
        pool = client.hbm_pool()
        if pool is None:
            return {"mapped": False}
        keys = client.block_keys(tokens(num_blocks))
        digests, tiers = [], []
        with cupy.cuda.Device(pool.device), client.pin(keys) as pinned:
            for i, slot in enumerate(pinned.slots):
                tiers.append(pinned.tiers[i].name)
                if pinned.device_ptr(i) is None:
                    digests.append(None)
                    continue
                out = cupy.empty(slot.size_bytes, dtype=cupy.uint8)
                runtime.memcpy(out.data.ptr, pinned.device_ptr(i), slot.size_bytes, 4)  # cudaMemcpyDefault
                digests.append(xxhash.xxh3_64_intdigest(cupy.asnumpy(out)))
            checksums = [s.checksum for s in pinned.slots]
        return {"mapped": True, "device": pool.device, "tiers": tiers, "digests": digests, "checksums": checksums}


def load(address: str, num_blocks: int, when: str) -> dict:
    from engines.adapter import StoreAdapter
    from engines.paged_cache import PagedKVCache

    cache = PagedKVCache(LAYERS, HEADS, HEAD_DIM, num_blocks + 4, BLOCK_TOKENS, dtype=torch.float16, device="cuda")
    adapter = StoreAdapter.for_cache(address, fingerprint(), cache, transport="shm")
    prompt = tokens(num_blocks)
    with adapter.session() as client:
        keys = adapter.block_keys(prompt)
        load = adapter.prepare_prefix_load(client, keys, len(prompt))
        pinned = load._pinned if hasattr(load, "_pinned") else None
        in_hbm = sum(t == Tier.HBM for t in pinned.tiers) if pinned is not None else 0
        pages = cache.allocate("p", len(prompt))
        if when.startswith("corrupt"):
            flip_byte(pinned.device_ptr(load.num_blocks - 1) + 7)
            when, waits = "before", not when.endswith("nowait")
        else:
            waits = True
        try:
            if when == "during":
                load.start(cache, pages)  # the first layers' copies are in flight when the server dies
                emit(stage="started", blocks=load.num_blocks, in_hbm=in_hbm)
            else:
                emit(stage="pinned", blocks=load.num_blocks, in_hbm=in_hbm)
            sys.stdin.readline()
            if when != "during":
                load.start(cache, pages)
            for layer in range(LAYERS if waits else 0):
                load.wait_for_layer(layer)
            load.finish()
            torch.cuda.synchronize()
        except Exception as err:  # what the engine sees: the test judges it
            return {"outcome": "error", "type": type(err).__name__, "detail": str(err)[:400],
                    "hbm_blocks": load.stats.extra.get("hbm_blocks")}
        got = cache.gather_blocks(pages[: load.num_blocks]).cpu()
        equal = load.num_blocks == num_blocks and torch.equal(got, payload(num_blocks))
        return {"outcome": "loaded", "equal": equal, "blocks": load.num_blocks, "hbm_blocks": load.stats.extra.get("hbm_blocks"),
                "checked_on": load.stats.extra.get("checked_on"), "host_copy": load.stats.extra.get("host_copy")}


def ucx_read(address: str, num_blocks: int) -> dict:
    """Gets into cupy arrays over UCX (UCX_TLS with CUDA transports, from the test): default (the get lands in GPU
    memory, so it asks for HBM copies) and prefer_hbm False (host copies), 5 of each; then one byte of the last
    block flipped in the HBM pool, which the get's checksums must catch."""
    import statistics

    import cupy
    import numpy as np

    from kvclient import KVClient

    want = [b.contiguous().view(torch.uint8).numpy().reshape(-1) for b in payload(num_blocks)]
    with KVClient(address, fingerprint(), transport="ucx") as client:
        transport = client.transport
        keys = client.block_keys(tokens(num_blocks))
        outs = [cupy.empty(len(w), dtype=cupy.uint8) for w in want]

        def sent_from_hbm() -> int:
            return client.stats()["counters"].get("ucx_hbm_sends", 0)

        def timed(prefer: bool | None) -> tuple[float, int]:
            transport.prefer_hbm = prefer
            before, runs = sent_from_hbm(), []
            for _ in range(6):
                for o in outs:
                    o.fill(0)
                cupy.cuda.runtime.deviceSynchronize()  # the zeros land before UCX's own streams write
                client.get(keys, out=outs)
                runs.append(client.last_transfer.transfer_s)
            return statistics.median(runs[1:]), sent_from_hbm() - before

        hbm_s, hbm_sent = timed(None)
        equal = all(np.array_equal(cupy.asnumpy(o), w) for o, w in zip(outs, want))
        host_s, host_sent = timed(False)
        equal_host = all(np.array_equal(cupy.asnumpy(o), w) for o, w in zip(outs, want))
        transport.prefer_hbm = None
        pool = client.hbm_pool()
        with client.pin(keys) as pinned:
            flip_byte(pinned.device_ptr(num_blocks - 1) + 7)
        try:
            client.get(keys, out=outs)
            corrupt = "no error"
        except Exception as err:
            corrupt = type(err).__name__
        return {"transport": client.stats()["client"]["transport"], "hbm_sends": transport.hbm_sends, "mapped": pool is not None,
                "equal": equal, "equal_host": equal_host, "hbm_sent": hbm_sent, "host_sent": host_sent,
                "hbm_ms": hbm_s * 1e3, "host_ms": host_s * 1e3, "bytes": sum(len(w) for w in want), "corrupt": corrupt}


def flip_byte(device_ptr: int) -> None:
    """Invert one byte of device memory at a raw address (here, a block in the server's mapped HBM pool)."""
    import cupy

    memory = cupy.cuda.UnownedMemory(device_ptr, 1, owner=None)
    byte = cupy.ndarray((1,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    byte ^= 0xFF
    cupy.cuda.runtime.deviceSynchronize()


def main(argv: list[str]) -> None:
    mode, address, num_blocks = argv[0], argv[1], int(argv[2])
    try:
        if mode == "read":
            result = read(address, num_blocks)
        elif mode == "ucx":
            result = ucx_read(address, num_blocks)
        else:
            result = load(address, num_blocks, argv[3])
    except Exception as err:
        result = {"outcome": "error", "type": type(err).__name__, "detail": str(err)[:400]}
    emit(**result)
    sys.stdout.flush()
    os._exit(0)  # no cleanup that could wait on a server the test killed


if __name__ == "__main__":
    main(sys.argv[1:])
