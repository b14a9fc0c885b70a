"""Host-tier fetch into paged KV against the pinned host-to-device bandwidth, measured in the same run.

    python bench/h2d_fetch.py                        # the real path: a kvstore server, pinned blocks, 1k/4k/8k
    python bench/h2d_fetch.py --strategies           # also the candidate copy strategies on a synthetic pool

The target (issue: host -> GPU at PCIe speed) is a ratio: a prefix streamed out of the store's
shared host pool into the engine's pages, layer by layer, must move at >= 90% of what one large
cudaMemcpyAsync from a pinned host buffer of the same size moves on this machine, now. The real
path is the engine's own: blocks of the model's shape published to a real server, pinned in one
Pin, StreamedPrefixLoad into a PagedKVCache (every layer enqueued, no forward pass to pace it),
checked in the pages; GB/s = bytes / GPU time from the first move to the last layer landed.

--strategies times, on a /dev/shm mapping registered like the store's pool, the ways to move the
same bytes: the copy engines in one plain copy (the shm anchor), pitched 2D copies per layer on one
or several streams (per-call and per-row costs), csrc/paged_gather.cu's kernel at several grid
sizes (one launch per layer, or all layers at once), with the pool's blocks back to back or
scattered, and a staged variant (one plain copy to device memory, then the kernel device to device).
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engines import store_dma  # noqa: E402
from engines.layerwise import CacheGeometry, plan_layer_copies, run_on_cuda  # noqa: E402
from engines.paged_gather import gather_kernel, layer_groups, plan_gather  # noqa: E402
from engines.presets import PRESETS  # noqa: E402

TARGET = 0.90
DEFAULT_CONTEXTS = (1024, 4096, 8192)


def time_ms(fn: Callable[[torch.cuda.Stream], None], repeats: int, stream: torch.cuda.Stream) -> float:
    """Median GPU time of fn's work on stream (fn may fork other streams and must join them back)."""
    fn(stream)  # warm
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        fn(stream)
        end.record(stream)
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def pinned_anchor_ms(nbytes: int, repeats: int, device: torch.device) -> float:
    """One cudaMemcpyAsync of nbytes from a pinned (cudaHostAlloc) buffer to device memory."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)

    def copy(s):
        with torch.cuda.stream(s):
            dst.copy_(src, non_blocking=True)

    ms = time_ms(copy, repeats, stream)
    del src, dst
    return ms


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / ms / 1e6 if ms else 0.0


def verdict(ratio: float) -> str:
    return "PASS" if ratio >= TARGET else "MISS"


# ---- the candidate strategies on a synthetic pool ----------------------------------------------------------


class ShmPool:
    """A /dev/shm file mapped and registered like the store's pool (RegisteredPool)."""

    def __init__(self, nbytes: int) -> None:
        fd, self.path = tempfile.mkstemp(prefix="h2d-fetch-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        os.ftruncate(fd, nbytes)
        self._mmap = mmap.mmap(fd, nbytes)
        os.close(fd)
        array = np.frombuffer(self._mmap, dtype=np.uint8)
        array[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
        self.registered = store_dma.RegisteredPool(array)

    def close(self) -> None:
        self.registered.close()
        os.unlink(self.path)


def strategies(context: int, repeats: int, device: torch.device) -> list[tuple[str, float, str]]:
    """(name, GB/s, note) for each candidate, on the 1b model's geometry, bf16, block 16."""
    config = PRESETS["1b"]
    block_tokens = 16
    num_blocks = (context - 1) // block_tokens
    kv = torch.zeros((config.num_hidden_layers, 2, num_blocks + 2, block_tokens, config.num_key_value_heads, config.head_dim),
                     dtype=torch.bfloat16, device=device)
    geometry = CacheGeometry.of(kv)
    bb = geometry.block_bytes
    nbytes = num_blocks * bb
    pool = ShmPool(2 * nbytes + bb)
    host, dptr = pool.registered.host, pool.registered.device_ptr
    pages = list(range(1, num_blocks + 1))
    packed = [i * bb for i in range(num_blocks)]
    scattered = [int(x) * bb for x in np.random.default_rng(1).permutation(2 * num_blocks)[:num_blocks]]
    kv_ptr = kv.data_ptr()
    staging = torch.empty(nbytes, dtype=torch.uint8, device=device)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pinned.copy_(host[:nbytes])
    main = torch.cuda.Stream(device)
    side = [torch.cuda.Stream(device) for _ in range(4)]
    kernel = gather_kernel()
    out: list[tuple[str, float, str]] = []

    def add(name: str, fn, note: str = "") -> None:
        out.append((name, gbps(nbytes, time_ms(fn, repeats, main)), note))

    def plain(src: torch.Tensor):
        def fn(s):
            with torch.cuda.stream(s):
                staging.copy_(src, non_blocking=True)
        return fn

    def ce2d(offsets, src_ptr, nstreams=1):
        plan = plan_layer_copies(geometry, pages, offsets)

        def fn(s):
            if nstreams == 1:
                for layer in plan:
                    run_on_cuda(layer, kv_ptr, src_ptr, s)
                return
            for t in side[:nstreams]:
                t.wait_stream(s)
            i = 0
            for layer in plan:
                for c in layer:
                    run_on_cuda([c], kv_ptr, src_ptr, side[i % nstreams])
                    i += 1
            for t in side[:nstreams]:
                s.wait_stream(t)
        return fn, sum(len(layer) for layer in plan)

    def gather(offsets, src_ptr, ctas, per_layer=True, source_bytes=None):
        plan = plan_gather(geometry, pages, offsets, source_bytes or host.numel(), src_ptr, kv_ptr)
        table = kernel.upload(plan, device, main)
        torch.cuda.synchronize()

        def fn(s):
            if per_layer:
                for layer in range(geometry.num_layers):
                    kernel.launch(plan, table, kv_ptr, src_ptr, layer, layer + 1, s, ctas)
            else:
                kernel.launch(plan, table, kv_ptr, src_ptr, 0, geometry.num_layers, s, ctas)
        return fn

    add("ce 1d pinned (anchor)", plain(pinned))
    add("ce 1d shm-registered", plain(host[:nbytes]))
    fn, calls = ce2d(packed, host.data_ptr())
    add("ce 2d/layer shm packed, 1 stream", fn, f"{calls} calls (current)")
    fn, calls = ce2d(packed, pinned.data_ptr())
    add("ce 2d/layer pinned packed, 1 stream", fn, f"{calls} calls")
    for n in (2, 4):
        fn, calls = ce2d(packed, host.data_ptr(), n)
        add(f"ce 2d/layer shm packed, {n} streams", fn, f"{calls} calls")
    fn, calls = ce2d(scattered, host.data_ptr())
    add("ce 2d shm scattered, 1 stream", fn, f"{calls} calls")
    reference = kv.clone()
    if kernel is not None and dptr is not None:
        for ctas in (16, 32, 64, 132, 264, 528):
            add(f"kernel/layer shm packed, {ctas} CTAs", gather(packed, dptr, ctas), "16 launches")
        kv.zero_()
        gather(scattered, dptr, 64)(main)
        torch.cuda.synchronize()
        exact = torch.equal(kv.view(torch.int16), reference.view(torch.int16))  # bytes: random bytes make NaNs
        for ctas in (64, 132):
            add(f"kernel/layer shm scattered, {ctas} CTAs", gather(scattered, dptr, ctas), f"byte-exact vs ce: {exact}")
        add("kernel all layers shm packed, 132 CTAs", gather(packed, dptr, 132, per_layer=False), "1 launch")
        groups = layer_groups(geometry.num_layers, 2 * num_blocks * geometry.half_bytes)
        grouped_plan = plan_gather(geometry, pages, packed, host.numel(), dptr, kv_ptr)
        grouped = kernel.bind(grouped_plan, kernel.upload(grouped_plan, device, main), kv_ptr, dptr, main, 64)
        torch.cuda.synchronize()

        def by_groups(s):
            for begin, end in groups:
                grouped(begin, end)
        add("kernel by layer groups shm packed, 64 CTAs", by_groups, f"{len(groups)} launches (the engine's path)")

        def staged(s):
            plain(host[:nbytes])(s)
            stage_fn(s)
        stage_fn = gather(packed, staging.data_ptr(), 264, source_bytes=nbytes)
        add("staged: ce 1d + kernel d2d", staged, "no layer pipelining")
    else:
        out.append(("kernel", 0.0, f"unavailable (device ptr {dptr}, kernel {kernel})"))
    pool.close()
    return out


# ---- the real path -------------------------------------------------------------------------------------------


def real_path(contexts: list[int], repeats: int, modes: list[str], device: torch.device) -> list[dict]:
    from engines.adapter import StoreAdapter
    from engines.paged_cache import PagedKVCache
    from kvwire.keys import Fingerprint
    from tests.serverproc import ServerProc

    config, block_tokens = PRESETS["1b"], 16
    blocks = [(c - 1) // block_tokens for c in contexts]
    cache = PagedKVCache.for_model(config, max(blocks) + 8, block_tokens, dtype=torch.bfloat16, device=device)
    fingerprint = Fingerprint(model="h2d-fetch", revision="random", num_layers=cache.num_layers, num_kv_heads=cache.num_kv_heads,
                              head_dim=cache.head_dim, block_tokens=block_tokens, dtype="bfloat16")
    pool_mib = int(sum(blocks) * cache.block_bytes * 1.25) // (1 << 20) + 256
    results = []
    with tempfile.TemporaryDirectory(prefix="h2d-fetch-") as tmp:
        server = ServerProc(Path(tmp) / "data", flags={"host_memory": f"{pool_mib}MiB", "ssd_capacity": f"{2 * pool_mib}MiB"})
        server.start()
        try:
            adapter = StoreAdapter.for_cache(server.address, fingerprint, cache, transport="shm")
            for context, n in zip(contexts, blocks):
                generator = torch.Generator().manual_seed(context)
                payload = torch.randn((n, *cache.block_shape), generator=generator).to(torch.bfloat16)
                tokens = torch.randint(0, 256, (n * block_tokens,), generator=generator).tolist()
                with adapter.session() as client:
                    keys = adapter.block_keys(tokens)
                    adapter.upload(client, keys, payload)
                nbytes = n * cache.block_bytes
                anchor_ms = pinned_anchor_ms(nbytes, repeats, device)
                pages = list(range(3, 3 + n))
                expected = None
                for mode, queued in [(m, q) for m in modes for q in (False, True)]:
                    adapter._dma.host_copy = mode  # the bench compares the two paths on one adapter
                    times, copies, exact = [], 0, True
                    for r in range(repeats + 1):
                        cache.kv.zero_()
                        with adapter.session() as client:
                            with adapter.prepare_load(client, keys) as load:
                                if queued:  # hold the copy stream until every layer is enqueued: GPU time alone
                                    with torch.cuda.stream(adapter._dma.copy_stream(device)):
                                        torch.cuda._sleep(20_000_000)
                                load.start(cache, pages)
                                if queued:
                                    load._enqueue_through(cache.num_layers - 1)
                                load.finish()  # every layer enqueued, landed and checked in the pages
                        copies = load.stats.extra.get("copies", 0)
                        if r:
                            times.append(load.dma_ms())
                        if expected is None:
                            expected = payload.to(device)
                        exact = exact and torch.equal(cache.kv[:, :, pages].permute(2, 0, 1, 3, 4, 5), expected)
                    ms = statistics.median(times)
                    results.append(dict(context=context, mode=mode + ("/queued" if queued else ""), blocks=n, bytes=nbytes, fetch_ms=ms, anchor_ms=anchor_ms,
                                        fetch_gbps=gbps(nbytes, ms), anchor_gbps=gbps(nbytes, anchor_ms),
                                        copies=copies, exact=exact))
            adapter.close()
        finally:
            server.stop()
    return results


def format_fetch(results: list[dict]) -> str:
    header = f"{'context':>7} {'path':>19} {'blocks':>6} {'MiB':>6} {'calls':>5} {'fetch ms':>8} {'fetch GB/s':>10} " \
             f"{'pinned H2D GB/s':>15} {'ratio':>5} {'exact':>5}  target >= {TARGET:.2f}"
    lines = [header, "-" * len(header)]
    for r in results:
        ratio = r["fetch_gbps"] / r["anchor_gbps"]
        lines.append(f"{r['context']:>7} {r['mode']:>19} {r['blocks']:>6} {r['bytes'] / (1 << 20):>6.0f} {r['copies']:>5} "
                     f"{r['fetch_ms']:>8.2f} {r['fetch_gbps']:>10.1f} {r['anchor_gbps']:>15.1f} {ratio:>5.2f} "
                     f"{'ok' if r['exact'] else 'DIFF':>5}  {verdict(ratio)}")
    lines.append("fetch: StreamedPrefixLoad out of a real server's shared host pool into the pages, all layers enqueued, "
                 "GPU time first move -> last layer landed (medians); /queued: the copy stream held until every layer was enqueued "
                 "(the GPU's time alone, without the host's pace); pinned H2D: one cudaMemcpyAsync of the same bytes "
                 "from a cudaHostAlloc buffer, this run; calls: copy calls or kernel launches")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default=",".join(map(str, DEFAULT_CONTEXTS)))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--strategies", action="store_true", help="also time the candidate copy strategies (synthetic pool)")
    parser.add_argument("--no-real", action="store_true", help="skip the real path (no server)")
    parser.add_argument("--modes", default="copy_engines,kernel", help="host copy paths the real path compares")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    contexts = [int(c) for c in args.contexts.split(",")]
    if args.strategies:
        for context in contexts:
            print(f"\ncontext {context}: 1b bf16, block 16, {(context - 1) // 16} blocks")
            for name, rate, note in strategies(context, args.repeats, device):
                print(f"  {name:<40} {rate:>7.1f} GB/s  {note}")
    if not args.no_real:
        print("\n" + format_fetch(real_path(contexts, args.repeats, args.modes.split(","), device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
