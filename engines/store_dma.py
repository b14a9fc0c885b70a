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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engines.block_checksum import paged_kernel, supports
from engines.cuda_events import StreamEvent, cuda_runtime, current_stream_ptr, new_event
from engines.cuda_kernels import on_stream
from engines.layerwise import CacheGeometry, LayerCopies, run_on_cuda
from engines.load_tables import NO_TIERS, write_load_tables
from engines.paged_gather import (DEFAULT_CTAS, BoundGather, GatherPlan, PagedGatherKernel, checked_plan, gather_kernel,
                                  layer_groups)
from engines.paged_cache import PagedKVCache
from engines.pinned_uploads import PinnedDownloads, TableRing, TableSlot
from kvclient.client import KVClient, PinnedBlocks, SlotRef, TransferStats
from kvclient.errors import CapacityExhaustedError, InvalidRequestError

# A block group is copied, then checked by one thread while later groups are still in flight.
# xxh3 reads DRAM at only ~6 GB/s a core on the H100 host, so matching its ~50 GB/s DMA takes many threads.
COPY_GROUP_BYTES = 4 << 20
CHECK_THREADS = min(16, os.cpu_count() or 1)
COPY_LOOKAHEAD = 2  # layers whose copies are enqueued ahead of the layer about to run its attention
# How host-pool blocks reach the pages: "kernel" (csrc/paged_gather.cu reading the mapped pool: one
# launch per layer), "copy_engines" (a pitched cudaMemcpy2DAsync per layer, K|V and run), or "auto":
# the kernel where it builds and the pool is mapped, else the copy engines. Read by each DmaWorkers.
HOST_COPY = os.environ.get("KVSTORE_HOST_COPY", "auto")
# auto takes the copy engines for a pass computing more tokens than this: its compute hides their pace, and
# the kernel's CTAs would share multiprocessors with it (8k prompt at 90% hit, 832 tokens computed, 1b model,
# H200: the pass's compute took 12.2 ms beside the kernel against 10.1 ms with the prefix resident).
KERNEL_MAX_COMPUTE_TOKENS = 64
# The same kernel reading the store's HBM pool: device memory answers in far less time than PCIe, so more
# CTAs keep more of its bandwidth busy (the pass beside it computes at most KERNEL_MAX_COMPUTE_TOKENS).
HBM_GATHER_CTAS = int(os.environ.get("KVSTORE_HBM_GATHER_CTAS", "128"))
# Its grid beside a pass computing more than KERNEL_MAX_COMPUTE_TOKENS: a few CTAs still move an HBM-resident prefix
# in well under a layer's compute and leave the multiprocessors to the pass, where the copy engines' pitched copies
# cost the launching thread a planning pass and a call per run and layer.
HBM_GATHER_CTAS_BESIDE_PASS = int(os.environ.get("KVSTORE_HBM_GATHER_CTAS_BESIDE_PASS", "16"))
CUDA_HOST_REGISTER_PORTABLE, CUDA_HOST_REGISTER_MAPPED = 1, 2
CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91  # cudaDevAttrCanUseHostPointerForRegisteredMem


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
    """A client's mapping of the store's shared-memory pool, page-locked for CUDA so copies out of it are DMA,
    and mapped into the GPUs' address space so a kernel can read it (device_ptr; None where the device
    cannot use the host address: then only the copy engines read it)."""

    def __init__(self, pool: np.ndarray) -> None:
        self.array = pool
        self.host = torch.from_numpy(pool)  # uint8, aliases the mapping
        flags = CUDA_HOST_REGISTER_PORTABLE | CUDA_HOST_REGISTER_MAPPED
        err = torch.cuda.cudart().cudaHostRegister(self.host.data_ptr(), self.host.numel(), flags)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the {self.host.numel()}-byte pool failed: {err}")
        self.device_ptr = self.host.data_ptr() if _host_pointer_is_device_pointer() else None

    def close(self) -> None:
        torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
        self.array = self.host = None


