"""The holder side of the directory: this node's stored and removed blocks, announced to each key's homes.

Owns turning index changes into batched, sequence-numbered announces (one queue per home, the
latest event per key winning), re-homing keys when the view changes, resyncing a home that asks
(or that is new, or restarted), and telling a commit when its announce has been acknowledged. It
refuses the wire (peers.py) and what a home does with a batch (directory.py).

One thread does all of it, so the per-home queues and sequence numbers need no lock; the store's
index only appends (skey, block) to a deque under the store lock, which costs a commit almost
nothing. Events are statements of a key's state at the time ("stored, with this checksum" /
"removed"), so re-applying one is harmless, and a resync that snapshots the index *after* the
events it supersedes were drained is exact: later events follow it in order.
"""
from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, deque
from typing import Callable, Protocol

from kvwire.errors import KVStoreError
from kvstore.counters import Event
from kvstore.cluster.directory import BlockRef, DirectoryShard, Rendezvous
from kvstore.cluster.peers import Peers
from kvstore.cluster.view import ClusterView, MemberState

log = logging.getLogger(__name__)

TICK_S = 0.05  # the thread's pace when nothing wakes it (a commit's flush does)
BATCH_MAX = 4096  # events per announce; a longer queue goes in several numbered batches


class Block(Protocol):
    skey: bytes
    fingerprint_id: bytes
    size: int
    checksum: int


def ref_of(block: Block) -> BlockRef:
    return BlockRef(block.skey, block.fingerprint_id, block.size, block.checksum)


def active_ring(view: ClusterView) -> Rendezvous:
    """Homes are chosen among active members only: a draining node is leaving and will not answer for long."""
    return Rendezvous(name for name, m in view.members.items() if m.state == MemberState.ACTIVE)


