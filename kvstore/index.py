"""The block index: storage key -> BlockMeta, each block's copies by tier, and LRU order per tier.

Owns which blocks exist, which tiers hold a copy of each and how recently each was used.
It holds no bytes and takes no locks: the block table drives it under the store lock.
A storage key ("skey") is tenant tag (TENANT_TAG_BYTES) + block key (16 bytes), so two
tenants can never address each other's blocks, whatever keys they send.
"""
from __future__ import annotations

import enum
import functools
import time
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import xxhash

from kvwire.types import Tier
from kvstore.tiers.base import Copy

TENANT_TAG_BYTES = 8
ROW_TIERS = (Tier.HOST, Tier.HBM)  # the copies a flat row holds


@functools.lru_cache(maxsize=4096)
def tenant_tag(tenant: str) -> bytes:
    """Cached: every key of every request is scoped by it."""
    return xxhash.xxh3_64_digest(b"kvstore-tenant-tag\x00" + tenant.encode())


def storage_key(tenant: str, key: bytes) -> bytes:
    return tenant_tag(tenant) + key


def block_key(skey: bytes) -> bytes:
    return skey[TENANT_TAG_BYTES:]


class Origin(enum.IntEnum):
    """How a block came to be here, for eviction (eviction.keep_rank): a node's own commits are LOCAL; the others
    are copies of a peer's block (cluster mode, kvstore/cluster/replicator.py), taken for a reason."""

    LOCAL = 0  # committed here
    COPY = 1  # a read-through copy: a reader here fetched it; its holder keeps the original
    REPLICA = 2  # pushed here as the R-th copy of a commit (cluster_replicas) or a repair
    SPILL = 3  # moved here from a full peer: the only copy
    HANDOFF = 4  # moved here from a peer that left (drain --handoff): the only copy


@dataclass(eq=False, slots=True)  # identity, not value: a block deleted and put again is a new block
class BlockMeta:
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    size: int  # payload bytes
    checksum: int
    copies: dict[Tier, Copy] = field(default_factory=dict)  # a Slot in a memory tier, a Record in a record tier
    pins: int = 0  # reads in progress plus read pins holding it
    deleted: bool = False
    last_access: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)
    origin: Origin = Origin.LOCAL
    elsewhere: bool = False  # another node is known to hold it too (a replica was pushed): evicted before sole copies

    @property
    def key(self) -> bytes:
        return self.skey[TENANT_TAG_BYTES:]

    @property
    def tier(self) -> Tier:
        """The fastest tier holding a copy (lower numbers are faster: HBM, HOST, SSD, REMOTE)."""
        return min(self.copies, default=Tier.UNSPECIFIED)


class FlatRows(Protocol):
    """kvstore._native.FlatIndex: what a prefix Pin reads of each block (fingerprint, size, checksum, host and HBM
    offsets), in flat rows beside the dict, for its compiled walk (csrc/kvstore_native/flat_index.c). An offset or
    size of -1: no copy on that tier. It also takes the blocks it holds, their copies dicts and their Slot and Record
    copies out of the cycle collector's sight (their fields are leaves): a full collection walked them all, ~350 ms a
    million blocks, stalling every request."""

    def put(self, skey: bytes, meta: "BlockMeta", fingerprint_id: bytes, size: int, checksum: int, host_offset: int,
            host_size: int, hbm_offset: int) -> None: ...

    def update(self, skey: bytes, meta: "BlockMeta", fingerprint_id: bytes, size: int, checksum: int, host_offset: int,
               host_size: int, hbm_offset: int) -> None: ...

    def drop(self, skey: bytes, meta: "BlockMeta") -> None: ...

    def __len__(self) -> int: ...


def row_fields(meta: "BlockMeta") -> tuple:
    """The flat row of meta, as FlatRows.put takes it."""
    host, hbm = meta.copies.get(Tier.HOST), meta.copies.get(Tier.HBM)
    return (meta.skey, meta, meta.fingerprint_id, meta.size, meta.checksum,
            -1 if host is None else getattr(host, "offset", None), -1 if host is None else getattr(host, "size_bytes", None),
            -1 if hbm is None else getattr(hbm, "offset", None))


MAX_PENDING_TOUCH_BLOCKS = 1 << 16  # queued touches applied at once past this many blocks (touch_later)


class _Blocks(dict):
    """Storage key -> BlockMeta: a dict, of a subclass only because the collector never untracks one. An exact dict is
    untracked while it holds no container (empty, at start), and its first block tracks it again in the youngest
    generation, past the server's freeze at start; this one stays tracked, so the freeze takes it."""

    __slots__ = ()


