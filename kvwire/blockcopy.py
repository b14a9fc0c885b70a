"""Many blocks copied in one call: a gather/scatter memcpy with each block's xxh3-64, for every data path.

Owns moving the bytes of a batch of blocks between buffers (the shared host pool, a caller's
arrays, a packed message) and hashing each block as it moves; refuses to own which blocks move
where or what a checksum means (the transports and the store decide).

One call per request, never one per block: in Python a copy of 512 blocks of 64 KiB cost ~10 us a
block in slicing, np.copyto and the hash call, twice the copy itself. The compiled version
(csrc/kvnative/block_copy.c) releases the GIL, hashes each chunk of a block right after copying it
(one pass over memory, not two), and splits a large call over up to `threads` threads.
copy_blocks_reference beside it is the same contract in numpy, which the compiled one is tested
against (tests/kvwire/test_blockcopy.py), and runs where it is not built or KVSTORE_NATIVE=0.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import xxhash

from kvwire.native import native

HASH_NONE = 0
HASH_SOURCE = 1  # each block's digest as read: the caller's bytes of a put
HASH_DEST = 2  # each block's digest where it landed, after its copy: a get's check
# A call uses several threads only where it moves at least 2 MiB a thread (block_copy.c MIN_THREAD_BYTES).
DEFAULT_THREADS = max(1, min(4, os.cpu_count() or 1))

Buffers = Any  # one buffer, or a list/tuple of one buffer per block


def copy_blocks(src: Buffers, src_offsets: Sequence[int] | None, dst: Buffers | None, dst_offsets: Sequence[int] | None,
                lengths: Sequence[int], hash: int = HASH_NONE, threads: int = DEFAULT_THREADS) -> list[int] | None:
    """Copy block i's lengths[i] bytes from src (at src_offsets[i]) to dst (at dst_offsets[i]); offsets None are all 0.

    src and dst are each one buffer the offsets point into, or a list/tuple holding one buffer per block;
    dst None only hashes. Returns each block's xxh3-64 (of its source or of its landed copy, per hash),
    or None without a hash. Regions must not overlap. Raises ValueError or TypeError, before any byte
    moves, for a block outside its buffer, a read-only destination, or arguments that do not line up.
    """
    if native is not None:
        result = native.copy_blocks(src, src_offsets, dst, dst_offsets, lengths, hash, threads)
        if result is not NotImplemented:
            return result
    return copy_blocks_reference(src, src_offsets, dst, dst_offsets, lengths, hash, threads)


def checksums(src: Buffers, offsets: Sequence[int] | None, lengths: Sequence[int], threads: int = DEFAULT_THREADS) -> list[int]:
    """Each block's xxh3-64, in one call (the store's commit check, a packed message's blocks)."""
    return copy_blocks(src, offsets, None, None, lengths, HASH_SOURCE, threads)


def runs_within(sizes: Sequence[int], max_bytes: int) -> list[range]:
    """Runs of consecutive blocks of at most max_bytes together, packed greedily; a block of max_bytes or more
    is a run of its own (a UCX message's blocks, a put's copy windows)."""
    runs: list[range] = []
    lo, total = 0, 0
    for i, size in enumerate(sizes):
        if i > lo and total + size > max_bytes:
            runs.append(range(lo, i))
            lo, total = i, 0
        total += size
    if len(sizes):
        runs.append(range(lo, len(sizes)))
    return runs


def packed_offsets(sizes: Sequence[int]) -> list[int]:
    """Where each block starts in a buffer that holds them back to back (a packed message, a staging area)."""
    return np.cumsum([0, *sizes[:-1]]).tolist() if len(sizes) else []


def copy_blocks_reference(src: Buffers, src_offsets: Sequence[int] | None, dst: Buffers | None, dst_offsets: Sequence[int] | None,
                          lengths: Sequence[int], hash: int = HASH_NONE, threads: int = 1) -> list[int] | None:
    lengths = list(lengths)
    n = len(lengths)
    if hash not in (HASH_NONE, HASH_SOURCE, HASH_DEST):
        raise ValueError(f"hash must be HASH_NONE, HASH_SOURCE or HASH_DEST, not {hash!r}")
    if dst is None and hash != HASH_SOURCE:
        raise ValueError("without a destination there is only the sources to hash (hash=HASH_SOURCE)")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, not {threads!r}")
    sources = _side(src, n, "source", writable=False)
    dests = _side(dst, n, "destination", writable=True) if dst is not None else None
    src_at = _offsets(src_offsets, n, "source")
    dst_at = _offsets(dst_offsets, n, "destination") if dst is not None else None
    for i, size in enumerate(lengths):
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"block {i}: length {size!r} is not a byte count")
        _check_range(sources, i, src_at[i], size, "source")
        if dests is not None:
            _check_range(dests, i, dst_at[i], size, "destination")
    digests = []
    for i, size in enumerate(lengths):
        block = sources[i % len(sources)][src_at[i] : src_at[i] + size]
        if dests is not None:
            landed = dests[i % len(dests)][dst_at[i] : dst_at[i] + size]
            np.copyto(landed, block)
            if hash == HASH_DEST:
                block = landed
        if hash != HASH_NONE:
            digests.append(xxhash.xxh3_64_intdigest(block))
    return digests if hash != HASH_NONE else None


def _side(obj: Buffers, n: int, what: str, writable: bool) -> list[np.ndarray]:
    """The uint8 views of one side: one for all blocks, or one per block."""
    per_block = isinstance(obj, (list, tuple))
    if per_block and len(obj) != n:
        raise ValueError(f"{len(obj)} {what} buffers for {n} blocks")
    views = []
    for buf in obj if per_block else [obj]:
        try:
            view = np.frombuffer(buf, dtype=np.uint8)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{what} is not a contiguous buffer: {err}") from None
        if writable and not view.flags.writeable:
            raise ValueError(f"{what} buffer is read-only")
        views.append(view)
    return views


def _offsets(offsets: Sequence[int] | None, n: int, what: str) -> list[int]:
    if offsets is None:
        return [0] * n
    offsets = list(offsets)
    if len(offsets) != n:
        raise ValueError(f"{len(offsets)} {what} offsets for {n} blocks")
    for i, at in enumerate(offsets):
        if isinstance(at, bool) or not isinstance(at, (int, np.integer)) or at < 0:
            raise ValueError(f"block {i}: {what} offset {at!r} is not a byte position")
    return [int(at) for at in offsets]


def _check_range(views: list[np.ndarray], i: int, at: int, size: int, what: str) -> None:
    view = views[i % len(views)]
    if at + size > len(view):
        raise ValueError(f"block {i}: {what} bytes {at}..{at + size} lie outside its {len(view)}-byte buffer")