def _host_pointer_is_device_pointer() -> bool:
    """Whether a kernel may read registered host memory at its host address (true on 64-bit Linux with
    unified addressing, every GPU the engines run on); cupy asks the device, as torch exposes no such call."""
    try:
        from cupy.cuda import runtime

        return bool(runtime.deviceGetAttribute(CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM, torch.cuda.current_device()))
    except Exception:  # no cupy: no kernel either
        return False


def choose_host_copy(mode: str, kernel_ready: bool, compute_tokens: int | None) -> str:
    """How a load's host-pool blocks move: "kernel" or "copy_engines". mode is DmaWorkers.host_copy; kernel_ready,
    whether the kernel built and can read the pool here; compute_tokens, what the pass beside the load computes
    (None: unknown, e.g. a fetch with no pass). Raises where the kernel is demanded but cannot run."""
    if mode == "copy_engines":
        return mode
    if mode == "kernel":
        if not kernel_ready:
            raise RuntimeError("host_copy='kernel', but the gather kernel cannot read this pool here "
                               "(no kernel, an unmapped pool or an unaligned layout)")
        return mode
    if not kernel_ready or (compute_tokens is not None and compute_tokens > KERNEL_MAX_COMPUTE_TOKENS):
        return "copy_engines"
    return "kernel"


class DmaWorkers:
    """An adapter's threads and streams for the GPU path, made at first use: checkers hash blocks in the
    pool, the check starter waits for a load to land and fans its checks out, one copy stream per device.
    host_copy picks how host-pool blocks move (HOST_COPY), gather_ctas the kernel's grid."""

    def __init__(self, host_copy: str | None = None, gather_ctas: int = DEFAULT_CTAS, hbm_gather_ctas: int = HBM_GATHER_CTAS,
                 hbm_gather_ctas_beside_pass: int = HBM_GATHER_CTAS_BESIDE_PASS) -> None:
        self.host_copy = host_copy or HOST_COPY
        if self.host_copy not in ("auto", "kernel", "copy_engines"):
            raise ValueError(f"host_copy {self.host_copy!r}: auto, kernel or copy_engines")
        self.gather_ctas, self.hbm_gather_ctas = gather_ctas, hbm_gather_ctas
        self.hbm_gather_ctas_beside_pass = hbm_gather_ctas_beside_pass
        self._lock = threading.Lock()
        self._checkers: ThreadPoolExecutor | None = None
        self._check_starter: ThreadPoolExecutor | None = None
        self._lanes: dict[torch.device, CopyLane] = {}  # one copy stream per device, with what loads need of it
        self.downloads = PinnedDownloads()  # and the checksum kernel's answers back

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
        return self.lane(device).stream

    def lane(self, device: torch.device) -> "CopyLane":
        """The device's copy stream as a load's hot path uses it (CopyLane), made at first use."""
        lane = self._lanes.get(device)
        if lane is None:
            with self._lock:
                lane = self._lanes.get(device)
                if lane is None:
                    stream = torch.cuda.Stream(device)
                    launch = on_stream(stream) if cuda_runtime() is not None else None
                    lane = self._lanes[device] = CopyLane(device, stream, stream.cuda_stream, launch, TableRing(device))
        return lane

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


