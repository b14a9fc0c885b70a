"""PagedKVCache: the engine's K/V pages, a free-page allocator and per-sequence block tables.

Storage is one tensor `kv` shaped [num_layers, 2, num_pages, block_tokens,
num_kv_heads, head_dim] (index 0 of dim 1 is K, 1 is V). A page holds the K/V of
`block_tokens` consecutive tokens of one sequence, for every layer; a sequence's
block table lists its pages in token order, so token t lives in page
table[t // block_tokens] at offset t % block_tokens.

Stored block format (kv_layout "layer_kv_block_head_dim")
--------------------------------------------------------
`gather_block(page_id)` returns, and `scatter_block(page_id, payload)` takes, one
page of every layer as a C-contiguous tensor shaped

    [num_layers, 2, block_tokens, num_kv_heads, head_dim]

in the cache dtype: layer-major, then K before V, then token offset within the
block, then KV head, then the head dimension. Its raw bytes (native little-endian)
are exactly what kvstore stores for one block key, and the fingerprint's
num_layers, num_kv_heads, head_dim, block_tokens, dtype and kv_layout fields
pin this shape. K is stored after RoPE, as attention consumes it.

This module refuses to own prefix sharing, reference counts or eviction: a page
belongs to one sequence until freed; sharing across requests happens through
the store, by copying blocks in and out.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch

from engines.config import ModelConfig

KV_LAYOUT = "layer_kv_block_head_dim"


class CacheFullError(RuntimeError):
    """Not enough free pages for an allocation; nothing was allocated."""


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        block_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_pages <= 0 or block_tokens <= 0:
            raise ValueError("num_pages and block_tokens must be positive")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.block_tokens = block_tokens
        self.kv = torch.zeros(
            (num_layers, 2, num_pages, block_tokens, num_kv_heads, head_dim), dtype=dtype, device=device
        )
        # Ascending, lowest handed out first: a sequence then mostly gets consecutive pages, which
        # attention reads in place instead of gathering (attention.AttentionMetadata.page_run).
        self._free_pages: list[int] = list(range(num_pages))
        self._tables: dict[Hashable, list[int]] = {}

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_pages: int,
        block_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> "PagedKVCache":
        return cls(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
            num_pages, block_tokens, dtype, device,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one stored block: [num_layers, 2, block_tokens, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return self.kv[:, :, 0].numel() * self.kv.element_size()

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def layer(self, layer_idx: int) -> torch.Tensor:
        """View [2, num_pages, block_tokens, num_kv_heads, head_dim] of one layer's K/V pages."""
        return self.kv[layer_idx]

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_tokens)

    # ---- sequences -------------------------------------------------------------------

    def allocate(self, seq_id: Hashable, num_tokens: int) -> list[int]:
        """Grow seq_id's block table to hold num_tokens tokens in total; returns the table.

        Idempotent for a table that is already large enough. All-or-nothing: raises
        CacheFullError, allocating nothing, when too few pages are free.
        """
        table = self._tables.setdefault(seq_id, [])
        missing = self.pages_for(num_tokens) - len(table)
        if missing > len(self._free_pages):
            if not table:
                del self._tables[seq_id]
            raise CacheFullError(f"{seq_id!r} needs {missing} more pages, {len(self._free_pages)} free")
        if missing > 0:
            table.extend(self._free_pages[:missing])
            del self._free_pages[:missing]
        return list(table)

    def free(self, seq_id: Hashable) -> None:
        """Return seq_id's pages to the free list; unknown ids are ignored."""
        self._free_pages.extend(self._tables.pop(seq_id, ()))
        self._free_pages.sort()

    def block_table(self, seq_id: Hashable) -> list[int]:
        return list(self._tables[seq_id])

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._tables

    # ---- stored-block payloads -------------------------------------------------------

    def gather_blocks(self, page_ids: Sequence[int]) -> torch.Tensor:
        """Copy pages out as one contiguous tensor [n, num_layers, 2, block_tokens, num_kv_heads, head_dim]."""
        index = torch.as_tensor(list(page_ids), dtype=torch.long, device=self.device)
        return self.kv.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()

    def scatter_blocks(self, page_ids: Sequence[int], payload: torch.Tensor) -> None:
        """Write [n, num_layers, 2, block_tokens, num_kv_heads, head_dim] blocks into the given pages.

        The payload may live on another device (a host staging buffer, say); its
        dtype must equal the cache's, because a dtype mismatch means a wrong
        fingerprint, not something to convert silently.
        """
        page_ids = list(page_ids)
        expected = (len(page_ids), *self.block_shape)
        if tuple(payload.shape) != expected:
            raise ValueError(f"payload shape {tuple(payload.shape)} != expected {expected}")
        if payload.dtype != self.dtype:
            raise ValueError(f"payload dtype {payload.dtype} != cache dtype {self.dtype}")
        index = torch.as_tensor(page_ids, dtype=torch.long, device=self.device)
        self.kv.index_copy_(2, index, payload.to(self.device).permute(1, 2, 0, 3, 4, 5))

    def gather_block(self, page_id: int) -> torch.Tensor:
        """One page as a contiguous [num_layers, 2, block_tokens, num_kv_heads, head_dim] tensor."""
        return self.gather_blocks([page_id])[0]

    def scatter_block(self, page_id: int, payload: torch.Tensor) -> None:
        self.scatter_blocks([page_id], payload.unsqueeze(0))
