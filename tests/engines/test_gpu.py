"""CUDA runs of the same model: they must agree with the CPU, and the store path must hold in bf16."""
import pytest
import torch

from engines.attention import SeqChunk
from engines.checkpoint import load_checkpoint
from engines.generate import generate_greedy
from tests.engines.tiny import gpu_only, make_cache

pytestmark = [pytest.mark.gpu, gpu_only]


def test_cuda_matches_cpu(tiny_model, tiny_checkpoint, prompt_ids):
    gpu_model = load_checkpoint(tiny_checkpoint, device="cuda")
    cpu_cache, gpu_cache = make_cache(tiny_model), make_cache(gpu_model)
    assert gpu_cache.device.type == "cuda"
    with torch.inference_mode():
        cpu = tiny_model(cpu_cache, [SeqChunk(prompt_ids, 0, cpu_cache.allocate("s", len(prompt_ids)))])
        gpu = gpu_model(gpu_cache, [SeqChunk(prompt_ids, 0, gpu_cache.allocate("s", len(prompt_ids)))])
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-3, rtol=0)
    assert generate_greedy(gpu_model, gpu_cache, prompt_ids, 12, seq_id="g") == generate_greedy(
        tiny_model, cpu_cache, prompt_ids, 12, seq_id="g"
    )


def test_host_staged_blocks_reproduce_generation_on_cuda(tiny_checkpoint, prompt_ids):
    model = load_checkpoint(tiny_checkpoint, device="cuda")
    cache = make_cache(model)
    expected = generate_greedy(model, cache, prompt_ids, 10, seq_id="a", keep_cache=True)
    full_blocks = len(prompt_ids) // cache.block_tokens
    host_payload = cache.gather_blocks(cache.block_table("a")[:full_blocks]).cpu()
    cache.free("a")
    other = make_cache(model)
    other.allocate("pad", 7 * cache.block_tokens)  # so b lands on different page ids
    other.allocate("b", len(prompt_ids) + 10)
    other.scatter_blocks(other.block_table("b")[:full_blocks], host_payload)
    got = generate_greedy(model, other, prompt_ids, 10, seq_id="b", num_cached_tokens=full_blocks * cache.block_tokens)
    assert got == expected


def test_bf16_prefix_then_rest_close_to_whole(tiny_checkpoint, prompt_ids):
    model = load_checkpoint(tiny_checkpoint, device="cuda", dtype=torch.bfloat16)
    split = 16
    with torch.inference_mode():
        cache = make_cache(model)
        assert cache.dtype == torch.bfloat16
        whole = model(cache, [SeqChunk(prompt_ids, 0, cache.allocate("w", len(prompt_ids)))])
        table = cache.allocate("s", len(prompt_ids))
        head = model(cache, [SeqChunk(prompt_ids[:split], 0, table)])
        rest = model(cache, [SeqChunk(prompt_ids[split:], split, table)])
    torch.testing.assert_close(torch.cat([head, rest]), whole, atol=0.05, rtol=0)
