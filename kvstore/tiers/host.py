"""Host-memory tier: one fixed-size shared-memory pool, carved into slots by the slab allocator.

The pool is a file in /dev/shm mapped by the server, so same-host clients can map
the same pages and move payload without the server touching it (or, unshared, an
anonymous mapping: in-process tests, hosts without /dev/shm). This module owns the
mapping and slot bytes, behind the Tier protocol (tiers/base.py); which block lives in
which slot is the block table's business.

Every free slot holds zeros: release() zeroes a slot before the allocator may hand it
out again, whoever frees it (delete, demotion, eviction, a lease's end). Otherwise the
next tenant to reserve the slot could read its last block, through the pool mapping
or by committing it under its own key. The memset costs about 1 ms a 16 MiB slot
(18 GB/s here); demotion, the bulk of frees, runs on the background worker.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import secrets
from pathlib import Path
from typing import Sequence

import numpy as np

from kvwire.defaults import SHM_DIR
from kvwire.errors import CapacityExhaustedError
from kvwire.types import Slot, Tier
from kvstore.tiers.base import Buffer, BlockLabel
from kvstore.tiers.slab import SlabAllocator, slab_bytes_for

log = logging.getLogger(__name__)

_POOL_NAME = re.compile(r"kvstore-(\d+)-[0-9a-f]{8}")


def sweep_stale_pools(shm_dir: Path = SHM_DIR) -> int:
    """Unlink pools left in /dev/shm by servers that died without cleaning up (SIGKILL, OOM).

    A pool is named after its server's pid; one whose process is gone holds RAM
    nobody can reach. Returns how many were removed.
    """
    removed = 0
    for path in shm_dir.glob("kvstore-*"):
        m = _POOL_NAME.fullmatch(path.name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed %d stale host pool(s) of dead servers from %s", removed, shm_dir)
    return removed


class HostPool:
    """The host tier (a MemoryTier): copies are Slots of the pool, `view` is all of it."""

    tier = Tier.HOST

    def __init__(self, capacity_bytes: int, max_block_bytes: int, name: str | None = None, shared: bool = True) -> None:
        slab_bytes = slab_bytes_for(max_block_bytes)
        self.allocator = SlabAllocator(capacity_bytes, slab_bytes)
        self.slots = self.allocator
        self.capacity_bytes = self.allocator.capacity_bytes
        self.shm_name = name or f"kvstore-{os.getpid()}-{secrets.token_hex(4)}"
        self.path = SHM_DIR / self.shm_name if shared and SHM_DIR.is_dir() else None
        if self.path is not None:
            sweep_stale_pools()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, self.capacity_bytes)
                self._commit(fd)
                # Populate the page tables now, so no transfer pays first-touch faults
                # (a 32 MiB put into fresh pages spent most of its time in them).
                self._mmap = mmap.mmap(fd, self.capacity_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            except BaseException:
                self.path.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
        else:
            self.shm_name = ""
            self._mmap = mmap.mmap(-1, self.capacity_bytes)
        self.view = memoryview(self._mmap)
        self._bytes = np.frombuffer(self.view, dtype=np.uint8)  # for memset: slicing in bytes(n) costs 16x at 16 MiB

    def _commit(self, fd: int) -> None:
        """Allocate the pool's RAM up front, like registered memory in other transfer engines.

        On tmpfs a sparse file that outgrows /dev/shm kills the writer with SIGBUS
        at some later put; failing here, with the numbers, is the kinder error.
        """
        try:
            os.posix_fallocate(fd, 0, self.capacity_bytes)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.ENOMEM):
                raise
            free = os.statvfs(SHM_DIR)
            raise CapacityExhaustedError(
                f"host pool needs {self.capacity_bytes} bytes of {SHM_DIR}, which has {free.f_bavail * free.f_frsize} free; "
                "lower host_memory or enlarge /dev/shm"
            ) from None

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    # ---- the Tier protocol: bookkeeping (under the store lock) --------------------------

    def room_for(self, tenant: str, size_bytes: int) -> int:
        return self.allocator.slot_bytes(size_bytes)

    def footprint(self, slot: Slot) -> int:
        return self.allocator.slot_bytes_at(slot.offset)

    def alloc(self, skey: bytes, tenant: str, size_bytes: int) -> Slot | None:
        offset = self.allocator.alloc(size_bytes)
        return None if offset is None else Slot(offset, size_bytes)

    def release(self, slot: Slot) -> None:
        """Zero the whole slot (a shm writer may have written past its block), then give it back."""
        self.zero(slot)
        self.allocator.free(slot.offset)

    def zero(self, slot: Slot) -> None:
        """Zero the allocated slot, all of it."""
        self.zero_range(slot.offset, self.allocator.slot_bytes_at(slot.offset))

    # ---- the Tier protocol: bytes (outside the store lock, on slots nobody else may touch) --

    def write(self, items: Sequence[tuple[BlockLabel, Slot, Buffer]]) -> None:
        view = self.view
        for _, slot, data in items:
            view[slot.offset : slot.offset + slot.size_bytes] = data

    def read(self, block: BlockLabel, slot: Slot) -> memoryview:
        return self.view[slot.offset : slot.offset + slot.size_bytes]

    def erase(self, slots: Sequence[Slot]) -> None:
        """Nothing to do: release zeroed them."""

    def writes_paused(self) -> bool:
        return False  # memory does not refuse a write

    # ---- scrubbing ----------------------------------------------------------------------

    def zero_range(self, offset: int, length: int) -> None:
        self._bytes[offset : offset + length] = 0

    def zero_free(self) -> int:
        """Zero every free slot and slab (release() already does; this is the secure delete's proof). Returns bytes zeroed."""
        ranges = self.allocator.free_ranges()
        for offset, length in ranges:
            self.zero_range(offset, length)
        return sum(length for _, length in ranges)

    def close(self) -> None:
        self._bytes = None
        self.view.release()
        try:
            self._mmap.close()
        except BufferError:
            pass
        if self.path is not None:
            self.path.unlink(missing_ok=True)
