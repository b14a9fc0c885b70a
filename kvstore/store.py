"""Store: coordinates the index, leases and tiers; the one place a request's policy lives.

It speaks in keys, byte buffers and small dataclasses, never in gRPC. All metadata
changes happen under one lock; payload copies of reads happen outside it, guarded
by pins, so a block being read is never evicted, moved or freed underneath a reader.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import xxhash

from kvwire.errors import (
    BlockNotFoundError,
    BlockTooLargeError,
    CapacityExhaustedError,
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidRequestError,
    LeaseError,
    NotDurableError,
    SizeMismatchError,
    SsdWriteError,
    UnavailableError,
)
from kvwire.keys import FINGERPRINT_ID_BYTES, KEY_BYTES
from kvstore.config import ServerConfig
from kvstore.index import BlockIndex, BlockMeta, storage_key, tenant_tag
from kvstore.leases import LeaseTable, ReadPin, WriteLease
from kvstore.tiers.host import HostPool
from kvstore.tiers.ssd import SsdTier, encode_header
from kvwire.v1 import kvstore_pb2 as pb

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.25  # how often a blocked Wait checks that its caller is still there
# Keys handled per hold of the store lock: a request naming tens of thousands of keys takes
# turns with everyone else's (a 1M-key Lookup once held it for 25 s).
LOCK_CHUNK_KEYS = 1024


def _chunks(items: Sequence, size: int = LOCK_CHUNK_KEYS) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


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


class _Changes(threading.Condition):
    """The store's condition, counting notifications: a waiter that read state without the
    lock can tell whether anything changed before it sleeps."""

    generation = 0

    def notify_all(self) -> None:
        self.generation += 1
        super().notify_all()


class Store:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.host = HostPool(cfg.host_memory, cfg.max_block_bytes)
        self.ssd = SsdTier(cfg.data_path / "ssd", cfg.ssd_capacity)
        self.index = BlockIndex()
        self.leases = LeaseTable()
        self.counters: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._changed = _Changes(self._lock)
        self.admitting = True
        self.closed = False
        # (free at, offset, tenant, bytes) of slots whose lease expired unreleased: a writer that outlived
        # its lease may still copy into them through the shared pool (see _free_lease_slot).
        self._quarantine: deque[tuple[float, int, str, int]] = deque()
        self._rebuild_index()

    # ---- validation ---------------------------------------------------------------

    @staticmethod
    def _check_fp(fingerprint_id: bytes) -> None:
        if len(fingerprint_id) != FINGERPRINT_ID_BYTES:
            raise InvalidRequestError(f"fingerprint_id must be {FINGERPRINT_ID_BYTES} bytes, got {len(fingerprint_id)}")

    def _check_count(self, n: int, what: str) -> None:
        if n > self.cfg.max_keys_per_request:
            raise InvalidRequestError(f"request names {n} {what}; the limit is {self.cfg.max_keys_per_request} (max_keys_per_request): split it")

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        """Well-formed, within the request limit, and each named once: a key named twice in one
        request would get one lease and two slots, and its second write would land in a freed slot."""
        self._check_count(len(keys), "keys")
        if not all(n == KEY_BYTES for n in map(len, keys)):
            for i, key in enumerate(keys):
                if len(key) != KEY_BYTES:
                    raise InvalidRequestError(f"key #{i} must be {KEY_BYTES} bytes, got {len(key)}")
        if len(set(keys)) != len(keys):
            first: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                if key in first:
                    raise InvalidRequestError(f"key #{i} repeats key #{first[key]} ({key.hex()}); name each key once per request")
                first[key] = i

    def _check_ids(self, ids: Sequence[int], what: str) -> None:
        self._check_count(len(ids), what)
        if len(set(ids)) != len(ids):
            raise InvalidRequestError(f"the request names one of its {what} more than once")

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
        states = self._states(caller, fingerprint_id, keys)
        prefix = 0
        for s in states:
            if s.state != pb.BLOCK_PRESENT:
                break
            prefix += 1
        self.counters["lookup_blocks_hit"] += sum(s.state == pb.BLOCK_PRESENT for s in states)
        self.counters["lookup_blocks_miss"] += sum(s.state != pb.BLOCK_PRESENT for s in states)
        return states, prefix

    def _states(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[KeyState]:
        states: list[KeyState] = []
        for chunk in _chunks(keys):
            with self._lock:
                states += [self._state(caller, fingerprint_id, k) for k in chunk]
        return states

    def prefix_length(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        """How many leading keys are present, looking no further than the first that is not."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        present = 0
        for chunk in _chunks(keys):
            with self._lock:
                found = len(self._leading_present(caller, fingerprint_id, chunk))
            present += found
            if found < len(chunk):
                break
        return present

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
        if lease is not None and not lease.held_by(caller.tenant, caller.client_id):
            return pb.LEASE_PENDING, lease
        if lease is None:
            self._check_quota(caller, new_ids=1)
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

    def _ttl(self, ttl_ms: int, default_s: float | None = None) -> float:
        if ttl_ms <= 0:
            return self.cfg.lease_ttl_s if default_s is None else default_s
        if ttl_ms > self.cfg.max_lease_ttl_s * 1000:
            raise InvalidRequestError(f"ttl_ms {ttl_ms} exceeds the server's limit of {int(self.cfg.max_lease_ttl_s * 1000)} ms (max_lease_ttl_s); renew instead")
        return ttl_ms / 1000

    def _check_quota(self, caller: Caller, new_ids: int = 0, new_bytes: int = 0) -> None:
        """One tenant may not hold the whole pool reserved or pinned (nothing of its can then be
        evicted to make room for others). Admins are exempt: they act for the whole server."""
        if caller.is_admin:
            return
        ids = self.leases.held_ids[caller.tenant] + new_ids
        if new_ids and ids > self.cfg.tenant_max_held_ids:
            raise CapacityExhaustedError(
                f"tenant {caller.tenant!r} would hold {ids} leases and pins; its limit is {self.cfg.tenant_max_held_ids} (tenant_max_held_ids): release or unpin some")
        limit = int(self.cfg.tenant_held_fraction * self.host.capacity_bytes)
        held = self.leases.held_bytes[caller.tenant] + new_bytes
        if new_bytes > 0 and held > limit:
            raise CapacityExhaustedError(
                f"tenant {caller.tenant!r} would hold {held} bytes reserved or pinned; its limit is {limit} (tenant_held_fraction of the host pool): commit, release or unpin first")

    def acquire(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0) -> list[LeaseInfo]:
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        self._check_admitting()
        ttl_s, out = self._ttl(ttl_ms), []
        for chunk in _chunks(keys):  # outcomes are per key: other requests may run between chunks
            with self._lock:
                for key in chunk:
                    outcome, lease = self._lease_for(caller, fingerprint_id, key, ttl_s)
                    out.append(self._lease_info(key, outcome, lease))
        return out

    def reserve(self, caller: Caller, fingerprint_id: bytes, specs: Sequence[tuple[bytes, int]], ttl_ms: int = 0, durable: bool = False) -> list[LeaseInfo]:
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
                            self._check_quota(caller, new_bytes=size - lease.size)
                            lease.host_offset = self._alloc_host(size)
                            self.leases.set_size(lease, size)
                    out.append(self._lease_info(key, outcome, lease))
                if durable:  # ALREADY_PRESENT to a durable put promises the block is durable
                    self._make_durable_locked([self.index.get(storage_key(caller.tenant, i.key)) for i in out if i.outcome == pb.LEASE_ALREADY_PRESENT])
            except (CapacityExhaustedError, InvalidRequestError):
                for lease in granted_now:
                    self._release_lease(lease)
                raise
            return out

    def renew(self, caller: Caller, lease_ids: Sequence[int], ttl_ms: int = 0) -> list[int]:
        self._check_ids(lease_ids, "lease ids")
        ttl_s = self._ttl(ttl_ms)
        with self._lock:
            leases = [self._owned_lease(caller, lid) for lid in lease_ids]
            for lease in leases:
                lease.expires_at = time.monotonic() + ttl_s
            return [lease.expires_unix_ms() for lease in leases]

    def release(self, caller: Caller, lease_ids: Sequence[int]) -> int:
        self._check_ids(lease_ids, "lease ids")
        with self._lock:
            released = 0
            for lid in lease_ids:
                lease = self.leases.owned_lease(lid, caller.tenant, caller.client_id)
                if lease is not None:
                    self._release_lease(lease)
                    released += 1
            return released

    def wait(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], timeout_ms: int,
             is_active: Callable[[], bool] | None = None) -> list[KeyState]:
        """Block until no key is PENDING (committed, or its lease released or expired) or timeout.

        The wait is bounded by max_wait_s whatever the caller asks, and ends early once
        is_active() says the caller has gone (checked at least every WAIT_POLL_S), so an
        abandoned Wait cannot hold a server thread.
        """
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        deadline = time.monotonic() + min(max(timeout_ms, 0) / 1000, self.cfg.max_wait_s)
        self.counters["lease_waits"] += 1
        while True:
            self.reap_expired()
            seen = self._changed.generation  # states are read a chunk at a time, outside one lock hold
            states = self._states(caller, fingerprint_id, keys)
            remaining = deadline - time.monotonic()
            if all(s.state != pb.BLOCK_PENDING for s in states) or remaining <= 0 or self.closed:
                return states
            if is_active is not None and not is_active():
                self.counters["lease_waits_abandoned"] += 1
                return states
            soonest = min((s.lease_expires_ms for s in states if s.state == pb.BLOCK_PENDING), default=0)
            until_expiry = max(0.01, soonest / 1000 - time.time())
            with self._changed:
                if self._changed.generation == seen:  # nothing changed while we read: sleep until something does
                    self._changed.wait(min(remaining, until_expiry, WAIT_POLL_S))

    def _owned_lease(self, caller: Caller, lease_id: int) -> WriteLease:
        """The caller's live lease. One answer for unknown, expired and somebody else's, so the
        error tells a caller nothing about leases that are not its own."""
        lease = self.leases.owned_lease(lease_id, caller.tenant, caller.client_id)
        if lease is None:
            raise LeaseError(f"lease {lease_id} is not a live lease of this client (unknown, expired, released or another client's)")
        return lease

    def _free_lease_slot(self, lease: WriteLease, stale: bool = False) -> None:
        """stale: the lease ended without Commit or Release (expired, revoked), so its holder may
        still be copying into the slot through the shared pool; the slot stays out of use for
        stale_write_quarantine_s, or that late copy would land in the next writer's block."""
        if lease.host_offset is None:
            return
        if stale and self.cfg.stale_write_quarantine_s > 0:
            self._quarantine.append((time.monotonic() + self.cfg.stale_write_quarantine_s, lease.host_offset, lease.tenant, lease.size))
            # Still the tenant's until freed: else reserving and letting leases lapse would park the whole pool.
            self.leases.held_bytes[lease.tenant] += lease.size
            self.host.zero(lease.host_offset)  # now too: a secure delete scrubs free slots only
            self.counters["slots_quarantined"] += 1
        else:
            self.host.free(lease.host_offset)
        lease.host_offset = None

    def _release_lease(self, lease: WriteLease, stale: bool = False) -> None:
        self._free_lease_slot(lease, stale)
        self.leases.drop(lease)
        self._changed.notify_all()

    def _expire_lease(self, lease: WriteLease) -> None:
        log.debug("lease expired", extra={"lease_id": lease.lease_id, "owner": lease.owner})
        self.counters["lease_expiries"] += 1
        self._release_lease(lease, stale=True)

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
        self._check_ids([lid for lid, _ in items], "lease ids")
        with self._lock:
            leases = [self._owned_lease(caller, lid) for lid, _ in items]
            expected_by_lease = dict(items)  # verified equal to each slot's checksum below
            for lease, (lid, expected) in zip(leases, items):
                if lease.fingerprint_id != fingerprint_id:
                    raise FingerprintMismatchError(f"lease {lid} was taken under another fingerprint than this commit names")
                if lease.host_offset is None:
                    raise LeaseError(f"lease {lid} has no reserved space; call Reserve first")
                actual = checksum(self.host.slot(lease.host_offset, lease.size))
                if actual != expected:
                    self.counters["checksum_failures"] += 1
                    # Never the slot's actual checksum: it would be an oracle for whatever the slot holds.
                    raise ChecksumMismatchError(
                        f"block {lease.skey[8:].hex()}: the reserved slot's bytes do not match the committed checksum"
                    )
            fresh: dict[bytes, BlockMeta] = {}
            present: list[BlockMeta] = []
            for lease in leases:
                if (existing := self.index.get(lease.skey)) is not None:
                    present.append(existing)
                elif lease.skey not in fresh:
                    fresh[lease.skey] = BlockMeta(lease.skey, lease.tenant, lease.fingerprint_id, lease.size,
                                                  expected_by_lease[lease.lease_id], host_offset=lease.host_offset)
            if durable:
                # Durable means every block this put names is in LMDB before it answers, those
                # ALREADY_PRESENT included. When they cannot all be (NotDurableError), nothing is
                # committed and the leases stay the caller's to retry or release, so no answer,
                # a retry's included, ever calls a block durable that is not.
                self._make_durable_locked([*fresh.values(), *present])
            outcomes = []
            for lease in leases:
                meta = fresh.pop(lease.skey, None)
                if meta is None:
                    outcomes.append(pb.PUT_ALREADY_PRESENT)
                    self._release_lease(lease)
                    continue
                lease.host_offset = None
                self.leases.drop(lease)
                self.index.add(meta)
                outcomes.append(pb.PUT_STORED)
                self.counters["puts"] += 1
                self.counters["bytes_in"] += meta.size
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
            present: list[BlockMeta] = []
            for info, (key, data, expected) in zip(leases, blocks):
                if info.outcome == pb.LEASE_GRANTED:
                    self.write(caller, info.lease_id, 0, data)
                    to_commit.append((info.lease_id, expected))
                    outcomes.append(pb.PUT_STORED)
                elif info.outcome == pb.LEASE_ALREADY_PRESENT:
                    present.append(self.index.get(storage_key(caller.tenant, key)))
                    outcomes.append(pb.PUT_ALREADY_PRESENT)
                else:
                    outcomes.append(pb.PUT_PENDING_ELSEWHERE)
            try:
                if durable:  # an ALREADY_PRESENT answer to a durable put promises durability too
                    self._make_durable_locked(present)
                committed = iter(self.commit(caller, fingerprint_id, to_commit, durable))
            except Exception:
                # Nothing new was committed; the leases this call took go, so a retry starts afresh.
                self.release(caller, [lid for lid, _ in to_commit])
                raise
            return [next(committed) if o == pb.PUT_STORED else o for o in outcomes]

    # ---- reads --------------------------------------------------------------------

    def _resolve_for_read(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool = False) -> list[BlockMeta]:
        """Pin-count the keys' blocks; all of them, or with prefix the leading run that is present.

        Takes the lock a chunk of keys at a time; blocks are pin-counted as they are found, so
        none can be evicted between chunks, and all are released again if one is missing."""
        metas: list[BlockMeta] = []
        missing: list[bytes] = []
        for chunk in _chunks(keys):
            with self._lock:
                if prefix:
                    found = self._leading_present(caller, fingerprint_id, chunk)
                else:
                    found = []
                    for key in chunk:
                        meta = self._present(caller, fingerprint_id, key, strict=True)
                        if meta is None:
                            missing.append(key)
                        else:
                            found.append(meta)
                for meta in found:
                    meta.pins += 1
                self.index.touch(*found)
            metas += found
            if prefix and len(found) < len(chunk):
                break
        if missing:
            with self._lock:
                self._unpin(metas)
                self.counters["misses"] += len(missing)
            raise BlockNotFoundError(f"{len(missing)} of {len(keys)} blocks not found: " + ", ".join(k.hex() for k in missing[:4]) + ("…" if len(missing) > 4 else ""))
        return metas

    def _unpin(self, metas: Sequence[BlockMeta]) -> None:
        for meta in metas:
            meta.pins -= 1
            if meta.deleted and meta.pins == 0 and meta.host_offset is not None:
                self.host.free(meta.host_offset)
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
        return self._stream(self._resolve_for_read(caller, fingerprint_id, keys))

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
        ttl = self._ttl(ttl_ms, self.cfg.pin_ttl_s)
        metas = self._resolve_for_read(caller, fingerprint_id, keys, prefix)
        with self._lock:
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
            metas = self._within_quota(caller, metas, prefix)
            pin = self.leases.add_pin(caller.tenant, caller.client_id, metas, ttl)
            self.counters["gets"] += len(metas)
            self.counters["bytes_out"] += sum(m.size for m in metas)
            return PinInfo(pin.pin_id, PinnedSlots.of(metas), int((time.time() + ttl) * 1000))

    def _within_quota(self, caller: Caller, metas: list[BlockMeta], prefix: bool) -> list[BlockMeta]:
        """The pin-counted blocks a new pin may hold under the caller's quota; a prefix pin is cut
        short rather than refused (the engine recomputes the rest). Caller holds the lock."""
        try:
            self._check_quota(caller, new_ids=1, new_bytes=sum(m.size for m in metas))
            return metas
        except CapacityExhaustedError:
            if not prefix or caller.is_admin:
                self._unpin(metas)
                raise
        room = int(self.cfg.tenant_held_fraction * self.host.capacity_bytes) - self.leases.held_bytes[caller.tenant]
        keep = 0
        while keep < len(metas) and metas[keep].size <= room:
            room -= metas[keep].size
            keep += 1
        self._unpin(metas[keep:])
        if keep == 0:
            raise CapacityExhaustedError(f"tenant {caller.tenant!r} holds its limit of bytes reserved or pinned (tenant_held_fraction of the host pool): unpin first")
        self._check_quota(caller, new_ids=1)
        return metas[:keep]

    def unpin(self, caller: Caller, pin_ids: Sequence[int]) -> int:
        self._check_ids(pin_ids, "pin ids")
        with self._lock:
            released = 0
            for pid in pin_ids:
                pin = self.leases.owned_pin(pid, caller.tenant, caller.client_id)
                if pin is not None:
                    self._drop_pin(pin)
                    released += 1
            return released

    def _drop_pin(self, pin: ReadPin) -> None:
        if self.leases.drop_pin(pin):
            self._unpin(pin.blocks)

    # ---- data-plane access: slots a transfer engine may touch ------------------------

    def pinned_slots(self, caller: Caller, pin_id: int) -> PinnedSlots:
        """Slots of a live pin the caller owns, for a data plane that sends them (e.g. UCX)."""
        with self._lock:
            pin = self.leases.owned_pin(pin_id, caller.tenant, caller.client_id)
            if pin is None or pin.expires_at <= time.monotonic():
                raise LeaseError(f"pin {pin_id} is not a live pin of this client (unknown, expired, released or another client's)")
            if any(m.host_offset is None for m in pin.blocks):
                raise LeaseError(f"pin {pin_id} names a block no longer in the host pool")
            return PinnedSlots.of(pin.blocks)

    def claim_write_slots(self, caller: Caller, lease_ids: Sequence[int], hold_s: float | None = None) -> list[tuple[int, int]]:
        """(offset, size) of each reserved lease, renewed for hold_s so expiry cannot free a slot mid-receive."""
        self._check_ids(lease_ids, "lease ids")
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
        deleted = 0
        for chunk in _chunks(keys):
            with self._lock:
                metas = [m for k in chunk if (m := self._present(caller, fingerprint_id, k, strict=False)) is not None]
                for meta in metas:
                    self._delete_locked(meta)
            deleted += len(metas)
        return deleted

    def _delete_locked(self, meta: BlockMeta) -> None:
        if self.index.get(meta.skey) is not meta:
            return
        if meta.on_ssd:
            self.ssd.delete_many([meta.skey])
        self.index.remove(meta.skey)
        meta.deleted = True
        if meta.host_offset is not None and meta.pins == 0:
            self.host.free(meta.host_offset)
            meta.host_offset = None
        self._changed.notify_all()

    # ---- placement: host pool room, demotion, ssd room ------------------------------

    def _alloc_host(self, size: int) -> int:
        offset = self.host.alloc(size)
        if offset is None:
            offset = self._make_room(size)
        if offset is None:
            raise self._no_room(size)
        return offset

    def _no_room(self, size: int) -> CapacityExhaustedError:
        """Why no slot could be found or made, in the pool's terms only: never whose blocks fill it, and
        no byte counts (a tenant watching them would see other tenants come and go; Stats is admin-only)."""
        alloc = self.host.allocator
        why = "its free space is in smaller size classes" if alloc.used_bytes < alloc.capacity_bytes else "the pool is full"
        quarantined = "; some slots wait out a stale-write quarantine (stale_write_quarantine_s)" if self._quarantine else ""
        return CapacityExhaustedError(
            f"host pool has no free {alloc.slot_bytes(size)}-byte slot for a {size}-byte block: {why}, "
            f"and every slab that could be emptied holds pinned or reserved blocks{quarantined}"
        )

    def _make_room(self, size: int) -> int | None:
        """Synchronous fallback when the background demoter has not kept up; evicts as little as it can.

        The least recently used block whose slot can hold size goes first: one eviction frees a
        usable slot. Failing that (a size class with no slab and no larger slot), a whole slab must
        empty, and the one needing the fewest evictions goes; evicting in LRU order until some slab
        happened to empty took 200 blocks to place one in a 4-slab pool (tests/kvstore/test_slots.py).
        """
        alloc = self.host.allocator
        need = alloc.slot_bytes(size)
        evictable = []
        for skey in list(self.index.host_lru):
            meta = self.index.get(skey)
            if meta is None or meta.pins > 0 or meta.host_offset is None:
                continue
            if alloc.slot_bytes_at(meta.host_offset) >= need:
                self._evict_from_host([meta])
                offset = self.host.alloc(size)
                if offset is not None:
                    return offset
            else:
                evictable.append(meta)
        by_slab: dict[int, list[BlockMeta]] = {}
        for meta in evictable:
            by_slab.setdefault(alloc.slab_of(meta.host_offset), []).append(meta)
        emptiable = [metas for slab, metas in by_slab.items() if len(metas) == alloc.slots_used(slab)]
        if not emptiable:
            return None
        self._evict_from_host(min(emptiable, key=len))
        return self.host.alloc(size)

    def _evict_from_host(self, metas: list[BlockMeta], demoted_ids: frozenset[int] = frozenset()) -> None:
        """Free host copies, writing dirty ones to the SSD tier first. Caller holds the lock.

        A dirty block the SSD tier has no room for is dropped: the host tier is a cache. One
        that LMDB refuses (a full disk), or that is not tried while writes are paused after such
        a refusal, stays in the host tier: a broken disk must not turn demotion into data loss.
        """
        dirty = [m for m in metas if not m.on_ssd]
        dirty_ids = {id(m) for m in dirty} | demoted_ids
        refused: set[int] = set()
        if dirty and self.ssd.writes_paused():
            refused = {id(m) for m in dirty}
        elif dirty:
            try:
                self._write_ssd_locked(dirty)
            except SsdWriteError:
                refused = {id(m) for m in dirty}
        for meta in metas:
            if meta.host_offset is None or id(meta) in refused:
                continue
            self.host.free(meta.host_offset)
            self.index.set_host(meta, None)
            if meta.on_ssd:
                self.counters["demotions" if id(meta) in dirty_ids else "host_evictions"] += 1
            else:
                self.index.remove(meta.skey)
                meta.deleted = True
                self.counters["evictions"] += 1

    def _ssd_items(self, metas: Sequence[BlockMeta]) -> list[tuple[bytes, bytes, memoryview]]:
        """LMDB records of blocks' host copies. Caller holds the lock (or has pinned the blocks)."""
        return [(m.skey, encode_header(m.tenant, m.fingerprint_id, m.checksum, m.size), self.host.slot(m.host_offset, m.size)) for m in metas]

    def _ssd_room_for(self, metas: Sequence[BlockMeta]) -> list[BlockMeta]:
        """The host-resident blocks of metas that fit on the SSD tier together, evicting its LRU
        blocks for them. SsdWriteError if LMDB refuses an eviction. Caller holds the lock."""
        fits, nbytes = [], 0
        for meta in metas:
            need = self.ssd.record_bytes(meta.tenant, meta.size)
            if meta.host_offset is not None and self._ssd_make_room(nbytes + need):
                fits.append(meta)
                nbytes += need
        return fits

    def _write_ssd_locked(self, metas: list[BlockMeta]) -> list[BlockMeta]:
        """Write blocks' host copies to LMDB in one transaction; returns those now on SSD.

        A block the SSD tier has no room for is left out. If LMDB refuses the write,
        SsdWriteError, and the index marks none of them on SSD. Caller holds the lock.
        """
        room = self._ssd_room_for(metas)
        if room:
            self.ssd.put_many(self._ssd_items(room))
        for meta in room:
            self.index.set_ssd(meta, True)
        return room

    def _make_durable_locked(self, metas: Sequence[BlockMeta]) -> None:
        """Write the blocks of metas not yet on SSD to LMDB in one transaction, or raise
        NotDurableError with none of them written. Blocks not in the index (a commit's, about
        to be added) are only marked on_ssd; index.add then accounts for them. Caller holds the lock."""
        todo = [m for m in metas if not m.on_ssd]
        if not todo:
            return
        need = [self.ssd.record_bytes(m.tenant, m.size) for m in todo]
        cap = self.ssd.capacity_bytes
        for meta, nbytes in zip(todo, need):
            if nbytes > cap:
                raise NotDurableError(f"block {meta.key.hex()} could not be made durable: its {meta.size} bytes are larger than the ssd tier ({cap} bytes)")
        head = f"{len(todo)} block(s) could not be made durable"
        if sum(need) > cap:
            raise NotDurableError(f"{head}: together their {sum(need)} bytes are larger than the ssd tier ({cap} bytes)")
        try:
            if not self._ssd_make_room(sum(need)):
                raise NotDurableError(f"{head}: the ssd tier is full and the blocks that could make room are pinned")
            self.ssd.put_many(self._ssd_items(todo))
        except SsdWriteError as err:
            raise NotDurableError(f"{head}: {err}") from err
        for meta in todo:
            if self.index.get(meta.skey) is meta:
                self.index.set_ssd(meta, True)
            else:
                meta.on_ssd = True

    def _ssd_make_room(self, nbytes: int) -> bool:
        """Evict LRU unpinned blocks from the SSD tier until nbytes more fit; False, evicting nothing,
        if they cannot. The victims leave LMDB in one transaction; if LMDB refuses it, SsdWriteError
        and the index is unchanged. Caller holds the lock."""
        if nbytes > self.ssd.capacity_bytes:
            return False
        excess = self.index.ssd_used_bytes + nbytes - self.ssd.capacity_bytes
        victims = []
        for skey in self.index.ssd_lru:
            if excess <= 0:
                break
            meta = self.index.get(skey)
            if meta is not None and meta.pins == 0:
                victims.append(meta)
                excess -= meta.size
        if excess > 0:
            return False
        if victims:
            self.ssd.delete_many([m.skey for m in victims])
        for meta in victims:
            self.index.set_ssd(meta, False)
            self.counters["ssd_evictions"] += 1
            if meta.host_offset is None:
                self.index.remove(meta.skey)
                meta.deleted = True
                self.counters["evictions"] += 1
        return True

    def demote_cold(self) -> int:
        """Above the high watermark, demote LRU unpinned blocks until under the low one.

        Victims are pinned while LMDB writes and fsyncs them without the store lock, so
        requests keep flowing during demotion; only the bookkeeping takes the lock. While
        LMDB refuses writes (a full disk) dirty victims stay in the host tier and only
        blocks already on SSD leave it.
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
            dirty: list[BlockMeta] = []
            if not self.ssd.writes_paused():
                try:
                    dirty = self._ssd_room_for([m for m in victims if not m.on_ssd])
                except SsdWriteError:
                    pass  # the tier logged it and pauses writes; _evict_from_host keeps the dirty victims
            for meta in dirty:
                meta.pins += 1
            items = self._ssd_items(dirty)
        written = False
        try:
            if items:
                self.ssd.put_many(items)
            written = True
        except SsdWriteError:
            pass  # as above: nothing is marked on SSD, and the victims stay in the host tier
        finally:
            with self._lock:
                stale = []
                for meta in dirty:
                    self._unpin([meta])
                    current = self.index.get(meta.skey)
                    if written and current is meta:
                        self.index.set_ssd(meta, True)
                    elif written and (current is None or not current.on_ssd):
                        stale.append(meta.skey)  # deleted while we wrote it
                if stale:
                    try:
                        self.ssd.delete_many(stale)
                    except SsdWriteError as err:
                        log.error("%d blocks deleted during demotion could not be removed from the ssd tier and may reappear after a restart: %s", len(stale), err)
                still = [m for m in victims if self.index.get(m.skey) is m and m.pins == 0 and m.host_offset is not None]
                self._evict_from_host(still, frozenset(id(m) for m in dirty))
        return len(victims)

    def reap_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            for lease in self.leases.expired_leases(now):
                self._expire_lease(lease)
            while self._quarantine and self._quarantine[0][0] <= now:
                _, offset, tenant, size = self._quarantine.popleft()
                self.host.free(offset)
                self.leases.held_bytes[tenant] -= size
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
            try:
                self.ssd.delete_many(damaged)
            except SsdWriteError as err:  # a full disk must not keep the server from starting: the records stay unindexed
                log.warning("could not remove %d damaged records from the ssd tier: %s", len(damaged), err)
        log.debug("index rebuilt from ssd tier", extra={"blocks": len(self.index), "damaged": len(damaged)})

    def flush_to_ssd(self, batch_bytes: int = 64 << 20) -> int:
        """Write every host-only block to LMDB, batch_bytes of payload a transaction; returns how many.

        A batch LMDB refuses is skipped, as a smaller one after it may still fit, until three
        in a row are refused (the disk is full: more tries only delay shutdown). What could
        not be written is reported in one error line, never raised.
        """
        with self._lock:
            dirty = [m for m in self.index if m.host_offset is not None and not m.on_ssd]
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
                try:
                    flushed += len(self._write_ssd_locked(batch))
                    refused_in_a_row = 0
                except SsdWriteError as err:
                    refused_in_a_row, why = refused_in_a_row + 1, str(err)
                    if refused_in_a_row == 3:
                        break
            if flushed < len(dirty):
                log.error("%d blocks could not be flushed to the ssd tier (%d were): %s", len(dirty) - flushed, flushed, why)
            return flushed

    def close(self) -> None:
        """Flush the host tier (persist_on_shutdown) and close the tiers; logs failures, never raises."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._changed.notify_all()
            try:
                if self.cfg.persist_on_shutdown:
                    flushed = self.flush_to_ssd()
                    log.info("flushed host tier to ssd", extra={"blocks": flushed})
                self.ssd.close()
            except SsdWriteError as err:
                log.error("closing the ssd tier failed: %s", err)
            except Exception:
                log.exception("closing the ssd tier failed")
            finally:
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
