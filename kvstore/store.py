"""Store: coordinates the index, leases and tiers; the one place a request's policy lives.

It speaks in keys, byte buffers and small dataclasses, never in gRPC. All metadata
changes happen under one lock; payload copies of reads happen outside it, guarded
by pins, so a block being read is never evicted, moved or freed underneath a reader.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import xxhash

from kvclient.errors import (
    BlockNotFoundError,
    BlockTooLargeError,
    CapacityExhaustedError,
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidRequestError,
    LeaseError,
    SizeMismatchError,
    UnavailableError,
)
from kvclient.keys import FINGERPRINT_ID_BYTES, KEY_BYTES
from kvstore.config import ServerConfig
from kvstore.index import BlockIndex, BlockMeta, storage_key, tenant_tag
from kvstore.leases import LeaseTable, ReadPin, WriteLease
from kvstore.tiers.host import HostPool
from kvstore.tiers.ssd import SsdTier, encode_header
from kvstore.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


@dataclass(frozen=True)
class Caller:
    """Who is asking: the tenant scopes every key; client_id owns leases and pins."""

    tenant: str = "default"
    client_id: str = "anonymous"
    is_admin: bool = False


@dataclass(frozen=True)
class KeyState:
    key: bytes
    state: int
    tier: int = pb.TIER_UNSPECIFIED
    size: int = 0
    lease_owner: str = ""
    lease_expires_ms: int = 0


@dataclass(frozen=True)
class LeaseInfo:
    key: bytes
    outcome: int
    lease_id: int = 0
    owner: str = ""
    expires_ms: int = 0
    slot_offset: int = 0
    slot_length: int = 0


class StagingNeeded(Exception):
    """A host_only pin named blocks that are on the SSD tier only; nothing was pinned."""


@dataclass(frozen=True)
class PinnedSlots:
    """Where pinned blocks sit in the host pool, as parallel lists in request order.

    Columns, not an object per block: a Pin of a long prefix names hundreds of blocks,
    and every consumer (the Pin RPC's packed arrays, the UCX data plane) wants columns.
    """

    offsets: list[int]
    sizes: list[int]
    checksums: list[int]

    @classmethod
    def of(cls, metas: Sequence[BlockMeta]) -> "PinnedSlots":
        return cls([m.host_offset for m in metas], [m.size for m in metas], [m.checksum for m in metas])

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class PinInfo:
    pin_id: int
    slots: PinnedSlots
    expires_ms: int


class Store:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.host = HostPool(cfg.host_memory, cfg.max_block_bytes)
        self.ssd = SsdTier(cfg.data_path / "ssd", cfg.ssd_capacity)
        self.index = BlockIndex()
        self.leases = LeaseTable()
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.admitting = True
        self.closed = False
        self._rebuild_index()

    # ---- validation ---------------------------------------------------------------

    @staticmethod
    def _check_fp(fingerprint_id: bytes) -> None:
        if len(fingerprint_id) != FINGERPRINT_ID_BYTES:
            raise InvalidRequestError(f"fingerprint_id must be {FINGERPRINT_ID_BYTES} bytes, got {len(fingerprint_id)}")

    @staticmethod
    def _check_keys(keys: Sequence[bytes]) -> None:
        if all(n == KEY_BYTES for n in map(len, keys)):
            return
        for i, key in enumerate(keys):
            if len(key) != KEY_BYTES:
                raise InvalidRequestError(f"key #{i} must be {KEY_BYTES} bytes, got {len(key)}")

    def _check_size(self, key: bytes, size: int) -> None:
        if size <= 0:
            raise InvalidRequestError(f"block {key.hex()} has size {size}; blocks must be non-empty")
        if size > self.cfg.max_block_bytes:
            raise BlockTooLargeError(f"block {key.hex()} is {size} bytes; max_block_bytes is {self.cfg.max_block_bytes}")

    def _check_admitting(self) -> None:
        if not self.admitting or self.closed:
            raise UnavailableError("server is draining and admits no writes")

    def _present(self, caller: Caller, fingerprint_id: bytes, key: bytes, strict: bool) -> BlockMeta | None:
        meta = self.index.get(storage_key(caller.tenant, key))
        if meta is not None and meta.fingerprint_id != fingerprint_id:
            if strict:
                raise FingerprintMismatchError(
                    f"block {key.hex()} was stored under fingerprint {meta.fingerprint_id.hex()}, request names {fingerprint_id.hex()}"
                )
            return None
        return meta

    # ---- lookup and leases --------------------------------------------------------

    def _state(self, caller: Caller, fingerprint_id: bytes, key: bytes) -> KeyState:
        meta = self._present(caller, fingerprint_id, key, strict=False)
        if meta is not None:
            return KeyState(key, pb.BLOCK_PRESENT, meta.tier, meta.size)
        lease = self.leases.active(storage_key(caller.tenant, key))
        if lease is not None:
            return KeyState(key, pb.BLOCK_PENDING, lease_owner=lease.owner, lease_expires_ms=lease.expires_unix_ms())
        return KeyState(key, pb.BLOCK_MISSING)

    def lookup(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> tuple[list[KeyState], int]:
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        with self._lock:
            states = [self._state(caller, fingerprint_id, k) for k in keys]
        prefix = 0
        for s in states:
            if s.state != pb.BLOCK_PRESENT:
                break
            prefix += 1
        self.counters["lookup_blocks_hit"] += sum(s.state == pb.BLOCK_PRESENT for s in states)
        self.counters["lookup_blocks_miss"] += sum(s.state != pb.BLOCK_PRESENT for s in states)
        return states, prefix

    def prefix_length(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        """How many leading keys are present, looking no further than the first that is not."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        with self._lock:
            return len(self._leading_present(caller, fingerprint_id, keys))

    def _leading_present(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[BlockMeta]:
        """The blocks of the leading present run of keys (one stored under another fingerprint ends it,
        as a miss would), counted as lookup hits and misses. Caller holds the lock."""
        tag, find = tenant_tag(caller.tenant), self.index.get  # a prefix names hundreds of keys: no per-key call
        metas = []
        for key in keys:
            meta = find(tag + key)
            if meta is None or meta.fingerprint_id != fingerprint_id:
                break
            metas.append(meta)
        self.counters["lookup_blocks_hit"] += len(metas)
        self.counters["lookup_blocks_miss"] += len(keys) - len(metas)
        return metas

    def _lease_for(self, caller: Caller, fingerprint_id: bytes, key: bytes, ttl_s: float) -> tuple[int, WriteLease | None]:
        """Outcome for one key and the caller's lease when GRANTED. Caller holds the lock."""
        if self._present(caller, fingerprint_id, key, strict=True) is not None:
            return pb.LEASE_ALREADY_PRESENT, None
        skey = storage_key(caller.tenant, key)
        lease = self.leases.by_skey.get(skey)
        if lease is not None and lease.expires_at <= time.monotonic():
            self._expire_lease(lease)
            lease = None
        if lease is not None and lease.owner != caller.client_id:
            return pb.LEASE_PENDING, lease
        if lease is None:
            lease = self.leases.grant(skey, caller.tenant, fingerprint_id, caller.client_id, ttl_s)
            self.counters["lease_grants"] += 1
        else:
            lease.expires_at = time.monotonic() + ttl_s
        return pb.LEASE_GRANTED, lease

    @staticmethod
    def _lease_info(key: bytes, outcome: int, lease: WriteLease | None) -> LeaseInfo:
        if lease is None:
            return LeaseInfo(key, outcome)
        granted = outcome == pb.LEASE_GRANTED
        return LeaseInfo(
            key,
            outcome,
            lease.lease_id if granted else 0,
            lease.owner,
            lease.expires_unix_ms(),
            (lease.host_offset or 0) if granted else 0,
            lease.size if granted and lease.host_offset is not None else 0,
        )

    def _ttl(self, ttl_ms: int) -> float:
        return ttl_ms / 1000 if ttl_ms > 0 else self.cfg.lease_ttl_s

    def acquire(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0) -> list[LeaseInfo]:
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        self._check_admitting()
        with self._lock:
            out = []
            for key in keys:
                outcome, lease = self._lease_for(caller, fingerprint_id, key, self._ttl(ttl_ms))
                out.append(self._lease_info(key, outcome, lease))
            return out

    def reserve(self, caller: Caller, fingerprint_id: bytes, specs: Sequence[tuple[bytes, int]], ttl_ms: int = 0) -> list[LeaseInfo]:
        self._check_fp(fingerprint_id)
        self._check_keys([k for k, _ in specs])
        for key, size in specs:
            self._check_size(key, size)
        self._check_admitting()
        with self._lock:
            out: list[LeaseInfo] = []
            granted_now: list[WriteLease] = []
            try:
                for key, size in specs:
                    outcome, lease = self._lease_for(caller, fingerprint_id, key, self._ttl(ttl_ms))
                    if outcome == pb.LEASE_GRANTED:
                        assert lease is not None
                        if lease.host_offset is None or lease.size != size:
                            granted_now.append(lease)
                            self._free_lease_slot(lease)
                            lease.host_offset = self._alloc_host(size)
                            lease.size = size
                    out.append(self._lease_info(key, outcome, lease))
            except CapacityExhaustedError:
                for lease in granted_now:
                    self._release_lease(lease)
                raise
            return out

    def renew(self, caller: Caller, lease_ids: Sequence[int], ttl_ms: int = 0) -> list[int]:
        with self._lock:
            leases = [self._owned_lease(caller, lid) for lid in lease_ids]
            for lease in leases:
                lease.expires_at = time.monotonic() + self._ttl(ttl_ms)
            return [lease.expires_unix_ms() for lease in leases]

    def release(self, caller: Caller, lease_ids: Sequence[int]) -> int:
        with self._lock:
            released = 0
            for lid in lease_ids:
                lease = self.leases.by_id.get(lid)
                if lease is not None and lease.owner == caller.client_id:
                    self._release_lease(lease)
                    released += 1
            return released

    def wait(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], timeout_ms: int) -> list[KeyState]:
        """Block until no key is PENDING (committed, or its lease released or expired) or timeout."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        deadline = time.monotonic() + timeout_ms / 1000
        self.counters["lease_waits"] += 1
        with self._changed:
            while True:
                self.reap_expired()
                states = [self._state(caller, fingerprint_id, k) for k in keys]
                remaining = deadline - time.monotonic()
                if all(s.state != pb.BLOCK_PENDING for s in states) or remaining <= 0 or self.closed:
                    return states
                soonest = min((s.lease_expires_ms for s in states if s.state == pb.BLOCK_PENDING), default=0)
                until_expiry = max(0.01, soonest / 1000 - time.time())
                self._changed.wait(min(remaining, until_expiry, 1.0))

    def _owned_lease(self, caller: Caller, lease_id: int) -> WriteLease:
        lease = self.leases.by_id.get(lease_id)
        if lease is None or lease.expires_at <= time.monotonic():
            raise LeaseError(f"lease {lease_id} is unknown or expired")
        if lease.owner != caller.client_id:
            raise LeaseError(f"lease {lease_id} is held by {lease.owner}, not {caller.client_id}")
        return lease

    def _free_lease_slot(self, lease: WriteLease) -> None:
        if lease.host_offset is not None:
            self.host.free(lease.host_offset, lease.size)
            lease.host_offset = None

    def _release_lease(self, lease: WriteLease) -> None:
        self._free_lease_slot(lease)
        self.leases.drop(lease)
        self._changed.notify_all()

    def _expire_lease(self, lease: WriteLease) -> None:
        log.debug("lease expired", extra={"lease_id": lease.lease_id, "owner": lease.owner})
        self.counters["lease_expiries"] += 1
        self._release_lease(lease)

    # ---- writes -------------------------------------------------------------------

    def write(self, caller: Caller, lease_id: int, offset: int, data: memoryview | bytes) -> None:
        with self._lock:
            lease = self._owned_lease(caller, lease_id)
            if lease.host_offset is None:
                raise LeaseError(f"lease {lease_id} has no reserved space; call Reserve first")
            if offset < 0 or offset + len(data) > lease.size:
                raise SizeMismatchError(f"write of {len(data)} bytes at offset {offset} exceeds the reserved {lease.size} bytes")
            # Under the lock: the slot cannot be reclaimed by expiry mid-copy.
            self.host.view[lease.host_offset + offset : lease.host_offset + offset + len(data)] = data

    def commit(self, caller: Caller, fingerprint_id: bytes, items: Sequence[tuple[int, int]], durable: bool = False) -> list[int]:
        """items: (lease_id, checksum). All are validated before any becomes visible."""
        self._check_fp(fingerprint_id)
        with self._lock:
            leases = [self._owned_lease(caller, lid) for lid, _ in items]
            expected_by_lease = dict(items)  # verified equal to each slot's checksum below
            for lease, (lid, expected) in zip(leases, items):
                if lease.fingerprint_id != fingerprint_id:
                    raise FingerprintMismatchError(f"lease {lid} was taken under fingerprint {lease.fingerprint_id.hex()}")
                if lease.host_offset is None:
                    raise LeaseError(f"lease {lid} has no reserved space; call Reserve first")
                actual = checksum(self.host.slot(lease.host_offset, lease.size))
                if actual != expected:
                    self.counters["checksum_failures"] += 1
                    raise ChecksumMismatchError(
                        f"block {lease.skey[8:].hex()} checksum {actual:#x} differs from the committed {expected:#x}"
                    )
            outcomes, committed = [], []
            for lease in leases:
                if lease.skey in (m.skey for m in committed) or self.index.get(lease.skey) is not None:
                    outcomes.append(pb.PUT_ALREADY_PRESENT)
                    self._release_lease(lease)
                    continue
                meta = BlockMeta(lease.skey, lease.tenant, lease.fingerprint_id, lease.size, expected_by_lease[lease.lease_id], host_offset=lease.host_offset)
                lease.host_offset = None
                self.leases.drop(lease)
                self.index.add(meta)
                committed.append(meta)
                outcomes.append(pb.PUT_STORED)
                self.counters["puts"] += 1
                self.counters["bytes_in"] += meta.size
            if durable and committed:
                self._write_ssd_locked(committed)
            self._changed.notify_all()
            return outcomes

    def put_inline(self, caller: Caller, fingerprint_id: bytes, blocks: Sequence[tuple[bytes, bytes, int]], durable: bool = False) -> list[int]:
        """blocks: (key, data, checksum). Reserve + write + commit per block, validated up front."""
        self._check_fp(fingerprint_id)
        self._check_keys([k for k, _, _ in blocks])
        for key, data, expected in blocks:
            self._check_size(key, len(data))
            if checksum(data) != expected:
                raise ChecksumMismatchError(f"block {key.hex()} data does not match its checksum {expected:#x}")
        with self._lock:
            leases = self.reserve(caller, fingerprint_id, [(k, len(d)) for k, d, _ in blocks])
            outcomes: list[int] = []
            to_commit: list[tuple[int, int]] = []
            for info, (key, data, expected) in zip(leases, blocks):
                if info.outcome == pb.LEASE_GRANTED:
                    self.write(caller, info.lease_id, 0, data)
                    to_commit.append((info.lease_id, expected))
                    outcomes.append(pb.PUT_STORED)
                elif info.outcome == pb.LEASE_ALREADY_PRESENT:
                    outcomes.append(pb.PUT_ALREADY_PRESENT)
                else:
                    outcomes.append(pb.PUT_PENDING_ELSEWHERE)
            committed = iter(self.commit(caller, fingerprint_id, to_commit, durable))
            return [next(committed) if o == pb.PUT_STORED else o for o in outcomes]

    # ---- reads --------------------------------------------------------------------

    def _resolve_for_read(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool = False) -> list[BlockMeta]:
        """Pin-count the keys' blocks; all of them, or with prefix the leading run that is present."""
        if prefix:
            metas = self._leading_present(caller, fingerprint_id, keys)
        else:
            metas, missing = [], []
            for key in keys:
                meta = self._present(caller, fingerprint_id, key, strict=True)
                if meta is None:
                    missing.append(key)
                else:
                    metas.append(meta)
            if missing:
                self.counters["misses"] += len(missing)
                raise BlockNotFoundError(f"{len(missing)} of {len(keys)} blocks not found: " + ", ".join(k.hex() for k in missing[:4]) + ("…" if len(missing) > 4 else ""))
        for meta in metas:
            meta.pins += 1
        self.index.touch(*metas)
        return metas

    def _unpin(self, metas: Sequence[BlockMeta]) -> None:
        for meta in metas:
            meta.pins -= 1
            if meta.deleted and meta.pins == 0 and meta.host_offset is not None:
                self.host.free(meta.host_offset, meta.size, zero=True)
                meta.host_offset = None

    def _read_ssd_verified(self, meta: BlockMeta) -> bytes:
        """Payload from LMDB; a block that fails its checksum is dropped and reported as a miss."""
        found = self.ssd.get(meta.skey)
        if found is not None and checksum(found[1]) == meta.checksum and found[0].size == meta.size:
            return found[1]
        with self._lock:
            self.counters["checksum_failures"] += 1
            self.counters["misses"] += 1
            log.warning("dropping corrupt block from ssd tier", extra={"key": meta.key.hex()})
            self._delete_locked(meta)
        raise BlockNotFoundError(f"1 of 1 blocks not found: {meta.key.hex()} (failed its checksum on the ssd tier and was dropped)")

    def _promote(self, meta: BlockMeta, data: bytes, make_room: bool) -> None:
        with self._lock:
            if meta.deleted or meta.host_offset is not None:
                return
            offset = self.host.alloc(meta.size)
            if offset is None and make_room:
                offset = self._make_room(meta.size)
            if offset is None:
                return
            self.host.view[offset : offset + meta.size] = data
            self.index.set_host(meta, offset)
            self.counters["promotions"] += 1

    def get(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> Iterator[tuple[bytes, bytes, int]]:
        """Yields (key, payload, checksum) in order; raises BlockNotFoundError before yielding if any is missing."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        with self._lock:
            metas = self._resolve_for_read(caller, fingerprint_id, keys)
        return self._stream(metas)

    def _stream(self, metas: list[BlockMeta]) -> Iterator[tuple[bytes, bytes, int]]:
        try:
            for meta in metas:
                if meta.host_offset is not None:
                    data = bytes(self.host.slot(meta.host_offset, meta.size))
                    self.counters["hits_host"] += 1
                else:
                    data = self._read_ssd_verified(meta)
                    self.counters["hits_ssd"] += 1
                    self._promote(meta, data, make_room=False)
                self.counters["gets"] += 1
                self.counters["bytes_out"] += meta.size
                yield meta.key, data, meta.checksum
        finally:
            with self._lock:
                self._unpin(metas)

    def pin(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0,
            prefix: bool = False, host_only: bool = False) -> PinInfo:
        """Pin blocks in the host pool (promoting from SSD) so a client can copy them out directly.

        With prefix, the longest present leading run is pinned instead of all or
        nothing, so an engine finds and pins its cached prefix in one round trip;
        a block that cannot be staged (corrupt on SSD, pool full of pins) ends the run.
        With host_only, StagingNeeded is raised (nothing pinned) rather than reading
        LMDB: for callers on an event loop, which then pin from a worker thread.
        """
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        with self._lock:
            metas = self._resolve_for_read(caller, fingerprint_id, keys, prefix)
            if host_only and any(m.host_offset is None for m in metas):
                self._unpin(metas)
                raise StagingNeeded(f"{sum(m.host_offset is None for m in metas)} of {len(metas)} blocks are on ssd")
        try:
            for i, meta in enumerate(metas):
                if meta.host_offset is None:
                    try:
                        self._promote(meta, self._read_ssd_verified(meta), make_room=True)
                        if meta.host_offset is None:
                            raise CapacityExhaustedError("host pool full of pinned blocks; cannot stage block from ssd")
                    except (BlockNotFoundError, CapacityExhaustedError):
                        if not prefix:
                            raise
                        with self._lock:
                            self._unpin(metas[i:])
                        metas = metas[:i]
                        break
                    self.counters["hits_ssd"] += 1
                else:
                    self.counters["hits_host"] += 1
        except Exception:
            with self._lock:
                self._unpin(metas)
            raise
        if not metas:
            return PinInfo(0, PinnedSlots([], [], []), 0)
        with self._lock:
            ttl = ttl_ms / 1000 if ttl_ms > 0 else self.cfg.pin_ttl_s
            pin = self.leases.add_pin(caller.client_id, metas, ttl)
            self.counters["gets"] += len(metas)
            self.counters["bytes_out"] += sum(m.size for m in metas)
            return PinInfo(pin.pin_id, PinnedSlots.of(metas), int((time.time() + ttl) * 1000))

    def unpin(self, caller: Caller, pin_ids: Sequence[int]) -> int:
        with self._lock:
            released = 0
            for pid in pin_ids:
                pin = self.leases.pins.get(pid)
                if pin is not None and pin.owner == caller.client_id:
                    self._drop_pin(pin)
                    released += 1
            return released

    def _drop_pin(self, pin: ReadPin) -> None:
        self.leases.pins.pop(pin.pin_id, None)
        self._unpin(pin.blocks)

    # ---- data-plane access: slots a transfer engine may touch ------------------------

    def pinned_slots(self, caller: Caller, pin_id: int) -> PinnedSlots:
        """Slots of a live pin the caller owns, for a data plane that sends them (e.g. UCX)."""
        with self._lock:
            pin = self.leases.pins.get(pin_id)
            if pin is None or pin.expires_at <= time.monotonic():
                raise LeaseError(f"pin {pin_id} is unknown or expired")
            if pin.owner != caller.client_id:
                raise LeaseError(f"pin {pin_id} is held by {pin.owner}, not {caller.client_id}")
            if any(m.host_offset is None for m in pin.blocks):
                raise LeaseError(f"pin {pin_id} names a block no longer in the host pool")
            return PinnedSlots.of(pin.blocks)

    def claim_write_slots(self, caller: Caller, lease_ids: Sequence[int], hold_s: float | None = None) -> list[tuple[int, int]]:
        """(offset, size) of each reserved lease, renewed for hold_s so expiry cannot free a slot mid-receive."""
        with self._lock:
            leases = [self._owned_lease(caller, lid) for lid in lease_ids]
            for lease in leases:
                if lease.host_offset is None:
                    raise LeaseError(f"lease {lease.lease_id} has no reserved space; call Reserve first")
                lease.expires_at = max(lease.expires_at, time.monotonic() + (hold_s or self.cfg.lease_ttl_s))
            return [(lease.host_offset, lease.size) for lease in leases]

    # ---- deletion -----------------------------------------------------------------

    def delete(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        with self._lock:
            metas = [m for k in keys if (m := self._present(caller, fingerprint_id, k, strict=False)) is not None]
            for meta in metas:
                self._delete_locked(meta)
            return len(metas)

    def _delete_locked(self, meta: BlockMeta, zero: bool = False) -> None:
        if self.index.get(meta.skey) is not meta:
            return
        if meta.on_ssd:
            self.ssd.delete_many([meta.skey])
        self.index.remove(meta.skey)
        meta.deleted = True
        if meta.host_offset is not None and meta.pins == 0:
            self.host.free(meta.host_offset, meta.size, zero=zero)
            meta.host_offset = None
        self._changed.notify_all()

    # ---- placement: host pool room, demotion, ssd room ------------------------------

    def _alloc_host(self, size: int) -> int:
        offset = self.host.alloc(size)
        if offset is None:
            offset = self._make_room(size)
        if offset is None:
            raise CapacityExhaustedError(f"host pool cannot fit a {size}-byte block: all resident blocks are pinned or reserved")
        return offset

    def _make_room(self, size: int) -> int | None:
        """Synchronous fallback when the background demoter has not kept up: evict LRU until size fits."""
        for skey in list(self.index.host_lru):
            meta = self.index.get(skey)
            if meta is None or meta.pins > 0:
                continue
            self._evict_from_host([meta])
            offset = self.host.alloc(size)
            if offset is not None:
                return offset
        return None

    def _evict_from_host(self, metas: list[BlockMeta], demoted_ids: frozenset[int] = frozenset()) -> None:
        """Free host copies, writing dirty ones to the SSD tier first. Caller holds the lock."""
        dirty = [m for m in metas if not m.on_ssd]
        dirty_ids = {id(m) for m in dirty} | demoted_ids
        if dirty:
            self._write_ssd_locked(dirty)
        for meta in metas:
            if meta.host_offset is None:
                continue
            self.host.free(meta.host_offset, meta.size)
            self.index.set_host(meta, None)
            if meta.on_ssd:
                self.counters["demotions" if id(meta) in dirty_ids else "host_evictions"] += 1
            else:
                self.index.remove(meta.skey)
                meta.deleted = True
                self.counters["evictions"] += 1

    def _write_ssd_locked(self, metas: list[BlockMeta]) -> None:
        room = [m for m in metas if self._ssd_make_room(self.ssd.record_bytes(m.tenant, m.size))]
        items = [(m.skey, encode_header(m.tenant, m.fingerprint_id, m.checksum, m.size), self.host.slot(m.host_offset, m.size)) for m in room if m.host_offset is not None]
        if items:
            self.ssd.put_many(items)
        for meta in room:
            self.index.set_ssd(meta, True)

    def _ssd_make_room(self, nbytes: int) -> bool:
        if nbytes > self.ssd.capacity_bytes:
            return False
        for skey in list(self.index.ssd_lru):
            if self.index.ssd_used_bytes + nbytes <= self.ssd.capacity_bytes:
                break
            meta = self.index.get(skey)
            if meta is None or meta.pins > 0:
                continue
            self.ssd.delete_many([skey])
            self.index.set_ssd(meta, False)
            self.counters["ssd_evictions"] += 1
            if meta.host_offset is None:
                self.index.remove(skey)
                meta.deleted = True
                self.counters["evictions"] += 1
        return self.index.ssd_used_bytes + nbytes <= self.ssd.capacity_bytes

    def demote_cold(self) -> int:
        """Above the high watermark, demote LRU unpinned blocks until under the low one.

        Victims are pinned while LMDB writes and fsyncs them without the store lock, so
        requests keep flowing during demotion; only the bookkeeping takes the lock.
        """
        with self._lock:
            cap = self.host.capacity_bytes
            if self.host.used_bytes <= self.cfg.high_watermark * cap:
                return 0
            target = self.cfg.low_watermark * cap
            victims, projected = [], self.host.used_bytes
            for skey in self.index.host_lru:
                if projected <= target:
                    break
                meta = self.index.get(skey)
                if meta is not None and meta.pins == 0:
                    victims.append(meta)
                    projected -= self.host.allocator.slot_bytes(meta.size)
            dirty = [m for m in victims if not m.on_ssd and self._ssd_make_room(self.ssd.record_bytes(m.tenant, m.size))]
            for meta in dirty:
                meta.pins += 1
            items = [(m.skey, encode_header(m.tenant, m.fingerprint_id, m.checksum, m.size), self.host.slot(m.host_offset, m.size)) for m in dirty]
        try:
            if items:
                self.ssd.put_many(items)
        finally:
            with self._lock:
                for meta in dirty:
                    self._unpin([meta])
                    current = self.index.get(meta.skey)
                    if current is meta:
                        self.index.set_ssd(meta, True)
                    elif current is None or not current.on_ssd:
                        self.ssd.delete_many([meta.skey])  # deleted while we wrote it
                still = [m for m in victims if self.index.get(m.skey) is m and m.pins == 0 and m.host_offset is not None]
                self._evict_from_host(still, frozenset(id(m) for m in dirty))
        return len(victims)

    def reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            for lease in self.leases.expired_leases(now):
                self._expire_lease(lease)
            for pin in self.leases.expired_pins(now):
                self.counters["pin_expiries"] += 1
                self._drop_pin(pin)

    # ---- lifecycle and stats ------------------------------------------------------

    def _rebuild_index(self) -> None:
        damaged = []
        for record, skey in self.ssd.scan():
            if record is None:
                damaged.append(skey)
                continue
            meta = BlockMeta(skey, record.tenant, record.fingerprint_id, record.size, record.checksum, on_ssd=True, created=record.created_ms / 1000)
            self.index.add(meta)
        if damaged:
            self.counters["checksum_failures"] += len(damaged)
            self.ssd.delete_many(damaged)
        log.debug("index rebuilt from ssd tier", extra={"blocks": len(self.index), "damaged": len(damaged)})

    def flush_to_ssd(self) -> int:
        with self._lock:
            dirty = [m for m in self.index if m.host_offset is not None and not m.on_ssd]
            self._write_ssd_locked(dirty)
            return len(dirty)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._changed.notify_all()
            if self.cfg.persist_on_shutdown:
                flushed = self.flush_to_ssd()
                log.info("flushed host tier to ssd", extra={"blocks": flushed})
            self.ssd.close()
            self.host.close()

    def stats(self) -> dict:
        self.reap_expired()
        with self._lock:
            host_blocks = len(self.index.host_lru)
            ssd_blocks = len(self.index.ssd_lru)
            return {
                "tiers": [
                    (pb.TIER_HOST, self.host.capacity_bytes, self.host.used_bytes, host_blocks),
                    (pb.TIER_SSD, self.ssd.capacity_bytes, self.index.ssd_used_bytes, ssd_blocks),
                ],
                "blocks": len(self.index),
                "leases_held": len(self.leases.by_id),
                "pins_held": len(self.leases.pins),
                "counters": dict(self.counters),
            }
