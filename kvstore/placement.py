"""Placement: copies moving between tiers, with tier I/O always outside the store lock.

Owns how copies move: demotion (a host copy written to the SSD tier, then dropped), promotion
(an SSD copy read back into the host pool), making room, durable writes, the shutdown flush,
the operator's evict-to-watermark, and handing what the block table freed back to the tiers
(the store lock's exit duty, `locked`). It refuses policy (eviction.py picks every victim) and
block state (block_table.py decides it).

Every move follows one pattern: decide and pin under the store lock, move bytes without it,
then bookkeeping under it again. So a lookup or a pin never waits on LMDB: not on a demotion's
fsync, a durable commit's write, or the synchronous room-making of a Reserve. Record-tier
mutations (LMDB puts and deletes) are serialised by one writer lock, taken before the store lock
and held from the decision to the bookkeeping, so records change on disk in the order they were
decided: an erase decided before a put of the same key runs before it. Erases decided without
the writer lock (a delete, a block dropped for a bad checksum) wait in a queue that the next
holder runs first.
"""
from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import xxhash

from kvwire.errors import BlockNotFoundError, CapacityExhaustedError, LeaseError, NotDurableError, SsdWriteError
from kvwire.types import Slot, Tier as TierId
from kvstore.counters import Event
from kvstore.block_table import BlockTable, Caller, WriteLease
from kvstore.eviction import EvictionPolicy, EvictReport, keep_rank
from kvstore.index import BlockMeta, Origin
from kvstore.tiers.base import Buffer, Copy, MemoryTier, Tier
from kvstore.tiers.ssd import SsdTier

log = logging.getLogger(__name__)

T = TypeVar("T")
HBM, HOST, SSD = TierId.HBM, TierId.HOST, TierId.SSD
# The background demoter writes at most this much a transaction, letting go of the writer lock
# between batches so durable commits need not wait for a whole watermark's worth of fsyncs.
DEMOTE_BATCH_BYTES = 64 << 20
# A Reserve that finds the pool full makes room this many times before it gives up: between
# making room and taking the slot, another request may take it first.
ROOM_ATTEMPTS = 4


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Moved:
    """What one pass of copying blocks down did."""

    victims: tuple[BlockMeta, ...] = ()  # the blocks chosen
    written: int = 0  # copies written to the tier below
    dropped: int = 0  # host copies dropped (the block demoted, or evicted from the store)
    evicted: int = 0  # of those, blocks gone from the store (no room below)
    refused: SsdWriteError | None = None  # the tier below refused the write


class _Held:
    """`with placement.locked as table:` the store lock, and on the way out, what the table freed goes to the tiers."""

    __slots__ = ("_placement",)

    def __init__(self, placement: "Placement") -> None:
        self._placement = placement

    def __enter__(self) -> BlockTable:
        self._placement.lock.acquire()
        return self._placement.table

    def __exit__(self, *exc) -> None:
        try:
            self._placement.settle()
        finally:
            self._placement.lock.release()


