"""The copy primitive: node X asks node Y to take copies of some blocks from holder H (usually X itself).

Everything that puts a block on another node goes through here: replica pushes of fresh commits
(replicas.py), repair after a holder left, capacity spill (spill.py), drain handoff, and pushes of hot
blocks. One PeerService call, `Replicate`, carries it:

- sent to the **target** Y, naming the source H and each block's tenant, size and checksum: Y fetches
  them from H through its ordinary remote-tier read path (RemoteTier.copy_from: UCX into reserved pool
  slots, every block checked before it is visible, stored through Store.adopt), marks them with the
  request's origin (how its eviction treats them), waits until its directory homes know it holds them,
  and answers how many it now holds;
- sent to the **source** H with `target` set to another node: H looks its blocks up (only a holder knows
  a block's tenant; the directory does not keep it) and sends the first kind of call itself. A directory
  home repairing a key uses this: it knows who holds the key, not what the key is.

The sender side paces itself: copies asked for in the background (repair, spill, requested copies) pass
a token bucket of cluster_copy_rate_mb_s per node, so a node loss cannot start a copy storm, and at most
MAX_INFLIGHT calls are out at once. Replica pushes of new commits are bounded by their queue instead
(replicas.py): capping them below the write rate would only grow the lag without bound.

API for other parts of the cluster code (node.py exposes it as ClusterNode.request_copies):
    Replicator.request_copies(target, skeys, source=None, origin=Origin.REPLICA, capped=True) -> int
returns how many of skeys the target holds afterwards; it never raises for a peer's failure (0 then).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from kvwire.errors import InvalidRequestError, KVStoreError
from kvstore.cluster.directory import HolderId
from kvstore.cluster.view import ClusterView
from kvstore.counters import Event
from kvstore.index import TENANT_TAG_BYTES, Origin, block_key, tenant_tag

if TYPE_CHECKING:
    from kvstore.cluster.remote_tier import RemoteTier
    from kvstore.store import Store

log = logging.getLogger(__name__)

GROUP_MAX_BYTES = 16 << 20  # one Replicate call copies at most this much: the rate cap and deadlines stay smooth
GROUP_MAX_KEYS = 4096
MAX_INFLIGHT = 2  # Replicate calls this node has out at once (sent) or serves at once (taken)
# A copy's deadline: this floor plus its bytes at this pace (a slow peer ends a copy, not the caller's thread).
COPY_DEADLINE_FLOOR_S = 2.0
COPY_DEADLINE_RATE = 16 << 20
ANNOUNCE_WAIT_S = 1.0  # the target answers once its homes know it holds the copies, or after this

ORIGIN_NAMES = {Origin.COPY: "copy", Origin.REPLICA: "replica", Origin.SPILL: "spill", Origin.HANDOFF: "handoff"}
ORIGINS = {name: origin for origin, name in ORIGIN_NAMES.items()}


@dataclass(frozen=True)
class CopyGroup:
    """Blocks of one tenant and fingerprint, in chain order: one run the target fetches from one holder."""

    tenant: str
    fingerprint_id: bytes
    skeys: tuple[bytes, ...]
    sizes: tuple[int, ...]
    checksums: tuple[int, ...]

    @property
    def bytes(self) -> int:
        return sum(self.sizes)


def group_blocks(rows: Sequence[tuple[bytes, str, bytes, int, int]], max_bytes: int = GROUP_MAX_BYTES) -> list[CopyGroup]:
    """(skey, tenant, fingerprint id, size, checksum) rows as copy groups: by tenant and fingerprint, in the order
    first met, each split into runs of at most max_bytes (and GROUP_MAX_KEYS keys)."""
    by: dict[tuple[str, bytes], list[tuple[bytes, int, int]]] = {}
    for skey, tenant, fingerprint_id, size, crc in rows:
        by.setdefault((tenant, fingerprint_id), []).append((skey, size, crc))
    out = []
    for (tenant, fingerprint_id), blocks in by.items():
        start, total = 0, 0
        for i, (_, size, _) in enumerate(blocks):
            if i > start and (total + size > max_bytes or i - start >= GROUP_MAX_KEYS):
                out.append(_group(tenant, fingerprint_id, blocks[start:i]))
                start, total = i, 0
            total += size
        if start < len(blocks):
            out.append(_group(tenant, fingerprint_id, blocks[start:]))
    return out


def _group(tenant: str, fingerprint_id: bytes, blocks: list[tuple[bytes, int, int]]) -> CopyGroup:
    skeys, sizes, crcs = zip(*blocks)
    return CopyGroup(tenant, fingerprint_id, skeys, sizes, crcs)


def _origin(name: str) -> Origin:
    origin = ORIGINS.get(name or "replica")
    if origin is None:
        raise InvalidRequestError(f"unknown copy origin {name!r} (replica, spill, handoff or copy)")
    return origin


class RateCap:
    """A token bucket of bytes: take(n) waits until n bytes may go (a burst of at most burst_bytes). A request
    larger than the burst goes once the bucket is full and leaves it in debt, so any size passes, at the rate."""

    def __init__(self, rate_bytes_s: float, burst_bytes: int = GROUP_MAX_BYTES, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = float(rate_bytes_s)
        self.burst = float(max(1, burst_bytes))
        self.clock, self.sleep = clock, sleep
        self._tokens = self.burst
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> float:
        """Wait for nbytes of allowance; the seconds waited."""
        need = min(float(nbytes), self.burst)
        with self._lock:  # callers queue here in turn: the first waits, the next sees the debt it left
            now = self.clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            wait = max(0.0, (need - self._tokens) / self.rate)
            if wait:
                self.sleep(wait)
                now = self.clock()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
            self._tokens -= nbytes
            return wait


class Replicator:
    def __init__(self, me: str, store: "Store", peers, remote: "RemoteTier", identity: Callable[[], tuple[int, ClusterView]],
                 settle: Callable[[float], bool], counters: Counter, rate_bytes_s: float) -> None:
        """peers: peers.Peers; settle(timeout_s): wait until this node's directory homes know what it holds (the
        announcer's flush)."""
        self.me = me
        self.store = store
        self.peers = peers
        self.remote = remote
        self.identity = identity
        self.settle = settle
        self.counters = counters
        # Groups sent under the cap are about 1/16 s of it (4 MB at 64 MB/s): the cap holds over short windows too, and
        # a holder's pins for one group (a peer's read pins like a client's, against the tenant's held quota) stay small.
        self.capped_group_bytes = int(min(GROUP_MAX_BYTES, max(1 << 20, rate_bytes_s / 16)))
        self.rate = RateCap(rate_bytes_s, self.capped_group_bytes)
        self._sending = threading.BoundedSemaphore(MAX_INFLIGHT)
        self._taking = threading.BoundedSemaphore(MAX_INFLIGHT)

    # ---- the sender ------------------------------------------------------------------------

    def groups_of(self, skeys: Sequence[bytes], capped: bool = True) -> list[CopyGroup]:
        """This node's blocks among skeys as copy groups (absent ones left out)."""
        described = self.store.describe(skeys)
        return group_blocks([(skey, *d) for skey, d in zip(skeys, described) if d is not None],
                            self.capped_group_bytes if capped else GROUP_MAX_BYTES)

    def request_copies(self, target: str, skeys: Sequence[bytes], source: str | None = None, origin: Origin = Origin.REPLICA,
                       capped: bool = True) -> int:
        """Have `target` take copies of these blocks from `source` (default: this node); how many of them the target
        holds afterwards (0 when a call failed: counted, logged at debug). With source another node, that node is
        asked to do it (it alone knows the blocks' tenants), and its own rate cap applies."""
        if not skeys or target == (source or self.me):
            return 0
        if source not in (None, self.me):
            timeout = COPY_DEADLINE_FLOOR_S + len(skeys) * (1 << 20) / COPY_DEADLINE_RATE  # sizes unknown here: ~1 MiB a block
            try:
                return sum(self.peers.copy_via(source, target, ORIGIN_NAMES[origin], list(skeys), timeout))
            except KVStoreError as err:
                self.counters[Event.CLUSTER_COPY_FAILURES] += 1
                log.debug("asking %s to copy %d blocks to %s failed: %s", source, len(skeys), target, err)
                return 0
        return sum(self.send(target, self.groups_of(skeys, capped), origin, capped))

    def send(self, target: str, groups: Sequence[CopyGroup], origin: Origin, capped: bool = True) -> list[int]:
        """Ask target to take each group from this node, one call a group (at most MAX_INFLIGHT out at once, paced by
        the rate cap when capped); per group, how many of its leading keys the target holds now."""
        held = []
        for group in groups:
            if capped:
                self.rate.take(group.bytes)
            held.append(self._send_one(target, group, origin))
        return held

    def _send_one(self, target: str, group: CopyGroup, origin: Origin) -> int:
        incarnation, _ = self.identity()
        with self._sending:
            try:
                answer, taken, taken_bytes = self.peers.copy_to(target, self.me, incarnation, ORIGIN_NAMES[origin], [group],
                                                   COPY_DEADLINE_FLOOR_S + group.bytes / COPY_DEADLINE_RATE)
            except KVStoreError as err:
                self.counters[Event.CLUSTER_COPY_FAILURES] += 1
                log.debug("copy of %d blocks to %s failed: %s", len(group.skeys), target, err)
                return 0
        held = min(answer[0] if answer else 0, len(group.skeys))
        self.counters[Event.CLUSTER_COPIES_SENT] += taken
        self.counters[Event.CLUSTER_COPY_BYTES_SENT] += taken_bytes
        if held and origin == Origin.REPLICA:  # this node's copy is no longer the only one: it is evicted before sole copies
            self.store.mark_copies(group.skeys[:held], elsewhere=True)
        return held

    # ---- the receiver (PeerService.Replicate) -----------------------------------------------------

    def forward(self, target: str, skeys: Sequence[bytes], origin_name: str) -> list[int]:
        """A peer's Replicate naming this node as the source: have target take these blocks from here (rate capped)."""
        return self.send(target, self.groups_of(skeys), _origin(origin_name))

    def take(self, source: str, source_incarnation: int, origin_name: str, groups: Sequence[CopyGroup]) -> tuple[list[int], int, int]:
        """A peer's Replicate naming this node as the target: copy each group in from source; (per group, its leading
        keys held here now; blocks copied in; their bytes). Answered once this node's homes know it holds them."""
        origin = _origin(origin_name)
        if source == self.me:
            raise InvalidRequestError("a node cannot take copies from itself")
        _, view = self.identity()
        holder = (source, source_incarnation or view.incarnation_of(source))
        held, taken, taken_bytes = [], 0, 0
        with self._taking:
            for group in groups:
                got, new, new_bytes = self._take(holder, group, origin)
                held.append(got)
                taken += new
                taken_bytes += new_bytes
            if taken:
                self.settle(ANNOUNCE_WAIT_S)
        return held, taken, taken_bytes

    def _take(self, holder: HolderId, group: CopyGroup, origin: Origin) -> tuple[int, int, int]:
        """(leading keys of the group held here now, blocks copied in by this call, their bytes)."""
        skeys = list(group.skeys)
        if not (len(skeys) == len(group.sizes) == len(group.checksums)):
            raise InvalidRequestError("a copy group needs a size and a checksum for every key")
        tag = tenant_tag(group.tenant)
        if any(len(skey) != TENANT_TAG_BYTES + 16 or skey[:TENANT_TAG_BYTES] != tag for skey in skeys):
            raise InvalidRequestError("a copy group's storage keys must belong to the tenant it names")
        present = self.store.describe(skeys)
        missing = [i for i, d in enumerate(present) if d is None]
        taken = taken_bytes = 0
        if missing:
            deadline = time.monotonic() + COPY_DEADLINE_FLOOR_S + sum(group.sizes[i] for i in missing) / COPY_DEADLINE_RATE
            taken = self.remote.copy_from(holder, group.tenant, group.fingerprint_id, [block_key(skeys[i]) for i in missing],
                                          [group.sizes[i] for i in missing], [group.checksums[i] for i in missing], deadline)
            self.counters[Event.CLUSTER_COPIES_TAKEN] += taken
            taken_bytes = sum(group.sizes[i] for i in missing[:taken])
            self.counters[Event.CLUSTER_COPY_BYTES_TAKEN] += taken_bytes
            present = self.store.describe(skeys)
        held = 0
        for d in present:
            if d is None or d[1] != group.fingerprint_id:
                break
            held += 1
        self.store.mark_copies(skeys[:held], origin=origin)
        return held, taken, taken_bytes
