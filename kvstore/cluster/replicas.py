"""cluster_replicas = R: every local commit batch pushed to R-1 other nodes, and repair when a holder leaves.

Owns the replica policy (design/cluster.md §3.6); the copies themselves go through the copy primitive
(replicator.py). It refuses the wire and the directory's bookkeeping.

- **Push.** The store's index tells this of every block committed here (origin LOCAL; copies taken from
  peers are never pushed on), with the store's change count: a commit adds its blocks under one hold of
  the store lock, so blocks told under one value are one commit batch. A thread takes what queued and has
  R-1 nodes take each batch (in runs of one tenant and fingerprint of at most 16 MiB): the top R-1 of a
  rendezvous ranking of the active members other than this node, keyed by the batch's first key, so a
  writer's chain stays together on its replica node; up to MAX_INFLIGHT batches at once. Not rate capped
  (a cap under the write rate would grow the lag without bound); bounded instead by the queue
  (MAX_PENDING_BYTES: past it new commits are not pushed, and counted).
- **Lag**: from the commit (when the index took the block) to the replica node's answer, which it gives
  once its directory homes know it holds the copy; a histogram for /metrics, recent p50/p99 in status.
- **Repair.** When the view drops a holder, each directory home looks at the keys that lost a holder
  (DirectoryShard.losing) and, for those now below R live holders, has a live holder copy them to the
  next nodes of the key's rendezvous ranking that do not hold it, through the source's rate-capped
  sender. Only the key's first home acts (or its second, where the first is new to the key and has no
  entry yet), so one loss is repaired once.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from kvstore.cluster.announcer import active_ring
from kvstore.cluster.directory import HolderId, Rendezvous
from kvstore.cluster.replicator import MAX_INFLIGHT, Replicator, group_blocks
from kvstore.cluster.view import ClusterView
from kvstore.counters import Event
from kvstore.index import BlockMeta, Origin

log = logging.getLogger(__name__)

MAX_PENDING_BYTES = 1 << 30  # committed bytes waiting for their push; past this, new commits are not replicated
TICK_S = 0.05
LAG_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_LAGS = 4096


def replica_targets(view: ClusterView, me: str, skey: bytes, count: int, exclude: Sequence[str] = ()) -> list[str]:
    """The `count` nodes a block keyed by skey is copied to: the top of the rendezvous ranking of the active
    members other than me and those excluded (its holders already), best first."""
    names = [n for n in active_ring(view).names if n != me and n not in exclude]
    if not names or count <= 0:
        return []
    ring = Rendezvous(names)
    return [ring.names[i] for i in ring.homes([skey], count)[0].tolist()]


class LagStats:
    """Replication lags: cumulative histogram buckets for /metrics and the recent ones for quantiles."""

    def __init__(self) -> None:
        self.buckets = [0] * (len(LAG_BUCKETS_S) + 1)
        self.count = 0
        self.sum = 0.0
        self.recent: deque[float] = deque(maxlen=RECENT_LAGS)

    def add(self, lag_s: float) -> None:
        self.buckets[bisect.bisect_left(LAG_BUCKETS_S, lag_s)] += 1
        self.count += 1
        self.sum += lag_s
        self.recent.append(lag_s)

    def quantile(self, q: float) -> float:
        recent = sorted(self.recent)
        return recent[min(len(recent) - 1, int(q * len(recent)))] if recent else 0.0


class Replicas:
    def __init__(self, me: str, replicas: int, replicator: Replicator, identity: Callable[[], tuple[int, ClusterView]],
                 counters: Counter, batch_of: Callable[[], int] = lambda: 0) -> None:
        """batch_of(): the store's change count (Store.changes), read under the store lock as blocks are told."""
        self.me = me
        self.batch_of = batch_of
        self.replicas = replicas
        self.replicator = replicator
        self.identity = identity
        self.counters = counters
        self.lags = LagStats()
        self._pending: deque[tuple[float, int, BlockMeta]] = deque()  # (committed, its batch, block)
        self._pending_bytes = 0
        self._in_flight = 0
        self._counting = threading.Lock()  # _pending_bytes: added to under the store lock, taken off by the thread
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvstore-replicas", daemon=True)
        self._pushes = ThreadPoolExecutor(max_workers=MAX_INFLIGHT, thread_name_prefix="kvstore-replica-push")
        self._repairs = ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvstore-repair-copies")
        self._ring: tuple[str, ...] | None = None  # the active members of the last view repaired against

    @property
    def pending(self) -> int:
        """Blocks committed here not yet pushed (or given up on)."""
        return len(self._pending) + self._in_flight

    def start(self) -> "Replicas":
        if self.replicas > 1:
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._repairs.shutdown(wait=False, cancel_futures=True)
        self._pushes.shutdown(wait=False, cancel_futures=True)

    # ---- push -----------------------------------------------------------------------------------

    def note(self, meta: BlockMeta) -> None:
        """A block entered the index (store lock held: appends only). Local commits are queued for their push."""
        if self.replicas <= 1 or meta.origin != Origin.LOCAL:
            return
        with self._counting:
            if self._pending_bytes + meta.size > MAX_PENDING_BYTES:
                self.counters[Event.CLUSTER_REPLICA_PUSHES_DROPPED] += 1
                return
            self._pending_bytes += meta.size
        self._pending.append((time.monotonic(), self.batch_of(), meta))
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            try:
                self._push_pending()
            except Exception:
                log.exception("replica push failed")

    def _push_pending(self) -> None:
        taken: list[tuple[float, int, BlockMeta]] = []
        while self._pending:
            taken.append(self._pending.popleft())
        if not taken:
            return
        self._in_flight = len(taken)
        with self._counting:
            self._pending_bytes -= sum(m.size for _, _, m in taken)
        try:
            incarnation, view = self.identity()
            if incarnation == 0:
                return  # fenced: nobody would take them; a repair restores R once peers see this node's blocks again
            batches: list[list[tuple[float, int, BlockMeta]]] = []
            for entry in taken:
                if batches and batches[-1][0][1] == entry[1]:
                    batches[-1].append(entry)
                else:
                    batches.append([entry])
            pushes = [self._pushes.submit(self._push, view, batch) for batch in batches]
            for push in pushes:
                push.result()
        finally:
            self._in_flight = 0

    def _push(self, view: ClusterView, batch: list[tuple[float, int, BlockMeta]]) -> None:
        """One commit batch to its R-1 replica nodes (keyed by its first key), recording its lag."""
        committed = batch[0][0]
        groups = group_blocks([(m.skey, m.tenant, m.fingerprint_id, m.size, m.checksum) for _, _, m in batch if not m.deleted])
        if not groups:
            return
        for target in replica_targets(view, self.me, batch[0][2].skey, self.replicas - 1):
            held = self.replicator.send(target, groups, Origin.REPLICA, capped=False)
            if any(held):
                self.lags.add(time.monotonic() - committed)
            if sum(held) < sum(len(g.skeys) for g in groups):
                log.debug("replica push to %s: %d of %d blocks", target, sum(held), sum(len(g.skeys) for g in groups))

    # ---- repair ---------------------------------------------------------------------------------

    def repair(self, view: ClusterView, lost: list[tuple[bytes, tuple[HolderId, ...]]]) -> int:
        """After a view change: have keys this node is home for that fell below R live holders copied again, in the
        background (through the sources' rate caps). lost: DirectoryShard.losing(). How many keys were asked for."""
        old, self._ring = self._ring, active_ring(view).names
        if self.replicas <= 1 or not lost:
            return 0
        ring = Rendezvous(self._ring)
        if self.me not in ring.names:
            return 0
        skeys = [skey for skey, _ in lost]
        homes = ring.homes(skeys)
        me = ring.names.index(self.me)
        work: dict[tuple[str, str], list[bytes]] = {}
        for (skey, holders), row in zip(lost, homes.tolist()):
            first_is_new = old is not None and ring.names[row[0]] not in old
            if not (row[0] == me or (first_is_new and len(row) > 1 and row[1] == me)):
                continue
            if not holders or len(holders) >= self.replicas:
                continue  # none left to copy from (lost for good), or enough copies still
            names = [h[0] for h in holders]
            source = self.me if self.me in names else names[0]
            for target in replica_targets(view, "", skey, self.replicas - len(holders), exclude=names):
                work.setdefault((source, target), []).append(skey)
        asked = len({k for keys in work.values() for k in keys})
        self.counters[Event.CLUSTER_REPAIR_KEYS] += asked
        for (source, target), keys in work.items():
            self._repairs.submit(self._repair_copy, source, target, keys)
        if asked:
            log.info("repair: %d keys below %d copies after a view change", asked, self.replicas)
        return asked

    def _repair_copy(self, source: str, target: str, skeys: list[bytes]) -> None:
        held = self.replicator.request_copies(target, skeys, source, Origin.REPLICA, capped=True)
        log.debug("repair: %s copied %d of %d keys to %s", source, held, len(skeys), target)
