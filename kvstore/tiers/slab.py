"""Slab allocator over a flat byte range: power-of-two size classes carved from fixed slabs.

Owns offsets only, never bytes. KV blocks of one deployment come in a handful of
sizes, so pow2 classes waste little, and a slab whose slots are all free goes back
to the common pool so another class can use it (memcached's design, minus rebalancing).
When a class has no free slot and no slab is left, a free slot of the smallest larger
class serves it: at most the larger slot is wasted, while a refusal wastes every free
byte of the pool (a pool with more sizes than slabs refused puts while 15-40% free).
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_SLOT_BYTES = 4096


def size_class(size: int) -> int:
    return max(MIN_SLOT_BYTES, 1 << (max(size, 1) - 1).bit_length())


def slab_bytes_for(max_block_bytes: int) -> int:
    """The slab size of a memory tier whose largest block is max_block_bytes: one such block's class, at least 1 MiB."""
    return max(1 << 20, 1 << (max_block_bytes - 1).bit_length())


@dataclass
class _Slab:
    base: int
    slot_bytes: int
    free_slots: list[int] = field(default_factory=list)
    used: int = 0


class SlabAllocator:
    def __init__(self, capacity_bytes: int, slab_bytes: int) -> None:
        if slab_bytes & (slab_bytes - 1):
            raise ValueError("slab_bytes must be a power of two")
        self.slab_bytes = slab_bytes
        self.num_slabs = capacity_bytes // slab_bytes
        if self.num_slabs == 0:
            raise ValueError(f"capacity {capacity_bytes} smaller than one slab ({slab_bytes})")
        self.capacity_bytes = self.num_slabs * slab_bytes
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))
        self._slabs: dict[int, _Slab] = {}
        self._partial: dict[int, set[int]] = {}  # size class -> slabs of it with a free slot
        self.used_bytes = 0

    def slot_bytes(self, size: int) -> int:
        """The slot a block of size gets when its own class has room."""
        return size_class(size)

    def slot_bytes_at(self, offset: int) -> int:
        """The size of the allocated slot at offset (larger than slot_bytes(size) when it was a fallback)."""
        return self._slabs[offset // self.slab_bytes].slot_bytes

    def slab_of(self, offset: int) -> int:
        return offset // self.slab_bytes

    def slots_used(self, slab: int) -> int:
        """Allocated slots in a slab: 0 for a free one."""
        found = self._slabs.get(slab)
        return found.used if found else 0

    @property
    def slabs_in_use(self) -> int:
        return self.num_slabs - len(self._free_slabs)

    def alloc(self, size: int) -> int | None:
        """Offset of a slot of at least size bytes: its own class, a new slab, else the smallest larger class
        with a free slot; None when none of these is free."""
        cls = size_class(size)
        if cls > self.slab_bytes:
            raise ValueError(f"block of {size} bytes exceeds slab size {self.slab_bytes}")
        if not self._partial.get(cls) and self._free_slabs:
            self._open_slab(cls)
        while cls <= self.slab_bytes:
            if self._partial.get(cls):
                return self._take(cls)
            cls <<= 1
        return None

    def _open_slab(self, cls: int) -> None:
        idx = self._free_slabs.pop()
        base = idx * self.slab_bytes
        self._slabs[idx] = _Slab(base, cls, list(range(base + self.slab_bytes - cls, base - 1, -cls)))
        self._partial.setdefault(cls, set()).add(idx)

    def _take(self, cls: int) -> int:
        partial = self._partial[cls]
        idx = next(iter(partial))
        slab = self._slabs[idx]
        offset = slab.free_slots.pop()
        slab.used += 1
        if not slab.free_slots:
            partial.discard(idx)
        self.used_bytes += cls
        return offset

    def free(self, offset: int) -> int:
        """Returns the slot size freed."""
        idx = offset // self.slab_bytes
        slab = self._slabs[idx]
        slab.free_slots.append(offset)
        slab.used -= 1
        self.used_bytes -= slab.slot_bytes
        partial = self._partial[slab.slot_bytes]
        if slab.used == 0:
            partial.discard(idx)
            del self._slabs[idx]
            self._free_slabs.append(idx)
        else:
            partial.add(idx)
        return slab.slot_bytes

    def free_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of every range no slot occupies: what a scrub must zero."""
        ranges = [(idx * self.slab_bytes, self.slab_bytes) for idx in self._free_slabs]
        for slab in self._slabs.values():
            ranges += [(offset, slab.slot_bytes) for offset in slab.free_slots]
        return ranges
