"""A holder's cap on concurrent transfers to peers (peer_max_inflight), and the count of what it served them.

Owns admission of one peer transfer (a gRPC Fetch stream, or one keyed get on a peer's UCX session) and the
served-bytes counters both data paths share. Past the cap a transfer is refused at once with PeerBusyError
(RESOURCE_EXHAUSTED): the reader moves to another holder (remote_tier.py) and no breaker counts it, since a
busy holder is a healthy one. Why a cap: a hot prefix's first holder would otherwise stream to every reader
at once, each slower for the others, while other holders of the same blocks sit idle (design/cluster.md §3.10).
It refuses choosing holders (remote_tier.py, holder_choice.py).
"""
from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

from kvwire.errors import PeerBusyError
from kvstore.counters import Event

Served = Callable[[int, int], None]  # (blocks, payload bytes) sent to the peer


class PeerTransfers:
    def __init__(self, me: str, limit: int, counters: Counter, count_served: Callable[[str, int], None]) -> None:
        """count_served(peer, bytes): the per-peer tally `kvstore-admin cluster` shows (Peers.count_served)."""
        self.me = me
        self.limit = limit
        self.counters = counters
        self.count_served = count_served
        self.inflight = 0
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, peer: str) -> Iterator[Served]:
        """Hold one of the cap's slots for a transfer to peer; yields what to call with what was sent."""
        with self._lock:
            if self.inflight >= self.limit:
                self.counters[Event.PEER_REJECTED_BUSY] += 1
                raise PeerBusyError(f"node {self.me} is sending {self.inflight} transfers to peers (peer_max_inflight); ask another holder")
            self.inflight += 1

        def served(blocks: int, nbytes: int) -> None:
            self.counters[Event.PEER_SERVED_BLOCKS] += blocks
            self.counters[Event.PEER_SERVED_BYTES] += nbytes
            self.count_served(peer, nbytes)

        try:
            yield served
        finally:
            with self._lock:
                self.inflight -= 1
