"""The gather kernel's plan (engines/paged_gather.py), held on the CPU to layerwise.py's reference executor:
which page each block lands in, from where, and how layers are grouped into launches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.layerwise import CacheGeometry, run_on_host
from engines.paged_cache import PagedKVCache
from engines.paged_gather import layer_groups, plan_gather
from engines.store_dma import KERNEL_MAX_COMPUTE_TOKENS, choose_host_copy


def cache_bytes(cache: PagedKVCache) -> np.ndarray:
    return cache.kv.view(-1).view(torch.uint8).numpy()


def pool_with(blocks: torch.Tensor, offsets: list[int], size: int) -> np.ndarray:
    pool = np.zeros(size, np.uint8)
    for block, offset in zip(blocks, offsets):
        raw = block.reshape(-1).view(torch.uint8).numpy()
        pool[offset: offset + len(raw)] = raw
    return pool


def test_gather_plan_lands_scattered_blocks_as_scatter_blocks_does():
    layers, heads, dim, block_tokens = 3, 2, 4, 4  # fp16: 64-byte parts
    reference = PagedKVCache(layers, heads, dim, 16, block_tokens, dtype=torch.float16)
    gathered = PagedKVCache(layers, heads, dim, 16, block_tokens, dtype=torch.float16)
    blocks = torch.randn((6, *reference.block_shape)).to(torch.float16)
    bb = reference.block_bytes
    offsets = [5 * bb, 0, 9 * bb, 2 * bb, 3 * bb, 7 * bb]  # out of order, gaps, one back-to-back pair
    pages = [7, 2, 3, 12, 13, 0]  # not ascending
    pool = pool_with(blocks, offsets, 10 * bb)
    reference.scatter_blocks(pages, blocks)

    plan = plan_gather(CacheGeometry.of(gathered.kv), pages, offsets, len(pool))
    assert plan is not None and plan.num_blocks == 6
    for layer in range(layers):
        run_on_host(plan.layer_copies(layer), cache_bytes(gathered), pool)
    assert torch.equal(gathered.kv, reference.kv)


def test_gather_plan_moves_a_layer_group_and_nothing_else():
    cache = PagedKVCache(4, 1, 8, 4, 2, dtype=torch.float32)  # 64-byte parts
    pool = np.arange(2 * cache.block_bytes, dtype=np.uint32).astype(np.uint8)
    plan = plan_gather(CacheGeometry.of(cache.kv), [3, 1], [cache.block_bytes, 0], len(pool))
    for layer in (1, 2):
        run_on_host(plan.layer_copies(layer), cache_bytes(cache), pool)
    words = cache.kv.view(torch.int32)  # the bytes, not floats: arbitrary bytes make NaNs
    assert (words[1:3, :, [1, 3]] != 0).all(dim=-1).any()
    assert (words[[0, 3]] == 0).all() and (words[:, :, [0, 2]] == 0).all()


def test_gather_plan_refuses_what_the_kernel_cannot_move():
    cache = PagedKVCache(2, 1, 8, 4, 2, dtype=torch.float32)
    geometry, bb = CacheGeometry.of(cache.kv), cache.block_bytes
    assert plan_gather(geometry, [0], [8], 4 * bb) is None  # an offset off the 16-byte grid: copy engines
    assert plan_gather(geometry, [0], [0], 4 * bb, source_ptr=4) is None
    odd = PagedKVCache(2, 1, 3, 4, 1, dtype=torch.float16)  # 6-byte parts
    assert plan_gather(CacheGeometry.of(odd.kv), [0], [0], 4 * odd.block_bytes) is None
    with pytest.raises(ValueError, match="outside the cache"):
        plan_gather(geometry, [4], [0], 4 * bb)
    with pytest.raises(ValueError, match="outside the"):
        plan_gather(geometry, [0], [3 * bb + 16], 4 * bb)  # the block would end past the source
    with pytest.raises(ValueError, match="pages for"):
        plan_gather(geometry, [0, 1], [0], 4 * bb)
    empty = plan_gather(geometry, [], [], 0)
    assert empty is not None and empty.num_blocks == 0


@pytest.mark.parametrize("layers, layer_mib, expected", [
    (16, 16, [(i, i + 1) for i in range(16)]),  # 8k prefix of a 1b model: a layer is launch enough
    (16, 8, [(i, i + 1) for i in range(16)]),
    (16, 2, [(0, 4), (4, 8), (8, 12), (12, 16)]),  # 1k: four layers a launch
    (16, 3, [(0, 3), (3, 6), (6, 9), (9, 12), (12, 16)]),  # a short last group folds into the one before
    (5, 1, [(0, 5)]),  # everything in one launch
    (1, 1, [(0, 1)]),
])
def test_layer_groups_cover_every_layer_in_order(layers, layer_mib, expected):
    groups = layer_groups(layers, layer_mib << 20, 8 << 20)
    assert groups == expected
    assert [layer for begin, end in groups for layer in range(begin, end)] == list(range(layers))


def test_layer_groups_keep_a_last_group_of_at_least_half_the_minimum():
    groups = layer_groups(10, 3 << 20, 8 << 20)  # 3 a launch, then 1 layer (3 MiB) left: folded
    assert groups == [(0, 3), (3, 6), (6, 10)]
    groups = layer_groups(10, 5 << 20, 8 << 20)  # 2 a launch, nothing short
    assert groups == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]


def test_auto_takes_the_kernel_only_where_the_copy_is_not_hidden_by_compute():
    assert choose_host_copy("auto", True, None) == "kernel"  # a fetch with no pass beside it
    assert choose_host_copy("auto", True, 16) == "kernel"  # a fully cached prompt computes its last block
    assert choose_host_copy("auto", True, KERNEL_MAX_COMPUTE_TOKENS + 1) == "copy_engines"
    assert choose_host_copy("auto", False, 16) == "copy_engines"  # no kernel here, or a layout it cannot move
    assert choose_host_copy("copy_engines", True, 16) == "copy_engines"
    assert choose_host_copy("kernel", True, 10_000) == "kernel"
    with pytest.raises(RuntimeError, match="cannot read this pool"):
        choose_host_copy("kernel", False, None)
