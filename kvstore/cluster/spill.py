"""Capacity spill: a node near full moves sole copies to a peer with room instead of evicting them.

Owns when to spill and where to (design/cluster.md §3.10); the copies go through the copy primitive
(replicator.py, origin spill, under the node's copy rate cap), and a block leaves here only once the
peer answered that it holds it (and its homes know).

- **Fullness** (node_room): the payload bytes of the blocks here, each counted once, against the tier
  whose overflow drops blocks for good: the ssd tier, or the host pool when there is no ssd tier. Above
  the store's high watermark of it, the least recently used sole copies (eviction.keep_rank 2) are
  spilled until it is under the low one: before the store's own eviction would have to drop them.
- **Where**: the run's first key ranks the active members other than this node (rendezvous, as replicas
  do, so a chain spilled together lands together); of the top CANDIDATES, two are drawn with probability
  by capacity and the one with the larger free fraction wins (capacity-weighted power of two choices:
  Mooncake#2430 / PR #3971 — capacity-blind choice underfills big nodes, pure emptiest-first sends
  everything to a node that just joined). A candidate must stay under its high watermark after taking
  the run. Peers' room comes from their Status (capacity_bytes, free_bytes), at most once per
  STATUS_MAX_AGE_S each, and is lowered here by what was just sent.
- Nobody with room: nothing is spilled, and the store evicts as it would alone (copies and blocks held
  elsewhere first, eviction.ranked), counting sole copies it drops (cluster_sole_copies_evicted).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from kvwire.errors import KVStoreError
from kvwire.types import Tier
from kvstore.cluster.replicas import replica_targets
from kvstore.cluster.replicator import Replicator, group_blocks
from kvstore.cluster.view import ClusterView
from kvstore.counters import Event
from kvstore.index import Origin

if TYPE_CHECKING:
    from kvstore.store import Store

log = logging.getLogger(__name__)

TICK_S = 0.1
ROUND_BYTES = 64 << 20  # spilled per look at the fullness, at most
CANDIDATES = 3
STATUS_MAX_AGE_S = 1.0
STATUS_TIMEOUT_S = 0.5


@dataclass
class PeerRoom:
    name: str
    capacity: int
    free: int
    at: float = 0.0  # monotonic time of the Status it came from


def node_room(store: "Store") -> tuple[int, int]:
    """(capacity, free bytes): the ssd tier's capacity (the host pool's without one) and what the blocks here leave of it."""
    capacity = store.ssd.capacity_bytes or store.host.capacity_bytes
    return capacity, max(0, capacity - store.index.bytes)


def choose_target(candidates: Sequence[PeerRoom], need_bytes: int, high_watermark: float, rng: random.Random) -> str | None:
    """Capacity-weighted power of two choices among the candidates that stay under high_watermark with need_bytes more:
    two distinct draws weighted by capacity, the larger free fraction wins. None when no candidate has room."""
    suitable = [c for c in candidates if c.capacity > 0 and c.capacity - c.free + need_bytes <= high_watermark * c.capacity]
    if len(suitable) <= 1:
        return suitable[0].name if suitable else None
    first = rng.choices(suitable, weights=[c.capacity for c in suitable])[0]
    rest = [c for c in suitable if c is not first]
    second = rng.choices(rest, weights=[c.capacity for c in rest])[0]
    return max((first, second), key=lambda c: c.free / c.capacity).name


class Spiller:
    def __init__(self, me: str, store: "Store", replicator: Replicator, status: Callable[[str, float], object],
                 identity: Callable[[], tuple[int, ClusterView]], counters: Counter, high_watermark: float, low_watermark: float) -> None:
        """status(name, timeout_s): a peer's ClusterStatus (peers.Peers.status)."""
        self.me = me
        self.store = store
        self.replicator = replicator
        self.status = status
        self.identity = identity
        self.counters = counters
        self.high, self.low = high_watermark, low_watermark
        self.rng = random.Random()
        self._rooms: dict[str, PeerRoom] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-spill", daemon=True)

    def start(self) -> "Spiller":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                while self.spill_once() and not self._stop.is_set():
                    pass
            except Exception:
                log.exception("spill failed")

    def spill_once(self) -> int:
        """One round: above the high watermark, spill sole copies (up to ROUND_BYTES) toward the low one. Blocks moved."""
        capacity, free = node_room(self.store)
        used = capacity - free
        if used <= self.high * capacity or not self.store.admitting:
            return 0
        incarnation, view = self.identity()
        if incarnation == 0:
            return 0
        tier = Tier.SSD if self.store.ssd.capacity_bytes else Tier.HOST
        metas = self.store.sole_copies(tier, min(ROUND_BYTES, int(used - self.low * capacity)))
        moved = 0
        for group in group_blocks([(m.skey, m.tenant, m.fingerprint_id, m.size, m.checksum) for m in metas],
                                  self.replicator.capped_group_bytes):
            rooms = [self._room(name) for name in replica_targets(view, self.me, group.skeys[0], CANDIDATES)]
            target = choose_target([r for r in rooms if r is not None], group.bytes, self.high, self.rng)
            if target is None:
                log.debug("spill: no peer has room for %d bytes", group.bytes)
                break
            held = self.replicator.send(target, [group], Origin.SPILL)[0]
            if not held:
                self._rooms.pop(target, None)
                continue
            self._rooms[target].free -= sum(group.sizes[:held])
            dropped = self.store.drop(group.skeys[:held])
            moved += dropped
            self.counters[Event.CLUSTER_SPILLED] += dropped
        if moved:
            log.info("spill: %d sole copies moved to peers", moved)
        return moved

    def _room(self, name: str) -> PeerRoom | None:
        room = self._rooms.get(name)
        now = time.monotonic()
        if room is None or now - room.at > STATUS_MAX_AGE_S:
            try:
                status = self.status(name, STATUS_TIMEOUT_S)
            except KVStoreError as err:
                log.debug("spill: status of %s: %s", name, err)
                return None
            room = self._rooms[name] = PeerRoom(name, status.capacity_bytes, status.free_bytes, now)
        return room
