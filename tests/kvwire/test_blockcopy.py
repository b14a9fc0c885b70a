"""kvwire.blockcopy: the compiled gather/scatter copy against its numpy reference, byte for byte and digest for digest.

The native function is called directly (a silent fallback cannot pass for it) and through the public
function; inputs it leaves to the reference (NotImplemented) must still get the reference's answer or error.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import xxhash

from kvwire import blockcopy, native as native_selection
from kvwire.blockcopy import HASH_DEST, HASH_NONE, HASH_SOURCE, checksums, copy_blocks, copy_blocks_reference, packed_offsets, runs_within

native = native_selection.native
MIB = 1 << 20


@pytest.fixture(scope="module")
def compiled():
    if native_selection.disabled():
        pytest.skip(f"the native code is off here ({native_selection.status})")
    assert native is not None, f"kvwire._native is not in use: {native_selection.status}; run `pip install -e .`"
    return native


def scattered(rng: np.random.Generator, sizes: list[int], gap: int = 64) -> tuple[np.ndarray, list[int]]:
    """A pool holding the blocks at shuffled, gapped offsets, as slots sit in the host pool."""
    order = rng.permutation(len(sizes))
    offsets = [0] * len(sizes)
    at = 0
    for i in order:
        offsets[i] = at
        at += sizes[i] + int(rng.integers(0, gap + 1))
    return rng.integers(0, 256, at + 1, dtype=np.uint8), offsets


CASES = {
    "one block": [4096],
    "empty block": [0, 17, 0],
    "1000 tiny": [int(x) for x in np.random.default_rng(1).integers(1, 300, 1000)],
    "64 KiB x 512": [64 << 10] * 512,
    "mixed": [1, 4095, 4096, 4097, 65535, 65536, 65537, MIB - 1, 3 * MIB + 5],
    "one block over a thread's share": [9 * MIB + 3],
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("hash", [HASH_NONE, HASH_SOURCE, HASH_DEST])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_gather_from_a_pool_equals_the_reference(compiled, case, hash, threads):
    sizes = CASES[case]
    rng = np.random.default_rng(len(sizes) * 7 + hash)
    pool, offsets = scattered(rng, sizes)
    got = [np.full(n, 0xAA, np.uint8) for n in sizes]
    want = [np.full(n, 0x55, np.uint8) for n in sizes]
    digests = compiled.copy_blocks(pool, offsets, got, None, sizes, hash, threads)
    expected = copy_blocks_reference(pool, offsets, want, None, sizes, hash)
    assert digests == expected
    for i, (g, w) in enumerate(zip(got, want)):
        assert np.array_equal(g, w), f"block {i} differs"
        assert np.array_equal(g, pool[offsets[i] : offsets[i] + sizes[i]])
    if hash != HASH_NONE:
        assert digests == [xxhash.xxh3_64_intdigest(pool[o : o + n]) for o, n in zip(offsets, sizes)]
    else:
        assert digests is None


@pytest.mark.parametrize("case", ["one block", "1000 tiny", "mixed", "one block over a thread's share"])
@pytest.mark.parametrize("threads", [1, 3])
def test_scatter_into_a_pool_equals_the_reference(compiled, case, threads):
    sizes = CASES[case]
    rng = np.random.default_rng(len(sizes))
    payloads = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    background, offsets = scattered(rng, sizes)
    got, want = background.copy(), background.copy()
    sums = compiled.copy_blocks([memoryview(p) for p in payloads], None, got, offsets, sizes, HASH_SOURCE, threads)
    assert sums == copy_blocks_reference(payloads, None, want, offsets, sizes, HASH_SOURCE)
    assert np.array_equal(got, want)  # the gaps between slots untouched too
    assert sums == [xxhash.xxh3_64_intdigest(p) for p in payloads]


def test_packing_and_hash_only_equal_the_reference(compiled):
    sizes = CASES["1000 tiny"]
    rng = np.random.default_rng(5)
    pool, offsets = scattered(rng, sizes)
    packed_at = packed_offsets(sizes)
    got, want = np.zeros(sum(sizes), np.uint8), np.ones(sum(sizes), np.uint8)
    assert compiled.copy_blocks(pool, offsets, got, packed_at, sizes, HASH_DEST, 2) == copy_blocks_reference(pool, offsets, want, packed_at, sizes, HASH_DEST)
    assert np.array_equal(got, want)
    assert compiled.copy_blocks(got, packed_at, None, None, sizes, HASH_SOURCE, 2) == checksums(want, packed_at, sizes)


def test_the_public_function_runs_the_native_code(compiled, monkeypatch):
    calls = []
    monkeypatch.setattr(blockcopy, "native", type("Spy", (), {"copy_blocks": staticmethod(lambda *a: calls.append(a) or compiled.copy_blocks(*a))}))
    copy_blocks(b"abc", [0], bytearray(3), [0], [3])
    assert len(calls) == 1


BAD = {
    "source out of range": (lambda: (np.zeros(10, np.uint8), [5], np.zeros(10, np.uint8), [0], [6]), ValueError, "outside its 10-byte buffer"),
    "destination out of range": (lambda: (np.zeros(10, np.uint8), [0], np.zeros(10, np.uint8), [8], [3]), ValueError, "destination bytes 8..11"),
    "read-only destination": (lambda: (np.zeros(4, np.uint8), None, b"xxxx", None, [4]), ValueError, "read-only"),
    "negative offset": (lambda: (np.zeros(4, np.uint8), [-1], np.zeros(4, np.uint8), None, [1]), ValueError, "not a byte position"),
    "negative length": (lambda: (np.zeros(4, np.uint8), None, np.zeros(4, np.uint8), None, [-2]), ValueError, "not a byte count"),
    "offsets do not line up": (lambda: (np.zeros(4, np.uint8), [0, 1], np.zeros(4, np.uint8), None, [1]), ValueError, "2 source offsets for 1 blocks"),
    "buffers do not line up": (lambda: ([b"ab", b"cd"], None, np.zeros(4, np.uint8), None, [1]), ValueError, "2 source buffers for 1 blocks"),
    "not a buffer": (lambda: (object(), None, np.zeros(4, np.uint8), None, [1]), TypeError, "not a contiguous buffer"),
    "not contiguous": (lambda: (np.zeros(8, np.uint8)[::2], None, np.zeros(4, np.uint8), None, [4]), TypeError, "not a contiguous buffer"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_the_references_error_and_moves_nothing(compiled, case):
    make, error, words = BAD[case]
    args = make()
    assert compiled.copy_blocks(*args, HASH_SOURCE, 2) is NotImplemented
    dst = args[2]
    before = bytes(dst) if isinstance(dst, np.ndarray) else None
    with pytest.raises(error, match=words):
        copy_blocks(*args, HASH_SOURCE)
    with pytest.raises(error, match=words):
        copy_blocks_reference(*args, HASH_SOURCE)
    if before is not None:
        assert bytes(dst) == before


def test_a_bad_block_after_good_ones_moves_nothing(compiled):
    src, dst = np.arange(16, dtype=np.uint8), np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="block 1"):
        copy_blocks(src, [0, 10], dst, [0, 8], [4, 10])
    assert not dst.any()


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="hash must be"):
        copy_blocks(b"ab", None, bytearray(2), None, [2], hash=7)
    with pytest.raises(ValueError, match="only the sources to hash"):
        copy_blocks(b"ab", None, None, None, [2], hash=HASH_DEST)
    with pytest.raises(ValueError, match="threads must be"):
        copy_blocks(b"ab", None, bytearray(2), None, [2], threads=0)


def test_copies_run_concurrently_without_the_gil(compiled):
    """Four threads copying at once (as four clients of one process do) each get exactly their bytes."""
    rng = np.random.default_rng(9)
    pool = rng.integers(0, 256, 48 * MIB, dtype=np.uint8)
    errors: list[str] = []

    def worker(k: int) -> None:
        sizes = [(k + 1) * 256 << 10] * 8
        offsets = [(k * 12 + j) * MIB for j in range(8)]
        for rep in range(5):
            outs = [np.zeros(n, np.uint8) for n in sizes]
            sums = copy_blocks(pool, offsets, outs, None, sizes, HASH_DEST, 2)
            for o, n, out, s in zip(offsets, sizes, outs, sums):
                if not np.array_equal(out, pool[o : o + n]) or s != xxhash.xxh3_64_intdigest(out):
                    errors.append(f"thread {k} rep {rep}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_runs_and_packed_offsets():
    assert runs_within([], 10) == [] and packed_offsets([]) == []
    assert runs_within([4, 4, 4, 12, 1, 9, 1], 10) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6), range(6, 7)]
    assert runs_within([3, 3], 0) == [range(0, 1), range(1, 2)]
    assert packed_offsets([4, 0, 5, 1]) == [0, 4, 4, 9]
