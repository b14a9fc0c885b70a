"""HBM placement: hot host blocks copied into the HBM tier, HBM copies dropped, and the tier dropped with its GPU.

Owns how copies move between the host and HBM tiers, following placement.py's pattern: decide and
pin under the store lock, move bytes without it (the upload to the device and its verification, on
the device's own stream), then bookkeeping under the lock again. It refuses policy (promotion.py
picks what is hot, eviction.py's room-making frees slots) and block state (block_table.py).

The tier is an inclusive, clean cache: a copy here is made from the host copy and is never the only
copy, so dropping one (to make room, by an operator, or all of them when the GPU fails) only ever
costs a same-host GPU client a host-to-device copy instead of a device-to-device one. A block is
attached here only after its bytes were hashed where they landed and matched its checksum.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

from kvwire.types import Slot, Tier
from kvstore import block_table
from kvstore.block_table import BlockTable, HbmColumns
from kvstore.config import ServerConfig
from kvstore.counters import Event
from kvstore.eviction import EvictReport
from kvstore.index import BlockMeta
from kvstore.placement import Placement
from kvstore.promotion import Heat, PromotionPolicy
from kvstore.tiers.device import DeviceError, DeviceMemory
from kvstore.tiers.hbm import HbmTier, open_device

log = logging.getLogger(__name__)

HBM, HOST, SSD = Tier.HBM, Tier.HOST, Tier.SSD
PRUNE_EVERY_FRACTION = 0.125  # the read history is pruned every window_s * this (a pass over all of it)
HANDLE_FILE = "hbm.handle"  # in the data directory (owner-only), as the local control socket
BATCHES_PER_PASS = 8  # promotion batches per background tick (each takes the store lock twice, briefly)
ROOM_SCAN_BLOCKS = 1024  # HBM copies a batch looks at, least recently read first, for ones it may displace


@dataclass(frozen=True)
class HbmExport:
    """What DataPlane tells clients about the tier: enough for a same-host process to map it."""

    device_index: int
    device_uuid: str
    handle_file: str  # the owner-only file holding the CUDA IPC handle; "" when the memory cannot be shared
    size_bytes: int
    pool_id: int


@dataclass(frozen=True)
class PinPlacement:
    """Where a pin's blocks are fastest, as columns in pin order: Tier values, and HBM offsets (0 elsewhere)."""

    tiers: list[int]
    hbm_offsets: list[int]
    pool_id: int

    @property
    def in_hbm(self) -> int:
        return self.tiers.count(HBM.value)


def placement_columns(metas: Sequence[BlockMeta]) -> tuple[list[int], list[int]]:
    """Each block's fastest tier (HBM where it has a copy there, else HOST) and its HBM offset (0 elsewhere), as plain
    ints: the native Pin encoder takes exact ints only (an enum member sent a 512-block answer through protobuf's
    messages, ~0.1 ms on the request thread). In one pass in C where built (kvstore._native tier_columns); this
    function's comprehensions are its definition."""
    hbm, host = HBM.value, HOST.value
    native = block_table.pin_table
    if native is not None and type(metas) is list:
        answer = native.tier_columns(metas, HBM, hbm, host)
        if answer is not NotImplemented:
            return answer[0], answer[1]
    slots = [m.copies.get(HBM) for m in metas]
    return [hbm if s is not None else host for s in slots], [s.offset if s is not None else 0 for s in slots]


@dataclass
class PromotionReport:
    """What one promotion pass did."""

    promoted: int = 0
    displaced: int = 0  # HBM copies dropped to make room
    failed: int = 0  # uploads that did not verify
    no_room: int = 0  # hot blocks left out: the tier is full of pinned or hotter copies


