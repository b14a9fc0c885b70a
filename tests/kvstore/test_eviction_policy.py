"""The one eviction policy in process: exact victim order (least recently used first, pinned skipped),
the watermarks, room in a record tier, and the slot a size class needs, with a real slab allocator."""
from __future__ import annotations

from kvwire.types import Slot, Tier
from kvstore.eviction import EvictionPolicy
from kvstore.index import BlockIndex, BlockMeta
from kvstore.tiers.slab import SlabAllocator

KIB, MIB = 1 << 10, 1 << 20


def blocks(n: int, size: int = 4 * KIB) -> list[BlockMeta]:
    return [BlockMeta(i.to_bytes(24, "big"), "t", b"f" * 16, size, 0, copies={Tier.HOST: Slot(i * size, size)}) for i in range(n)]


def index_of(metas: list[BlockMeta]) -> BlockIndex:
    index = BlockIndex()
    for meta in metas:
        index.add(meta)
    return index


def ids(metas: list[BlockMeta]) -> list[int]:
    return [int.from_bytes(m.skey, "big") for m in metas]


def size_of(meta: BlockMeta) -> int:
    return meta.size


def test_victims_go_least_recently_used_first_and_pinned_ones_stay():
    metas = blocks(10)
    index = index_of(metas)
    index.touch([metas[3], metas[0]])  # used again: now the most recent, in that order
    metas[5].pins = metas[6].pins = 1
    lru = list(index.in_lru_order(Tier.HOST))
    assert ids(lru) == [1, 2, 4, 5, 6, 7, 8, 9, 3, 0]
    victims = EvictionPolicy.to_watermark(lru, used_bytes=10 * 4 * KIB, target_bytes=3 * 4 * KIB, footprint=size_of)
    assert ids(victims.blocks) == [1, 2, 4, 7, 8, 9, 3]
    assert victims.skipped_pinned == 2 and victims.reached


def test_a_budget_ends_one_batch_and_an_unreachable_target_says_so():
    metas = blocks(6)
    metas[4].pins = metas[5].pins = 1
    batch = EvictionPolicy.to_watermark(metas, 6 * 4 * KIB, 0, size_of, budget_bytes=8 * KIB)
    assert ids(batch.blocks) == [0, 1]
    everything = EvictionPolicy.to_watermark(metas, 6 * 4 * KIB, 0, size_of)
    assert ids(everything.blocks) == [0, 1, 2, 3] and everything.skipped_pinned == 2 and not everything.reached


def test_demotion_starts_above_the_high_watermark_and_aims_for_the_low_one():
    policy = EvictionPolicy(high_watermark=0.9, low_watermark=0.7)
    assert policy.demotion_target(900, 1000) is None
    assert policy.demotion_target(901, 1000) == 700


def test_room_in_a_record_tier_costs_victims_only_for_copies_that_fit():
    metas = blocks(4, size=100)
    metas[2].pins = 1
    # 50 bytes free; unpinned victims could free 300 more. 400 never fits (and costs nothing), 120 then 200 do.
    room = EvictionPolicy.room(metas, free_bytes=50, needs=[400, 120, 200], footprint=size_of)
    assert room.fits == [False, True, True]
    assert ids(room.victims) == [0, 1, 3]
    assert EvictionPolicy.room(metas, 500, [200, 300], size_of).victims == []  # free room first


def test_a_slot_for_a_size_class_frees_the_lru_block_whose_slot_can_hold_it():
    slabs = SlabAllocator(4 * MIB, MIB)
    metas = []
    for i, size in enumerate([4 * KIB, 8 * KIB, 4 * KIB, 8 * KIB]):
        metas.append(BlockMeta(bytes([i]), "t", b"f" * 16, size, 0, copies={Tier.HOST: Slot(slabs.alloc(size), size)}))
    metas[1].pins = 1
    victims = EvictionPolicy.for_slots(metas, lambda m: m.copies[Tier.HOST].offset, [8 * KIB, 4 * KIB], slabs)
    assert victims == [metas[3], metas[0]]  # the pinned 8 KiB block stays; the 4 KiB one goes second


def test_a_size_class_with_no_slot_empties_the_slab_cheapest_to_empty():
    """As in tests/kvstore/test_slots.py: 200 old 4 KiB blocks in one slab and three younger single-block
    slabs of other classes; a 64 KiB block needs a slab, and the oldest single-block slab goes, not the 200."""
    slabs = SlabAllocator(4 * MIB, MIB)
    sizes = [4 * KIB] * 200 + [8 * KIB, 16 * KIB, 32 * KIB]
    metas = [BlockMeta(i.to_bytes(2, "big"), "t", b"f" * 16, n, 0, copies={Tier.HOST: Slot(slabs.alloc(n), n)}) for i, n in enumerate(sizes)]
    offset = lambda m: m.copies[Tier.HOST].offset
    assert EvictionPolicy.for_slots(metas, offset, [64 * KIB], slabs) == [metas[200]]
    metas[200].pins = 1
    assert EvictionPolicy.for_slots(metas, offset, [64 * KIB], slabs) == [metas[201]]
    assert EvictionPolicy.for_slots(metas, offset, [64 * KIB, 64 * KIB], slabs) == [metas[201], metas[202]]
    for meta in metas[201:]:
        meta.pins = 1
    assert EvictionPolicy.for_slots(metas, offset, [64 * KIB], slabs) == metas[:200]  # the only slab left to empty
    metas[7].pins = 1
    assert EvictionPolicy.for_slots(metas, offset, [64 * KIB], slabs) == []  # every slab holds a pinned block
