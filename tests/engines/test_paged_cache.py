import pytest
import torch

from engines.paged_cache import CacheFullError, PagedKVCache


def small_cache(num_pages: int = 8) -> PagedKVCache:
    return PagedKVCache(num_layers=3, num_kv_heads=2, head_dim=4, num_pages=num_pages, block_tokens=4)


def test_allocate_grows_table_and_free_returns_pages():
    cache = small_cache()
    assert cache.allocate("a", 5) == [0, 1]
    assert cache.allocate("a", 8) == [0, 1]  # already large enough
    assert cache.allocate("b", 1) == [2]
    assert cache.allocate("a", 9) == [0, 1, 3]
    assert cache.num_free_pages == 4
    cache.free("a")
    assert "a" not in cache and cache.num_free_pages == 7
    assert cache.block_table("b") == [2]
    cache.free("never-allocated")


def test_freed_pages_are_reused_lowest_first_so_tables_stay_consecutive():
    cache = small_cache()
    cache.allocate("a", 8)
    cache.allocate("b", 12)
    cache.free("a")
    assert cache.allocate("c", 4) == [0]  # not 5, the next never-used page
    cache.free("b")
    cache.free("c")
    assert cache.allocate("d", 32) == list(range(8))


def test_allocation_is_all_or_nothing():
    cache = small_cache(num_pages=3)
    cache.allocate("a", 4)
    with pytest.raises(CacheFullError):
        cache.allocate("b", 12)
    assert "b" not in cache and cache.num_free_pages == 2
    with pytest.raises(CacheFullError):
        cache.allocate("a", 16)
    assert cache.block_table("a") == [0]


def test_gather_block_layout_is_layer_kv_block_head_dim():
    cache = small_cache()
    cache.kv.copy_(torch.randn_like(cache.kv))
    block = cache.gather_block(5)
    assert block.shape == cache.block_shape == (3, 2, 4, 2, 4)
    assert block.is_contiguous()
    assert block.numel() * block.element_size() == cache.block_bytes
    for layer in range(3):
        assert torch.equal(block[layer, 0], cache.kv[layer, 0, 5])  # K
        assert torch.equal(block[layer, 1], cache.kv[layer, 1, 5])  # V


def test_scatter_into_other_pages_round_trips_and_touches_nothing_else():
    cache = small_cache()
    cache.kv.copy_(torch.randn_like(cache.kv))
    blocks = cache.gather_blocks([1, 2])
    before = cache.kv.clone()
    cache.scatter_blocks([6, 4], blocks)
    assert torch.equal(cache.gather_block(6), blocks[0])
    assert torch.equal(cache.gather_block(4), blocks[1])
    untouched = [p for p in range(8) if p not in (4, 6)]
    assert torch.equal(cache.kv[:, :, untouched], before[:, :, untouched])
    cache.scatter_block(0, blocks[1])
    assert torch.equal(cache.gather_block(0), blocks[1])


def test_scatter_refuses_wrong_shape_or_dtype():
    cache = small_cache()
    with pytest.raises(ValueError):
        cache.scatter_block(0, torch.zeros(3, 2, 4, 2, 5))
    with pytest.raises(ValueError):
        cache.scatter_block(0, torch.zeros(cache.block_shape, dtype=torch.float16))