@dataclass
class CopyLane:
    """A device's copy stream as a load's launching thread names it: its raw pointer, cupy's view of it to launch
    kernels on (None without cupy: no kernels then), and the ring of the loads' table slots on that device."""

    device: torch.device
    stream: torch.cuda.Stream
    ptr: int
    launch_stream: object | None
    tables: TableRing

    def follow(self, stream_ptr: int) -> None:
        """Hold the copy stream's later work until what is enqueued on stream_ptr so far has run (earlier passes
        may still read the pages a load is about to overwrite): Stream.wait_stream, without its objects."""
        event = new_event(self.device)
        event.record(stream_ptr)
        event.wait_on(self.ptr)


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

    def __init__(self, workers: DmaWorkers, registered: RegisteredPool, pinned: PinnedBlocks, num_blocks: int | None = None,
                 compute_tokens: int | None = None) -> None:
        self._workers, self._registered, self._pinned = workers, registered, pinned
        self._compute_tokens = compute_tokens  # tokens the pass beside this load computes, if known (choose_host_copy)
        # The first n pinned blocks, read as the Pin's columns (pinned.columns): one SlotRef per block cost ~0.25 ms
        # of an 8k prompt's load on an H200 host, on the thread that then launches the forward pass.
        self._n = len(pinned) if num_blocks is None else max(0, min(num_blocks, len(pinned)))
        self.stats = pinned.stats  # the client's last_transfer: the Pin, then the copies and checks here
        self._landed: list[StreamEvent] = []
        self._checked = None  # host checks: a future
        self._hashes: torch.Tensor | None = None  # GPU checks: the kernel's output in page-locked memory, ready at _hashed
        self._hashed: StreamEvent | None = None
        self._waited: tuple[int, StreamEvent] | None = None  # the last (stream, event) wait_for_layer made wait
        self._tables: TableSlot | None = None  # the kernels' tables, given back once the last kernel reading them is enqueued
        self._done = False

    @property
    def num_blocks(self) -> int:
        return self._n

    def start(self, cache: PagedKVCache, pages: Sequence[int]) -> "PrefixLoad":
        """Plan the copies and enqueue the first layer's; the rest COPY_LOOKAHEAD layers ahead of each
        wait_for_layer, and the checksum kernel behind the last (_hash_in_pages). Every enqueue is CPU time on the
        thread launching the pass: all sixteen layers' before layer 0's attention left the GPU idle
        ~0.5 ms (8k prompt, 1b model, H100 host), while a copy engine at ~30-50 GB/s stays ahead of
        the layers' compute with two layers of lead. (That lead once left a 2 ms checksum kernel
        behind the last layer; the warp-per-block kernel takes 0.26 ms.)"""
        if not self._n:
            return self
        t0 = time.perf_counter()
        self._cache, self._pages = cache, np.asarray(pages[: self._n], dtype=np.int64)
        self._geometry = CacheGeometry.of(cache.kv)
        self._num_layers = self._geometry.num_layers
        self._lane = lane = self._workers.lane(cache.device)
        self._stream = lane.stream
        lane.follow(current_stream_ptr(cache.device))  # earlier passes may still read these pages
        self._sources, self._hash_offsets = self._plan_sources()
        self._groups = self._layer_groups()
        self._began = new_event(cache.device, timing=True)  # after the plan's own small uploads: dma_ms is the moves
        self._began.record(lane.ptr)
        self.stats.extra["copies"] = sum(source.calls(self._groups) for source in self._sources)
        self.stats.extra["host_copy"] = "+".join(source.kind for source in self._sources)
        self.stats.transfer_s += time.perf_counter() - t0
        self._enqueue_through(0)
        return self

    def _plan_sources(self) -> tuple[list["_LayerSource"], int | None]:
        """Per source, what moves its blocks layer by layer: the registered host pool (the gather kernel, or the
        copy engines), and the store's HBM pool for blocks with a copy there (when mapped here and the pages are
        checked on the GPU), device to device; and the device address of the checksum kernel's page offsets, or None
        where the pages are checked on the host. Every table the kernels read is written into one of the lane's table
        slots and goes up in one copy, from page-locked memory, on the copy stream: built after the last layer, a
        pageable copy there could hold the host until every layer had landed."""
        pinned, n, pages, geometry, lane = self._pinned, self._n, self._pages, self._geometry, self._lane
        columns = pinned.columns
        on_gpu = self._checked_on_gpu()
        hbm = pinned.hbm if pinned.hbm is not None and len(columns.tiers) and on_gpu else None
        slot = self._tables = lane.tables.take(3 * n)
        tables = write_load_tables(pages, columns.tiers if hbm is not None else NO_TIERS, columns.offsets,
                                   columns.hbm_offsets if hbm is not None else NO_TIERS, slot.words, geometry.half_bytes,
                                   geometry.num_pages, geometry.block_bytes, self._registered.host.numel(),
                                   hbm.size_bytes if hbm is not None else 0, on_gpu)
        self.stats.extra["hbm_blocks"] = tables.hbm_blocks
        planned: list[_LayerSource | _PendingGather] = []
        if tables.host_blocks:
            planned.append(self._host_source(*tables.host(slot.words), tables.host_or, tables.host_at))
        if tables.hbm_blocks:
            planned.append(self._hbm_source(*tables.hbm(slot.words), tables.hbm_or, tables.hbm_at))
        if not on_gpu and not any(isinstance(p, _PendingGather) for p in planned):
            self._give_back_tables()  # no kernel reads them: the copy engines took their plan as lists
            return planned, None
        slot.upload(tables.hash_at + (n if on_gpu else 0), lane.ptr)
        kv_ptr = self._cache.kv.data_ptr()
        sources = [p.bind(slot, kv_ptr, lane.launch_stream) if isinstance(p, _PendingGather) else p for p in planned]
        return sources, (slot.ptr(tables.hash_at) if on_gpu else None)

    def _layer_groups(self) -> list[tuple[int, int]]:
        """Layer ranges moved (and waited for) together: one layer each, unless the kernel moves so few bytes
        a layer that launching layer by layer would leave it waiting on the host (paged_gather.layer_groups).
        Out of device memory alone (the HBM pool) beside a pass of few tokens, layer 0, then the rest in one
        launch: the kernel's full grid moves an 8k prefix of a 1b model (256 MiB) in a fraction of a millisecond,
        ahead of the layers' compute, while each layer's own launch and event cost the thread launching the
        pass ~35 us (H200 host), which such a pass waits on. Beside a longer pass the kernel's grid is small
        (hbm_gather_ctas_beside_pass) and the pass is paced by its compute, so layer by layer again."""
        gathered = [s for s in self._sources if isinstance(s, _GatherSource)]
        if not gathered:
            return [(layer, layer + 1) for layer in range(self._num_layers)]
        short_pass = self._compute_tokens is None or self._compute_tokens <= KERNEL_MAX_COMPUTE_TOKENS
        if short_pass and all(s.kind == "d2d_kernel" for s in self._sources):
            return [(0, 1), (1, self._num_layers)] if self._num_layers > 1 else [(0, 1)]
        return layer_groups(self._num_layers, gathered[0].layer_bytes)

    def _host_source(self, pages: np.ndarray, offsets: np.ndarray, offsets_or: int, at: int) -> "_LayerSource | _PendingGather":
        """The gather kernel where asked for (or auto), built and able to read the pool; else the copy engines. pages and
        offsets: the host pool's blocks, views of the load's tables, which start at word `at` of its slot."""
        registered, workers = self._registered, self._workers
        kernel = gather_kernel() if workers.host_copy != "copy_engines" and registered.device_ptr is not None else None
        plan = checked_plan(self._geometry, pages, offsets, offsets_or, registered.device_ptr,
                            self._cache.kv.data_ptr()) if kernel is not None else None
        if choose_host_copy(workers.host_copy, plan is not None, self._compute_tokens) == "kernel":
            return _PendingGather(kernel, plan, registered.device_ptr, workers.gather_ctas, "kernel", at)
        return _CopySource(LayerCopies(self._geometry, pages, offsets), registered.host.data_ptr(), False)

    def _hbm_source(self, pages: np.ndarray, offsets: np.ndarray, offsets_or: int, at: int) -> "_LayerSource | _PendingGather":
        """Device to device out of the store's HBM pool: the gather kernel where it builds and the pool sits on
        the pages' GPU (unless the copy engines are asked for), with a grid of hbm_gather_ctas, or of
        hbm_gather_ctas_beside_pass beside a pass computing more than KERNEL_MAX_COMPUTE_TOKENS; else pitched
        copies on the copy engines. A layer's rows are one page's K or V (16 KiB for a 1b model), and the copy
        engines moved those at ~90 GB/s (8k prefix, H200), slower than the forward pass they feed; the kernel
        reads device memory at its pace."""
        hbm, workers = self._pinned.hbm, self._workers
        same_gpu = hbm.device == self._cache.device.index
        kernel = gather_kernel() if workers.host_copy != "copy_engines" and same_gpu else None
        plan = checked_plan(self._geometry, pages, offsets, offsets_or, hbm.base_ptr, self._cache.kv.data_ptr()) \
            if kernel is not None else None
        if plan is not None:
            busy = self._compute_tokens is not None and self._compute_tokens > KERNEL_MAX_COMPUTE_TOKENS
            ctas = workers.hbm_gather_ctas_beside_pass if busy else workers.hbm_gather_ctas
            return _PendingGather(kernel, plan, hbm.base_ptr, ctas, "d2d_kernel", at)
        return _CopySource(LayerCopies(self._geometry, pages, offsets), hbm.base_ptr, True)

    def _checked_on_gpu(self) -> bool:
        geometry = self._geometry
        return supports(geometry.half_bytes, 2 * geometry.num_layers) and paged_kernel() is not None

    def _enqueue_through(self, layer: int) -> None:
        """Enqueue the copies of every layer up to `layer` (whole groups)."""
        last = self._num_layers - 1
        if not self._n or len(self._landed) > min(layer, last):
            return
        t0 = time.perf_counter()
        kv, lane = self._cache.kv.data_ptr(), self._lane
        while len(self._landed) <= min(layer, last):
            begin, end = next(g for g in self._groups if g[0] == len(self._landed))
            for source in self._sources:
                source.enqueue(begin, end, kv, self._stream)
            landed = new_event(lane.device, timing=True)
            landed.record(lane.ptr)
            self._landed.extend([landed] * (end - begin))  # every layer of a group waits for the group
        self.stats.transfer_s += time.perf_counter() - t0  # enqueueing; the DMA itself is dma_ms()

    def _hash_in_pages(self) -> None:
        """The checksum kernel over the loaded pages, on the copy stream behind every layer's copies, once they are all
        enqueued: from the wait before layer 1 on, so its launch overlaps the forward pass instead of preceding it."""
        if self._hashed is not None or self._hash_offsets is None or len(self._landed) < self._num_layers:
            return
        geometry, stream, lane = self._geometry, self._stream, self._lane
        kernel = paged_kernel()
        with torch.cuda.stream(stream):
            hashes = kernel.launch_at(self._cache.kv.data_ptr(), self._hash_offsets, self._n, lane.device,
                                      geometry.num_pages * geometry.half_bytes, geometry.half_bytes, 2 * geometry.num_layers,
                                      stream)
        self._hashes = self._workers.downloads.start(hashes, stream)  # read once _hashed has passed
        self._hashes_on_device = hashes  # kept until then: the copy out of it is still queued
        self._hashed = new_event(lane.device)
        self._hashed.record(lane.ptr)
        self._give_back_tables()  # the checksum kernel is the last to read them
        self.stats.extra["checked_on"] = "gpu"

    def _give_back_tables(self) -> None:
        """Once every kernel that reads the load's table slot is enqueued: the ring reuses it after they ran."""
        slot, self._tables = self._tables, None
        if slot is not None:
            self._lane.tables.give_back(slot, self._lane.ptr)

    def _check_hashes(self) -> None:
        t0 = time.perf_counter()
        self._hashed.synchronize()
        try:
            got = self._hashes.numpy().view(np.uint64)
            self.stats.validate_s += time.perf_counter() - t0
            self._pinned.verify_hashes(got)
        finally:
            self._workers.downloads.done(self._hashes)

    def _start_checks(self) -> None:
        """Checks begin once the forward pass is (nearly) enqueued, not at start: sixteen threads taking
        the GIL back after every block starved the thread launching the kernels (TTFT doubled)."""
        if self._checked is None and self._landed and self._hash_offsets is None:
            self._checked = self._workers.check_starter().submit(self._check_when_landed)

    def _check_when_landed(self) -> None:
        self._landed[-1].synchronize()
        t0 = time.perf_counter()
        slots = self._pinned.slots[: self._n]  # the host-side check only: the kernel's reads the columns
        per_group = max(1, COPY_GROUP_BYTES // max(1, slots[0].size_bytes))
        groups = [slots[i: i + per_group] for i in range(0, len(slots), per_group)]
        checkers = self._workers.checkers()
        errors = [f.exception() for f in [checkers.submit(verify_in_pool, self._pinned, g) for g in groups]]
        self.stats.validate_s += time.perf_counter() - t0
        for err in errors:
            if err is not None:
                raise err

    def wait_for_layer(self, layer: int) -> None:
        if self._landed:
            self._enqueue_through(layer + COPY_LOOKAHEAD)
            stream, landed = current_stream_ptr(self._lane.device), self._landed[layer]
            waited = self._waited  # layers of one group share its event: one wait on a stream will do
            if waited is None or waited[0] != stream or waited[1] is not landed:
                landed.wait_on(stream)
                self._waited = (stream, landed)
            if layer >= 1:
                self._hash_in_pages()
            if layer == self._num_layers - 1:
                self._start_checks()

    def dma_ms(self) -> float:
        """GPU time from the first copy to the last layer landing (call after finish)."""
        return self._began.elapsed_ms(self._landed[-1]) if self._landed else 0.0

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            if self._landed:
                self._enqueue_through(self._num_layers - 1)  # a caller that skipped some layers' waits
                self._hash_in_pages()
            self._give_back_tables()  # checked on the host: the gather kernels were the last readers
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
        self._give_back_tables()  # nothing more is enqueued (a start that raised may have taken the slot)
        if self._landed:
            (self._hashed or self._landed[-1]).synchronize()  # no DMA or hash may outlive the pin
        if self._checked is not None:
            self._checked.exception()
        self._pinned.release(failed=True)


class _LayerSource:
    """One source of a streamed load, enqueueing its moves a range of layers at a time."""

    kind = ""

    def calls(self, groups: list[tuple[int, int]]) -> int:
        """Copy calls or kernel launches for the whole load."""
        raise NotImplementedError

    def enqueue(self, layer_begin: int, layer_end: int, kv_ptr: int, stream: torch.cuda.Stream) -> None:
        raise NotImplementedError


class _CopySource(_LayerSource):
    """Pitched copies on the copy engines (layerwise.py): host to device, or device to device; each layer's made as it
    is enqueued (LayerCopies)."""

    def __init__(self, plan: LayerCopies, base: int, from_device: bool) -> None:
        self.plan, self.base, self.from_device = plan, base, from_device
        self.kind = "d2d" if from_device else "copy_engines"

    def calls(self, groups: list[tuple[int, int]]) -> int:
        return self.plan.calls()

    def enqueue(self, layer_begin: int, layer_end: int, kv_ptr: int, stream: torch.cuda.Stream) -> None:
        for layer in range(layer_begin, layer_end):
            run_on_cuda(self.plan.layer(layer), kv_ptr, self.base, stream, self.from_device)


class _PendingGather:
    """A gather kernel's plan before its table is on the device: its table sits at word `at` of the load's table slot
    (load_tables.py), which StreamedPrefixLoad sends in one copy before binding each plan to its part (bind)."""

    def __init__(self, kernel: PagedGatherKernel, plan: GatherPlan, src_ptr: int, ctas: int, kind: str, at: int) -> None:
        self.kernel, self.plan, self.src_ptr, self.ctas, self.kind, self.at = kernel, plan, src_ptr, ctas, kind, at

    def bind(self, slot: TableSlot, kv_ptr: int, launch_stream) -> "_GatherSource":
        n, at = self.plan.num_blocks, self.at
        launch = self.kernel.bind_at(self.plan, slot.ptr(at), slot.ptr(at + n), kv_ptr, self.src_ptr, launch_stream, self.ctas)
        return _GatherSource(launch, 2 * n * self.plan.part_bytes, kind=self.kind)


class _GatherSource(_LayerSource):
    """csrc/paged_gather.cu reading the mapped host pool: one launch per layer group, any pool layout."""

    def __init__(self, launch: BoundGather, layer_bytes: int, kind: str = "kernel") -> None:
        self.launch, self.layer_bytes, self.kind = launch, layer_bytes, kind

    def calls(self, groups: list[tuple[int, int]]) -> int:
        return len(groups)

    def enqueue(self, layer_begin: int, layer_end: int, kv_ptr: int, stream: torch.cuda.Stream) -> None:
        self.launch(layer_begin, layer_end)  # bound to the pages and the copy stream at planning
