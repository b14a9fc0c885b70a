"""The layer-by-layer copy plan, executed by the host reference, must land blocks exactly as scatter_blocks does."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.layerwise import CacheGeometry, LayerCopies, plan_layer_copies, run_on_host, runs
from engines.paged_cache import PagedKVCache


def cache_bytes(cache: PagedKVCache) -> np.ndarray:
    return cache.kv.view(-1).view(torch.uint8).numpy()


@pytest.mark.parametrize("slot_stride_blocks", [1, 2])  # back to back, or blocks in slots twice their size
def test_plan_reproduces_scatter_blocks(slot_stride_blocks):
    layers, heads, dim, block_tokens = 3, 2, 4, 4
    reference = PagedKVCache(layers, heads, dim, 16, block_tokens, dtype=torch.float16)
    streamed = PagedKVCache(layers, heads, dim, 16, block_tokens, dtype=torch.float16)
    blocks = torch.randn((7, *reference.block_shape)).to(torch.float16)
    block_bytes = reference.block_bytes
    # Blocks 0-3 back to back in the pool (one run), 4 elsewhere, 5-6 back to back again.
    slot = block_bytes * slot_stride_blocks
    offsets = [0, slot, 2 * slot, 3 * slot, 10 * slot, 12 * slot, 13 * slot]
    pool = np.zeros(14 * slot, np.uint8)
    for block, offset in zip(blocks, offsets):
        pool[offset: offset + block_bytes] = block.view(-1).view(torch.uint8).numpy()
    pages = [2, 3, 4, 5, 9, 10, 11]
    reference.scatter_blocks(pages, blocks)

    plan = plan_layer_copies(CacheGeometry.of(streamed.kv), pages, offsets)
    assert len(plan) == layers
    assert all(len(copies) == 2 * 3 for copies in plan)  # K and V of three runs, per layer
    for layer_copies in plan:
        run_on_host(layer_copies, cache_bytes(streamed), pool)
    assert torch.equal(streamed.kv, reference.kv)


def test_a_layer_lands_only_its_own_pages():
    cache = PagedKVCache(2, 1, 2, 4, 2, dtype=torch.float32)
    pool = np.arange(cache.block_bytes, dtype=np.uint64).astype(np.uint8)
    first_layer = plan_layer_copies(CacheGeometry.of(cache.kv), [1], [0])[0]
    run_on_host(first_layer, cache_bytes(cache), pool)
    assert cache.kv[0, :, 1].abs().sum() > 0
    assert cache.kv[1].abs().sum() == 0 and cache.kv[0, :, [0, 2, 3]].abs().sum() == 0


def test_runs_split_where_pages_or_pool_offsets_break():
    assert runs([4, 5, 6, 9, 10], [0, 8, 16, 24, 32]) == [(0, 3, 8), (3, 2, 8)]
    assert runs([1, 2, 3], [16, 8, 0]) == [(0, 1, 0), (1, 1, 0), (2, 1, 0)]  # descending pool: no strided run
    assert runs([1, 2, 3, 4], [0, 8, 24, 32]) == [(0, 2, 8), (2, 2, 8)]  # uneven step ends a run


def test_layer_copies_made_per_layer_match_the_whole_plan_from_arrays_or_lists():
    """LayerCopies (what a prefix load plans: runs now, a layer's copies when it is enqueued) gives plan_layer_copies'
    copies layer by layer, from the int64 arrays of a load's tables as from lists, and counts them."""
    geometry = CacheGeometry(num_layers=3, num_pages=40, half_bytes=256)
    rng = np.random.default_rng(9)
    back_to_back = (np.arange(5, 25, dtype=np.int64), np.arange(20, dtype=np.int64) * geometry.block_bytes)
    scattered = (rng.permutation(40)[:20].astype(np.int64), rng.permutation(20).astype(np.int64) * geometry.block_bytes)
    for pages, offsets in (back_to_back, scattered):
        whole = plan_layer_copies(geometry, pages.tolist(), offsets.tolist())
        lazy = LayerCopies(geometry, pages, offsets)
        assert [lazy.layer(layer) for layer in range(3)] == whole
        assert lazy.calls() == sum(map(len, whole))
        assert all(type(v) is int for c in lazy.layer(2) for v in (c.dst, c.src, c.height, c.src_pitch))
    assert LayerCopies(geometry, *back_to_back).calls() == 2 * 3  # one run
    with pytest.raises(ValueError, match="3 pages for 2 blocks"):
        LayerCopies(geometry, [1, 2, 3], [0, 1])
