"""LayerAttention (a pass's layers sharing their views and choices) against paged_attention, layer by layer."""
from __future__ import annotations

import pytest
import torch

from engines.attention import AttentionMetadata, LayerAttention, SeqChunk, paged_attention

LAYERS, PAGES, BLOCK, HKV, HQ, D = 3, 24, 4, 2, 4, 16

CASES = {
    "whole prompt": [SeqChunk(list(range(10)), 0, list(range(3)))],
    "chunk after a prefix": [SeqChunk(list(range(7)), 9, list(range(2, 6)))],
    "decode token": [SeqChunk([5], 13, list(range(4, 8)))],
    "scattered pages": [SeqChunk(list(range(6)), 4, [9, 3, 17])],
    "a batch": [SeqChunk(list(range(5)), 0, [0, 1]), SeqChunk([1, 2], 6, [7, 8])],
}


def run_both(chunks, device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    kv = torch.randn(LAYERS, 2, PAGES, BLOCK, HKV, D, device=device, dtype=dtype, generator=g)
    n = sum(c.num_tokens for c in chunks)
    qs = torch.randn(LAYERS, n, HQ, D, device=device, dtype=dtype, generator=g)
    news = torch.randn(LAYERS, 2, n, HKV, D, device=device, dtype=dtype, generator=g)
    meta = AttentionMetadata.build(chunks, BLOCK, torch.device(device))
    reference_kv, shared_kv = kv.clone(), kv.clone()
    layers = LayerAttention(shared_kv, meta, HQ, dtype)
    for i in range(LAYERS):
        want = paged_attention(qs[i], news[i], reference_kv[i], meta)
        got = layers(i, qs[i], news[i])
        yield want, got
    yield reference_kv, shared_kv


@pytest.mark.parametrize("case", CASES)
def test_matches_paged_attention_on_cpu(case):
    for want, got in run_both(CASES[case], "cpu", torch.float32):
        assert torch.allclose(got, want, atol=1e-5), case


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES)
def test_direct_flash_call_matches_sdpa_on_cuda(case):
    for want, got in run_both(CASES[case], "cuda", torch.bfloat16):
        assert (got.float() - want.float()).abs().max().item() < 2e-2, case
