"""Eviction policy: which copies leave a tier, and when. One policy for every path that evicts.

Owns victim selection only: the watermarks, least-recently-used order, skipping pinned
blocks, and, when a memory tier's size class needs a slot, preferring the victims that
free one (a slab that empties). It is pure: it reads the blocks it is shown and returns
lists, never changes the table, never touches a tier's bytes. Placement (placement.py)
carries the choices out, for the background worker, the synchronous room-making of
Reserve and promotion, durable commits and the operator's evict.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

from kvstore.index import BlockMeta, Origin
from kvstore.tiers.base import SlotMap


def keep_rank(meta: BlockMeta) -> int:
    """How much losing this node's copy would cost (cluster mode): 0 a read-through copy (its holder keeps the
    original), 1 a block another node holds too (a replica, or one whose replica was pushed), 2 a sole copy."""
    if meta.origin == Origin.COPY:
        return 0
    if meta.elsewhere or meta.origin == Origin.REPLICA:
        return 1
    return 2


RANK_WINDOW = 4096  # blocks at the cold end reordered by rank; past them, plain LRU order


def ranked(lru: Iterable[BlockMeta], window: int = RANK_WINDOW) -> Iterator[BlockMeta]:
    """lru reordered for eviction in cluster mode: read-through copies first, then blocks held elsewhere too, then
    sole copies, each in least recently used order (design/cluster.md §3.10), over the `window` least recently used
    blocks; the rest follow in LRU order. The window bounds the walk under the store lock (a whole LRU order of 100k
    blocks would be tens of milliseconds per room-making) while the cold end, where victims come from, is ranked."""
    later: tuple[list[BlockMeta], list[BlockMeta]] = ([], [])
    rest = iter(lru)
    for meta in itertools.islice(rest, window):
        rank = keep_rank(meta)
        if rank == 0:
            yield meta
        else:
            later[rank - 1].append(meta)
    yield from later[0]
    yield from later[1]
    yield from rest


@dataclass(frozen=True)
class Victims:
    blocks: list[BlockMeta]  # least recently used first
    skipped_pinned: int = 0
    reached: bool = True  # whether evicting them gets the tier to its target


@dataclass(frozen=True)
class Room:
    """Which of some new copies a tier can take, in order, and the victims that make their room."""

    fits: list[bool]
    victims: list[BlockMeta]


@dataclass(frozen=True)
class EvictReport:
    evicted: int = 0  # blocks gone from the store
    demoted: int = 0  # copies dropped from one tier; the block stays readable from another
    bytes: int = 0
    skipped_pinned: int = 0


class EvictionPolicy:
    def __init__(self, high_watermark: float, low_watermark: float) -> None:
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        # Cluster mode: victims in keep_rank order (copies, then blocks held elsewhere, then sole copies). Off alone:
        # every block is a sole copy there, and the ranked walk reads the whole LRU order instead of its cold end.
        self.by_rank = False

    def order(self, lru: Iterable[BlockMeta]) -> Iterable[BlockMeta]:
        """The order victims are taken from: LRU, or ranked() in cluster mode."""
        return ranked(lru) if self.by_rank else lru

    def demotion_target(self, used_bytes: int, capacity_bytes: int) -> int | None:
        """Above the high watermark, the bytes to demote down to (the low one); None below it.
        Two marks, so the background worker moves blocks in batches rather than one per put."""
        if used_bytes <= self.high_watermark * capacity_bytes:
            return None
        return int(self.low_watermark * capacity_bytes)

    @staticmethod
    def to_watermark(lru: Iterable[BlockMeta], used_bytes: int, target_bytes: int, footprint: Callable[[BlockMeta], int],
                     budget_bytes: int | None = None) -> Victims:
        """Least recently used unpinned blocks until used_bytes is down to target_bytes (or their
        footprints add up to budget_bytes: one batch of a longer walk). Pinned blocks are skipped."""
        victims, skipped, freed = [], 0, 0
        for meta in lru:
            if used_bytes - freed <= target_bytes or (budget_bytes is not None and freed >= budget_bytes):
                break
            if meta.pins:
                skipped += 1
                continue
            victims.append(meta)
            freed += footprint(meta)
        return Victims(victims, skipped, used_bytes - freed <= target_bytes)

    @staticmethod
    def room(lru: Iterable[BlockMeta], free_bytes: int, needs: Sequence[int], footprint: Callable[[BlockMeta], int]) -> Room:
        """For each new copy of needs bytes, in order, whether the tier can take it once its least
        recently used unpinned blocks make room. A copy that does not fit costs no victims, and a
        smaller one after it may still fit."""
        candidates = iter(lru)
        chosen: list[BlockMeta] = []
        room, fits = free_bytes, []
        for need in needs:
            taken = []
            while room < need:
                meta = next(candidates, None)
                if meta is None:
                    break
                if meta.pins == 0:
                    taken.append(meta)
                    room += footprint(meta)
            if room < need:  # exhausted: nothing taken here helps this copy; give it back for later ones
                candidates = iter([*taken, *candidates])
                room -= sum(footprint(m) for m in taken)
                fits.append(False)
                continue
            chosen += taken
            room -= need
            fits.append(True)
        return Room(fits, chosen)

    @staticmethod
    def for_slots(lru: Iterable[BlockMeta], slot_of: Callable[[BlockMeta], int], sizes: Sequence[int], slots: SlotMap) -> list[BlockMeta]:
        """The fewest unpinned blocks whose eviction frees a slot for each of sizes.

        The least recently used block whose slot can hold the size goes first: one eviction frees
        a usable slot. Failing that (a size class with no slab and no larger slot), a whole slab
        must empty, and the one needing the fewest evictions goes; evicting in LRU order until some
        slab happened to empty took 200 blocks to place one in a 4-slab pool (tests/kvstore/test_slots.py).
        slot_of gives a block's offset in the tier.
        """
        unseen = (m for m in lru if m.pins == 0)  # walked lazily: a fit is usually near the cold end
        seen: list[BlockMeta] = []  # evictable blocks walked so far, in LRU order
        chosen: list[BlockMeta] = []
        taken: set[BlockMeta] = set()
        for size in sizes:
            need = slots.slot_bytes(size)
            fit = next((m for m in seen if m not in taken and slots.slot_bytes_at(slot_of(m)) >= need), None)
            while fit is None and (meta := next(unseen, None)) is not None:
                seen.append(meta)
                if slots.slot_bytes_at(slot_of(meta)) >= need:
                    fit = meta
            if fit is not None:
                chosen.append(fit)
                taken.add(fit)
                continue
            by_slab: dict[int, list[BlockMeta]] = {}
            for meta in seen:  # every evictable block by now: the walk found no fit
                by_slab.setdefault(slots.slab_of(slot_of(meta)), []).append(meta)
            # A slab holding a block chosen for an earlier size is not empty afterwards: that size takes the slot.
            emptiable = [metas for slab, metas in by_slab.items()
                         if len(metas) == slots.slots_used(slab) and not any(m in taken for m in metas)]
            if emptiable:
                cheapest = min(emptiable, key=len)
                chosen += cheapest
                taken.update(cheapest)
        return chosen