class BlockIndex:
    def __init__(self, flat: FlatRows | None = None) -> None:
        self._blocks: dict[bytes, BlockMeta] = _Blocks()
        # The prefix Pin's rows, kept in step with _blocks and each block's HOST and HBM copies (add, remove, attach,
        # detach: the only ways they change while a block is indexed); None where the compiled walk is not built.
        self.flat = flat
        self.get = self._blocks.get  # the dict's own: requests look up every key they name, without a Python frame each
        # tier -> storage keys of the blocks with a copy there, least recently used first
        self.lru: defaultdict[Tier, OrderedDict[bytes, None]] = defaultdict(OrderedDict)
        # The dict and the orders hold every block, so they must exist, tracked, when the server moves what is alive
        # at start out of the cycle collector's sight (server.settle_heap's gc.freeze): one tracked later, in the young
        # generations, was walked whole by every full collection (~150 ms a million blocks) once the flat rows had
        # taken the blocks themselves out of the collector's sight (_Blocks says why the dict is a subclass).
        for tier in (Tier.HBM, Tier.HOST, Tier.SSD):
            self.lru[tier]
        # Told of every block that enters (its meta) or leaves (None) the index, under the store lock, so it must
        # only take note: cluster mode announces them to the directory (kvstore/cluster/announcer.py).
        self.listener: Callable[[bytes, BlockMeta | None], None] | None = None
        self.bytes = 0  # payload bytes of the blocks here, each counted once whatever its tiers (cluster mode's fullness)
        # Touches queued by touch_later, applied in order by flush_touches before anything reads the LRU orders
        # (in_lru_order) or a block's last_access; toucher: touch's compiled twin, set by the block table where built.
        self._pending_touches: list[tuple[list[BlockMeta], float]] = []
        self.pending_touch_blocks = 0
        self.toucher: Callable[[list[BlockMeta], defaultdict, float], object] | None = None

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[BlockMeta]:
        return iter(list(self._blocks.values()))

    @property
    def blocks(self) -> dict[bytes, BlockMeta]:
        """Storage key -> block, for the block table's compiled prefix walk (kvstore._native) to read; change it through add and remove."""
        return self._blocks

    def holds(self, meta: BlockMeta) -> bool:
        return self._blocks.get(meta.skey) is meta

    def add(self, meta: BlockMeta) -> None:
        self.flush_touches()  # reads answered before this block came are older than it in the LRU orders
        old = self._blocks.get(meta.skey)
        self.bytes += meta.size - (old.size if old is not None else 0)
        self._blocks[meta.skey] = meta
        if self.flat is not None:
            self.flat.put(*row_fields(meta))
        for tier in meta.copies:
            self.lru[tier][meta.skey] = None
        if self.listener is not None:
            self.listener(meta.skey, meta)

    def remove(self, meta: BlockMeta) -> None:
        if self._blocks.get(meta.skey) is meta:
            del self._blocks[meta.skey]
            if self.flat is not None:
                self.flat.drop(meta.skey, meta)
            self.bytes -= meta.size
            for tier in meta.copies:
                self.lru[tier].pop(meta.skey, None)
            if self.listener is not None:
                self.listener(meta.skey, None)

    def touch(self, metas: list[BlockMeta], now: float | None = None) -> None:
        """Stamp each block read at now and move it to the end of each of its tiers' LRU order, in order. A block no
        longer in a tier's order (it left the index after a deferred touch was queued) is not moved there."""
        if now is None:
            self.flush_touches()
        now, lru = time.monotonic() if now is None else now, self.lru
        for meta in metas:
            meta.last_access = now
            for tier in meta.copies:
                try:
                    lru[tier].move_to_end(meta.skey)
                except KeyError:
                    pass

    def touch_later(self, metas: list[BlockMeta], now: float) -> None:
        """touch(metas, now), applied by the next flush_touches: a prefix Pin answers before its 512 LRU moves
        (Caffeine's read buffer, replayed under the lock). The blocks are pinned meanwhile, so nothing that reads
        the order could take them anyway. Whatever reads the orders, and whatever adds to them (a block added, a
        copy attached, another touch), applies the queue first, so the orders come out as if each touch had been
        made when its read was answered."""
        self._pending_touches.append((metas, now))
        self.pending_touch_blocks += len(metas)
        if self.pending_touch_blocks > MAX_PENDING_TOUCH_BLOCKS:  # no door settled them: bounded all the same
            self.flush_touches()

    def flush_touches(self) -> None:
        """Apply the queued touches, oldest first (store lock held)."""
        if not self._pending_touches:
            return
        pending, self._pending_touches, self.pending_touch_blocks = self._pending_touches, [], 0
        for metas, now in pending:
            if self.toucher is None or self.toucher(metas, self.lru, now) is NotImplemented:
                self.touch(metas, now)

    def attach(self, meta: BlockMeta, tier: Tier, copy: Copy) -> None:
        self.flush_touches()
        meta.copies[tier] = copy
        if self.holds(meta):
            self.lru[tier][meta.skey] = None
            if self.flat is not None:  # any tier: the row's copies, and the new copy out of the collector's sight
                self.flat.update(*row_fields(meta))

    def detach(self, meta: BlockMeta, tier: Tier) -> Copy:
        copy = meta.copies.pop(tier)
        if self.holds(meta):
            self.lru[tier].pop(meta.skey, None)
            if self.flat is not None and tier in ROW_TIERS:
                self.flat.update(*row_fields(meta))
        return copy

    def in_lru_order(self, tier: Tier) -> Iterator[BlockMeta]:
        """Blocks with a copy in tier, least recently used first. Do not change the index while iterating."""
        self.flush_touches()
        blocks = self._blocks
        return (blocks[skey] for skey in self.lru[tier])

    def blocks_in(self, tier: Tier) -> int:
        return len(self.lru[tier])
