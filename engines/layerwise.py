"""Layer-by-layer KV loading: stored blocks go straight from the store's pool into the paged cache.

A stored block holds every layer ([num_layers, 2, block_tokens, heads, dim],
paged_cache.py), so a plain fetch must land all of a prefix before layer 0's
attention may read it. Here each layer's K and V rows of a run of blocks move
in one strided (2D) DMA straight into the cache's pages, layers in order on a
copy stream, each layer ending in an event: layer i's attention waits for its
own event only, so the transfer of later layers hides behind the compute of
earlier ones. This is the shape of vLLM's KV connector (start_load_kv, then
wait_for_layer_load before each attention) and of LMCache's layerwise retrieval.

This module owns the copy plan and its execution (CUDA via cupy, and a host
reference the tests hold the plan to). It refuses to own pins, checksums and
the store: adapter.py decides what is loaded and checks it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: unified addressing picks device to device, or peer to peer across GPUs


@dataclass(frozen=True)
class Copy2D:
    """height rows of width bytes: row r from src + r*src_pitch to dst + r*dst_pitch (byte offsets)."""

    dst: int
    src: int
    width: int
    height: int
    src_pitch: int
    dst_pitch: int


@dataclass(frozen=True)
class CacheGeometry:
    """What a copy plan needs of a contiguous [layers, 2, pages, block_tokens, heads, dim] cache."""

    num_layers: int
    num_pages: int
    half_bytes: int  # one page's K (or V) of one layer: block_tokens * heads * dim * element size

    @classmethod
    def of(cls, kv: torch.Tensor) -> "CacheGeometry":
        if not kv.is_contiguous():
            raise ValueError("the paged cache must be one contiguous tensor")
        layers, two, pages = kv.shape[:3]
        return cls(layers, pages, math.prod(kv.shape[3:]) * kv.element_size())  # no view made: ~40 us a load on an H200 host

    @property
    def block_bytes(self) -> int:
        return self.num_layers * 2 * self.half_bytes


def runs(pages: Sequence[int], offsets: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first index, length, source stride) of stretches where pages are consecutive and pool
    offsets step evenly: a fresh upload sits back to back in the pool, a fresh table in the cache."""
    if len(pages) > 1:  # the common case, one run, without a Python step per block
        page_steps, offset_steps = np.diff(np.asarray(pages)), np.diff(np.asarray(offsets))
        if (page_steps == 1).all() and offset_steps[0] > 0 and (offset_steps == offset_steps[0]).all():
            return [(0, len(pages), int(offset_steps[0]))]
    pages = pages.tolist() if isinstance(pages, np.ndarray) else pages  # a step per block below: ints, not numpy scalars
    offsets = offsets.tolist() if isinstance(offsets, np.ndarray) else offsets
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(pages):
        j, stride = i + 1, 0
        while j < len(pages) and pages[j] == pages[j - 1] + 1:
            step = offsets[j] - offsets[j - 1]
            if step <= 0 or (stride and step != stride):
                break
            stride = step
            j += 1
        out.append((i, j - i, stride))
        i = j
    return out


class LayerCopies:
    """plan_layer_copies a layer at a time: the runs found once, when the load is planned, and each layer's copies made
    when that layer is enqueued. A prefix load plans on the thread that then launches the forward pass, before layer
    0's copies can move; making every layer's copies there cost ~80 us for one run of 460 blocks (2-core box), most of
    the copy-engine path's planning, while a layer's own take microseconds once the pass is under way."""

    def __init__(self, geometry: CacheGeometry, pages: Sequence[int], offsets: Sequence[int]) -> None:
        """pages[i] receives the block stored at pool byte offset offsets[i] (ints, or int64 arrays)."""
        if len(pages) != len(offsets):
            raise ValueError(f"{len(pages)} pages for {len(offsets)} blocks")
        self.geometry = geometry
        # (first page, first offset, blocks, source stride) of each run: ints, nothing kept of the inputs
        self.stretches = [(int(pages[first]), int(offsets[first]), length, stride)
                          for first, length, stride in runs(pages, offsets)]

    def calls(self) -> int:
        """Copies over every layer: 2 x layers x runs."""
        return 2 * self.geometry.num_layers * len(self.stretches)

    def layer(self, layer: int) -> list[Copy2D]:
        """The 2D copies that move every block's K and V of this layer into its page."""
        geometry, half, copies = self.geometry, self.geometry.half_bytes, []
        for kv in (0, 1):
            part = layer * 2 + kv
            for page, offset, length, stride in self.stretches:
                copies.append(Copy2D(
                    dst=(part * geometry.num_pages + page) * half,
                    src=offset + part * half,
                    width=half,
                    height=length,
                    src_pitch=stride or geometry.block_bytes,
                    dst_pitch=half,
                ))
        return copies


def plan_layer_copies(geometry: CacheGeometry, pages: Sequence[int], offsets: Sequence[int]) -> list[list[Copy2D]]:
    """Per layer, the 2D copies that move every block's K and V of that layer into its page.

    pages[i] receives the block stored at pool byte offset offsets[i]. Copies
    count 2 x layers x runs, independent of the number of blocks in a run.
    """
    plan = LayerCopies(geometry, pages, offsets)
    return [plan.layer(layer) for layer in range(geometry.num_layers)]


def run_on_host(copies: Sequence[Copy2D], dst: np.ndarray, src: np.ndarray) -> None:
    """The reference executor: dst and src are flat uint8 arrays (the cache's and the pool's bytes)."""
    for c in copies:
        s = np.lib.stride_tricks.as_strided(src[c.src:], shape=(c.height, c.width), strides=(c.src_pitch, 1))
        d = np.lib.stride_tricks.as_strided(dst[c.dst:], shape=(c.height, c.width), strides=(c.dst_pitch, 1))
        d[...] = s


def run_on_cuda(copies: Sequence[Copy2D], dst_ptr: int, src_ptr: int, stream: torch.cuda.Stream, from_device: bool = False) -> None:
    """Enqueue the copies on stream. src_ptr is page-locked host memory (the registered pool), or with
    from_device device memory (the store's HBM pool as this process maps it: a device-to-device copy,
    peer to peer when it sits on another GPU than the pages)."""
    from cupy.cuda import runtime

    handle = stream.cuda_stream
    kind = MEMCPY_DEFAULT if from_device else runtime.memcpyHostToDevice
    for c in copies:
        runtime.memcpy2DAsync(dst_ptr + c.dst, c.dst_pitch, src_ptr + c.src, c.src_pitch, c.width, c.height, kind, handle)
