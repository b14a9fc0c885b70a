"""A decayed count-min sketch: how often each key was asked for lately, in fixed memory, for a whole batch at once.

Owns counting and forgetting, nothing else: what a count means (a hot key) is hot.py's. A directory home
counts the Locates of every key it is home for; keys are many and mostly cold, so a dict of counters would
grow with every key ever asked, while a sketch of depth x width counters estimates any key's count within
a small overcount (never under: count-min) in a fixed 128 KiB.

Forgetting: every counter decays exponentially with a half-life, applied lazily as one multiply of the
whole table when a batch arrives (cheaper than per-counter timestamps), so a key that was hot an hour ago
reads as cold now. Rows hash a key's 64-bit word (directory.key_words) with a salt each, the same
splitmix64 finaliser the rendezvous hashing uses.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from kvstore.cluster.directory import mix64

DEPTH = 4
WIDTH = 4096  # counters per row (a power of two: the hash is masked)
_SALTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93], dtype=np.uint64)


class DecayedCountMin:
    def __init__(self, half_life_s: float, width: int = WIDTH, depth: int = DEPTH,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if width & (width - 1) or not 0 < depth <= len(_SALTS) or half_life_s <= 0:
            raise ValueError("width must be a power of two, depth 1..4, half_life_s positive")
        self.half_life_s = half_life_s
        self.clock = clock
        self._table = np.zeros((depth, width), dtype=np.float64)
        self._mask = np.uint64(width - 1)
        self._rows = np.arange(depth)[:, None]
        self._decayed_at = clock()
        self._lock = threading.Lock()

    def _columns(self, words: np.ndarray) -> np.ndarray:
        """[depth, n] counter index of each key in each row."""
        return (mix64(words[None, :] ^ _SALTS[: len(self._table), None]) & self._mask).astype(np.intp)

    def _decay(self) -> None:
        now = self.clock()
        elapsed = now - self._decayed_at
        if elapsed >= self.half_life_s / 16:  # a few steps per half-life: the multiply costs ~10 us
            self._table *= 0.5 ** (elapsed / self.half_life_s)
            self._decayed_at = now

    def add(self, words: np.ndarray, weight: float = 1.0) -> np.ndarray:
        """Count each key (a uint64 word; repeats count each time) and return its estimate after the add."""
        if not len(words):
            return np.zeros(0)
        cols = self._columns(words)
        with self._lock:
            self._decay()
            for row, col in enumerate(cols):
                np.add.at(self._table[row], col, weight)
            return self._table[self._rows, cols].min(axis=0)

    def estimate(self, words: np.ndarray) -> np.ndarray:
        """Each key's decayed count (never below the truth; above it only where keys share every counter)."""
        if not len(words):
            return np.zeros(0)
        cols = self._columns(words)
        with self._lock:
            self._decay()
            return self._table[self._rows, cols].min(axis=0)