class HbmPlacement:
    def __init__(self, placement: Placement, tier: HbmTier, policy: PromotionPolicy, handle_file: Path | None = None) -> None:
        """handle_file: where to publish the device's IPC handle for same-host clients (owner-only), if it has one."""
        self.placement, self.tier, self.policy = placement, tier, policy
        self.handle_file = self._publish_handle(handle_file) if handle_file is not None else None
        self.table, self.counters = placement.table, placement.counters
        placement.tiers[HBM] = tier  # the table's outbox hands freed HBM slots back through placement.settle
        self.history = policy.history()
        self._pending: dict[bytes, Heat] = {}  # hot blocks a pass had no time for: the next one takes them
        self._pruned_at = time.monotonic()
        self._ssd_evictions_seen = 0
        self._dropped = False

    @classmethod
    def open(cls, cfg: ServerConfig, placement: Placement, device: DeviceMemory | None = None) -> "HbmPlacement | None":
        """The HBM tier cfg asks for (hbm_memory > 0), on device or the one cfg names; None where it is off or
        there is no device (logged once by open_device)."""
        if device is None:
            if cfg.hbm_memory <= 0:
                return None
            device = open_device(cfg.hbm_backend, cfg.gpu, cfg.hbm_memory)
            if device is None:
                return None
        tier = HbmTier(device, cfg.max_block_bytes)
        log.info("HBM tier: %d MiB on %s", tier.capacity_bytes >> 20,
                 f"GPU {device.device_index} ({device.device_uuid})" if device.device_index >= 0 else "host memory (no GPU)")
        return cls(placement, tier, PromotionPolicy(cfg.hbm_promote_hits, cfg.hbm_promote_window_s),
                   cfg.data_path.absolute() / HANDLE_FILE)

    @property
    def available(self) -> bool:
        return self.tier.available

    # ---- request threads ------------------------------------------------------------------

    def note_reads(self, metas: Sequence[BlockMeta]) -> None:
        """A Get or Pin read these blocks, in chain order. O(1): the worker folds it into the history."""
        if self.tier.available:
            self.history.note(metas)

    def pin_placement(self, table: BlockTable, metas: Sequence[BlockMeta]) -> PinPlacement | None:
        """Where pinned blocks have an HBM copy, or None when none has (the Pin's answer then stays as it was). Lock held.
        A pinned block's HBM copy stays until it is unpinned: eviction skips pinned blocks."""
        if not self.tier.available or not table.index.blocks_in(HBM):
            return None
        tiers, offsets = placement_columns(metas)
        if HBM.value not in tiers:
            return None
        return PinPlacement(tiers, offsets, self.tier.device.pool_id)

    def placement_values(self) -> tuple[int, int] | None:
        """What a prefix walk names a block's tier by (HBM, HOST values), for it to read the run's placement as it
        pins (block_table.pin_prefix); None when the tier is not serving (the answer then names the host pool only)."""
        return (HBM.value, HOST.value) if self.tier.available else None

    def placement_of(self, columns: HbmColumns | None, n: int) -> PinPlacement | None:
        """pin_placement of the first n blocks of a prefix walk, from the placement the walk read (None: none in HBM)."""
        if columns is None:
            return None
        tiers, offsets, _ = columns
        if n < len(tiers):
            tiers, offsets = tiers[:n], offsets[:n]
            if HBM.value not in tiers:
                return None
        return PinPlacement(tiers, offsets, self.tier.device.pool_id)

    def sendable(self, device_ok: bool) -> bool:
        """Whether a data plane may send from the tier's copies: the tier works, and its memory is host memory or
        the sender can read GPU memory."""
        return self.tier.available and (self.tier.device.device_index < 0 or device_ok)

    def send_sources(self, tiers: Sequence[int], hbm_offsets: Sequence[int], sizes: Sequence[int], device_ok: bool) -> list | None:
        """Each pinned block's HBM copy as a buffer to send from in place (None where it has none), or None when no
        copy may be sent: the tier is gone, no block has one, or the pool is on a GPU and the sender cannot read GPU
        memory (device_ok). The pin keeps the copies until the sends are done: eviction skips pinned blocks, and a lost
        GPU's allocation stays mapped until the server closes (its data plane has stopped by then)."""
        if not tiers or not self.sendable(device_ok):
            return None
        device, hbm = self.tier.device, HBM.value
        try:
            return [device.span(o, n) if t == hbm else None for t, o, n in zip(tiers, hbm_offsets, sizes)]
        except DeviceError:
            return None

    def export(self) -> HbmExport | None:
        if not self.tier.available:
            return None
        device = self.tier.device
        return HbmExport(device.device_index, device.device_uuid, str(self.handle_file or ""), self.tier.capacity_bytes, device.pool_id)

    def _publish_handle(self, path: Path) -> Path | None:
        """Write the device's IPC handle to path, readable by this OS user alone: whoever opens the handle
        maps every tenant's blocks, and CUDA checks no identity, so it is guarded like the shared host pool."""
        handle = self.tier.device.ipc_handle()
        if not handle:
            return None
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # one a crashed server left, perhaps with looser permissions
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(handle)
        return path

    # ---- the background worker ------------------------------------------------------------

    def promote_hot(self) -> PromotionReport:
        """Copy blocks that became hot into the tier, shallowest first, displacing colder copies: a few batches,
        the store lock let go between them (and during every upload), so requests never wait on more than one."""
        report = PromotionReport()
        if self.placement.stopped:
            return report
        if not self.tier.available:
            self._drop_tier()
            return report
        now = time.monotonic()
        for heat in self.history.fold(skip_tier=HBM):
            self._pending[heat.meta.skey] = heat
        if now - self._pruned_at >= self.policy.window_s * PRUNE_EVERY_FRACTION:
            self._prune(now)
        for _ in range(BATCHES_PER_PASS):
            if not self._pending or not self._promote_batch(now, report):
                break
        return report

    def _promote_batch(self, now: float, report: PromotionReport) -> bool:
        """Choose, upload and attach one batch; False when nothing more can move this pass."""
        with self.placement.locked as table:
            if self.placement.stopped:
                return False
            chosen = self._choose(table, now, report)
            metas = [m for m, _ in chosen]
            table.pin_blocks(metas)  # the host copies stay put while they are read, and none is deleted under us
            items = [(m, slot, self.placement.host.read(m, m.copies[HOST])) for m, slot in chosen]
        if not chosen:
            return False
        verified: list[bool] | None = None
        try:
            verified = self.tier.write_verified(items)
        except DeviceError:
            pass  # the tier marked itself lost and logged why
        finally:
            with self.placement.locked as table:
                table.unpin_blocks(metas)
                self._settle(table, chosen, verified, report)
        if verified is None:
            self._drop_tier()
            return False
        return True

    def _choose(self, table: BlockTable, now: float, report: PromotionReport) -> list[tuple[BlockMeta, Slot]]:
        """The next batch of pending hot blocks, each with its new HBM slot, room made. Lock held."""
        hot = [h for h in self._pending.values()
               if HBM not in h.meta.copies and HOST in h.meta.copies and table.index.holds(h.meta) and self.policy.is_hot(h, now)]
        ranked = self.policy.candidates(hot, now)
        taken = {id(h) for h in ranked}
        self._pending = {h.meta.skey: h for h in hot if id(h) not in taken}  # hot, past this batch: the next one's
        chosen: list[tuple[BlockMeta, Slot]] = []
        victims: Iterator[BlockMeta] | None = None  # the HBM copies in the order they give way, made once a batch if needed
        for heat in ranked:  # shallowest first: each may displace no more than the one before it
            meta = heat.meta
            slot = self.tier.alloc(meta.skey, meta.tenant, meta.size)
            if slot is None:
                if victims is None:
                    victims = self._victim_order(table, now)
                victim = self._next_victim(victims, heat, now)
                if victim is not None:
                    self._drop_copy(table, victim)
                    report.displaced += 1
                    self.placement.settle()  # its slot is free before it is allocated again
                    slot = self.tier.alloc(meta.skey, meta.tenant, meta.size)
            if slot is None:
                report.no_room += 1
                continue
            chosen.append((meta, slot))
        return chosen

    def _victim_order(self, table: BlockTable, now: float) -> Iterator[BlockMeta]:
        """The least recently read ROOM_SCAN_BLOCKS HBM copies, in the order they give way: those not read
        within the window (least recently read first), then the others deepest first. Lock held; one pass
        over that many copies whatever the tier's size."""
        cold, recent = [], []
        for meta in islice(table.index.in_lru_order(HBM), ROOM_SCAN_BLOCKS):
            if self.policy.read_lately(meta, now):
                heat = self.history.get(meta)
                recent.append((heat.position if heat is not None else -1, meta))
            else:
                cold.append(meta)
        recent.sort(key=lambda pair: -pair[0])
        return iter(cold + [meta for _, meta in recent])

    def _next_victim(self, victims: Iterator[BlockMeta], incoming: Heat, now: float) -> BlockMeta | None:
        """The next HBM copy incoming may displace whose slot would hold it. Lock held.

        One passed over (pinned, or read lately at a position no deeper than incoming's) stays passed
        over for the rest of the batch, whose blocks sit no shallower. A slot of a smaller size class
        is passed over too: block sizes are few, and a smaller block later in the batch finds its own."""
        need = self.tier.room_for(incoming.meta.tenant, incoming.meta.size)
        for meta in victims:
            copy = meta.copies.get(HBM)
            if copy is None or meta.pins or self.tier.footprint(copy) < need:
                continue
            heat = self.history.get(meta)
            if self.policy.may_displace(incoming, meta, heat.position if heat is not None else None, now):
                return meta
        return None

    def _settle(self, table: BlockTable, chosen: list[tuple[BlockMeta, Slot]], verified: list[bool] | None,
                report: PromotionReport) -> None:
        """Attach the copies that landed and verified to blocks still wanting one; give the other slots back. Lock held."""
        for i, (meta, slot) in enumerate(chosen):
            ok = verified is not None and verified[i]
            if ok and table.index.holds(meta) and HOST in meta.copies and HBM not in meta.copies:
                table.attach(meta, HBM, slot)
                report.promoted += 1
                continue
            self.tier.release(slot)
            if verified is not None and not verified[i]:
                report.failed += 1
                log.warning("a block copied into the HBM tier did not match its checksum there; it stays on the host tier",
                            extra={"key": meta.key.hex()})
        self.counters[Event.HBM_PROMOTIONS] += report.promoted
        if report.failed:
            self.counters[Event.HBM_VERIFY_FAILURES] += report.failed

    def _prune(self, now: float) -> None:
        """Forget blocks not read lately (but not where resident copies were promoted from). After copies left
        the ssd tier (an operator's evict), drop HBM copies left with nothing below them: the tier stays clean."""
        self._pruned_at = now
        self.history.prune(now, self.policy.window_s, keep_tier=HBM)
        ssd_evictions = self.counters[Event.SSD_EVICTIONS]
        if ssd_evictions == self._ssd_evictions_seen:
            return
        self._ssd_evictions_seen = ssd_evictions
        with self.placement.locked as table:
            for meta in [m for m in table.index.in_lru_order(HBM) if HOST not in m.copies and SSD not in m.copies and not m.pins]:
                self._drop_copy(table, meta)

    def _drop_copy(self, table: BlockTable, meta: BlockMeta) -> None:
        self.counters[Event.HBM_EVICTIONS] += 1
        if table.drop_copy(meta, HBM):  # it was the last copy (an orphan): the block leaves the store
            self.counters[Event.EVICTIONS] += 1

    def _drop_tier(self) -> None:
        """The device failed: forget every copy on it (nothing touches the device again). Once."""
        if self._dropped:
            return
        self._dropped = True
        self.counters[Event.HBM_DEVICE_ERRORS] += 1
        with self.placement.locked as table:
            metas = list(table.index.in_lru_order(HBM))
            for meta in metas:
                if table.drop_copy(meta, HBM):
                    self.counters[Event.EVICTIONS] += 1
        self._pending.clear()
        if self.handle_file is not None:
            self.handle_file.unlink(missing_ok=True)
        log.error("HBM tier dropped with %d copies; clients read those blocks from the host tier", len(metas))

    # ---- the operator -----------------------------------------------------------------------

    def evict_to_watermark(self, fraction: float) -> EvictReport:
        """Drop least recently used unpinned HBM copies until used <= fraction * capacity (their blocks stay)."""
        tier = self.tier
        with self.placement.locked as table:
            victims = self.placement.policy.to_watermark(table.index.in_lru_order(HBM), tier.used_bytes,
                                                         int(fraction * tier.capacity_bytes), lambda m: tier.footprint(m.copies[HBM]))
            for meta in victims.blocks:
                self._drop_copy(table, meta)
        return EvictReport(0, len(victims.blocks), sum(m.size for m in victims.blocks), victims.skipped_pinned)

    def close(self) -> None:
        if self.handle_file is not None:
            self.handle_file.unlink(missing_ok=True)
        self.tier.close()
