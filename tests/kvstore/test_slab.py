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
