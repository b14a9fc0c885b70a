"""The tier seam: what every place a block's bytes can live offers the store.

A tier owns its bytes and the room they take, nothing else: which blocks exist and who holds
them is the block table's business (block_table.py), which copy moves where is placement's
(placement.py), and which copy leaves is eviction's (eviction.py). Two kinds of copy fit one
protocol:

* a memory tier (the host pool; HBM next, device memory carved into slots the same way) hands
  out a `Slot`, an address a client may map or a transfer engine may reach;
* a record tier (LMDB on the SSD; a REMOTE peer next) keeps a `Record` under the block's storage key.

Calls are of two kinds, and the store relies on the difference. Bookkeeping (`room_for`,
`footprint`, `alloc`, `release`, `used_bytes`) never waits on a device and is made under the
store lock; releasing a memory slot zeroes it, a memset (about 1 ms a 16 MiB slot). I/O (`write`,
`read`, `erase`) may block for milliseconds (an fsync, a DMA, a network round trip) and is made
outside the store lock, on copies that are pinned or not yet visible, so lookups and pins never
wait on a disk (placement.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, Union

from kvwire.types import Slot, Tier as TierId


@dataclass(frozen=True)
class Record:
    """A copy kept by key rather than by address: an LMDB record, a block on a peer."""

    skey: bytes
    size_bytes: int  # the block's payload bytes, as the tier counts them in used_bytes


Copy = Union[Slot, Record]
Buffer = Union[bytes, bytearray, memoryview]


class BlockLabel(Protocol):
    """What a tier may know of a block it writes: enough to name it, size it and check it on the way back."""

    skey: bytes
    tenant: str
    fingerprint_id: bytes
    size: int  # payload bytes
    checksum: int


class Tier(Protocol):
    tier: TierId
    capacity_bytes: int

    @property
    def used_bytes(self) -> int:
        """Room held by allocated copies."""

    def room_for(self, tenant: str, size_bytes: int) -> int:
        """Bytes a new copy of a size_bytes block of tenant's would take (a slot class, a record with its header)."""

    def footprint(self, copy: Copy) -> int:
        """Bytes an existing copy holds of used_bytes."""

    def alloc(self, skey: bytes, tenant: str, size_bytes: int) -> Copy | None:
        """Room for one copy, or None where there is none. Bookkeeping: nothing is written yet."""

    def release(self, copy: Copy) -> None:
        """Give a copy's room back. Bookkeeping; a memory tier zeroes the slot first."""

    def write(self, items: Sequence[tuple[BlockLabel, Copy, Buffer]]) -> None:
        """Store payloads in allocated copies, all or none (TierWriteError, i.e. SsdWriteError, when refused). I/O."""

    def read(self, block: BlockLabel, copy: Copy) -> Buffer | None:
        """A copy's payload; None when the tier no longer has it or cannot parse it. The caller checks the checksum. I/O."""

    def erase(self, copies: Sequence[Copy]) -> None:
        """Make released copies' bytes unreachable (LMDB delete, a peer's delete); a no-op for memory tiers. I/O."""

    def writes_paused(self) -> bool:
        """True for a while after a refused write (a full disk, an unreachable peer): background writers wait."""

    def close(self) -> None: ...


class SlotMap(Protocol):
    """How a memory tier carves its bytes: what eviction needs to free a slot of a given size."""

    def slot_bytes(self, size: int) -> int: ...

    def slot_bytes_at(self, offset: int) -> int: ...

    def slab_of(self, offset: int) -> int: ...

    def slots_used(self, slab: int) -> int: ...


class MemoryTier(Tier, Protocol):
    """A tier of addressable memory: its copies are Slots in `view`, carved by `slots`."""

    view: memoryview
    slots: SlotMap

    def zero(self, slot: Slot) -> None:
        """Zero an allocated slot now, without releasing it (a quarantined slot)."""
