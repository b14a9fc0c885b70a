"""How vLLM's pages map to the project's canonical block layout, for sharing blocks with the bundled engines.

The canonical payload (docs/engine-adapter.md, "Block payload format") is
[num_layers, 2, block_tokens, num_kv_heads, head_dim], K at 0 and V at 1, K after RoPE. vLLM's
CPU backend (CPU_ATTN, KV cache layout LBHNC) keeps each layer's page as
[num_kv_heads, block_tokens, 2 * head_dim], where each head's 2 * head_dim * block_tokens
values are K transposed ([head_dim, block_tokens]) followed by V ([block_tokens, head_dim])
(tests/connectors pin this against the bundled engine's own K and V). Only that layout is
converted; the connector refuses the canonical option for any other backend rather than guess.
Pure tensor reshuffles: no store, no vLLM imports.
"""
from __future__ import annotations

import torch

CANONICAL_BACKENDS = {("CPU_ATTN", "LBHNC")}  # (attention backend, vLLM KV cache layout) whose pages this module knows


def canonical_block_shape(num_layers: int, num_kv_heads: int, block_tokens: int, head_dim: int) -> tuple[int, ...]:
    return (num_layers, 2, block_tokens, num_kv_heads, head_dim)


def cpu_pages_to_canonical(pages: torch.Tensor) -> torch.Tensor:
    """[n, layers, kv_heads, block_tokens, 2 * head_dim] vLLM CPU pages -> [n, layers, 2, block_tokens, kv_heads, head_dim]."""
    n, layers, heads, tokens, two_d = pages.shape
    d = two_d // 2
    halves = pages.reshape(n, layers, heads, 2, d * tokens)
    k = halves[:, :, :, 0].reshape(n, layers, heads, d, tokens).transpose(-1, -2)  # [n, L, H, N, D]
    v = halves[:, :, :, 1].reshape(n, layers, heads, tokens, d)
    return torch.stack([k, v], dim=2).permute(0, 1, 2, 4, 3, 5).contiguous()


def canonical_to_cpu_pages(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of cpu_pages_to_canonical."""
    n, layers, _, tokens, heads, d = blocks.shape
    k = blocks[:, :, 0].permute(0, 1, 3, 4, 2).reshape(n, layers, heads, d * tokens)  # K as [D, N] per head
    v = blocks[:, :, 1].permute(0, 1, 3, 2, 4).reshape(n, layers, heads, tokens * d)
    return torch.stack([k, v], dim=3).reshape(n, layers, heads, tokens, 2 * d)
