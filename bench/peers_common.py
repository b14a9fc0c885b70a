"""The measurement loops every peer system in bench/peers.py runs, so kvstore and its peers do the same work.

Owns: the put/get loop over a working set (the shape bench/throughput.py's client workers use: put once
in calls of call_bytes, then get it back `passes` times into resident buffers, GB/s over the wall time),
the contains loop, metric names, and PeerAbsent. Refuses to own any system's setup: each adapter
(peers_redis.py, peers_mooncake.py) starts its own processes and hands plain callables here.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from throughput import KIB, blocks_for, size_label  # bench/ is on sys.path wherever this module is imported

CONTAINS_KEYS = 1024
CONTAINS_BLOCK_BYTES = 4 * KIB

PutFn = Callable[[Sequence[str], Sequence[np.ndarray]], None]
GetFn = Callable[[Sequence[str], Sequence[np.ndarray]], None]  # fills the given buffers
ContainsFn = Callable[[Sequence[str]], Sequence[bool]]


class PeerAbsent(RuntimeError):
    """A peer system that cannot run here: the bench reports the reason and prints its ratios as n/a."""


@dataclass(frozen=True)
class LoopShape:
    """How much one put/get measurement moves: the same for kvstore and every peer in a run."""

    working_set: int
    call_bytes: int
    passes: int

    def as_args(self) -> dict:
        """The dict bench/throughput.py's functions take."""
        return {"working_set": self.working_set, "call_bytes": self.call_bytes, "passes": self.passes}


def metric(system: str, op: str, size: int | None = None) -> str:
    """One measured number's name, e.g. 'redis-tcp get 1 MiB' (GB/s) or 'redis-tcp contains' (ms per 1024 keys)."""
    return f"{system} {op}" if size is None else f"{system} {op} {size_label(size)}"


RegisterFn = Callable[[Sequence[np.ndarray]], Callable[[], None]]  # registers whole buffers, returns the undo


def put_get_gbps(system: str, put: PutFn, get: GetFn, remove: Callable[[Sequence[str]], None], block_bytes: int,
                 shape: LoopShape, key_prefix: str, register: RegisterFn | None = None) -> dict[str, float]:
    """Put the working set once, get it back `passes` times into resident buffers; bytes checked after.

    Keys carry key_prefix so every round writes fresh keys (a store may treat a put of a present key as a
    no-op, which would time nothing); they are removed at the end so the next round starts from the same state.
    Sources and destinations are each one contiguous array, so a system that wants its buffers registered
    (Mooncake's zero-copy calls) registers two regions, outside the timed loops.
    """
    blocks = blocks_for(block_bytes, shape.working_set, seed=block_bytes & 0xFFFF)
    out_region = np.ones(len(blocks) * block_bytes, np.uint8)
    outs = [out_region[i * block_bytes : (i + 1) * block_bytes] for i in range(len(blocks))]
    unregister = register([blocks[0].base if blocks[0].base is not None else blocks[0], out_region]) if register else None
    keys = [f"{key_prefix}-{block_bytes}-{i}" for i in range(len(blocks))]
    per_call = max(1, shape.call_bytes // block_bytes)
    start = time.perf_counter()
    for lo in range(0, len(blocks), per_call):
        put(keys[lo : lo + per_call], blocks[lo : lo + per_call])
    put_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(shape.passes):
        for lo in range(0, len(blocks), per_call):
            get(keys[lo : lo + per_call], outs[lo : lo + per_call])
    get_s = time.perf_counter() - start
    if not all(np.array_equal(a, b) for a, b in zip(outs, blocks)):
        raise RuntimeError(f"{system} returned different bytes")
    remove(keys)
    if unregister is not None:
        unregister()
    moved = len(blocks) * block_bytes
    return {metric(system, "put", block_bytes): moved / put_s / 1e9, metric(system, "get", block_bytes): shape.passes * moved / get_s / 1e9}


def contains_ms(system: str, contains: ContainsFn, keys: Sequence[str], calls: int) -> dict[str, float]:
    """Median ms of one existence query over all `keys` (all present), after a few warm-up calls."""
    samples = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        found = contains(keys)
        if i >= 3:
            samples.append(time.perf_counter() - t0)
        if not all(found):
            raise RuntimeError(f"{system}: {len(found) - sum(map(bool, found))} stored keys reported missing")
    return {metric(system, "contains"): statistics.median(samples) * 1000}
