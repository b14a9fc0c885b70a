"""The block table: which blocks exist, who may write a missing one, who is reading one. A state machine with no I/O.

Owns the block index (index.py) together with write leases, read pins, per-tenant accounting,
expiry and the quarantine of slots a stale writer may still touch, and decides every change
to them. It never touches bytes, tiers or LMDB: what its decisions free is left in `outbox`
(copies whose room goes back, slots to zero now, records to erase), which the store hands to
the tiers before it lets go of its lock (placement.py). It takes no lock either: the store
serialises every call, so tests drive it directly, with a clock of their own.

A write lease makes one client the only writer of a missing key (groupcache's singleflight,
across processes); a read pin keeps blocks in place while a client copies them. Both expire,
so a dead client cannot hold either forever. Ownership is the pair (tenant, client id): the
tenant comes from the caller's token, the client id is only a name the client picks, so two
tenants choosing the same client id still own nothing of each other's. Ids are random, not a
counter, so one caller cannot enumerate another's leases or pins; what a caller holds is
counted per tenant, so quotas are O(1) checks.
"""
from __future__ import annotations

import logging
import secrets
import time
from array import array
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Callable, Sequence

from kvwire.errors import CapacityExhaustedError, FingerprintMismatchError, LeaseError
from kvwire.keys import key_list, native_keys
from kvwire.native import load
from kvwire.types import BlockState, KeyStatus, LeaseOutcome, Slot, Tier
from kvstore.counters import Event
from kvstore.index import BlockIndex, BlockMeta, block_key, storage_key, tenant_tag
from kvstore.tiers.base import Copy, Record

log = logging.getLogger(__name__)

ID_BITS = 62  # random lease and pin ids: guessing a live one is hopeless, and ownership is checked anyway
LANDING_TIER = Tier.HOST  # where a write lease reserves its slot: the memory clients write into
PIN_TABLE_ABI = 7  # csrc/kvstore_native/pin_table.c PIN_TABLE_ABI
_size = attrgetter("size")

# The per-key Pin bookkeeping in C (kvwire/native.py says when), bound to BlockMeta's fields.
pin_table, pin_table_status = load("kvstore._native", PIN_TABLE_ABI)
if pin_table is not None and not pin_table.bind(BlockMeta, OrderedDict):
    log.warning("kvstore._native does not know this BlockMeta (not a slots class with the fields it reads): running Python")
    pin_table, pin_table_status = None, "BlockMeta unknown to it"
if pin_table is not None:
    pin_table.bind_slot(Slot)  # else it reads a Slot's fields by attribute, as Python does


HostColumns = tuple[list[int], list[int], list[int], int]  # offsets, sizes, checksums, payload bytes


def host_columns(metas: list[BlockMeta]) -> HostColumns | None:
    """Where pinned blocks' host copies sit (offsets, sizes) and their checksums, as columns in order, and the
    blocks' payload bytes; None when one has no host copy (it is on a lower tier only and must be staged
    first). In C where built."""
    if pin_table is not None:
        columns = pin_table.host_columns(metas, Tier.HOST)
        if columns is not NotImplemented:
            return columns
    try:
        slots = [m.copies[Tier.HOST] for m in metas]
    except KeyError:
        return None
    return [s.offset for s in slots], [s.size_bytes for s in slots], [m.checksum for m in metas], sum(map(_size, metas))


HbmColumns = tuple[list[int], list[int], int]  # each block's fastest tier (HBM or HOST value), its HBM offset, how many in HBM


def _u64s(column: bytes) -> array:
    values = array("Q")
    values.frombytes(column)
    return values


def _unpacked_columns(columns: tuple | None) -> HostColumns | None:
    """The walk's packed host columns (bytes of uint64s) as array('Q')s: sequences of ints, made without an int a value."""
    return None if columns is None else (_u64s(columns[0]), _u64s(columns[1]), _u64s(columns[2]), columns[3])


def _unpacked_placement(placement: tuple | None) -> HbmColumns | None:
    return None if placement is None else (_u64s(placement[0]), _u64s(placement[1]), placement[2])


