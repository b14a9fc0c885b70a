"""Which holder a reader fetches a run of keys from: power of two choices on what this node sees of each peer.

Owns the reader's per-peer load (transfers in flight from this node, EWMA of how long a transfer took per MiB)
and the choice among holders that all hold the run. The two choices are the directory's first (its home
lists holders least loaded first, by the traffic it has pointed readers at: hot.py) and one other at random;
the other wins only where this node knows better: fewer of its own transfers in flight to it, or, as many,
a latency under half the first's. Why not two at random: a reader's own numbers are empty for a peer it has
not read from, so readers arriving one after another would each flip coins and the first holder of a hot
prefix would serve most copies; the home's order turns that into a chain (each new copy serves the next
reader). Why a reader's numbers at all: concurrent fetches from one node spread over holders at once, and a
slow or busy holder is left while it stays so (Mitzenmacher's two choices: most of the balance of asking
everyone, at the cost of looking at two).
It refuses fetching (remote_tier.py) and the home's order (hot.py).
"""
from __future__ import annotations

import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from kvstore.cluster.directory import HolderId

EWMA_WEIGHT = 0.3  # of the newest transfer
MIB = 1 << 20


@dataclass
class _PeerLoad:
    inflight: int = 0
    s_per_mib: float | None = None  # EWMA; None until a transfer finished


class ReaderLoad:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self._peers: dict[HolderId, _PeerLoad] = {}
        self._lock = threading.Lock()

    def _of(self, holder: HolderId) -> _PeerLoad:
        load = self._peers.get(holder)
        if load is None:
            load = self._peers[holder] = _PeerLoad()
        return load

    @contextmanager
    def transfer(self, holder: HolderId) -> Iterator[list[int]]:
        """Around one transfer from holder: counted in flight; append the bytes it moved to the yielded list, and
        its time per MiB (runs under a MiB count as one) enters the EWMA. A transfer that moved nothing adds no sample."""
        moved: list[int] = []
        with self._lock:
            self._of(holder).inflight += 1
        started = time.monotonic()
        try:
            yield moved
        finally:
            elapsed = time.monotonic() - started
            nbytes = sum(moved)
            with self._lock:
                load = self._of(holder)
                load.inflight -= 1
                if nbytes:
                    sample = elapsed / max(1.0, nbytes / MIB)
                    load.s_per_mib = sample if load.s_per_mib is None else (1 - EWMA_WEIGHT) * load.s_per_mib + EWMA_WEIGHT * sample

    def choose(self, holders: Sequence[HolderId]) -> HolderId:
        """One of holders (in the directory's order, least loaded first): the first, or a random other where this
        node's own numbers say it is better."""
        first = holders[0]
        if len(holders) == 1:
            return first
        other = holders[1 + self.rng.randrange(len(holders) - 1)]
        with self._lock:
            a, b = self._of(first), self._of(other)
            if b.inflight != a.inflight:
                return other if b.inflight < a.inflight else first
            if a.s_per_mib is not None and b.s_per_mib is not None and 2 * b.s_per_mib < a.s_per_mib:
                return other
        return first

    def forget(self, live: frozenset[HolderId]) -> None:
        with self._lock:
            self._peers = {h: load for h, load in self._peers.items() if h in live or load.inflight}