class Placement:
    def __init__(self, lock: threading.RLock, changed: threading.Condition, table: BlockTable, host: MemoryTier, ssd: SsdTier,
                 policy: EvictionPolicy, counters: Counter) -> None:
        """host: the memory tier clients read and write; ssd: the record tier below it (its start-up scan and
        secure rewrite are LMDB's own; everything else goes through the Tier protocol)."""
        self.lock, self.changed, self.table = lock, changed, table
        self.host, self.ssd = host, ssd
        self.tiers: dict[TierId, Tier] = {host.tier: host, ssd.tier: ssd}
        self.policy = policy
        self.counters = counters
        self.locked = _Held(self)
        self.writer = threading.Lock()  # record-tier mutations, in the order they were decided
        self._erases: deque[tuple[TierId, Copy]] = deque()
        self.stopped = False  # the tiers are closed: nothing moves any more

    # ---- the store lock's exit duty -----------------------------------------------------

    def settle(self) -> None:
        """Hand what the table freed to the tiers: room back, quarantined slots zeroed, records queued for erasing. Lock held."""
        box = self.table.outbox
        if not box:
            return
        for tier, copy in box.release:
            self.tiers[tier].release(copy)
        for tier, slot in box.zero:
            self.tiers[tier].zero(slot)
        self._erases.extend(box.erase)
        changed = box.changed
        box.release.clear()
        box.zero.clear()
        box.erase.clear()
        box.changed = False
        if changed:
            self.changed.notify_all()

    def _take_erases(self) -> list[tuple[TierId, Copy]]:
        """The erases decided so far, to run before anything this holder writes. Both locks held."""
        self.settle()
        erases = list(self._erases)
        self._erases.clear()
        return erases

    def _erase(self, erases: list[tuple[TierId, Copy]]) -> None:
        """Run erases (writer lock held); refused ones go back to the front of the queue, and SsdWriteError."""
        by_tier: dict[TierId, list[Copy]] = {}
        for tier, copy in erases:
            by_tier.setdefault(tier, []).append(copy)
        try:
            for tier, copies in by_tier.items():
                self.tiers[tier].erase(copies)
        except SsdWriteError:
            with self.lock:
                self._erases.extendleft(reversed(erases))
            raise

    def erase_pending(self) -> None:
        """Run the queued erases now (a delete answers once its records are gone). SsdWriteError if refused."""
        if not self._erases and not self.table.outbox.erase:
            return
        with self.writer:
            with self.locked:
                erases = self._take_erases()
            self._erase(erases)

    # ---- demotion: host copies down to the ssd tier ---------------------------------------

    def _room_below(self, table: BlockTable, blocks: Sequence[BlockMeta], all_or_none: bool = False) -> list[bool]:
        """Which blocks the ssd tier can take, its least recently used unpinned blocks evicted to make
        their room (none if all_or_none and not all fit). Lock held."""
        ssd = self.ssd
        needs = [ssd.room_for(m.tenant, m.size) for m in blocks]
        room = self.policy.room(self.policy.order(table.index.in_lru_order(SSD)), ssd.capacity_bytes - ssd.used_bytes, needs,
                                lambda m: ssd.footprint(m.copies[SSD]))
        if all_or_none and not all(room.fits):
            return room.fits
        for victim in room.victims:
            self.counters[Event.SSD_EVICTIONS] += 1
            if table.drop_copy(victim, SSD):
                self._evicted(victim)
        self.settle()  # the victims' room is back before the new records are allocated
        return room.fits

    def _evicted(self, meta: BlockMeta) -> None:
        """A block left the store for want of room; in cluster mode, count it when it was a sole copy (a loss)."""
        self.counters[Event.EVICTIONS] += 1
        if self.policy.by_rank and keep_rank(meta) == 2:
            self.counters[Event.CLUSTER_SOLE_COPIES_EVICTED] += 1

    def _alloc_below(self, blocks: Sequence[BlockMeta]) -> list[tuple[BlockMeta, Copy]]:
        """Ssd records for blocks _room_below found room for (a block whose record cannot be had is left out). Lock held."""
        items = [(m, self.ssd.alloc(m.skey, m.tenant, m.size)) for m in blocks]
        return [(m, record) for m, record in items if record is not None]

    def _write_below(self, erases: list, items: list[tuple[BlockMeta, Copy]]) -> None:
        """Queued erases, then the blocks' host copies into their new ssd records, one transaction. Writer lock held."""
        self._erase(erases)
        if items:
            self.ssd.write([(m, record, self.host.read(m, m.copies[HOST])) for m, record in items])

    def _demote(self, pick: Callable[[BlockTable], list[BlockMeta]], drop_source: bool = True, respect_pause: bool = True) -> Moved:
        """Copy picked blocks' host copies down to the ssd tier, then (drop_source) free the host copies.

        Victims are pinned while LMDB writes and fsyncs them without the store lock, so requests
        keep flowing; only the bookkeeping takes it. A dirty victim (no ssd copy) the ssd tier has
        no room for is dropped: the host tier is a cache. One that LMDB refuses (a full disk), or
        that is not tried while writes are paused after such a refusal (respect_pause), stays in
        the host tier: a broken disk must not turn demotion into data loss.
        """
        ssd = self.ssd
        with self.writer:
            with self.locked as table:
                if self.stopped:
                    return Moved()
                victims = pick(table)
                # In cluster mode a read-through copy is dropped, not written down: its holder keeps the block.
                copies = {m for m in victims if self.policy.by_rank and m.origin == Origin.COPY and SSD not in m.copies}
                dirty = [m for m in victims if SSD not in m.copies and m not in copies]
                paused = respect_pause and bool(dirty) and ssd.writes_paused()
                fit_flags = [False] * len(dirty) if paused else self._room_below(table, dirty)
                no_room = {m for m, ok in zip(dirty, fit_flags) if not ok}
                items = self._alloc_below([m for m, ok in zip(dirty, fit_flags) if ok])
                fits = [m for m, _ in items]
                table.pin_blocks(fits)
                erases = self._take_erases()
            refused: SsdWriteError | None = None
            failed: BaseException | None = None
            try:
                self._write_below(erases, items)
            except SsdWriteError as err:
                refused = err  # the tier logged it and pauses background writes
            except BaseException as err:  # a bug: nothing is marked written, nothing stays pinned, and it is raised
                refused = SsdWriteError(f"ssd tier write failed: {err!r}")
                failed = err
            with self.locked as table:
                table.unpin_blocks(fits)
                stale = self._settle_written(table, items, refused is None)
                dropped = evicted = 0
                if drop_source:
                    # Dirty blocks leave without an ssd copy only for want of room; after a refusal none do.
                    droppable = (no_room if not paused and refused is None else set()) | copies
                    written = set(fits) if refused is None else set()
                    for meta in victims:
                        if not table.index.holds(meta) or meta.pins or HOST not in meta.copies:
                            continue
                        if SSD in meta.copies:
                            self.counters[Event.DEMOTIONS if meta in written else Event.HOST_EVICTIONS] += 1
                        elif meta in droppable:
                            evicted += 1
                            self._evicted(meta)
                        else:
                            continue
                        dropped += 1
                        table.drop_copy(meta, HOST)
                        if SSD not in meta.copies and HBM in meta.copies:  # the HBM tier keeps clean copies only
                            self.counters[Event.HBM_EVICTIONS] += 1
                            table.drop_copy(meta, HBM)
            self._erase_stale(stale)
        if failed is not None:
            raise failed
        return Moved(tuple(victims), 0 if refused else len(items), dropped, evicted, refused)

    def _settle_written(self, table: BlockTable, items: list[tuple[BlockMeta, Copy]], written: bool) -> list[Copy]:
        """Attach the records just written to their blocks; the records of blocks deleted meanwhile are stale. Lock held."""
        stale = []
        for meta, record in items:
            if written and not meta.deleted and table.index.get(meta.skey) in (meta, None) and SSD not in meta.copies:
                table.attach(meta, SSD, record)
            else:
                self.ssd.release(record)
                if written:
                    stale.append(record)
        return stale

    def _erase_stale(self, stale: list[Copy]) -> None:
        """Records written for blocks deleted while they were written. Writer lock held."""
        if not stale:
            return
        try:
            self.ssd.erase(stale)
        except SsdWriteError as err:
            log.error("%d blocks deleted during demotion could not be removed from the ssd tier and may reappear after a restart: %s", len(stale), err)

    def demote_cold(self) -> int:
        """Above the high watermark, demote LRU unpinned blocks until under the low one; how many were chosen."""
        host = self.host
        with self.locked:
            target = self.policy.demotion_target(host.used_bytes, host.capacity_bytes)
        if target is None:
            return 0

        def pick(table: BlockTable) -> list[BlockMeta]:
            return self.policy.to_watermark(self.policy.order(table.index.in_lru_order(HOST)), host.used_bytes, target,
                                            self._host_footprint, DEMOTE_BATCH_BYTES).blocks

        chosen = 0
        while True:
            moved = self._demote(pick)
            chosen += len(moved.victims)
            if not moved.dropped:  # under the target, or nothing could leave (pinned, a refusing disk)
                return chosen

    def _host_footprint(self, meta: BlockMeta) -> int:
        return self.host.footprint(meta.copies[HOST])

    def make_room(self, sizes: Sequence[int]) -> int:
        """The synchronous fallback when the background demoter has not kept up: demote the fewest
        blocks that free a host slot for each of sizes (eviction.py's for_slots). How many left."""
        def pick(table: BlockTable) -> list[BlockMeta]:
            return self.policy.for_slots(self.policy.order(table.index.in_lru_order(HOST)), lambda m: m.copies[HOST].offset, sizes, self.host.slots)

        return self._demote(pick).dropped

    def take_slot(self, table: BlockTable, lease: WriteLease, size: int) -> bool:
        """Give a write lease a host slot of size if one is free (its old one given back first). Lock held."""
        if lease.slot is not None:
            table.assign_slot(lease, None)
            self.settle()
        slot = self.host.alloc(lease.skey, lease.tenant, size)
        if slot is not None:
            table.assign_slot(lease, slot)
        return slot is not None

    def find_slots(self, caller: Caller, short: list[tuple[WriteLease, int]]) -> None:
        """Slots for granted leases the pool had none for, demoting blocks to make them (make_room);
        CapacityExhaustedError, saying why in the pool's terms, when none can be made."""
        for _ in range(ROOM_ATTEMPTS):
            moved = self.make_room([size for _, size in short])
            with self.locked as table:
                still = []
                for lease, size in short:
                    if table.leases.get(lease.lease_id) is not lease:
                        raise LeaseError(f"lease {lease.lease_id} ended while room was made for its block")
                    table.check_quota(caller, new_bytes=size)
                    if not self.take_slot(table, lease, size):
                        still.append((lease, size))
                short = still
            if not short or not moved:
                break
        if short:
            with self.locked as table:
                raise self._no_room(table, short[0][1])

    def _no_room(self, table: BlockTable, size: int) -> CapacityExhaustedError:
        """Why no slot could be found or made, in the pool's terms only: never whose blocks fill it, and
        no byte counts (a tenant watching them would see other tenants come and go; Stats is admin-only)."""
        slots = self.host.slots
        why = "its free space is in smaller size classes" if self.host.used_bytes < self.host.capacity_bytes else "the pool is full"
        quarantined = "; some slots wait out a stale-write quarantine (stale_write_quarantine_s)" if table.quarantine else ""
        return CapacityExhaustedError(
            f"host pool has no free {slots.slot_bytes(size)}-byte slot for a {size}-byte block: {why}, "
            f"and every slab that could be emptied holds pinned or reserved blocks{quarantined}"
        )

    def flush(self, batch_bytes: int = 64 << 20) -> int:
        """Write every host-only block to the ssd tier, batch_bytes of payload a transaction; returns how many.

        A batch LMDB refuses is skipped, as a smaller one after it may still fit, until three
        in a row are refused (the disk is full: more tries only delay shutdown). What could
        not be written is reported in one error line, never raised.
        """
        with self.locked as table:
            dirty = [m for m in table.index if HOST in m.copies and SSD not in m.copies]
        batches: list[list[BlockMeta]] = []
        size = batch_bytes
        for meta in dirty:
            if size + meta.size > batch_bytes:
                batches.append([])
                size = 0
            batches[-1].append(meta)
            size += meta.size
        flushed, refused_in_a_row, why = 0, 0, "no room on the ssd tier"
        for batch in batches:
            moved = self._demote(lambda table: [m for m in batch if table.index.holds(m) and HOST in m.copies and SSD not in m.copies],
                                 drop_source=False, respect_pause=False)
            flushed += moved.written
            if moved.refused is None:
                refused_in_a_row = 0
                continue
            refused_in_a_row, why = refused_in_a_row + 1, str(moved.refused)
            if refused_in_a_row == 3:
                break
        if flushed < len(dirty):
            log.error("%d blocks could not be flushed to the ssd tier (%d were): %s", len(dirty) - flushed, flushed, why)
        return flushed

    # ---- durability --------------------------------------------------------------------

    def make_durable(self, metas: Sequence[BlockMeta], then: Callable[[BlockTable], T] | None = None) -> T | None:
        """Write the blocks of metas not yet on the ssd tier to it in one transaction, or raise
        NotDurableError with none of them written; then run `then` under the store lock, in the
        hold that marks them durable, and return what it returns.

        metas may name blocks not in the index yet: a commit's, whose host copy is still its lease's
        slot (the lease's committing mark keeps it from expiring or moving). `then` is what adds them;
        if it raises, their records are erased again.
        """
        ssd = self.ssd
        with self.writer:
            with self.locked as table:
                gone = sum(m.deleted for m in metas)
                if gone:  # deleted, or evicted for want of ssd room, since the caller found it: nothing to write
                    raise NotDurableError(f"{gone} block(s) could not be made durable: they left the store while the put ran; put them again")
                todo = [m for m in metas if SSD not in m.copies]
                if todo:
                    self._check_durable_fits(table, todo)
                items = self._alloc_below(todo)
                if len(items) < len(todo):
                    for _, record in items:
                        ssd.release(record)
                    raise NotDurableError(f"{len(todo)} block(s) could not be made durable: the ssd tier has no room for them")
                resident = [m for m in todo if table.index.holds(m)]
                table.pin_blocks(resident)
                erases = self._take_erases()
            try:
                self._write_below(erases, items)
            except BaseException as err:
                with self.locked as table:
                    table.unpin_blocks(resident)
                    for _, record in items:
                        ssd.release(record)
                if isinstance(err, SsdWriteError):
                    raise NotDurableError(f"{len(todo)} block(s) could not be made durable: {err}") from err
                raise
            stale: list[Copy] = []
            try:
                with self.locked as table:
                    table.unpin_blocks(resident)
                    stale = self._settle_written(table, items, True)
                    try:
                        return then(table) if then is not None else None
                    except BaseException:
                        for meta in todo:
                            if not table.index.holds(meta) and SSD in meta.copies:
                                table.drop_copy(meta, SSD)
                        raise
            finally:
                self._erase_stale(stale)
                try:
                    with self.locked:
                        erases = self._take_erases()
                    self._erase(erases)
                except SsdWriteError as err:
                    log.error("queued ssd erases could not run yet (they are retried): %s", err)

    def _check_durable_fits(self, table: BlockTable, todo: list[BlockMeta]) -> None:
        """Make the ssd tier's room for all of todo, or NotDurableError having evicted nothing. Lock held."""
        ssd = self.ssd
        need = [ssd.room_for(m.tenant, m.size) for m in todo]
        cap = ssd.capacity_bytes
        for meta, nbytes in zip(todo, need):
            if nbytes > cap:
                raise NotDurableError(f"block {meta.key.hex()} could not be made durable: its {meta.size} bytes are larger than the ssd tier ({cap} bytes)")
        head = f"{len(todo)} block(s) could not be made durable"
        if sum(need) > cap:
            raise NotDurableError(f"{head}: together their {sum(need)} bytes are larger than the ssd tier ({cap} bytes)")
        if not all(self._room_below(table, todo, all_or_none=True)):
            raise NotDurableError(f"{head}: the ssd tier is full and the blocks that could make room are pinned")

    # ---- promotion: ssd copies back up to the host tier -----------------------------------

    def read_below(self, meta: BlockMeta) -> bytes:
        """A block's payload from the ssd tier, checked; a block that fails its checksum is dropped and reported as a miss."""
        record = meta.copies.get(SSD)
        data = self.ssd.read(meta, record) if record is not None else None
        if data is not None and len(data) == meta.size and checksum(data) == meta.checksum:
            return data
        with self.locked as table:
            self.counters[Event.MISSES] += 1
            if meta.deleted:
                raise BlockNotFoundError(f"1 of 1 blocks not found: {meta.key.hex()} (deleted while it was read)")
            self.counters[Event.CHECKSUM_FAILURES] += 1
            log.warning("dropping corrupt block from ssd tier", extra={"key": meta.key.hex()})
            table.delete(meta)
        raise BlockNotFoundError(f"1 of 1 blocks not found: {meta.key.hex()} (failed its checksum on the ssd tier and was dropped)")

    def promote(self, items: Sequence[tuple[BlockMeta, bytes]], make_room: bool) -> None:
        """Copy payloads read from the ssd tier into host slots, where there is room (made, with make_room,
        by demoting others). The copy runs outside the lock, into slots nobody else can see yet."""
        host = self.host
        with self.locked as table:
            slots = [self._host_slot_for(table, m) for m, _ in items]
        if make_room and any(s is None and self._wants_host(m) for (m, _), s in zip(items, slots)):
            self.make_room([m.size for (m, _), s in zip(items, slots) if s is None and self._wants_host(m)])
            with self.locked as table:
                slots = [s if s is not None else self._host_slot_for(table, m) for (m, _), s in zip(items, slots)]
        host.write([(m, s, data) for (m, data), s in zip(items, slots) if s is not None])
        with self.locked as table:
            for (meta, _), slot in zip(items, slots):
                if slot is None:
                    continue
                if self._wants_host(meta) and table.index.holds(meta):
                    table.attach(meta, HOST, slot)
                    self.counters[Event.PROMOTIONS] += 1
                else:
                    host.release(slot)

    @staticmethod
    def _wants_host(meta: BlockMeta) -> bool:
        return not meta.deleted and HOST not in meta.copies

    def _host_slot_for(self, table: BlockTable, meta: BlockMeta) -> Slot | None:
        return self.host.alloc(meta.skey, meta.tenant, meta.size) if self._wants_host(meta) else None

    def stage(self, metas: list[BlockMeta], prefix: bool) -> tuple[list[BlockMeta], int]:
        """For a pin: read its pin-counted blocks that are on the ssd tier only and promote them, making
        room. Returns the blocks now in the host pool and how many were staged; with prefix the run ends
        at the first that could not be, else that one's error is raised. Either way the rest are unpinned."""
        try:
            read, end = [], len(metas)
            for i, meta in enumerate(metas):
                if HOST in meta.copies:
                    continue
                try:
                    read.append((meta, self.read_below(meta)))
                except BlockNotFoundError:
                    if not prefix:
                        raise
                    end = i
                    break
            self.promote(read, make_room=True)
            stuck = next((i for i, m in enumerate(metas[:end]) if HOST not in m.copies), end)
            if stuck < end and not prefix:
                if metas[stuck].deleted:
                    raise BlockNotFoundError(f"1 of 1 blocks not found: {metas[stuck].key.hex()} (deleted while it was staged)")
                raise CapacityExhaustedError("host pool full of pinned blocks; cannot stage block from ssd")
        except Exception:
            with self.locked as table:
                table.unpin_blocks(metas)
            raise
        with self.locked as table:
            table.unpin_blocks(metas[stuck:])
        kept = set(metas[:stuck])
        return metas[:stuck], sum(m in kept for m, _ in read)

    def reserve_copies(self, metas: Sequence[BlockMeta]) -> list[Slot | None]:
        """Host slots for blocks about to arrive from a peer (room made by demotion, as a promotion's), visible to
        nobody until settle_copies; None for one present here already or that finds no room."""
        with self.locked as table:
            slots = [None if table.index.get(m.skey) is not None else self._host_slot_for(table, m) for m in metas]
            short = [m.size for m, s in zip(metas, slots) if s is None and table.index.get(m.skey) is None]
        if short:
            self.make_room(short)
            with self.locked as table:
                slots = [s if s is not None or table.index.get(m.skey) is not None else self._host_slot_for(table, m)
                         for m, s in zip(metas, slots)]
        return slots

    def settle_copies(self, metas: Sequence[BlockMeta], slots: Sequence[Slot | None], landed: int, still_wanted: Callable[[], bool]) -> int:
        """The first `landed` reserved copies (bytes written and checked) become local blocks if still_wanted()
        (asked under the lock); every other slot is released (zeroed). How many leading metas are now present
        (indexed here, or committed meanwhile by someone else, whose copy then stands); the run ends at one
        that did not land or found no room."""
        present, leading = 0, True
        with self.locked as table:
            wanted = still_wanted()
            for i, (meta, slot) in enumerate(zip(metas, slots)):
                existing = table.index.get(meta.skey)
                if i < landed and wanted and existing is None and slot is not None:
                    meta.copies[HOST] = slot
                    table.add(meta)
                    ok = True
                else:
                    if slot is not None:
                        self.host.release(slot)
                    ok = i < landed and wanted and existing is not None and existing.fingerprint_id == meta.fingerprint_id
                leading = leading and ok
                present += leading
        return present

    def adopt(self, items: Sequence[tuple[BlockMeta, Buffer]], still_wanted: Callable[[], bool]) -> int:
        """Blocks copied from a peer (checked by the caller) become local blocks: reserve_copies, the bytes written
        outside the lock into slots nobody can see yet, settle_copies."""
        metas = [m for m, _ in items]
        slots = self.reserve_copies(metas)
        self.host.write([(m, s, data) for (m, data), s in zip(items, slots) if s is not None])
        return self.settle_copies(metas, slots, len(items), still_wanted)

    # ---- the operator's evict ----------------------------------------------------------

    def evict_to_watermark(self, tier: TierId, fraction: float) -> EvictReport:
        """Evict least recently used unpinned blocks from one tier until used <= fraction * capacity.

        From the host tier a block is demoted (written to the ssd tier first, as the background
        worker does); from the ssd tier its copy is dropped, and with it the block unless a host
        copy remains.
        """
        if tier == SSD:
            return self._evict_below(fraction)
        host, found = self.host, {}

        def pick(table: BlockTable) -> list[BlockMeta]:
            found["victims"] = self.policy.to_watermark(self.policy.order(table.index.in_lru_order(HOST)), host.used_bytes,
                                                         int(fraction * host.capacity_bytes), self._host_footprint)
            return found["victims"].blocks

        moved = self._demote(pick)
        victims = found.get("victims")
        if victims is None:
            return EvictReport()
        self.counters[Event.ADMIN_EVICTIONS] += moved.evicted
        return EvictReport(moved.evicted, len(victims.blocks) - moved.evicted, sum(m.size for m in victims.blocks), victims.skipped_pinned)

    def _evict_below(self, fraction: float) -> EvictReport:
        ssd = self.ssd
        with self.writer:
            with self.locked as table:
                victims = self.policy.to_watermark(self.policy.order(table.index.in_lru_order(SSD)), ssd.used_bytes, int(fraction * ssd.capacity_bytes),
                                                   lambda m: ssd.footprint(m.copies[SSD]))
                gone = sum(table.drop_copy(meta, SSD) for meta in victims.blocks)
                self.counters[Event.SSD_EVICTIONS] += len(victims.blocks)
                self.counters[Event.ADMIN_EVICTIONS] += gone
                erases = self._take_erases()
            self._erase(erases)
        return EvictReport(gone, len(victims.blocks) - gone, sum(m.size for m in victims.blocks), victims.skipped_pinned)

    # ---- start-up and secure delete ------------------------------------------------------

    def restore(self) -> None:
        """Rebuild the index from the ssd tier at start-up; damaged records are counted and removed."""
        damaged = []
        for record, skey in self.ssd.scan():
            if record is None:
                damaged.append(skey)
                continue
            meta = BlockMeta(skey, record.tenant, record.fingerprint_id, record.size, record.checksum, created=record.created_ms / 1000)
            meta.copies[SSD] = self.ssd.adopt(skey, record.size)
            self.table.index.add(meta)
        if damaged:
            self.counters[Event.CHECKSUM_FAILURES] += len(damaged)
            try:
                self.ssd.delete_many(damaged)
            except SsdWriteError as err:  # a full disk must not keep the server from starting: the records stay unindexed
                log.warning("could not remove %d damaged records from the ssd tier: %s", len(damaged), err)
        log.debug("index rebuilt from ssd tier", extra={"blocks": len(self.table.index), "damaged": len(damaged)})

    def scrub_host(self) -> int:
        """Zero every free byte of the host pool and the unused tails of live slots (an earlier, larger
        block may have left bytes there); bytes zeroed."""
        with self.locked as table:
            slots = [m.copies[HOST] for m in table.index if HOST in m.copies]
            slots += [lease.slot for lease in table.leases.values() if lease.slot is not None]
            zeroed = self.host.zero_free()
            for slot in slots:
                tail = self.host.footprint(slot) - slot.size_bytes
                if tail:
                    self.host.zero_range(slot.offset + slot.size_bytes, tail)
                    zeroed += tail
        return zeroed

    def rewrite_below(self) -> int:
        """Erase what is queued, then rewrite the ssd tier so no freed page keeps a deleted payload; bytes rewritten."""
        with self.writer:
            with self.locked:
                erases = self._take_erases()
            self._erase(erases)
            return self.ssd.rewrite_live()