@dataclass(slots=True)
class PrefixRun:
    """What a prefix Pin's walk pinned: the blocks, their host columns (None: one has no host copy, the caller
    stages it) and, where asked and read, their HBM placement (placed; None then: none of them is in HBM)."""

    metas: list[BlockMeta]
    columns: HostColumns | None
    placement: HbmColumns | None = None
    placed: bool = False


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant scopes every key; client_id owns leases and pins."""

    tenant: str = "default"
    client_id: str = "anonymous"
    is_admin: bool = False


@dataclass(frozen=True)
class Limits:
    tenant_max_held_ids: int = 65536  # leases plus pins one non-admin tenant may hold
    tenant_held_bytes: int = 1 << 62  # bytes one non-admin tenant may hold reserved or pinned
    stale_write_quarantine_s: float = 30.0  # an expired or revoked lease's slot is not reused for this long


@dataclass(eq=False, slots=True)
class WriteLease:
    lease_id: int
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    owner: str  # the holder's client id, within its tenant
    expires_at: float  # on the table's clock
    size: int = 0  # bytes reserved for the block (0 until Reserve); counted against the tenant
    slot: Slot | None = None  # in LANDING_TIER
    committing: bool = False  # a durable commit is writing the slot to the ssd tier: it neither expires nor moves

    @property
    def key(self) -> bytes:
        return block_key(self.skey)

    def held_by(self, caller: Caller) -> bool:
        return self.tenant == caller.tenant and self.owner == caller.client_id


@dataclass(eq=False, slots=True)
class ReadPin:
    pin_id: int
    tenant: str
    owner: str
    blocks: list[BlockMeta]  # held, so a pin outlives a concurrent delete
    expires_at: float
    size: int = 0  # payload bytes pinned; counted against the tenant

    def held_by(self, caller: Caller) -> bool:
        return self.tenant == caller.tenant and self.owner == caller.client_id


@dataclass
class Outbox:
    """What the table's decisions freed, for the store to hand to the tiers before it lets go of its lock."""

    release: list[tuple[Tier, Copy]] = field(default_factory=list)  # room goes back now (a memory tier zeroes the slot)
    zero: list[tuple[Tier, Slot]] = field(default_factory=list)  # zero now, release when the quarantine ends
    erase: list[tuple[Tier, Copy]] = field(default_factory=list)  # record copies whose bytes must go: I/O, outside the lock
    changed: bool = False  # some key's state changed (committed, deleted, a lease ended): waiters should look again

    def __bool__(self) -> bool:
        return bool(self.release or self.zero or self.erase or self.changed)


@dataclass(frozen=True)
class LeaseView:
    """A lease or a pin as an operator sees it."""

    id: int
    kind: str  # "write" or "pin"
    owner: str
    tenant: str
    fingerprint_id: bytes
    keys: tuple[bytes, ...]
    expires_unix_ms: int
    size: int


@dataclass(frozen=True)
class BlockView:
    """A block as an operator sees it."""

    skey: bytes
    tenant: str
    fingerprint_id: bytes
    key: bytes
    tier: Tier  # the fastest holding a copy
    tiers: frozenset[Tier]
    size: int
    pins: int
    age_s: float
    idle_s: float

    @property
    def on_ssd(self) -> bool:
        return Tier.SSD in self.tiers


