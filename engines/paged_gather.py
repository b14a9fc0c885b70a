"""Stored blocks into cache pages by csrc/paged_gather.cu: a layer's K and V of every block in one launch.

The store's host pool is page-locked and mapped for the GPU (store_dma.RegisteredPool), so the
kernel's loads read it over PCIe directly, wherever each block sits in the pool: one launch per
layer instead of 2 x runs pitched copies, and no layout of the pool is slower than another. The
plan (which block goes to which page, from which offset) is checked here on the host, where a
bad offset is a clear error instead of a fault on the device; the CPU tests hold it to
layerwise.py's reference executor. It refuses to own pins and checksums: store_dma.py does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engines.cuda_kernels import build_error, kernels, on_stream
from engines.layerwise import CacheGeometry, Copy2D

KERNEL_SOURCE = "paged_gather.cu"
ALIGN = 16  # the kernel moves 16-byte words
# Enough CTAs to keep ~55 GB/s of PCIe reads in flight (each holds 16 KiB outstanding), few enough
# to leave most of the 132 multiprocessors of an H100/H200 to the forward pass running beside it.
DEFAULT_CTAS = 64
THREADS = 256
# A launch (and its event) covers whole layers, at least this many bytes of them: moving a 1k prefix of a
# 1b model (2 MiB a layer) took ~40 us a layer on the GPU, less than the host takes to launch and record
# a layer, so layer-sized launches let the copy wait on the host; one launch for all of it ran 6% faster.
MIN_LAUNCH_BYTES = 8 << 20


@dataclass(frozen=True)
class GatherPlan:
    """Which page each block lands in and where it sits in the source, as the kernel takes them."""

    pages: np.ndarray  # int64 [n]: destination page of block i
    offsets: np.ndarray  # int64 [n]: byte offset of block i in the source
    num_layers: int
    num_pages: int
    part_bytes: int  # one page's K (or V) of one layer

    @property
    def num_blocks(self) -> int:
        return len(self.pages)

    def layer_copies(self, layer: int) -> list[Copy2D]:
        """The same moves as one-row copies, for layerwise.run_on_host: what the tests hold the kernel to."""
        half, out = self.part_bytes, []
        for part in (2 * layer, 2 * layer + 1):
            for page, offset in zip(self.pages.tolist(), self.offsets.tolist()):
                out.append(Copy2D(dst=(part * self.num_pages + page) * half, src=offset + part * half,
                                  width=half, height=1, src_pitch=half, dst_pitch=half))
        return out


def plan_gather(geometry: CacheGeometry, pages: Sequence[int], offsets: Sequence[int], source_bytes: int,
                source_ptr: int = 0, dest_ptr: int = 0) -> GatherPlan | None:
    """The kernel's plan for pages[i] <- block at offsets[i], or None where the kernel cannot move it
    (parts or addresses not 16-byte aligned: the caller uses the copy engines). Raises ValueError for
    a plan that is wrong whatever moves it: a page or a block outside the cache or the source."""
    if len(pages) != len(offsets):
        raise ValueError(f"{len(pages)} pages for {len(offsets)} blocks")
    page_array = np.asarray(pages, dtype=np.int64).reshape(-1)
    offset_array = np.asarray(offsets, dtype=np.int64).reshape(-1)
    if len(page_array):
        if page_array.min() < 0 or page_array.max() >= geometry.num_pages:
            raise ValueError(f"a page outside the cache's {geometry.num_pages}")
        if offset_array.min() < 0 or offset_array.max() + geometry.block_bytes > source_bytes:
            raise ValueError(f"a block outside the {source_bytes}-byte source")
    offsets_or = int(np.bitwise_or.reduce(offset_array)) if len(offset_array) else 0
    return checked_plan(geometry, page_array, offset_array, offsets_or, source_ptr, dest_ptr)


def checked_plan(geometry: CacheGeometry, pages: np.ndarray, offsets: np.ndarray, offsets_or: int, source_ptr: int,
                 dest_ptr: int) -> GatherPlan | None:
    """plan_gather for pages and offsets already checked in range (int64 arrays; offsets_or: the offsets or-ed
    together), as a prefix load's tables are (load_tables.py); None where the kernel's 16-byte words do not fit."""
    if (geometry.half_bytes | source_ptr | dest_ptr | offsets_or) % ALIGN:
        return None
    return GatherPlan(pages, offsets, geometry.num_layers, geometry.num_pages, geometry.half_bytes)


def layer_groups(num_layers: int, layer_bytes: int, min_bytes: int = MIN_LAUNCH_BYTES) -> list[tuple[int, int]]:
    """[begin, end) layer ranges, in order, covering every layer: each at least min_bytes of moves
    (layer_bytes a layer) where the layers allow, the last one taking what is left. One layer each
    when a layer alone is that large: later layers' moves then hide behind earlier layers' compute."""
    per = max(1, -(-min_bytes // max(1, layer_bytes)))
    groups = [(begin, min(begin + per, num_layers)) for begin in range(0, num_layers, per)]
    if len(groups) > 1 and (groups[-1][1] - groups[-1][0]) * layer_bytes < min_bytes // 2:
        groups[-2:] = [(groups[-2][0], num_layers)]  # no short launch at the end: fold it into the one before
    return groups


class PagedGatherKernel:
    """csrc/paged_gather.cu's gather_parts, with its plan's arrays on the device."""

    def __init__(self, function) -> None:
        self._kernel = function

    @staticmethod
    def table(plan: GatherPlan) -> np.ndarray:
        """The [2, n] int64 table the kernel reads: each block's source offset, then its page."""
        return np.stack([plan.offsets, plan.pages])

    @staticmethod
    def upload(plan: GatherPlan, device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
        """The plan's table as one [2, n] int64 device tensor, copied on stream (ordered before the launches) from a
        fresh page-locked buffer: one-off plans (benchmarks, tests). A load writes its tables into a TableRing slot."""
        table = PagedGatherKernel.table(plan)
        host = torch.from_numpy(table).pin_memory()
        with torch.cuda.stream(stream):
            return host.to(device, non_blocking=True)

    def bind(self, plan: GatherPlan, table: torch.Tensor, dst_ptr: int, src_ptr: int, stream: torch.cuda.Stream,
             ctas: int = DEFAULT_CTAS) -> "BoundGather":
        """A launcher of this plan's layer ranges on stream, its arguments made once: each launch is on
        the host's critical path (the thread running the forward pass enqueues them)."""
        return self.bind_at(plan, table[0].data_ptr(), table[1].data_ptr(), dst_ptr, src_ptr, on_stream(stream), ctas, keep=table)

    def bind_at(self, plan: GatherPlan, offsets_ptr: int, pages_ptr: int, dst_ptr: int, src_ptr: int, launch_stream,
                ctas: int = DEFAULT_CTAS, keep: object = None) -> "BoundGather":
        """bind, the table given as the device addresses of its two rows (offsets, then pages: the layout of table())
        and the stream as cupy's view of it (cuda_kernels.on_stream); keep: whatever holds the table, kept alive."""
        return BoundGather(self._kernel, plan, offsets_ptr, pages_ptr, dst_ptr, src_ptr, launch_stream, ctas, keep)

    def launch(self, plan: GatherPlan, table: torch.Tensor, dst_ptr: int, src_ptr: int, layer_begin: int, layer_end: int,
               stream: torch.cuda.Stream, ctas: int = DEFAULT_CTAS) -> None:
        """Enqueue on stream the K and V of layers [layer_begin, layer_end) of every block of the plan."""
        self.bind(plan, table, dst_ptr, src_ptr, stream, ctas)(layer_begin, layer_end)


class BoundGather:
    """One plan's launches on one stream: call with a [begin, end) layer range."""

    def __init__(self, function, plan: GatherPlan, offsets_ptr: int, pages_ptr: int, dst_ptr: int, src_ptr: int, cupy_stream,
                 ctas: int, keep: object = None) -> None:
        self._function, self._stream, self.table = function, cupy_stream, keep  # table: kept alive with the launches
        self._grid, self._block = (max(1, ctas),), (THREADS,)
        self._head = (np.uint64(dst_ptr), np.uint64(src_ptr), np.uint64(offsets_ptr), np.uint64(pages_ptr),
                      np.int32(plan.num_blocks))
        self._tail = (np.int64(plan.num_pages), np.int64(plan.part_bytes))
        self._empty = plan.num_blocks == 0

    def __call__(self, layer_begin: int, layer_end: int) -> None:
        if self._empty or layer_end <= layer_begin:
            return
        with self._stream:
            self._function(self._grid, self._block, self._head + (np.int32(2 * layer_begin), np.int32(2 * layer_end)) + self._tail)


def gather_kernel() -> PagedGatherKernel | None:
    """The kernel, or None where it cannot be built (the caller then uses the copy engines)."""
    built = kernels(KERNEL_SOURCE, ("gather_parts",))
    return PagedGatherKernel(built["gather_parts"]) if built else None


def kernel_error() -> str | None:
    return build_error(KERNEL_SOURCE)
