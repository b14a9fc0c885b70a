"""Blocks into a CUDA cache straight out of the store's pool: prefix loads and their DMA path.

PrefixLoad is the engine's side of vLLM's KV-connector shape (prepare, start, wait per
layer, finish); its base class is the host path, a payload fetched whole. The rest is the
GPU path over shm: a client's mapping of the store's pool page-locked for CUDA once
(RegisteredPool), so copies out of it are DMA, of blocks pinned with the client's public
`pin` (kvclient.PinnedBlocks): a download in a few large copies (copy_from_pool), or a
prefix streamed layer by layer into the pages (StreamedPrefixLoad, over layerwise.py's
plan), each block checked where it landed before its pin is dropped. Blocks the store
also holds in its HBM tier are copied device to device out of its pool, which this
process maps once (KVClient.hbm_pool), in the same layer-by-layer load as the rest. It
refuses to own what is loaded and when: adapter.py decides that.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch

from engines.block_checksum import paged_kernel, supports
from engines.layerwise import CacheGeometry, plan_layer_copies, run_on_cuda
from engines.paged_cache import PagedKVCache
from kvclient.client import KVClient, PinnedBlocks, SlotRef, TransferStats
from kvclient.errors import CapacityExhaustedError, InvalidRequestError

# A block group is copied, then checked by one thread while later groups are still in flight.
# xxh3 reads DRAM at only ~6 GB/s a core on the H100 host, so matching its ~50 GB/s DMA takes many threads.
COPY_GROUP_BYTES = 4 << 20
CHECK_THREADS = min(16, os.cpu_count() or 1)
COPY_LOOKAHEAD = 2  # layers whose copies are enqueued ahead of the layer about to run its attention


def plan_copies(slots: Sequence[SlotRef], block_bytes: int, group_bytes: int = COPY_GROUP_BYTES
                ) -> list[tuple[list[tuple[int, int, int]], list[SlotRef]]]:
    """Groups of about group_bytes, each as (copies, slots): (dest offset, pool offset, size) copies,
    merged where consecutive blocks sit back to back in the pool, as a fresh slab hands them out."""
    groups: list[tuple[list[tuple[int, int, int]], list[SlotRef]]] = []
    copies: list[tuple[int, int, int]] = []
    members: list[SlotRef] = []
    for s in slots:
        if members and (len(members) + 1) * block_bytes > group_bytes:
            groups.append((copies, members))
            copies, members = [], []
        dest = s.index * block_bytes
        if copies and copies[-1][0] + copies[-1][2] == dest and copies[-1][1] + copies[-1][2] == s.offset:
            copies[-1] = (copies[-1][0], copies[-1][1], copies[-1][2] + s.size_bytes)
        else:
            copies.append((dest, s.offset, s.size_bytes))
        members.append(s)
    if members:
        groups.append((copies, members))
    return groups


def verify_in_pool(pinned: PinnedBlocks, members: Sequence[SlotRef]) -> None:
    """Check pinned blocks where they sit in the pool (xxh3 releases the GIL: run it on worker threads)."""
    for s in members:
        pinned.verify(s.index)


class RegisteredPool:
    """A client's mapping of the store's shared-memory pool, page-locked for CUDA so copies out of it are DMA."""

    def __init__(self, pool: np.ndarray) -> None:
        self.array = pool
        self.host = torch.from_numpy(pool)  # uint8, aliases the mapping
        err = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.host.numel(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the {self.host.numel()}-byte pool failed: {err}")

    def close(self) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
        self.array = self.host = None


class DmaWorkers:
    """An adapter's threads and streams for the GPU path, made at first use: checkers hash blocks in the
    pool, the check starter waits for a load to land and fans its checks out, one copy stream per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checkers: ThreadPoolExecutor | None = None
        self._check_starter: ThreadPoolExecutor | None = None
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    def checkers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._checkers is None:
                self._checkers = ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="kv-check")
            return self._checkers

    def check_starter(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._check_starter is None:
                self._check_starter = ThreadPoolExecutor(4, thread_name_prefix="kv-check-start")
            return self._check_starter

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        with self._lock:
            if device not in self._copy_streams:
                self._copy_streams[device] = torch.cuda.Stream(device)
            return self._copy_streams[device]

    def close_starter(self) -> None:
        with self._lock:
            starter, self._check_starter = self._check_starter, None
        if starter is not None:
            starter.shutdown()

    def close_checkers(self) -> None:
        with self._lock:
            checkers, self._checkers = self._checkers, None
        if checkers is not None:
            checkers.shutdown()


def copy_from_pool(client: KVClient, registered: RegisteredPool, digests: Sequence[bytes], out: torch.Tensor,
                   checkers: ThreadPoolExecutor, lo: int = 0, hi: int | None = None) -> None:
    """Pin blocks [lo, hi), DMA them out of the registered pool into out in a few large copies, check them in
    the pool on worker threads as each group lands (xxh3 releases the GIL), unpin; all or nothing. A batch
    larger than the host pool can stage is halved until it fits."""
    hi = len(digests) if hi is None else hi
    try:
        pinned = client.pin(digests[lo:hi])
    except CapacityExhaustedError:
        if hi - lo < 2:
            raise
        mid = (lo + hi) // 2
        copy_from_pool(client, registered, digests, out, checkers, lo, mid)
        copy_from_pool(client, registered, digests, out, checkers, mid, hi)
        return
    with pinned:
        out_bytes = out.view(-1).view(torch.uint8)
        block_bytes = out_bytes.numel() // len(digests)
        for s in pinned.slots:
            if s.size_bytes != block_bytes:
                raise InvalidRequestError(f"output buffer for block {pinned.keys[s.index].hex()} holds {block_bytes} bytes; "
                                          f"the block has {s.size_bytes}")
        window = out_bytes[lo * block_bytes: hi * block_bytes]  # slot indices count from this window's first block
        stats = pinned.stats  # the client's last_transfer
        t0 = time.perf_counter()
        stream = torch.cuda.current_stream(out.device)
        groups = plan_copies(pinned.slots, block_bytes)
        landed = []
        for copies, _ in groups:
            for dest, offset, size in copies:
                window[dest: dest + size].copy_(registered.host[offset: offset + size], non_blocking=True)
            landed.append(torch.cuda.Event())
            landed[-1].record(stream)
        checks = []
        for event, (_, members) in zip(landed, groups):
            event.synchronize()
            checks.append(checkers.submit(verify_in_pool, pinned, members))
        t1 = time.perf_counter()
        errors = [f.exception() for f in checks]
        stats.transfer_s += t1 - t0
        stats.validate_s += time.perf_counter() - t1
        stats.extra["copies"] = sum(len(copies) for copies, _ in groups)
        for err in errors:
            if err is not None:
                raise err


class PrefixLoad:
    """A cached prefix on its way into cache pages; the engine's side of vLLM's KV-connector shape.

    prepare_load (outside the engine's lock: it talks to the store) -> start
    (under the lock, once the pages exist) -> wait_for_layer(i) before layer i
    reads the pages -> finish before anything computed from them is used:
    finish raises ChecksumMismatchError if a block failed its check, and the
    caller then recomputes. abort (or leaving the with-block unfinished) undoes
    a load at any step. This base class is the host path: the payload was
    fetched whole by prepare_load, start scatters it, and there is nothing to wait for.
    """

    def __init__(self, payload: torch.Tensor, stats: TransferStats | None = None) -> None:
        self.payload = payload
        self.stats = stats or TransferStats()

    @property
    def num_blocks(self) -> int:
        return len(self.payload)

    def start(self, cache: PagedKVCache, pages: Sequence[int]) -> "PrefixLoad":
        if self.num_blocks:
            cache.scatter_blocks(pages[: self.num_blocks], self.payload)
        return self

    def wait_for_layer(self, layer: int) -> None:
        pass

    def dma_ms(self) -> float:
        return 0.0

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def __enter__(self) -> "PrefixLoad":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


class StreamedPrefixLoad(PrefixLoad):
    """Pinned blocks DMA'd from the CUDA-registered pool into the pages, layer by layer (layerwise.py).

    Each block is checked once every layer has landed, while the forward pass
    is still running: on the GPU, in the pages themselves, by the XXH3 kernel
    (block_checksum.py) queued behind the copies, so what is checked is what
    attention reads; without the kernel, in the pool on worker threads. The pin
    is dropped only after that. It loads the first num_blocks pinned blocks (a
    prefix pin may hold more; they are released with the rest).

    Blocks with a copy in the store's HBM tier, when this process maps that pool,
    are copied device to device from it instead (a second plan per layer, on the
    same stream): one load may mix both sources. Only where the kernel checks the
    pages: the host-side check reads the host pool, which is not where those bytes
    came from. A store that dies mid-copy leaves pages that fail that check (or a
    CUDA error), never pages that pass it with other bytes.
    """

    def __init__(self, workers: DmaWorkers, registered: RegisteredPool, pinned: PinnedBlocks, num_blocks: int | None = None) -> None:
        self._workers, self._registered, self._pinned = workers, registered, pinned
        self._slots = pinned.slots[:num_blocks] if num_blocks is not None else pinned.slots
        self.stats = pinned.stats  # the client's last_transfer: the Pin, then the copies and checks here
        self._landed: list[torch.cuda.Event] = []
        self._checked = None  # host checks: a future
        self._hashes: torch.Tensor | None = None  # GPU checks: the kernel's output, ready at _hashed
        self._hashed: torch.cuda.Event | None = None
        self._done = False

    @property
    def num_blocks(self) -> int:
        return len(self._slots)

    def start(self, cache: PagedKVCache, pages: Sequence[int]) -> "PrefixLoad":
        """Plan the copies and enqueue the first layer's; the rest, and the checksum kernel behind the
        last, COPY_LOOKAHEAD layers ahead of each wait_for_layer. Every enqueue is CPU time on the
        thread launching the pass: all sixteen layers' before layer 0's attention left the GPU idle
        ~0.5 ms (8k prompt, 1b model, H100 host), while a copy engine at ~30-50 GB/s stays ahead of
        the layers' compute with two layers of lead. (That lead once left a 2 ms checksum kernel
        behind the last layer; the warp-per-block kernel takes 0.26 ms.)"""
        if not self._slots:
            return self
        t0 = time.perf_counter()
        self._cache, self._pages = cache, pages[: len(self._slots)]
        self._geometry = CacheGeometry.of(cache.kv)
        self._plans = self._plan_sources()
        self._num_layers = self._geometry.num_layers
        self._stream = self._workers.copy_stream(cache.device)
        self._stream.wait_stream(torch.cuda.current_stream(cache.device))  # earlier passes may still read these pages
        self._began = torch.cuda.Event(enable_timing=True)
        self._began.record(self._stream)
        self.stats.extra["copies"] = sum(len(c) for plan, _, _ in self._plans for c in plan)
        self.stats.transfer_s += time.perf_counter() - t0
        self._enqueue_through(0)
        return self

    def _plan_sources(self) -> list[tuple[list, int, bool]]:
        """Per source, its layer plan, base address and whether it is device memory: the registered host pool,
        and the store's HBM pool for blocks with a copy there (when mapped here and the pages are checked on the GPU)."""
        pinned, slots, pages = self._pinned, self._slots, self._pages
        in_hbm = [i for i in pinned.in_hbm() if i < len(slots)] if pinned.hbm is not None else []
        if in_hbm and not self._checked_on_gpu():
            in_hbm = []
        if len(in_hbm) == len(slots):
            on_host = []
        else:
            skip = set(in_hbm)
            on_host = [i for i in range(len(slots)) if i not in skip]
        self.stats.extra["hbm_blocks"] = len(in_hbm)
        plans = []
        if on_host:
            plan = plan_layer_copies(self._geometry, [pages[i] for i in on_host], [slots[i].offset for i in on_host])
            plans.append((plan, self._registered.host.data_ptr(), False))
        if in_hbm:
            plan = plan_layer_copies(self._geometry, [pages[i] for i in in_hbm], [pinned.hbm_offsets[i] for i in in_hbm])
            plans.append((plan, pinned.hbm.base_ptr, True))
        return plans

    def _checked_on_gpu(self) -> bool:
        geometry = self._geometry
        return supports(geometry.half_bytes, 2 * geometry.num_layers) and paged_kernel() is not None

    def _enqueue_through(self, layer: int) -> None:
        """Enqueue the copies of every layer up to `layer`; after the last, the checksum kernel."""
        last = self._num_layers - 1
        if not self._slots or len(self._landed) > min(layer, last):
            return
        t0 = time.perf_counter()
        kv = self._cache.kv.data_ptr()
        while len(self._landed) <= min(layer, last):
            for plan, base, from_device in self._plans:
                run_on_cuda(plan[len(self._landed)], kv, base, self._stream, from_device)
            self._landed.append(torch.cuda.Event(enable_timing=True))
            self._landed[-1].record(self._stream)
        if len(self._landed) == self._num_layers:
            self._hash_in_pages()
        self.stats.transfer_s += time.perf_counter() - t0  # enqueueing; the DMA itself is dma_ms()

    def _hash_in_pages(self) -> None:
        geometry, stream = self._geometry, self._stream
        kernel = paged_kernel() if supports(geometry.half_bytes, 2 * geometry.num_layers) else None
        if kernel is None:
            return
        with torch.cuda.stream(stream):
            offsets = torch.tensor([p * geometry.half_bytes for p in self._pages], dtype=torch.int64)
            offsets = offsets.to(self._cache.device, non_blocking=True)
            self._hashes = kernel.launch(self._cache.kv.data_ptr(), offsets, geometry.num_pages * geometry.half_bytes,
                                         geometry.half_bytes, 2 * geometry.num_layers, stream)
        self._hashed = torch.cuda.Event()
        self._hashed.record(stream)
        self.stats.extra["checked_on"] = "gpu"

    def _check_hashes(self) -> None:
        t0 = time.perf_counter()
        self._hashed.synchronize()
        got = self._hashes.cpu().numpy().view(np.uint64)
        self.stats.validate_s += time.perf_counter() - t0
        self._pinned.verify_hashes(got)

    def _start_checks(self) -> None:
        """Checks begin once the forward pass is (nearly) enqueued, not at start: sixteen threads taking
        the GIL back after every block starved the thread launching the kernels (TTFT doubled)."""
        if self._checked is None and self._landed and self._hashed is None:
            self._checked = self._workers.check_starter().submit(self._check_when_landed)

    def _check_when_landed(self) -> None:
        self._landed[-1].synchronize()
        t0 = time.perf_counter()
        per_group = max(1, COPY_GROUP_BYTES // max(1, self._slots[0].size_bytes))
        groups = [self._slots[i: i + per_group] for i in range(0, len(self._slots), per_group)]
        checkers = self._workers.checkers()
        errors = [f.exception() for f in [checkers.submit(verify_in_pool, self._pinned, g) for g in groups]]
        self.stats.validate_s += time.perf_counter() - t0
        for err in errors:
            if err is not None:
                raise err

    def wait_for_layer(self, layer: int) -> None:
        if self._landed:
            self._enqueue_through(layer + COPY_LOOKAHEAD)
            torch.cuda.current_stream(self._cache.device).wait_event(self._landed[layer])
            if layer == self._num_layers - 1:
                self._start_checks()

    def dma_ms(self) -> float:
        """GPU time from the first copy to the last layer landing (call after finish)."""
        return self._began.elapsed_time(self._landed[-1]) if self._landed else 0.0

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._landed:
                self._enqueue_through(self._num_layers - 1)  # a caller that skipped some layers' waits
            self._start_checks()
            if self._checked is not None:
                self._checked.result()
            if self._hashed is not None:
                self._check_hashes()
        except BaseException:
            self._pinned.release(failed=True)
            raise
        self._pinned.release()

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        if self._landed:
            (self._hashed or self._landed[-1]).synchronize()  # no DMA or hash may outlive the pin
        if self._checked is not None:
            self._checked.exception()
        self._pinned.release(failed=True)