class BlockTable:
    def __init__(self, limits: Limits = Limits(), counters: Counter | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.index = BlockIndex(pin_table.FlatIndex(secrets.randbits(64), (Slot, Record)) if pin_table is not None else None)
        if pin_table is not None:
            self.index.toucher = pin_table.touch
        self.limits = limits
        self.counters: Counter[Event] = Counter() if counters is None else counters
        self.clock = clock
        self.leases: dict[int, WriteLease] = {}
        self._lease_at: dict[bytes, WriteLease] = {}  # storage key -> its lease
        self.pins: dict[int, ReadPin] = {}
        self.held_bytes: Counter[str] = Counter()  # tenant -> bytes reserved, pinned or quarantined
        self.held_ids: Counter[str] = Counter()  # tenant -> leases plus pins
        self.quarantine: deque[tuple[float, Tier, Slot, str]] = deque()  # (release at, tier, slot, tenant)
        self.pin_count = 0  # block pins in all: reads in progress and pinned blocks
        self.outbox = Outbox()

    def unix_ms(self, at: float) -> int:
        return int((time.time() + at - self.clock()) * 1000)

    def _new_id(self) -> int:
        while True:  # one id space for leases and pins: an id names at most one of them
            candidate = secrets.randbits(ID_BITS) or 1
            if candidate not in self.leases and candidate not in self.pins:
                return candidate

    # ---- blocks ---------------------------------------------------------------------

    def find(self, tenant: str, fingerprint_id: bytes, key: bytes, strict: bool = False) -> BlockMeta | None:
        """The tenant's block of key; one stored under another fingerprint is a miss, or with strict an error."""
        meta = self.index.get(storage_key(tenant, key))
        if meta is not None and meta.fingerprint_id != fingerprint_id:
            if strict:
                raise FingerprintMismatchError(
                    f"block {key.hex()} was stored under fingerprint {meta.fingerprint_id.hex()}, request names {fingerprint_id.hex()}")
            return None
        return meta

    def leading_present(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[BlockMeta]:
        """The blocks of the leading present run of keys (one stored under another fingerprint ends it,
        as a miss would), counted as lookup hits and misses."""
        tag, find = tenant_tag(tenant), self.index.get  # a prefix names hundreds of keys: no per-key call
        metas = []
        for key in keys:
            meta = find(tag + key)
            if meta is None or meta.fingerprint_id != fingerprint_id:
                break
            metas.append(meta)
        self.counters[Event.LOOKUP_BLOCKS_HIT] += len(metas)
        self.counters[Event.LOOKUP_BLOCKS_MISS] += len(keys) - len(metas)
        return metas

    def present(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes]) -> bytes:
        """One byte a key, 1 where the tenant's block of it is stored under fingerprint_id: leading_present's
        walk over every key (not counted here: the caller counts hits once it has asked peers too). In C where
        built; the comprehension below is its definition."""
        if pin_table is not None:
            answer = pin_table.present(self.index.blocks, tenant_tag(tenant), keys, fingerprint_id)
            if answer is not NotImplemented:
                return answer
        tag, find = tenant_tag(tenant), self.index.get
        return bytes([(meta := find(tag + key)) is not None and meta.fingerprint_id == fingerprint_id for key in keys])

    def status(self, tenant: str, fingerprint_id: bytes, key: bytes) -> KeyStatus:
        meta = self.find(tenant, fingerprint_id, key)
        if meta is not None:
            return KeyStatus(key, BlockState.PRESENT, meta.tier, meta.size)
        lease = self.active_lease(storage_key(tenant, key))
        if lease is not None:
            return KeyStatus(key, BlockState.PENDING, lease_owner=lease.owner, lease_expires_unix_ms=self.unix_ms(lease.expires_at))
        return KeyStatus(key, BlockState.MISSING)

    def add(self, meta: BlockMeta) -> None:
        self.index.add(meta)
        self.outbox.changed = True

    def attach(self, meta: BlockMeta, tier: Tier, copy: Copy) -> None:
        self.index.attach(meta, tier, copy)

    def _detach(self, meta: BlockMeta, tier: Tier) -> None:
        copy = self.index.detach(meta, tier)
        self.outbox.release.append((tier, copy))
        if isinstance(copy, Record):
            self.outbox.erase.append((tier, copy))

    def delete(self, meta: BlockMeta) -> bool:
        """Remove a block from the store. Its records are erased now; its memory copies once the
        last reader unpins (a client may be copying out of the slot). False if it was gone already."""
        if not self.index.holds(meta):
            return False
        self.index.remove(meta)
        meta.deleted = True
        self.outbox.changed = True
        for tier, copy in list(meta.copies.items()):
            if isinstance(copy, Record) or meta.pins == 0:
                self._detach(meta, tier)
        return True

    def drop_copy(self, meta: BlockMeta, tier: Tier) -> bool:
        """Drop one copy of an unpinned block; True when it was the last, and the block left the store."""
        self._detach(meta, tier)
        if meta.copies or not self.index.holds(meta):
            return False
        self.index.remove(meta)
        meta.deleted = True
        self.outbox.changed = True
        return True

    def pin_leading(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[BlockMeta]:
        """leading_present, then pin_blocks and the index's touch of the blocks found: a prefix Pin's
        per-key work, which for an 8k-token prompt is 512 keys. Done in one pass by kvstore._native
        (csrc/kvstore_native/pin_table.c) where it is built, in the same order (every block pin-counted
        before any is touched); this method's three calls are its definition."""
        self.index.flush_touches()  # queued touches are older than this one
        if pin_table is not None:
            index = self.index
            metas = pin_table.pin_leading(index.blocks, index.lru, tenant_tag(tenant), keys, fingerprint_id, time.monotonic())
            if metas is not NotImplemented:
                self.counters[Event.LOOKUP_BLOCKS_HIT] += len(metas)
                self.counters[Event.LOOKUP_BLOCKS_MISS] += len(keys) - len(metas)
                self.pin_count += len(metas)
                return metas
        metas = self.leading_present(tenant, fingerprint_id, keys)
        self.pin_blocks(metas)
        self.index.touch(metas)
        return metas

    def pin_leading_columns(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes],
                            defer_touch: bool = False) -> tuple[list[BlockMeta], HostColumns | None]:
        """pin_leading, and host_columns of the blocks it pinned: the definition of pin_prefix's walk. defer_touch: the
        blocks' touch is queued (index.touch_later) instead of made: the LRU moves were a quarter of a 512-key Pin's
        walk with the caches cold, as an engine's calls find them."""
        now = time.monotonic()
        if not defer_touch:
            self.index.flush_touches()  # queued touches are older than this one
        metas = self.leading_present(tenant, fingerprint_id, keys)
        self.pin_blocks(metas)
        if defer_touch:
            self.index.touch_later(metas, now)
        else:
            self.index.touch(metas, now)
        return metas, host_columns(metas)

    def pin_prefix(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes],
                   hbm_values: tuple[int, int] | None = None, packed: bool = False) -> PrefixRun:
        """A prefix Pin's walk: pin_leading_columns(defer_touch=True), its definition, and with hbm_values (the HBM
        and HOST tiers' values) the run's HBM placement, whose definition is hbm_placement.placement_columns. In C
        over the index's flat rows where built (csrc/kvstore_native/flat_index.c): the walk of 512 blocks was a
        chain of some ten dependent cache misses a block through the dict and the blocks' objects; the rows are
        read in stages that overlap those misses. packed: the columns may come as array('Q')s (no int object a
        value), for an answer encoded at once (the local socket's)."""
        flat = self.index.flat
        if flat is not None:
            now = time.monotonic()
            answer = flat.pin_prefix(tenant_tag(tenant), native_keys(keys), fingerprint_id, hbm_values, packed)
            if answer is not NotImplemented:
                metas, columns, placement = answer
                if packed:
                    columns, placement = _unpacked_columns(columns), _unpacked_placement(placement)
                self.counters[Event.LOOKUP_BLOCKS_HIT] += len(metas)
                self.counters[Event.LOOKUP_BLOCKS_MISS] += len(keys) - len(metas)
                self.pin_count += len(metas)
                if metas:
                    self.index.touch_later(metas, now)
                return PrefixRun(metas, columns, placement, placed=hbm_values is not None and columns is not None)
        metas, columns = self.pin_leading_columns(tenant, fingerprint_id, key_list(keys), defer_touch=True)
        return PrefixRun(metas, columns)

    def pin_found(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], missing: list[bytes]) -> list[BlockMeta]:
        """The blocks of keys, pin-counted and touched, the keys with none appended to missing (an all-or-nothing
        Pin, and every get); a block under another fingerprint raises FingerprintMismatchError. In one pass in
        C where built, leaving that error to the loop below, its definition."""
        self.index.flush_touches()  # queued touches are older than this one
        if pin_table is not None:
            index = self.index
            answer = pin_table.pin_found(index.blocks, index.lru, tenant_tag(tenant), keys, fingerprint_id, time.monotonic())
            if answer is not NotImplemented:
                metas, absent = answer
                missing += absent
                self.pin_count += len(metas)
                return metas
        metas = []
        for key in keys:
            meta = self.find(tenant, fingerprint_id, key, strict=True)
            if meta is None:
                missing.append(key)
            else:
                metas.append(meta)
        self.pin_blocks(metas)
        self.index.touch(metas)
        return metas

    def pin_blocks(self, metas: list[BlockMeta]) -> None:
        """Count a read of each block: none is evicted, moved or freed until unpin_blocks."""
        for meta in metas:
            meta.pins += 1
        self.pin_count += len(metas)

    def unpin_blocks(self, metas: Sequence[BlockMeta]) -> None:
        if pin_table is not None:  # the count in C (a prefix pin's 512 blocks), the freeing here
            freed = pin_table.unpin_blocks(metas)
            if freed is not NotImplemented:
                for meta in freed:
                    for tier in list(meta.copies):
                        self._detach(meta, tier)
                self.pin_count -= len(metas)
                return
        for meta in metas:
            meta.pins -= 1
            if meta.deleted and meta.pins == 0:
                for tier in list(meta.copies):
                    self._detach(meta, tier)
        self.pin_count -= len(metas)

    def block_view(self, meta: BlockMeta, now_unix: float, now: float) -> BlockView:
        self.index.flush_touches()  # last_access as of every read answered
        return BlockView(meta.skey, meta.tenant, meta.fingerprint_id, meta.key, meta.tier, frozenset(meta.copies), meta.size,
                         meta.pins, now_unix - meta.created, now - meta.last_access)

    # ---- write leases -----------------------------------------------------------------

    def active_lease(self, skey: bytes) -> WriteLease | None:
        lease = self._lease_at.get(skey)
        if lease is not None and self._lapsed(lease, self.clock()):
            return None
        return lease

    @staticmethod
    def _lapsed(lease: WriteLease, now: float) -> bool:
        return lease.expires_at <= now and not lease.committing

    def lease_for(self, caller: Caller, fingerprint_id: bytes, key: bytes, ttl_s: float) -> tuple[LeaseOutcome, WriteLease | None]:
        """The outcome for one key, and the lease: the caller's when GRANTED (new, or its own renewed), the holder's when PENDING."""
        if self.find(caller.tenant, fingerprint_id, key, strict=True) is not None:
            return LeaseOutcome.ALREADY_PRESENT, None
        skey, now = storage_key(caller.tenant, key), self.clock()
        lease = self._lease_at.get(skey)
        if lease is not None and self._lapsed(lease, now):
            self.expire(lease)
            lease = None
        if lease is not None and not lease.held_by(caller):
            return LeaseOutcome.PENDING, lease
        if lease is None:
            self.check_quota(caller, new_ids=1)
            lease = WriteLease(self._new_id(), skey, caller.tenant, fingerprint_id, caller.client_id, now + ttl_s)
            self.leases[lease.lease_id] = lease
            self._lease_at[skey] = lease
            self.held_ids[caller.tenant] += 1
            self.counters[Event.LEASE_GRANTS] += 1
        else:
            lease.expires_at = now + ttl_s
        return LeaseOutcome.GRANTED, lease

    def owned_lease(self, caller: Caller, lease_id: int) -> WriteLease:
        """The caller's live lease. One answer for unknown, expired and somebody else's, so the
        error tells a caller nothing about leases that are not its own."""
        lease = self.leases.get(lease_id)
        if lease is None or self._lapsed(lease, self.clock()) or not lease.held_by(caller):
            raise LeaseError(f"lease {lease_id} is not a live lease of this client (unknown, expired, released or another client's)")
        return lease

    def writable_lease(self, caller: Caller, lease_id: int) -> WriteLease:
        """The caller's live lease with its slot reserved and no durable commit under way."""
        lease = self.owned_lease(caller, lease_id)
        if lease.slot is None:
            raise LeaseError(f"lease {lease_id} has no reserved space; call Reserve first")
        if lease.committing:
            raise LeaseError(f"lease {lease_id} is being committed durably; wait for that Commit's answer")
        return lease

    def renew(self, lease: WriteLease, ttl_s: float) -> int:
        lease.expires_at = self.clock() + ttl_s
        return self.unix_ms(lease.expires_at)

    def hold(self, lease: WriteLease, hold_s: float) -> None:
        """Keep the lease alive at least hold_s more (a data plane receiving into its slot)."""
        lease.expires_at = max(lease.expires_at, self.clock() + hold_s)

    def assign_slot(self, lease: WriteLease, slot: Slot | None) -> None:
        """Give the lease a slot of its new size (None: none yet), releasing the one it had."""
        if lease.slot is not None:
            self.outbox.release.append((LANDING_TIER, lease.slot))
        size = slot.size_bytes if slot is not None else 0
        self.held_bytes[lease.tenant] += size - lease.size
        lease.slot, lease.size = slot, size

    def _drop(self, lease: WriteLease) -> bool:
        if self.leases.pop(lease.lease_id, None) is None:
            return False
        if self._lease_at.get(lease.skey) is lease:
            del self._lease_at[lease.skey]
        self.held_ids[lease.tenant] -= 1
        self.held_bytes[lease.tenant] -= lease.size
        self.outbox.changed = True
        return True

    def end_lease(self, lease: WriteLease, stale: bool = False) -> None:
        """End a lease without a commit. stale: it ended without Commit or Release (expired, revoked), so
        its holder may still be copying into the slot through the shared pool; the slot stays out of use
        for stale_write_quarantine_s, or that late copy would land in the next writer's block."""
        if not self._drop(lease):
            return
        slot, lease.slot, lease.committing = lease.slot, None, False
        if slot is None:
            return
        if stale and self.limits.stale_write_quarantine_s > 0:
            self.quarantine.append((self.clock() + self.limits.stale_write_quarantine_s, LANDING_TIER, slot, lease.tenant))
            # Still the tenant's until released: else reserving and letting leases lapse would park the whole pool.
            self.held_bytes[lease.tenant] += slot.size_bytes
            self.outbox.zero.append((LANDING_TIER, slot))  # now too: a secure delete scrubs free slots only
            self.counters[Event.SLOTS_QUARANTINED] += 1
        else:
            self.outbox.release.append((LANDING_TIER, slot))

    def expire(self, lease: WriteLease) -> None:
        self.counters[Event.LEASE_EXPIRIES] += 1
        self.end_lease(lease, stale=True)

    def release(self, caller: Caller, lease_ids: Sequence[int]) -> int:
        """End the caller's leases of these ids (others' and unknown ids are ignored); how many ended."""
        released = 0
        for lease_id in lease_ids:
            lease = self.leases.get(lease_id)
            if lease is not None and not self._lapsed(lease, self.clock()) and lease.held_by(caller):
                self.end_lease(lease)
                released += 1
        return released

    def begin_commit(self, leases: Sequence[WriteLease]) -> None:
        """A durable commit is writing these leases' slots out: they neither lapse nor take writes until end_commit."""
        for lease in leases:
            lease.committing = True

    def end_commit(self, leases: Sequence[WriteLease]) -> None:
        for lease in leases:
            lease.committing = False

    def commit_lease(self, lease: WriteLease) -> Slot:
        """End a lease by committing its block: the slot becomes the block's copy."""
        slot, lease.slot = lease.slot, None
        self._drop(lease)
        lease.size, lease.committing = 0, False
        assert slot is not None
        return slot

    # ---- read pins --------------------------------------------------------------------

    def add_pin(self, caller: Caller, metas: list[BlockMeta], ttl_s: float, size_bytes: int | None = None) -> ReadPin:
        """A pin over blocks already pin-counted (pin_blocks); drop_pin uncounts them. size_bytes: their sizes' sum, if known."""
        size = sum(map(_size, metas)) if size_bytes is None else size_bytes
        pin = ReadPin(self._new_id(), caller.tenant, caller.client_id, metas, self.clock() + ttl_s, size)
        self.pins[pin.pin_id] = pin
        self.held_ids[caller.tenant] += 1
        self.held_bytes[caller.tenant] += pin.size
        return pin

    def owned_pin(self, caller: Caller, pin_id: int) -> ReadPin | None:
        pin = self.pins.get(pin_id)
        return pin if pin is not None and pin.held_by(caller) else None

    def live_pin(self, caller: Caller, pin_id: int) -> ReadPin:
        pin = self.owned_pin(caller, pin_id)
        if pin is None or pin.expires_at <= self.clock():
            raise LeaseError(f"pin {pin_id} is not a live pin of this client (unknown, expired, released or another client's)")
        return pin

    def drop_pin(self, pin: ReadPin) -> bool:
        if self.pins.pop(pin.pin_id, None) is None:
            return False
        self.held_ids[pin.tenant] -= 1
        self.held_bytes[pin.tenant] -= pin.size
        self.unpin_blocks(pin.blocks)
        return True

    def unpin(self, caller: Caller, pin_ids: Sequence[int]) -> int:
        """Drop the caller's pins of these ids (others' and unknown ids are ignored); how many were dropped."""
        dropped = 0
        for pin_id in pin_ids:
            pin = self.owned_pin(caller, pin_id)
            if pin is not None and self.drop_pin(pin):
                dropped += 1
        return dropped

    # ---- quotas -----------------------------------------------------------------------

    def check_quota(self, caller: Caller, new_ids: int = 0, new_bytes: int = 0) -> None:
        """One tenant may not hold the whole pool reserved or pinned (nothing of its can then be
        evicted to make room for others). Admins are exempt: they act for the whole server."""
        if caller.is_admin:
            return
        ids = self.held_ids[caller.tenant] + new_ids
        if new_ids and ids > self.limits.tenant_max_held_ids:
            raise CapacityExhaustedError(
                f"tenant {caller.tenant!r} would hold {ids} leases and pins; its limit is {self.limits.tenant_max_held_ids} (tenant_max_held_ids): release or unpin some")
        limit = self.limits.tenant_held_bytes
        held = self.held_bytes[caller.tenant] + new_bytes
        if new_bytes > 0 and held > limit:
            raise CapacityExhaustedError(
                f"tenant {caller.tenant!r} would hold {held} bytes reserved or pinned; its limit is {limit} (tenant_held_fraction of the host pool): commit, release or unpin first")

    def within_quota(self, caller: Caller, metas: list[BlockMeta], prefix: bool, size_bytes: int | None = None) -> list[BlockMeta]:
        """The pin-counted blocks a new pin may hold under the caller's quota, the rest unpinned; a prefix
        pin is cut short rather than refused (the engine recomputes the rest). size_bytes: their sizes' sum, if known."""
        try:
            self.check_quota(caller, new_ids=1, new_bytes=sum(map(_size, metas)) if size_bytes is None else size_bytes)
            return metas
        except CapacityExhaustedError:
            if not prefix or caller.is_admin:
                self.unpin_blocks(metas)
                raise
        room = self.limits.tenant_held_bytes - self.held_bytes[caller.tenant]
        keep = 0
        while keep < len(metas) and metas[keep].size <= room:
            room -= metas[keep].size
            keep += 1
        self.unpin_blocks(metas[keep:])
        if keep == 0:
            raise CapacityExhaustedError(
                f"tenant {caller.tenant!r} holds its limit of bytes reserved or pinned (tenant_held_fraction of the host pool): unpin first")
        try:
            self.check_quota(caller, new_ids=1)
        except CapacityExhaustedError:
            self.unpin_blocks(metas[:keep])
            raise
        return metas[:keep]

    # ---- expiry -----------------------------------------------------------------------

    def reap(self) -> None:
        """End expired leases (their slots quarantined), release slots whose quarantine is over, drop expired pins."""
        now = self.clock()
        for lease in [lease for lease in self.leases.values() if self._lapsed(lease, now)]:
            self.expire(lease)
        while self.quarantine and self.quarantine[0][0] <= now:
            _, tier, slot, tenant = self.quarantine.popleft()
            self.outbox.release.append((tier, slot))
            self.held_bytes[tenant] -= slot.size_bytes
        for pin in [pin for pin in self.pins.values() if pin.expires_at <= now]:
            self.counters[Event.PIN_EXPIRIES] += 1
            self.drop_pin(pin)

    # ---- what an operator sees and does -----------------------------------------------

    def lease_views(self) -> list[LeaseView]:
        views = [
            LeaseView(l.lease_id, "write", l.owner, l.tenant, l.fingerprint_id, (l.key,), self.unix_ms(l.expires_at), l.size)
            for l in self.leases.values()
        ]
        for pin in self.pins.values():
            fingerprint_id = pin.blocks[0].fingerprint_id if pin.blocks else b""
            views.append(LeaseView(pin.pin_id, "pin", pin.owner, pin.tenant, fingerprint_id, tuple(m.key for m in pin.blocks),
                                   self.unix_ms(pin.expires_at), pin.size))
        return views

    def revoke(self, match: Callable[[LeaseView], bool]) -> tuple[int, int]:
        """End the leases and drop the pins an operator names; returns (leases, pins)."""
        chosen = {v.id for v in self.lease_views() if match(v)}
        leases = [l for l in self.leases.values() if l.lease_id in chosen]
        pins = [p for p in self.pins.values() if p.pin_id in chosen]
        for lease in leases:
            self.end_lease(lease, stale=True)  # its holder may still be writing
        for pin in pins:
            self.drop_pin(pin)
        if leases:
            self.counters[Event.LEASE_REVOCATIONS] += len(leases)
        if pins:
            self.counters[Event.PIN_REVOCATIONS] += len(pins)
        return len(leases), len(pins)

    def in_flight(self) -> int:
        """Reads holding pins plus write leases still open."""
        return self.pin_count + len(self.leases)
