"""Host-memory tier: one fixed-size shared-memory pool, carved into slots by the slab allocator.

The pool is a file in /dev/shm mapped by the server, so same-host clients can map
the same pages and move payload without the server touching it. This module owns
the mapping and slot bytes; which block lives in which slot is the index's business.
"""
from __future__ import annotations

import mmap
import os
import secrets
from pathlib import Path

from kvstore.tiers.slab import SlabAllocator

SHM_DIR = Path("/dev/shm")


def _slab_bytes_for(max_block_bytes: int) -> int:
    return max(1 << 20, 1 << (max_block_bytes - 1).bit_length())


class HostPool:
    def __init__(self, capacity_bytes: int, max_block_bytes: int, name: str | None = None) -> None:
        slab_bytes = _slab_bytes_for(max_block_bytes)
        self.allocator = SlabAllocator(capacity_bytes, slab_bytes)
        self.capacity_bytes = self.allocator.capacity_bytes
        self.shm_name = name or f"kvstore-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = SHM_DIR / self.shm_name if SHM_DIR.is_dir() else None
        if self.path is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, self.capacity_bytes)
                self._mmap = mmap.mmap(fd, self.capacity_bytes)
            finally:
                os.close(fd)
        else:
            self.shm_name = ""
            self._mmap = mmap.mmap(-1, self.capacity_bytes)
        self.view = memoryview(self._mmap)

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def alloc(self, size: int) -> int | None:
        return self.allocator.alloc(size)

    def free(self, offset: int, size: int, zero: bool = False) -> None:
        if zero:
            self.zero(offset, size)
        self.allocator.free(offset)

    def zero(self, offset: int, size: int) -> None:
        self.zero_range(offset, self.allocator.slot_bytes(size))

    def zero_range(self, offset: int, length: int) -> None:
        self.view[offset : offset + length] = bytes(length)

    def zero_free(self) -> int:
        """Zero every free slot and slab; freeing for demotion leaves old copies behind. Returns bytes zeroed."""
        ranges = self.allocator.free_ranges()
        for offset, length in ranges:
            self.zero_range(offset, length)
        return sum(length for _, length in ranges)

    def slot(self, offset: int, size: int) -> memoryview:
        return self.view[offset : offset + size]

    def close(self) -> None:
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass
        if self.path is not None:
            self.path.unlink(missing_ok=True)
