"""HBM tier: one device allocation per server, carved into slots by the slab allocator like the host pool.

A clean, inclusive cache of hot host blocks: a copy here is made from the block's host copy, checked
where it landed, and is never the only copy, so dropping it loses nothing and a crash loses nothing
durable. Same-host GPU clients map the whole allocation once (DataPlane's IPC handle) and copy pinned
blocks device to device straight into their pages. This module owns the slots and their bytes
behind the Tier protocol (tiers/base.py); which blocks come here and which leave is
hbm_placement.py's and promotion.py's business, and the device itself is reached only through
DeviceMemory (device.py), so everything here runs in CI against host memory.

A device that fails (DeviceError) marks the tier lost: from then on bookkeeping still works, nothing
touches the device, and the store drops every copy here and serves on from host and SSD.
"""
from __future__ import annotations

import logging
from typing import Sequence

from kvwire.types import Slot, Tier
from kvstore.tiers.base import Buffer, BlockLabel
from kvstore.tiers.device import DeviceError, DeviceMemory, HostDeviceMemory
from kvstore.tiers.slab import SlabAllocator, slab_bytes_for

log = logging.getLogger(__name__)

BACKENDS = ("cuda", "host")


class HbmWriteError(DeviceError):
    """An upload into the tier failed; the tier is lost."""


class HbmTier:
    """The HBM tier (a Tier): copies are Slots of the device allocation."""

    tier = Tier.HBM

    def __init__(self, device: DeviceMemory, max_block_bytes: int) -> None:
        self.device = device
        self.allocator = SlabAllocator(device.capacity_bytes, slab_bytes_for(max_block_bytes))
        self.slots = self.allocator
        self.capacity_bytes = self.allocator.capacity_bytes
        self.lost = ""  # why the device is gone; "" while it works

    @property
    def available(self) -> bool:
        return not self.lost

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def mark_lost(self, err: BaseException | str) -> None:
        if not self.lost:
            self.lost = str(err) or type(err).__name__
            log.error("HBM tier lost (%s): its copies are dropped; serving from the host and ssd tiers", self.lost)

    # ---- the Tier protocol: bookkeeping (under the store lock) --------------------------

    def room_for(self, tenant: str, size_bytes: int) -> int:
        return self.allocator.slot_bytes(size_bytes)

    def footprint(self, slot: Slot) -> int:
        return self.allocator.slot_bytes_at(slot.offset)

    def alloc(self, skey: bytes, tenant: str, size_bytes: int) -> Slot | None:
        if self.lost:
            return None
        offset = self.allocator.alloc(size_bytes)
        return None if offset is None else Slot(offset, size_bytes)

    def release(self, slot: Slot) -> None:
        """Zero the slot (enqueued on the device's stream: it lands before any later upload), then give it back.
        A secure delete then leaves no copy here, and a client mapping the pool finds only zeros in free slots."""
        self.zero(slot)
        self.allocator.free(slot.offset)

    def zero(self, slot: Slot) -> None:
        if self.lost:
            return
        try:
            self.device.zero(slot.offset, self.allocator.slot_bytes_at(slot.offset))
        except DeviceError as err:
            self.mark_lost(err)

    # ---- the Tier protocol: bytes (outside the store lock, on slots nobody else may touch) --

    def write(self, items: Sequence[tuple[BlockLabel, Slot, Buffer]]) -> None:
        """All or none: HbmWriteError unless every copy landed and verified."""
        ok = self.write_verified(items)
        if not all(ok):
            raise HbmWriteError(f"{ok.count(False)} of {len(ok)} blocks did not verify after their upload")

    def write_verified(self, items: Sequence[tuple[BlockLabel, Slot, Buffer]]) -> list[bool]:
        """Upload the payloads, then hash them where they landed: which match their block's checksum.
        Raises DeviceError (and marks the tier lost) if the device fails."""
        if not items:
            return []
        if self.lost:
            raise DeviceError(self.lost)
        try:
            self.device.upload([(slot.offset, data) for _, slot, data in items])
            digests = self.device.hashes([(slot.offset, slot.size_bytes) for _, slot, _ in items])
        except DeviceError as err:
            self.mark_lost(err)
            raise
        return [digest == block.checksum for (block, _, _), digest in zip(items, digests)]

    def read(self, block: BlockLabel, slot: Slot) -> bytes | None:
        if self.lost:
            return None
        try:
            return self.device.download(slot.offset, slot.size_bytes)
        except DeviceError as err:
            self.mark_lost(err)
            return None

    def erase(self, slots: Sequence[Slot]) -> None:
        """Nothing to do: release zeroed them."""

    def writes_paused(self) -> bool:
        return bool(self.lost)

    def close(self) -> None:
        try:
            self.device.close()
        except DeviceError as err:
            log.debug("closing the HBM device failed: %s", err)


def open_device(backend: str, gpu: int, capacity_bytes: int) -> DeviceMemory | None:
    """The device memory for an HBM tier of capacity_bytes, or None (logged once) where there is none.

    "cuda": GPU gpu, when cupy and a CUDA device are present; "host": host memory standing in for a
    device (the tier's logic without a GPU; nothing is exported to clients)."""
    if backend not in BACKENDS:
        raise ValueError(f"hbm_backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "host":
        return HostDeviceMemory(capacity_bytes)
    try:
        from kvstore.tiers.cuda_device import CudaDeviceMemory

        return CudaDeviceMemory(gpu, capacity_bytes)
    except DeviceError as err:
        log.warning("HBM tier off: %s (hbm_memory=%d, gpu=%d); serving from the host and ssd tiers", err, capacity_bytes, gpu)
        return None
