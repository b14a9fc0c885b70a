"""A prefix load's kernel tables, written from its Pin's answer into the load's table slot in one pass.

The Pin names each pinned block's fastest tier and its offsets in the store's host pool and HBM
pool; the engine has a page for each. The gather kernel takes, per source, a table of offsets
and a table of pages; the checksum kernel, every block's page offset in key order. Built with
numpy masks and gathers, and checked in range, that cost ~0.15 ms of an 8k prompt's load on an
H200 host, on the thread that then launches the forward pass before layer 0's bytes can move;
kvwire._native's write_load_tables (csrc/kvnative/load_tables.c) does it in one loop, and
write_load_tables_reference is its definition (tests/engines/test_load_tables.py holds the two
to the same words and errors). The tables refuse to know how blocks move: store_dma.py decides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvwire.native import native
from kvwire.types import Tier

NO_TIERS = np.empty(0, dtype=np.uint64)


@dataclass(frozen=True)
class LoadTables:
    """Where write_load_tables put each table in the words, for h blocks from the host pool and m from HBM (n = h + m):
    [0, h) host offsets, [h, 2h) their pages, [2h, 2h+m) HBM offsets, [2h+m, 2n) their pages, and with hash offsets
    [2n, 3n) every block's page * half_bytes in key order. host_or and hbm_or: each source's offsets or-ed together
    (the gather kernel needs them 16-byte aligned)."""

    host_blocks: int
    hbm_blocks: int
    host_or: int
    hbm_or: int

    @property
    def num_blocks(self) -> int:
        return self.host_blocks + self.hbm_blocks

    @property
    def host_at(self) -> int:
        return 0

    @property
    def hbm_at(self) -> int:
        return 2 * self.host_blocks

    @property
    def hash_at(self) -> int:
        return 2 * self.num_blocks

    def host(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pages, offsets) of the host pool's blocks, as views of words."""
        h = self.host_blocks
        return words[h: 2 * h], words[:h]

    def hbm(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pages, offsets) of the HBM pool's blocks, as views of words."""
        at, m = self.hbm_at, self.hbm_blocks
        return words[at + m: at + 2 * m], words[at: at + m]


def write_load_tables(pages: np.ndarray, tiers: np.ndarray, host_offsets: np.ndarray, hbm_offsets: np.ndarray,
                      words: np.ndarray, half_bytes: int, num_pages: int, block_bytes: int, host_bytes: int, hbm_bytes: int,
                      hash_offsets: bool) -> LoadTables:
    """Write the tables of blocks i < len(pages), block i landing in pages[i], into words (LoadTables says where).
    tiers: each block's fastest tier (Tier values), or empty for all from the host pool; host_offsets and hbm_offsets:
    the blocks' offsets in the two pools (uint64); host_bytes, hbm_bytes: the pools' sizes. Raises ValueError for a
    page outside the cache or a block outside its pool."""
    if native is not None:
        answer = native.write_load_tables(pages, tiers, host_offsets, hbm_offsets, words, half_bytes, num_pages, block_bytes,
                                          host_bytes, hbm_bytes, hash_offsets)
        if answer is not NotImplemented:
            return LoadTables(*answer)
    return write_load_tables_reference(pages, tiers, host_offsets, hbm_offsets, words, half_bytes, num_pages, block_bytes,
                                       host_bytes, hbm_bytes, hash_offsets)


def write_load_tables_reference(pages: np.ndarray, tiers: np.ndarray, host_offsets: np.ndarray, hbm_offsets: np.ndarray,
                                words: np.ndarray, half_bytes: int, num_pages: int, block_bytes: int, host_bytes: int,
                                hbm_bytes: int, hash_offsets: bool) -> LoadTables:
    """write_load_tables in numpy: its definition."""
    pages = np.asarray(pages, dtype=np.int64).reshape(-1)
    n = len(pages)
    if len(tiers) and len(tiers) < n or len(host_offsets) < n or len(tiers) and len(hbm_offsets) < n:
        raise ValueError(f"{n} pages for fewer blocks")
    if len(words) < (3 if hash_offsets else 2) * n:
        raise ValueError(f"{len(words)} words cannot hold the tables of {n} blocks")
    in_hbm = np.asarray(tiers[:n]) == Tier.HBM.value if len(tiers) else np.zeros(n, dtype=bool)
    if n and (pages.min() < 0 or pages.max() >= num_pages):
        raise ValueError(f"a page outside the cache's {num_pages}")
    sources = []
    for mask, offsets, size in ((~in_hbm, host_offsets, host_bytes), (in_hbm, hbm_offsets, hbm_bytes)):
        chosen = np.asarray(offsets[:n], dtype=np.uint64)[mask] if mask.any() else np.empty(0, dtype=np.uint64)
        if len(chosen) and (chosen.max() > size or (np.uint64(size) - chosen < np.uint64(block_bytes)).any()):
            raise ValueError(f"a block outside the {size}-byte source")
        sources.append((chosen, pages[mask]))
    at, ors = 0, []
    for offsets, chosen_pages in sources:
        k = len(offsets)
        words[at: at + k] = offsets.astype(np.int64)
        words[at + k: at + 2 * k] = chosen_pages
        at += 2 * k
        ors.append(int(np.bitwise_or.reduce(offsets)) if k else 0)
    if hash_offsets:
        words[2 * n: 3 * n] = pages * half_bytes
    return LoadTables(len(sources[0][0]), len(sources[1][0]), ors[0], ors[1])