class Announcer:
    def __init__(self, me: str, shard: DirectoryShard, peers: Peers, identity: Callable[[], tuple[int, ClusterView]],
                 snapshot: Callable[[], list[BlockRef]], counters: Counter, timeout_s: float = 1.0, drop_removed: bool = False) -> None:
        """identity(): this node's incarnation (0: fenced or not joined) and view; snapshot(): every block it holds.
        drop_removed: a fault for tests only (stale directory entries): removals are never announced."""
        self.me = me
        self.shard = shard
        self.peers = peers
        self.identity = identity
        self.snapshot = snapshot
        self.counters = counters
        self.timeout_s = timeout_s
        self.drop_removed = drop_removed
        self._events: deque[tuple[int, bytes, Block | None]] = deque()
        self._recorded = 0  # events appended so far (written under the store lock only)
        self._delivered = 0  # events every home they concern has acknowledged or been given up on
        self._done = threading.Condition()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # The holder state below belongs to the announcer thread alone.
        self._incarnation = 0  # the incarnation the sequences below are for
        self._view_revision = -1
        self._ring = Rendezvous(())
        self._homes: dict[str, int] = {}  # home -> its incarnation the sequence numbers are for
        self._queues: dict[str, dict[bytes, BlockRef | None]] = {}  # home -> skey -> stored ref, or None: removed
        self._next: dict[str, int] = {}  # home -> the next batch's sequence number
        self._resync: set[str] = set()  # homes owed a full resync
        self._thread = threading.Thread(target=self._run, name="kvstore-announcer", daemon=True)

    # ---- called from elsewhere ---------------------------------------------------------------

    def record(self, skey: bytes, block: Block | None) -> None:
        """The index's listener: a block was added (block) or removed (None). Store lock held: appends only."""
        self._recorded += 1
        self._events.append((self._recorded, skey, block))

    def flush(self, timeout_s: float) -> bool:
        """Wait until every change recorded so far has been acknowledged by its homes (or given up on); False at timeout."""
        target = self._recorded
        if self._delivered >= target:
            return True
        self._wake.set()
        with self._done:
            return self._done.wait_for(lambda: self._delivered >= target or self._stop.is_set(), timeout_s)

    def start(self) -> "Announcer":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        with self._done:
            self._done.notify_all()

    @property
    def queued(self) -> int:
        """Changes not yet acknowledged by their homes (read from another thread: a torn read is retried)."""
        for _ in range(5):
            try:
                return len(self._events) + sum(map(len, list(self._queues.values())))
            except RuntimeError:
                continue
        return len(self._events)

    # ---- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(TICK_S)
            self._wake.clear()
            try:
                self._pass()
            except Exception:
                log.exception("announce pass failed; retrying")

    def _pass(self) -> None:
        incarnation, view = self.identity()
        if incarnation == 0:  # fenced or not joined: nothing goes out; the next join resyncs every home
            self._delivered_upto(self._drain_discarding())
            self._incarnation, self._view_revision = 0, -1
            return
        if incarnation != self._incarnation or view.revision != self._view_revision:
            self._rehome(incarnation, view)
        last = self._drain()
        # Batches first: they are what a commit waits for. A home owed a resync gets no batch (its resync, taken
        # after this drain, covers the keys), and while the view settles readers ask both homes of a key anyway;
        # so a slow resync to a home that just joined does not hold every commit back.
        self._send_batches(incarnation)
        self._delivered_upto(last)
        if self._resync:
            self._send_resyncs(incarnation)

    def _delivered_upto(self, last: int | None) -> None:
        if last is None:
            return
        with self._done:
            self._delivered = last
            self._done.notify_all()

    def _drain_discarding(self) -> int | None:
        last = None
        while self._events:
            last = self._events.popleft()[0]
        return last

    def _drain(self) -> int | None:
        """Move recorded events into the per-home queues; the last event number moved."""
        batch, last = [], None
        while self._events:
            last, skey, block = self._events.popleft()
            batch.append((skey, block))
        if not batch or not len(self._ring):
            return last
        homes = self._ring.homes([skey for skey, _ in batch])
        names = self._ring.names
        for (skey, block), row in zip(batch, homes.tolist()):
            if block is None and self.drop_removed:
                continue
            ref = ref_of(block) if block is not None else None
            for h in row:
                name = names[h]
                if name not in self._resync:  # its resync, taken after this drain, covers the key
                    self._queues.setdefault(name, {})[skey] = ref
        return last

    def _rehome(self, incarnation: int, view: ClusterView) -> None:
        """The view changed: homes that are new (or restarted) get a resync; keys whose homes moved to an
        existing member are queued to it; departed homes are forgotten."""
        ring = active_ring(view)
        active = {name: view.members[name].incarnation for name in ring.names}
        if incarnation != self._incarnation:  # (re)joined: a new holder incarnation starts from nothing everywhere
            self._queues.clear()
            self._next.clear()
            self._resync = set(active)
        else:
            for name in list(self._homes):
                if active.get(name) != self._homes[name]:
                    self._queues.pop(name, None)
                    self._next.pop(name, None)
                    self._resync.discard(name)
            self._resync |= {name for name, inc in active.items() if self._homes.get(name) != inc}
            if ring.names != self._ring.names and len(self._ring):
                self._queue_moved(self._ring, ring)
        self._homes, self._ring = active, ring
        self._incarnation, self._view_revision = incarnation, view.revision

    def _queue_moved(self, old: Rendezvous, new: Rendezvous) -> None:
        refs = self.snapshot()
        if not refs:
            return
        skeys = [r.skey for r in refs]
        before = [{old.names[h] for h in row} for row in old.homes(skeys).tolist()]
        moved = 0
        for ref, was, row in zip(refs, before, new.homes(skeys).tolist()):
            for h in row:
                name = new.names[h]
                if name not in was and name not in self._resync:
                    self._queues.setdefault(name, {})[ref.skey] = ref
                    moved += 1
        self.counters[Event.DIRECTORY_REHOMED] += moved

    def _send_resyncs(self, incarnation: int) -> None:
        refs = self.snapshot()
        skeys = [r.skey for r in refs]
        for name in sorted(self._resync):
            if name not in self._homes:
                self._resync.discard(name)
                continue
            homed = self._ring.is_home(name, skeys) if refs else []
            blocks = [ref for ref, mine in zip(refs, homed) if mine]
            try:
                if name == self.me:
                    self.shard.resync((self.me, incarnation), 1, blocks)
                else:
                    self.peers.resync(name, 1, blocks, max(self.timeout_s, len(blocks) / 20_000))
            except KVStoreError as err:
                log.debug("resync to %s failed (retried): %s", name, err)
                continue
            self._resync.discard(name)
            self._queues.pop(name, None)
            self._next[name] = 1
            self.counters[Event.DIRECTORY_RESYNCS_SENT] += 1

    def _send_batches(self, incarnation: int) -> None:
        batches: dict[str, tuple[int, list[BlockRef], list[bytes]]] = {}
        sent: dict[str, list[bytes]] = {}
        for name, queue in self._queues.items():
            if not queue or name in self._resync:
                continue
            items = list(itertools.islice(queue.items(), BATCH_MAX))
            sent[name] = [skey for skey, _ in items]
            batches[name] = (self._next.get(name, 1), [ref for _, ref in items if ref is not None],
                             [skey for skey, ref in items if ref is None])
        if not batches:
            return
        results = {}
        local = batches.pop(self.me, None)
        if local is not None:
            results[self.me] = self.shard.announce((self.me, incarnation), *local)
        if batches:
            results.update(self.peers.announce_many(batches, self.timeout_s))
        more = False
        for name, result in results.items():
            if isinstance(result, KVStoreError):
                self.counters[Event.DIRECTORY_ANNOUNCE_FAILURES] += 1
                log.debug("announce to %s failed (kept for the next pass): %s", name, result)
                continue
            if result.applied:
                queue = self._queues[name]
                for skey in sent[name]:
                    queue.pop(skey, None)
                self._next[name] = result.expected_sequence
                self.counters[Event.DIRECTORY_BATCHES_SENT] += 1
                more = more or bool(queue)
            else:  # a gap, or the home does not know this incarnation: it wants everything again
                self._resync.add(name)
                self._queues.pop(name, None)
        if more:
            self._wake.set()  # more than one batch's worth: go again at once (a failed send waits for the next tick)
