"""Slab allocator: classes, reuse, and slabs returning to the common pool."""
from __future__ import annotations

import pytest

from kvstore.tiers.slab import SlabAllocator, size_class


def test_size_classes_are_pow2_with_a_floor():
    assert size_class(1) == 4096
    assert size_class(65536) == 65536
    assert size_class(65537) == 131072


def test_alloc_until_full_then_free_reuses():
    alloc = SlabAllocator(4 << 20, 1 << 20)
    offsets = [alloc.alloc(1 << 20) for _ in range(4)]
    assert sorted(offsets) == [0, 1 << 20, 2 << 20, 3 << 20]
    assert alloc.alloc(4096) is None
    assert alloc.used_bytes == 4 << 20
    alloc.free(offsets[2])
    assert alloc.alloc(4096) == 2 << 20  # the emptied slab serves another class
    assert alloc.used_bytes == (3 << 20) + 4096


def test_slots_never_overlap():
    alloc = SlabAllocator(16 << 20, 1 << 20)
    spans = []
    for size in [5000, 70000, 4096, 300000, 1 << 20, 9000] * 3:
        off = alloc.alloc(size)
        assert off is not None
        spans.append((off, off + size_class(size)))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_oversize_is_refused():
    with pytest.raises(ValueError):
        SlabAllocator(4 << 20, 1 << 20).alloc((1 << 20) + 1)


def test_a_class_without_a_slab_takes_a_slot_of_the_smallest_larger_class():
    alloc = SlabAllocator(3 << 20, 1 << 20)
    big, mid, _ = alloc.alloc(1 << 19), alloc.alloc(1 << 18), alloc.alloc(1 << 17)  # one slab each, none left
    assert alloc.slabs_in_use == 3
    small = alloc.alloc(4096)  # no 4 KiB slab, no free slab: the 128 KiB class is the smallest with room
    assert alloc.slab_of(small) == alloc.slab_of(_) and alloc.slot_bytes_at(small) == 1 << 17
    assert alloc.used_bytes == (1 << 19) + (1 << 18) + 2 * (1 << 17)
    assert alloc.free(small) == 1 << 17 and alloc.alloc(5000) == small  # freed into its real class
    assert alloc.slot_bytes_at(big) == 1 << 19 and alloc.slot_bytes_at(mid) == 1 << 18


def test_only_larger_classes_are_borrowed_and_full_means_none():
    alloc = SlabAllocator(2 << 20, 1 << 20)
    alloc.alloc(4096), alloc.alloc(8192)  # two slabs of small classes
    assert alloc.alloc(16384) is None  # smaller free slots never serve a larger block
    assert alloc.capacity_bytes - alloc.used_bytes == (2 << 20) - 4096 - 8192


def test_borrowed_slots_never_overlap_and_all_come_back():
    alloc = SlabAllocator(4 << 20, 1 << 20)
    sizes = [1 << 18, 1 << 17, 1 << 16, 1 << 15] + [3000, 9000, 20000, 40000, 70000] * 6
    spans = []
    for size in sizes:
        off = alloc.alloc(size)
        if off is not None:
            spans.append((off, off + alloc.slot_bytes_at(off)))
    assert len(spans) > 20
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    for off, _ in spans:
        alloc.free(off)
    assert alloc.used_bytes == 0 and alloc.slabs_in_use == 0
    assert sorted(alloc.free_ranges()) == [(i << 20, 1 << 20) for i in range(4)]
