"""Paged attention: write a forward pass's new K/V into pages, then attend over each sequence's pages.

A forward pass is a batch of SeqChunks, one per sequence, each a run of
consecutive tokens starting at any position: a whole prompt, the rest of a
prompt whose prefix KV was scattered in from the store, or one decode token.
AttentionMetadata turns the chunks into index tensors once per pass, so the
per-layer work is a scatter, a gather and one scaled_dot_product_attention call
over the padded batch, with no Python loop over tokens or sequences.

paged_attention is the reference path: it copies each sequence's pages into
contiguous K/V every layer. LayerAttention, what the model calls, reads one
sequence's consecutive pages in place instead and calls flash attention itself
on CUDA; for anything else it calls paged_attention. A fused paged kernel may
replace both later and must match paged_attention.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right


@dataclass(frozen=True)
class SeqChunk:
    """Tokens at positions start_pos .. start_pos+len-1 of one sequence, and its block table.

    Positions before start_pos must already be in the table's pages, computed
    by an earlier pass or scattered in from the store; the table must cover
    every position up to the chunk's end.
    """

    token_ids: Sequence[int] | torch.Tensor
    start_pos: int
    block_table: Sequence[int]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class AttentionMetadata:
    """Index tensors for one forward pass, on the cache's device. N = total new tokens, n = chunks."""

    positions: torch.Tensor  # [N] absolute position of each new token
    slot_pages: torch.Tensor  # [N] page each new token's K/V goes to
    slot_offsets: torch.Tensor  # [N] offset inside that page
    token_rows: torch.Tensor  # [N] chunk index of each new token
    token_cols: torch.Tensor  # [N] index of each new token inside its chunk
    gather_pages: torch.Tensor  # [n, max_blocks] pages to read per chunk, padded with page 0
    max_query_len: int
    max_context_len: int
    # [n, 1, max_query_len, max_context_len], True = attend; for one chunk after a cached prefix, a
    # bottom-right causal bias instead, which keeps SDPA on its flash/efficient kernels on CUDA.
    attn_mask: torch.Tensor | None
    is_causal: bool
    # One chunk whose pages are consecutive (as a fresh cache hands them out): its first page, so
    # LayerAttention reads K/V in place as a view instead of gathering a copy of the context every layer.
    page_run: int | None = None

    @classmethod
    def build(cls, chunks: Sequence[SeqChunk], block_tokens: int, device: torch.device) -> "AttentionMetadata":
        if not chunks:
            raise ValueError("a forward pass needs at least one chunk")
        # Index arithmetic in numpy: a few microseconds an op where torch's CPU ops cost ten or more,
        # and this runs on the launching thread before any of the pass reaches the GPU.
        max_blocks = -(-max(c.end_pos for c in chunks) // block_tokens)
        gather_pages = np.zeros((len(chunks), max_blocks), dtype=np.int64)
        for i, chunk in enumerate(chunks):
            if chunk.num_tokens == 0 or chunk.start_pos < 0:
                raise ValueError(f"chunk {i} is empty or starts before 0")
            needed = -(-chunk.end_pos // block_tokens)
            if len(chunk.block_table) < needed:
                raise ValueError(
                    f"chunk {i} ends at {chunk.end_pos} but its block table has {len(chunk.block_table)} pages"
                )
            gather_pages[i, :needed] = chunk.block_table[:needed]
        starts = np.array([c.start_pos for c in chunks], dtype=np.int64)
        lengths = np.array([c.num_tokens for c in chunks], dtype=np.int64)
        row = np.repeat(np.arange(len(chunks), dtype=np.int64), lengths)
        col = np.arange(len(row), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        pos = starts[row] + col
        slot_pages = gather_pages[row, pos // block_tokens]
        max_query_len = int(lengths.max())
        max_context_len = int((starts + lengths).max())

        attn_mask = None
        single = len(chunks) == 1
        is_causal = single and chunks[0].start_pos == 0 and chunks[0].num_tokens > 1
        if single and chunks[0].start_pos > 0 and chunks[0].num_tokens > 1:
            # The chunk's queries are the last rows of the causal square over its context.
            attn_mask = causal_lower_right(max_query_len, max_context_len)
        elif not single:
            query_pos = torch.from_numpy(starts)[:, None] + torch.arange(max_query_len)[None, :]
            attn_mask = (torch.arange(max_context_len)[None, None, :] <= query_pos[:, :, None]).unsqueeze(1)
            attn_mask = attn_mask.to(device)

        page_run = None
        if single and (np.diff(gather_pages[0]) == 1).all():
            page_run = int(gather_pages[0, 0])

        # One host-to-device copy for all index tensors: each pageable copy blocks the launching thread.
        n_tok = len(pos)
        packed = np.concatenate((pos, slot_pages, pos % block_tokens, row, col, gather_pages.reshape(-1)))
        packed = torch.from_numpy(packed).to(device)
        per_token = packed[: 5 * n_tok].view(5, n_tok)
        return cls(
            page_run=page_run,
            positions=per_token[0],
            slot_pages=per_token[1],
            slot_offsets=per_token[2],
            token_rows=per_token[3],
            token_cols=per_token[4],
            gather_pages=packed[5 * n_tok:].view(gather_pages.shape),
            max_query_len=max_query_len,
            max_context_len=max_context_len,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )


def paged_attention(
    q: torch.Tensor,
    kv_new: torch.Tensor,
    kv_layer: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Store kv_new [2, N, Hkv, D] (K then V) in their pages, then attend q [N, Hq, D] causally; returns [N, Hq, D].

    kv_layer is one layer's [2, num_pages, block_tokens, Hkv, D] view of the cache.
    K and V arrive stacked so that they go to their pages in one indexed write.
    """
    kv_layer[:, meta.slot_pages, meta.slot_offsets] = kv_new.to(kv_layer.dtype)

    n, max_blocks = meta.gather_pages.shape
    _, _, block_tokens, num_kv_heads, head_dim = kv_layer.shape
    num_heads = q.shape[1]
    # [2, n, max_blocks, B, Hkv, D] -> [2, n, Hkv, S, D]
    kv = kv_layer[:, meta.gather_pages]
    kv = kv.reshape(2, n, max_blocks * block_tokens, num_kv_heads, head_dim)
    kv = kv[:, :, : meta.max_context_len].transpose(2, 3).to(q.dtype)
    keys, values = kv[0], kv[1]
    # Query head h reads KV head h // group, as HF's repeat_kv does. Without a mask or with the
    # causal bias, SDPA groups heads itself (enable_gqa: flash does it natively) instead of copying
    # K and V out to every query head; an explicit mask (a batch of chunks) would push a grouped
    # call onto the slow math kernel, so there K and V are expanded, as HF does.
    grouped = num_heads != num_kv_heads
    native_gqa = grouped and type(meta.attn_mask) is not torch.Tensor
    if grouped and not native_gqa:
        group = num_heads // num_kv_heads
        shape = (n, num_heads, meta.max_context_len, head_dim)
        keys = keys[:, :, None].expand(n, num_kv_heads, group, *shape[2:]).reshape(shape)
        values = values[:, :, None].expand(n, num_kv_heads, group, *shape[2:]).reshape(shape)
    if n == 1:
        queries = q.transpose(0, 1).unsqueeze(0)
    else:
        queries = q.new_zeros((n, meta.max_query_len, num_heads, head_dim))
        queries[meta.token_rows, meta.token_cols] = q
        queries = queries.transpose(1, 2)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.attn_mask, is_causal=meta.is_causal,
                                         enable_gqa=native_gqa)
    out = out.transpose(1, 2)  # [n, max_query_len, Hq, D]
    return out[0] if n == 1 else out[meta.token_rows, meta.token_cols]


def flash_usable(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether flash attention takes these queries: what SDPA would check before choosing it, once a pass."""
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0
            and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled() and not torch.is_grad_enabled())


class LayerAttention:
    """paged_attention for each layer of one pass, with what every layer shares worked out once.

    The layers of a pass differ only in which layer of the cache they touch:
    where the new K/V go, the context view over a consecutive page run and the
    attention call are the same for all. On a GPU a short chunk, a decode step,
    or the start of any pass is bound by the thread launching each layer's ops,
    so every op saved here is saved once per layer. For one chunk over a page
    run on CUDA it calls flash attention itself, as SDPA's causal-bias dispatch
    does after a dozen Python-level checks; anything else goes to paged_attention.
    """

    def __init__(self, kv: torch.Tensor, meta: AttentionMetadata, num_heads: int, dtype: torch.dtype) -> None:
        self.kv, self.meta = kv, meta
        self.direct = meta.page_run is not None and meta.gather_pages.shape[0] == 1
        if not self.direct:
            return
        layers, _, pages, block_tokens, heads, dim = kv.shape
        self.flat = kv.view(layers, 2, pages * block_tokens, heads, dim)
        self.slots = meta.slot_pages * block_tokens + meta.slot_offsets
        first = meta.page_run * block_tokens
        self.context = self.flat[:, :, first: first + meta.max_context_len].transpose(2, 3)  # [L, 2, Hkv, S, D]
        self.causal = meta.is_causal or isinstance(meta.attn_mask, CausalBias)  # bottom-right, as flash aligns it
        self.flash = flash_usable(kv.device, dtype, dim) and (meta.attn_mask is None or self.causal)
        self.grouped = num_heads != heads

    def __call__(self, layer: int, q: torch.Tensor, kv_new: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D] and kv_new [2, N, Hkv, D] of layer `layer` -> attention's output [N, Hq, D]."""
        if not self.direct:
            return paged_attention(q, kv_new, self.kv[layer], self.meta)
        self.flat[layer].index_copy_(1, self.slots, kv_new.to(self.flat.dtype))
        context = self.context[layer]
        keys, values = context[0].unsqueeze(0).to(q.dtype), context[1].unsqueeze(0).to(q.dtype)
        queries = q.transpose(0, 1).unsqueeze(0)
        if self.flash:
            out = torch.ops.aten._scaled_dot_product_flash_attention(queries, keys, values, 0.0, self.causal)[0]
        else:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.meta.attn_mask,
                                                 is_causal=self.meta.is_causal, enable_gqa=self.grouped)
        return out.transpose(1, 2)[0]
