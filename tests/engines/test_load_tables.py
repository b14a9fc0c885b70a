"""engines/load_tables.py: the compiled write_load_tables against its numpy reference, word for word.

The native function is called directly (a silent fallback cannot pass for it) and through the public
function, on random mixes of host and HBM blocks; inputs it leaves to the reference (out of range, a
short buffer, a strided array) must still get the reference's answer or its one error.
"""
from __future__ import annotations

import numpy as np
import pytest

from engines.load_tables import NO_TIERS, LoadTables, write_load_tables, write_load_tables_reference
from kvwire import native as native_selection
from kvwire.types import Tier

native = native_selection.native
HALF, NUM_PAGES, BLOCK, HOST_BYTES, HBM_BYTES = 4096, 700, 64 * 4096, 1 << 30, 1 << 28


def case(rng: np.random.Generator, n: int, hbm_share: float, extra: int = 3):
    """A Pin's columns for n + extra blocks (a prefix pin may hold more than the load takes) and n pages."""
    pages = rng.permutation(NUM_PAGES)[:n].astype(np.int64)
    tiers = np.where(rng.random(n + extra) < hbm_share, Tier.HBM.value, Tier.HOST.value).astype(np.uint64)
    host = (rng.integers(0, HOST_BYTES // BLOCK, n + extra) * BLOCK).astype(np.uint64)
    hbm = np.where(tiers == Tier.HBM.value, rng.integers(0, HBM_BYTES // BLOCK, n + extra) * BLOCK, 0).astype(np.uint64)
    return pages, tiers, host, hbm


def both(pages, tiers, host, hbm, hash_offsets, words_len=None):
    n = len(pages)
    size = words_len if words_len is not None else 3 * n + 5
    got_words, want_words = np.full(size, -7, np.int64), np.full(size, -7, np.int64)
    args = (HALF, NUM_PAGES, BLOCK, HOST_BYTES, HBM_BYTES, hash_offsets)
    got = write_load_tables(pages, tiers, host, hbm, got_words, *args)
    want = write_load_tables_reference(pages, tiers, host, hbm, want_words, *args)
    return got, want, got_words, want_words


@pytest.mark.skipif(native is None, reason="kvwire._native is not built here")
@pytest.mark.parametrize("hbm_share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("hash_offsets", [True, False])
def test_native_writes_the_references_words(hbm_share, hash_offsets):
    rng = np.random.default_rng(int(hbm_share * 10) + hash_offsets)
    for n in (0, 1, 17, 512):
        pages, tiers, host, hbm = case(rng, n, hbm_share)
        direct_words = np.full(3 * n + 5, -7, np.int64)
        direct = native.write_load_tables(pages, tiers, host, hbm, direct_words, HALF, NUM_PAGES, BLOCK, HOST_BYTES,
                                          HBM_BYTES, hash_offsets)
        assert direct is not NotImplemented
        got, want, got_words, want_words = both(pages, tiers, host, hbm, hash_offsets)
        assert got == want == LoadTables(*direct)
        assert np.array_equal(got_words, want_words) and np.array_equal(direct_words, want_words)


def test_tables_say_where_each_block_goes():
    """Key order is kept within each source; the checksum offsets follow every block in key order."""
    pages = np.array([5, 3, 9, 1], np.int64)
    tiers = np.array([Tier.HOST.value, Tier.HBM.value, Tier.HBM.value, Tier.HOST.value], np.uint64)
    host = np.array([0, 4 * BLOCK, 8 * BLOCK, 2 * BLOCK + 16], np.uint64)
    hbm = np.array([0, 3 * BLOCK, BLOCK, 0], np.uint64)
    words = np.zeros(12, np.int64)
    tables = write_load_tables(pages, tiers, host, hbm, words, HALF, NUM_PAGES, BLOCK, HOST_BYTES, HBM_BYTES, True)
    assert tables == LoadTables(2, 2, 2 * BLOCK + 16, 3 * BLOCK)
    assert [a.tolist() for a in tables.host(words)] == [[5, 1], [0, 2 * BLOCK + 16]]
    assert [a.tolist() for a in tables.hbm(words)] == [[3, 9], [3 * BLOCK, BLOCK]]
    assert words[tables.hash_at:].tolist() == [5 * HALF, 3 * HALF, 9 * HALF, 1 * HALF]
    no_hbm = write_load_tables(pages, NO_TIERS, host, NO_TIERS, words, HALF, NUM_PAGES, BLOCK, HOST_BYTES, 0, False)
    assert no_hbm.hbm_blocks == 0 and tables.host(words)[0].tolist() != [] and no_hbm.host(words)[0].tolist() == [5, 3, 9, 1]


@pytest.mark.parametrize("broken, message", [
    ("page", "a page outside the cache's 700"),
    ("negative page", "a page outside the cache's 700"),
    ("host offset", f"a block outside the {HOST_BYTES}-byte source"),
    ("hbm offset", f"a block outside the {HBM_BYTES}-byte source"),
    ("short words", "words cannot hold the tables"),
    ("short columns", "pages for fewer blocks"),
])
def test_out_of_range_is_the_references_one_error(broken, message):
    rng = np.random.default_rng(3)
    pages, tiers, host, hbm = case(rng, 40, 0.5)
    words_len = None
    if broken == "page":
        pages[7] = NUM_PAGES
    elif broken == "negative page":
        pages[0] = -1
    elif broken == "host offset":
        host[int(np.flatnonzero(tiers[:40] == Tier.HOST.value)[0])] = HOST_BYTES - BLOCK + 1
    elif broken == "hbm offset":
        hbm[int(np.flatnonzero(tiers[:40] == Tier.HBM.value)[0])] = HBM_BYTES
    elif broken == "short words":
        words_len = 3 * 40 - 1
    else:
        host = host[:39]
    for write in (write_load_tables, write_load_tables_reference):
        with pytest.raises(ValueError, match=message):
            write(pages, tiers, host, hbm, np.zeros(words_len or 200, np.int64), HALF, NUM_PAGES, BLOCK, HOST_BYTES,
                  HBM_BYTES, True)


@pytest.mark.skipif(native is None, reason="kvwire._native is not built here")
def test_inputs_the_native_code_leaves_alone_get_the_references_answer():
    """A strided page array, a read-only destination, 4-byte words: NotImplemented, then the reference."""
    rng = np.random.default_rng(5)
    pages, tiers, host, hbm = case(rng, 30, 0.5)
    strided = np.repeat(pages, 2)[::2]
    words = np.zeros(100, np.int64)
    assert native.write_load_tables(strided, tiers, host, hbm, words, HALF, NUM_PAGES, BLOCK, HOST_BYTES, HBM_BYTES,
                                    True) is NotImplemented
    got, want, got_words, want_words = both(strided, tiers, host, hbm, True)
    assert got == want and np.array_equal(got_words, want_words)
    frozen = np.zeros(100, np.int64)
    frozen.flags.writeable = False
    assert native.write_load_tables(pages, tiers, host, hbm, frozen, HALF, NUM_PAGES, BLOCK, HOST_BYTES, HBM_BYTES,
                                    True) is NotImplemented
    assert native.write_load_tables(pages.astype(np.int32), tiers, host, hbm, words, HALF, NUM_PAGES, BLOCK, HOST_BYTES,
                                    HBM_BYTES, True) is NotImplemented
