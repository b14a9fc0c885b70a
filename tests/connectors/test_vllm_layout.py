"""The page <-> canonical block conversion (connectors/vllm/layout.py), without vLLM.

test_vllm_cross_engine.py checks it against real vLLM pages; this pins the index mapping itself.
"""
from __future__ import annotations

import torch

from connectors.vllm.layout import canonical_to_cpu_pages, cpu_pages_to_canonical


def test_cpu_page_holds_k_transposed_then_v_per_head():
    n, layers, heads, tokens, d = 2, 3, 2, 32, 8
    blocks = torch.randn(n, layers, 2, tokens, heads, d)
    pages = canonical_to_cpu_pages(blocks)
    assert pages.shape == (n, layers, heads, tokens, 2 * d)
    flat = pages.reshape(n, layers, heads, 2 * tokens * d)
    b, layer, head, token, dim = 1, 2, 1, 5, 3
    assert flat[b, layer, head, dim * tokens + token] == blocks[b, layer, 0, token, head, dim]  # K[dim, token]
    assert flat[b, layer, head, tokens * d + token * d + dim] == blocks[b, layer, 1, token, head, dim]  # then V[token, dim]
    assert torch.equal(cpu_pages_to_canonical(pages), blocks)
