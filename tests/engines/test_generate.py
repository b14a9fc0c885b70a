import torch

from engines.generate import generate_greedy
from tests.engines.tiny import make_cache


def test_greedy_is_deterministic_and_frees_pages(tiny_model, prompt_ids):
    cache = make_cache(tiny_model)
    first = generate_greedy(tiny_model, cache, prompt_ids, 12)
    assert cache.num_free_pages == cache.num_pages
    assert generate_greedy(tiny_model, cache, prompt_ids, 12) == first
    assert len(first) == 12 and len(set(first)) > 1


def test_blocks_moved_through_gather_scatter_reproduce_generation(tiny_model, prompt_ids):
    """The store path in miniature: blocks gathered from one sequence, scattered into other pages, reused."""
    cache = make_cache(tiny_model)
    expected = generate_greedy(tiny_model, cache, prompt_ids, 10, seq_id="a", keep_cache=True)
    full_blocks = len(prompt_ids) // cache.block_tokens
    gathered = cache.gather_blocks(cache.block_table("a")[:full_blocks])
    stored = gathered.numpy().tobytes()  # the bytes kvstore would hold
    payload = torch.frombuffer(bytearray(stored), dtype=gathered.dtype).view(gathered.shape)

    pages_a = cache.block_table("a")
    cache.allocate("b", len(prompt_ids) + 10)
    pages_b = cache.block_table("b")[:full_blocks]
    assert not set(pages_b) & set(pages_a)
    cache.scatter_blocks(pages_b, payload)
    cache.free("a")
    cache.kv[:, :, pages_a] = 0  # b must read only its own pages
    got = generate_greedy(tiny_model, cache, prompt_ids, 10, seq_id="b", num_cached_tokens=full_blocks * cache.block_tokens)
    assert got == expected


def test_whole_prompt_cached_recomputes_last_token(tiny_model, prompt_ids):
    ids = prompt_ids[:16]
    cache = make_cache(tiny_model)
    expected = generate_greedy(tiny_model, cache, ids, 5, seq_id="a", keep_cache=True)
    assert generate_greedy(tiny_model, cache, ids, 5, seq_id="a", num_cached_tokens=16) == expected


def test_temperature_sampling_is_seeded(tiny_model, prompt_ids):
    cache = make_cache(tiny_model)

    def sample(seed):
        gen = torch.Generator().manual_seed(seed)
        return generate_greedy(tiny_model, cache, prompt_ids, 16, temperature=1.0, generator=gen)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_stops_at_eos(tiny_model, prompt_ids):
    cache = make_cache(tiny_model)
    greedy = generate_greedy(tiny_model, cache, prompt_ids, 8)
    assert generate_greedy(tiny_model, cache, prompt_ids, 8, eos_id=greedy[2]) == greedy[: greedy.index(greedy[2]) + 1]
