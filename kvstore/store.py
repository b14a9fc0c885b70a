"""Store: the facade under every front door (through kvstore/api.py); a request's rules, in order.

It validates requests, makes the block table's decisions under the store lock, and asks
placement for anything that moves bytes between tiers. It speaks keys, byte buffers and
kvwire records (KeyStatus, LeaseInfo, PutOutcome, ...), never gRPC. Metadata changes happen
under one lock; payload copies of reads happen outside it, guarded by pins, so a block being
read is never evicted, moved or freed underneath a reader; tier I/O (LMDB) never happens
under it (placement.py). The admin section at the end is what kvstore/operations.py uses.

Its parts: block_table.py (leases, pins, the index: decisions, no I/O), placement.py (copies
between tiers, I/O outside the lock), eviction.py (which copies leave), tiers/ (the bytes).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator, NamedTuple, Protocol, Sequence

from kvwire.errors import (
    BlockNotFoundError,
    BlockTooLargeError,
    ChecksumMismatchError,
    FingerprintMismatchError,
    InvalidRequestError,
    KVStoreError,
    LeaseError,
    SizeMismatchError,
    SsdWriteError,
    UnavailableError,
)
from kvwire.blockcopy import checksums
from kvwire.keys import FINGERPRINT_ID_BYTES, KEY_BYTES, key_list, native_keys
from kvwire.types import BlockState, KeyStatus, LeaseInfo, LeaseOutcome, PutOutcome, Slot, Tier
from kvstore.counters import Event
from kvstore.block_table import BlockTable, BlockView, Caller, HostColumns, LeaseView, Limits, PrefixRun, WriteLease, host_columns, pin_table
from kvstore.config import ServerConfig
from kvstore.eviction import EvictionPolicy, EvictReport, keep_rank
from kvstore.hbm_placement import HbmPlacement, PinPlacement, PromotionReport
from kvstore.index import BlockIndex, BlockMeta, Origin, storage_key, tenant_tag
from kvstore.placement import Placement, checksum
from kvstore.tiers.device import DeviceMemory
from kvstore.tiers.host import HostPool
from kvstore.tiers.ssd import SsdTier

__all__ = ["BlockStream", "Caller", "PinInfo", "PinnedSlots", "RemoteSource", "Store", "StoreStats", "TierStats", "checksum"]

log = logging.getLogger(__name__)

# (key, payload, checksum) a block, in request order; a payload may be a view of its pinned slot (Store.get)
BlockStream = Generator[tuple[bytes, bytes | memoryview, int], None, None]

HBM, HOST, SSD = Tier.HBM, Tier.HOST, Tier.SSD
WAIT_POLL_S = 0.25  # how often a blocked Wait checks that its caller is still there
# Keys handled per hold of the store lock: a request naming tens of thousands of keys takes
# turns with everyone else's (a 1M-key Lookup once held it for 25 s).
LOCK_CHUNK_KEYS = 1024


def _chunks(items: Sequence, size: int = LOCK_CHUNK_KEYS) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class PinnedSlots:
    """Where pinned blocks sit in the host pool, as parallel lists in request order.

    Columns, not an object per block: a Pin of a long prefix names hundreds of blocks,
    and every consumer (the Pin RPC's packed arrays, the UCX data plane) wants columns.
    """

    offsets: Sequence[int]  # lists, or array('Q')s where the Pin asked for packed columns
    sizes: Sequence[int]
    checksums: Sequence[int]
    # Where some blocks also have an HBM copy: each block's fastest tier and its HBM offset (0 elsewhere); empty otherwise.
    tiers: Sequence[int] = field(default_factory=list)
    hbm_offsets: Sequence[int] = field(default_factory=list)

    @classmethod
    def of(cls, metas: Sequence[BlockMeta], slots: Sequence[Slot] | None = None, hbm: PinPlacement | None = None) -> "PinnedSlots":
        slots = [m.copies[HOST] for m in metas] if slots is None else slots
        placed = (hbm.tiers, hbm.hbm_offsets) if hbm is not None else ([], [])
        return cls([s.offset for s in slots], [s.size_bytes for s in slots], [m.checksum for m in metas], *placed)

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class PinInfo:
    pin_id: int
    slots: PinnedSlots
    expires_unix_ms: int
    hbm_pool_id: int = 0  # the HBM allocation slots.hbm_offsets point into (DataPlane's), when any does

    @property
    def expires_ms(self) -> int:  # the older name
        return self.expires_unix_ms


@dataclass(frozen=True)
class TierStats:
    tier: Tier
    capacity_bytes: int
    used_bytes: int  # host: slot bytes; ssd: payload bytes
    blocks: int  # blocks with a copy in the tier


@dataclass(frozen=True)
class StoreStats:
    tiers: tuple[TierStats, ...]
    blocks: int
    leases_held: int
    pins_held: int
    counters: dict[str, int]


class TenantUsage(NamedTuple):
    tenant: str
    blocks: int
    bytes: int


@dataclass(frozen=True)
class Deletion:
    """What an operator's delete removed; readers may still hold some until they unpin."""

    deleted: int
    bytes: int
    leases_revoked: int
    blocks: tuple[BlockMeta, ...]


class RemoteSource(Protocol):
    """Where blocks missing here may be found in cluster mode (kvstore/cluster/remote_tier.py): a staging
    source beside the ssd tier. Both calls are bounded by the cluster's deadlines and never raise for a
    peer's failure: a block a peer cannot give is a miss, which costs the engine a recompute, not an error."""

    def locate(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[int]:
        """Each key's size where a live peer holds it under this tenant and fingerprint, else 0."""

    def fetch(self, tenant: str, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool) -> None:
        """Copy what peers hold of keys (with prefix, their leading run) into this store (Store.adopt), checked."""


class ClaimAnswer(Protocol):
    outcome: LeaseOutcome  # GRANTED, ALREADY_PRESENT or PENDING (another node computes it)
    holder: str  # that node, when PENDING
    expires_in_s: float  # until its claim lapses, when PENDING


class ClaimSource(Protocol):
    """Cluster mode's single writer (kvstore/cluster/claims.py): a lease granted here for a key no node holds is
    claimed at the key's directory home, and stands only if the claim is granted; else the key is PENDING
    elsewhere. Never raises for a peer's failure: a home that cannot answer grants (availability before dedup).
    Keys are storage keys: the caller's tenant is already in them."""

    def claim(self, fingerprint_id: bytes, skeys: Sequence[bytes], lease_ids: Sequence[int], ttl_s: float) -> list[ClaimAnswer]: ...

    def renew(self, fingerprint_id: bytes, skeys: Sequence[bytes], lease_ids: Sequence[int], ttl_s: float) -> None: ...

    def release(self, skeys: Sequence[bytes], lease_ids: Sequence[int]) -> None: ...

    def wait(self, skeys: Sequence[bytes], timeout_s: float, is_active: Callable[[], bool] | None = None) -> dict[int, float]:
        """Until none of skeys is claimed by another node (timeout_s at most): position -> seconds until its claim lapses."""


class _Changes(threading.Condition):
    """The store's condition, counting notifications: a waiter that read state without the
    lock can tell whether anything changed before it sleeps."""

    generation = 0

    def notify_all(self) -> None:
        self.generation += 1
        super().notify_all()


class Store:
    def __init__(self, cfg: ServerConfig, host: HostPool | None = None, ssd: SsdTier | None = None,
                 hbm_device: DeviceMemory | None = None) -> None:
        """host, ssd and the HBM tier's device memory: built by the caller (an unshared pool, a host stand-in for
        the GPU in tests); by default from cfg (no HBM tier unless hbm_memory > 0 and a device is there)."""
        self.cfg = cfg
        self.host = host if host is not None else HostPool(cfg.host_memory, cfg.max_block_bytes)
        self.ssd = ssd if ssd is not None else SsdTier(cfg.data_path / "ssd", cfg.ssd_capacity)
        self.counters: Counter[Event] = Counter()
        self._lock = threading.RLock()
        self._changed = _Changes(self._lock)
        limits = Limits(cfg.tenant_max_held_ids, int(cfg.tenant_held_fraction * self.host.capacity_bytes), cfg.stale_write_quarantine_s)
        self.table = BlockTable(limits, self.counters)
        self.policy = EvictionPolicy(cfg.high_watermark, cfg.low_watermark)
        self.placement = Placement(self._lock, self._changed, self.table, self.host, self.ssd, self.policy, self.counters)
        self._locked = self.placement.locked
        self.hbm = HbmPlacement.open(cfg, self.placement, hbm_device)
        self.admitting = True
        self.closed = False
        self.remote: RemoteSource | None = None  # cluster mode: peers' blocks, staged in as local copies
        self.claims: ClaimSource | None = None  # cluster mode: leases are claimed cluster-wide at the keys' homes
        self.deletions = 0  # operator deletes so far: a peer's copy fetched across one is not adopted (adopt's `since`)
        self.placement.restore()

    @property
    def index(self) -> BlockIndex:
        return self.table.index

    @property
    def changes(self) -> int:
        """Holds of the store lock that changed the table, so far: blocks added under one hold (one commit's batch)
        are told to the index's listener under one value (cluster mode's replicas push a commit batch together)."""
        return self._changed.generation

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
        if pin_table is not None and pin_table.distinct_keys(native_keys(keys), KEY_BYTES):
            return  # in C (a fifth of a 512-key Pin's server time in Python); the loops below name what is wrong
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

    def _ttl(self, ttl_ms: int, default_s: float | None = None) -> float:
        if ttl_ms <= 0:
            return self.cfg.lease_ttl_s if default_s is None else default_s
        if ttl_ms > self.cfg.max_lease_ttl_s * 1000:
            raise InvalidRequestError(f"ttl_ms {ttl_ms} exceeds the server's limit of {int(self.cfg.max_lease_ttl_s * 1000)} ms (max_lease_ttl_s); renew instead")
        return ttl_ms / 1000

    # ---- lookup and leases --------------------------------------------------------

    def lookup(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> tuple[list[KeyStatus], int]:
        """Each key's status, and how many leading keys are present."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        statuses = self._statuses(caller, fingerprint_id, keys)
        if self.remote is not None:
            statuses = self._with_remote(caller, fingerprint_id, statuses)
        prefix = 0
        for s in statuses:
            if s.state != BlockState.PRESENT:
                break
            prefix += 1
        hits = sum(s.state == BlockState.PRESENT for s in statuses)
        self.counters[Event.LOOKUP_BLOCKS_HIT] += hits
        self.counters[Event.LOOKUP_BLOCKS_MISS] += len(statuses) - hits
        return statuses, prefix

    def _statuses(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> list[KeyStatus]:
        statuses: list[KeyStatus] = []
        for chunk in _chunks(keys):
            with self._locked as table:
                statuses += [table.status(caller.tenant, fingerprint_id, k) for k in chunk]
        return statuses

    def _with_remote(self, caller: Caller, fingerprint_id: bytes, statuses: list[KeyStatus]) -> list[KeyStatus]:
        """Missing keys a live peer holds are PRESENT, tier REMOTE (a Pin or Get here fetches them)."""
        absent = BlockState.MISSING  # `is`: an enum compared with == cost a local 512-key Lookup a seventh here
        missing = [i for i, s in enumerate(statuses) if s.state is absent]
        if not missing:
            return statuses
        sizes = self.remote.locate(caller.tenant, fingerprint_id, [statuses[i].key for i in missing])
        for i, size in zip(missing, sizes):
            if size:
                statuses[i] = KeyStatus(statuses[i].key, BlockState.PRESENT, Tier.REMOTE, size)
        return statuses

    def _with_claims(self, caller: Caller, statuses: list[KeyStatus], timeout_s: float,
                     is_active: Callable[[], bool] | None) -> list[KeyStatus]:
        """Cluster mode: wait (timeout_s at most) while missing keys are claimed by another node; those still
        claimed then are PENDING, with their claim's expiry."""
        absent = BlockState.MISSING
        missing = [i for i, s in enumerate(statuses) if s.state is absent]
        if not missing:
            return statuses
        tag = tenant_tag(caller.tenant)
        still = self.claims.wait([tag + statuses[i].key for i in missing], max(0.0, timeout_s), is_active)
        for j, expires_in_s in still.items():
            i = missing[j]
            statuses[i] = KeyStatus(statuses[i].key, BlockState.PENDING, lease_expires_unix_ms=int((time.time() + expires_in_s) * 1000))
        return statuses

    def prefix_length(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        """How many leading keys are present, looking no further than the first that is not (here, then at peers)."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        present = 0
        for chunk in _chunks(keys):
            with self._locked as table:
                found = len(table.leading_present(caller.tenant, fingerprint_id, chunk))
            present += found
            if found < len(chunk):
                break
        if self.remote is not None and present < len(keys):
            sizes = self.remote.locate(caller.tenant, fingerprint_id, keys[present:])
            present += next((i for i, size in enumerate(sizes) if not size), len(sizes))
        return present

    def contains(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> bytes:
        """One byte a key, 1 where it is present (here, or in cluster mode at a live peer): lookup's walk
        without a status record a key, which cost ten times the walk (bench/throughput.py's contains row)."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        present = bytearray()
        for chunk in _chunks(keys):
            with self._locked as table:
                present += table.present(caller.tenant, fingerprint_id, chunk)
        if self.remote is not None and 0 in present:
            missing = [i for i, p in enumerate(present) if not p]
            sizes = self.remote.locate(caller.tenant, fingerprint_id, [keys[i] for i in missing])
            for i, size in zip(missing, sizes):
                if size:
                    present[i] = 1
        hits = present.count(1)
        self.counters[Event.LOOKUP_BLOCKS_HIT] += hits
        self.counters[Event.LOOKUP_BLOCKS_MISS] += len(present) - hits
        return bytes(present)

    @staticmethod
    def _lease_info(table: BlockTable, key: bytes, outcome: LeaseOutcome, lease: WriteLease | None) -> LeaseInfo:
        if lease is None:
            return LeaseInfo(key, outcome)
        granted = outcome == LeaseOutcome.GRANTED
        return LeaseInfo(key, outcome, lease.lease_id if granted else 0, lease.owner, table.unix_ms(lease.expires_at),
                         lease.slot if granted else None)

    def acquire(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0) -> list[LeaseInfo]:
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        self._check_admitting()
        ttl_s, out = self._ttl(ttl_ms), []
        elsewhere = self._held_by_peers(caller, fingerprint_id, keys) if self.remote is not None else set()
        claims, granted = self.claims, []
        for chunk in _chunks(keys):  # outcomes are per key: other requests may run between chunks
            with self._locked as table:
                for key in chunk:
                    if key in elsewhere:  # the engine fetches it (Pin, Get) instead of computing it
                        out.append(LeaseInfo(key, LeaseOutcome.ALREADY_PRESENT))
                        continue
                    outcome, lease = table.lease_for(caller, fingerprint_id, key, ttl_s)
                    if claims is not None and outcome == LeaseOutcome.GRANTED:
                        granted.append((len(out), lease))
                    out.append(self._lease_info(table, key, outcome, lease))
        if granted:
            self._claim_cluster_wide(claims, fingerprint_id, out, granted, ttl_s)
        return out

    def _claim_cluster_wide(self, claims: ClaimSource, fingerprint_id: bytes, out: list[LeaseInfo],
                            granted: list[tuple[int, WriteLease]], ttl_s: float) -> None:
        """Cluster mode: leases granted here stand only where their keys' homes grant the claim (outside the lock: a
        call to the home); the others end here and answer PENDING (another node computes the key: a Wait here
        waits for it) or ALREADY_PRESENT. The local rules came first, so a key pending here never asks a home."""
        answers = claims.claim(fingerprint_id, [lease.skey for _, lease in granted], [lease.lease_id for _, lease in granted], ttl_s)
        lost = [(i, lease, answer) for (i, lease), answer in zip(granted, answers) if answer.outcome != LeaseOutcome.GRANTED]
        if not lost:
            return
        with self._locked as table:
            for i, lease, answer in lost:
                if table.leases.get(lease.lease_id) is lease:
                    table.end_lease(lease)
                if answer.outcome == LeaseOutcome.PENDING:
                    out[i] = LeaseInfo(out[i].key, LeaseOutcome.PENDING, 0, f"node {answer.holder}",
                                       table.unix_ms(table.clock() + answer.expires_in_s))
                else:
                    out[i] = LeaseInfo(out[i].key, LeaseOutcome.ALREADY_PRESENT)

    def _missing(self, caller: Caller, keys: Sequence[bytes]) -> list[bytes]:
        """The keys with no block of the caller's here at all (under any fingerprint)."""
        tag, missing = tenant_tag(caller.tenant), []
        for chunk in _chunks(keys):
            with self._locked as table:
                find = table.index.get
                missing += [key for key in chunk if find(tag + key) is None]
        return missing

    def _held_by_peers(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> set[bytes]:
        missing = self._missing(caller, keys)
        if not missing:
            return set()
        return {key for key, size in zip(missing, self.remote.locate(caller.tenant, fingerprint_id, missing)) if size}

    def _fetch_missing(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool) -> None:
        """Cluster mode, before a read: copy in from peers what is missing here (with prefix, the leading run
        of the missing keys they hold), so the read then finds local blocks. What cannot be had stays missing."""
        missing = self._missing(caller, keys)
        if missing:
            self.remote.fetch(caller.tenant, fingerprint_id, missing, prefix)

    def reserve(self, caller: Caller, fingerprint_id: bytes, specs: Sequence[tuple[bytes, int]], ttl_ms: int = 0,
                durable: bool = False) -> list[LeaseInfo]:
        """specs: (key, size_bytes). A granted lease comes with a slot of that size in the host pool;
        with durable, a key ALREADY_PRESENT is made durable before the answer (it promises that)."""
        self._check_fp(fingerprint_id)
        self._check_keys([k for k, _ in specs])
        for key, size in specs:
            self._check_size(key, size)
        self._check_admitting()
        ttl_s = self._ttl(ttl_ms)
        answers: list[tuple[bytes, LeaseOutcome, WriteLease | None]] = []
        granted_now: list[WriteLease] = []
        short: list[tuple[WriteLease, int]] = []  # granted, waiting for a slot
        present: list[BlockMeta] = []
        try:
            with self._locked as table:
                for key, size in specs:
                    outcome, lease = table.lease_for(caller, fingerprint_id, key, ttl_s)
                    if outcome == LeaseOutcome.GRANTED and (lease.slot is None or lease.size != size):
                        granted_now.append(lease)
                        table.check_quota(caller, new_bytes=size - lease.size)
                        if not self.placement.take_slot(table, lease, size):
                            short.append((lease, size))
                    elif outcome == LeaseOutcome.ALREADY_PRESENT and durable:
                        present.append(table.find(caller.tenant, fingerprint_id, key))
                    answers.append((key, outcome, lease))
            if short:
                self.placement.find_slots(caller, short)
            if present:
                self.placement.make_durable(present)
        except KVStoreError:
            with self._locked as table:
                for lease in granted_now:
                    table.end_lease(lease)
            raise
        with self._locked as table:
            return [self._lease_info(table, key, outcome, lease) for key, outcome, lease in answers]

    def renew(self, caller: Caller, lease_ids: Sequence[int], ttl_ms: int = 0) -> list[int]:
        """The leases' new expiry times (Unix ms)."""
        self._check_ids(lease_ids, "lease ids")
        ttl_s = self._ttl(ttl_ms)
        with self._locked as table:
            leases = [table.owned_lease(caller, lid) for lid in lease_ids]
            expiries = [table.renew(lease, ttl_s) for lease in leases]
        if (claims := self.claims) is not None:
            by_fingerprint: dict[bytes, list[WriteLease]] = defaultdict(list)
            for lease in leases:
                by_fingerprint[lease.fingerprint_id].append(lease)
            for fingerprint_id, group in by_fingerprint.items():
                claims.renew(fingerprint_id, [lease.skey for lease in group], [lease.lease_id for lease in group], ttl_s)
        return expiries

    def release(self, caller: Caller, lease_ids: Sequence[int]) -> int:
        self._check_ids(lease_ids, "lease ids")
        with self._locked as table:
            held = [lease for lid in lease_ids if (lease := table.leases.get(lid)) is not None and lease.held_by(caller)]
            released = table.release(caller, lease_ids)
        if (claims := self.claims) is not None and held:  # their cluster-wide claims end too: a waiting node takes over now
            claims.release([lease.skey for lease in held], [lease.lease_id for lease in held])
        return released

    def wait(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], timeout_ms: int,
             is_active: Callable[[], bool] | None = None) -> list[KeyStatus]:
        """Block until no key is PENDING (committed, or its lease released or expired) or timeout; in cluster
        mode, then until no key is claimed by another node (claims.py) in what is left of the timeout, and the
        answer's MISSING keys a peer holds are PRESENT, tier REMOTE, as in lookup.

        The wait is bounded by max_wait_s whatever the caller asks, and ends early once
        is_active() says the caller has gone (checked at least every WAIT_POLL_S), so an
        abandoned Wait cannot hold a server thread.
        """
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        deadline = time.monotonic() + min(max(timeout_ms, 0) / 1000, self.cfg.max_wait_s)
        self.counters[Event.LEASE_WAITS] += 1
        while True:
            self.reap_expired()
            seen = self._changed.generation  # statuses are read a chunk at a time, outside one lock hold
            statuses = self._statuses(caller, fingerprint_id, keys)
            remaining = deadline - time.monotonic()
            if all(s.state != BlockState.PENDING for s in statuses) or remaining <= 0 or self.closed:
                if self.claims is not None:
                    statuses = self._with_claims(caller, statuses, remaining, is_active)
                return self._with_remote(caller, fingerprint_id, statuses) if self.remote is not None else statuses
            if is_active is not None and not is_active():
                self.counters[Event.LEASE_WAITS_ABANDONED] += 1
                return statuses
            soonest = min((s.lease_expires_unix_ms for s in statuses if s.state == BlockState.PENDING), default=0)
            until_expiry = max(0.01, soonest / 1000 - time.time())
            with self._changed:
                if self._changed.generation == seen:  # nothing changed while we read: sleep until something does
                    self._changed.wait(min(remaining, until_expiry, WAIT_POLL_S))

    # ---- writes -------------------------------------------------------------------

    def write(self, caller: Caller, lease_id: int, offset: int, data: memoryview | bytes) -> None:
        with self._locked as table:
            lease = table.writable_lease(caller, lease_id)
            if offset < 0 or offset + len(data) > lease.size:
                raise SizeMismatchError(f"write of {len(data)} bytes at offset {offset} exceeds the reserved {lease.size} bytes")
            # Under the lock: the slot cannot be reclaimed by expiry mid-copy.
            start = lease.slot.offset + offset
            self.host.view[start : start + len(data)] = data

    def commit(self, caller: Caller, fingerprint_id: bytes, items: Sequence[tuple[int, int]], durable: bool = False) -> list[PutOutcome]:
        """items: (lease_id, checksum). All are validated before any becomes visible.

        Durable means every block this put names is in LMDB before it answers, those ALREADY_PRESENT
        included. When they cannot all be (NotDurableError), nothing is committed and the leases stay
        the caller's to retry or release, so no answer, a retry's included, ever calls a block durable
        that is not. The LMDB write runs outside the store lock; the leases are marked committing
        meanwhile, so they neither expire nor take another write."""
        self._check_fp(fingerprint_id)
        self._check_ids([lid for lid, _ in items], "lease ids")
        with self._locked as table:
            leases = [table.owned_lease(caller, lid) for lid, _ in items]
            for lease, (lid, _) in zip(leases, items):
                if lease.fingerprint_id != fingerprint_id:
                    raise FingerprintMismatchError(f"lease {lid} was taken under another fingerprint than this commit names")
                table.writable_lease(caller, lid)
            # Every slot hashed in one call, GIL released and over threads for a large commit: a put of 32 MiB
            # spent ~2 ms here hashing block by block, holding the GIL the request threads need.
            digests = checksums(self.host.view, [lease.slot.offset for lease in leases], [lease.slot.size_bytes for lease in leases])
            for lease, (_, expected), digest in zip(leases, items, digests):
                if digest != expected:
                    self.counters[Event.CHECKSUM_FAILURES] += 1
                    # Never the slot's actual checksum: it would be an oracle for whatever the slot holds.
                    raise ChecksumMismatchError(f"block {lease.key.hex()}: the reserved slot's bytes do not match the committed checksum")
            fresh, present = self._new_blocks(table, leases, dict(items))
            if not durable:
                return self._commit_locked(table, leases, fresh)
            table.begin_commit(leases)
        try:
            return self.placement.make_durable([*fresh.values(), *present], then=lambda t: self._commit_locked(t, leases, fresh, durable=True))
        finally:
            with self._locked as table:
                table.end_commit(leases)

    @staticmethod
    def _new_blocks(table: BlockTable, leases: list[WriteLease], checksums: dict[int, int]) -> tuple[dict[bytes, BlockMeta], list[BlockMeta]]:
        """The blocks a commit adds (by storage key; their host copy is the lease's slot) and those already present."""
        fresh: dict[bytes, BlockMeta] = {}
        present: list[BlockMeta] = []
        for lease in leases:
            if (existing := table.index.get(lease.skey)) is not None:
                present.append(existing)
            elif lease.skey not in fresh:
                fresh[lease.skey] = BlockMeta(lease.skey, lease.tenant, lease.fingerprint_id, lease.size, checksums[lease.lease_id],
                                              copies={HOST: lease.slot})
        return fresh, present

    def _commit_locked(self, table: BlockTable, leases: list[WriteLease], fresh: dict[bytes, BlockMeta], durable: bool = False) -> list[PutOutcome]:
        if durable:
            for lease in leases:
                if table.leases.get(lease.lease_id) is not lease:
                    raise LeaseError(f"lease {lease.lease_id} ended (revoked or released) while its block was written to the ssd tier; nothing was committed")
        outcomes = []
        for lease in leases:
            meta = fresh.pop(lease.skey, None)
            if meta is None:
                outcomes.append(PutOutcome.ALREADY_PRESENT)
                table.end_lease(lease)
                continue
            meta.copies[HOST] = table.commit_lease(lease)
            table.add(meta)
            outcomes.append(PutOutcome.STORED)
            self.counters[Event.PUTS] += 1
            self.counters[Event.BYTES_IN] += meta.size
        return outcomes

    def put_inline(self, caller: Caller, fingerprint_id: bytes, blocks: Sequence[tuple[bytes, bytes, int]], durable: bool = False) -> list[PutOutcome]:
        """blocks: (key, data, checksum). Reserve + write + commit, validated up front."""
        self._check_fp(fingerprint_id)
        self._check_keys([k for k, _, _ in blocks])
        for key, data, expected in blocks:
            self._check_size(key, len(data))
            if checksum(data) != expected:
                raise ChecksumMismatchError(f"block {key.hex()} data does not match its checksum {expected:#x}")
        infos = self.reserve(caller, fingerprint_id, [(k, len(d)) for k, d, _ in blocks])
        outcomes: list[PutOutcome] = []
        to_commit: list[tuple[int, int]] = []
        try:
            present: list[BlockMeta] = []
            with self._locked as table:
                for info, (key, data, expected) in zip(infos, blocks):
                    if info.outcome == LeaseOutcome.GRANTED:
                        to_commit.append((info.lease_id, expected))
                        self.write(caller, info.lease_id, 0, data)
                        outcomes.append(PutOutcome.STORED)
                    elif info.outcome == LeaseOutcome.ALREADY_PRESENT:
                        if (meta := table.find(caller.tenant, fingerprint_id, key)) is not None:
                            present.append(meta)
                        outcomes.append(PutOutcome.ALREADY_PRESENT)
                    else:
                        outcomes.append(PutOutcome.PENDING_ELSEWHERE)
            if durable and present:  # an ALREADY_PRESENT answer to a durable put promises durability too
                self.placement.make_durable(present)
            committed = iter(self.commit(caller, fingerprint_id, to_commit, durable))
        except Exception:
            # Nothing new was committed; the leases this call took go, so a retry starts afresh.
            self.release(caller, [lid for lid, _ in to_commit])
            raise
        return [next(committed) if o == PutOutcome.STORED else o for o in outcomes]

    # ---- reads --------------------------------------------------------------------

    def _resolve_for_read(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool = False) -> list[BlockMeta]:
        """Pin-count the keys' blocks; all of them, or with prefix the leading run that is present.

        Takes the lock a chunk of keys at a time; blocks are pin-counted as they are found, so
        none can be evicted between chunks, and all are released again if one is missing."""
        missing: list[bytes] = []
        metas, _ = self._pin_present(caller, fingerprint_id, keys, prefix, missing)
        if missing:
            self._unpin(metas)
            self.counters[Event.MISSES] += len(missing)
            raise BlockNotFoundError(f"{len(missing)} of {len(keys)} blocks not found: " + ", ".join(k.hex() for k in missing[:4]) + ("…" if len(missing) > 4 else ""))
        if self.hbm is not None:
            self.hbm.note_reads(metas)
        return metas

    def _pin_present(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool,
                     missing: list[bytes]) -> tuple[list[BlockMeta], int]:
        """_resolve_for_read's pass: (the blocks pin-counted, how many keys a prefix pass looked at); without prefix,
        the keys with no block appended to missing."""
        metas: list[BlockMeta] = []
        looked = 0
        try:
            for chunk in _chunks(keys):
                with self._locked as table:
                    if prefix:
                        found = table.pin_leading(caller.tenant, fingerprint_id, chunk)  # pin-counted and touched
                    else:
                        found = table.pin_found(caller.tenant, fingerprint_id, chunk, missing)  # likewise
                metas += found
                looked += len(chunk)
                if prefix and len(found) < len(chunk):
                    break
        except KVStoreError:
            self._unpin(metas)
            raise
        return metas, looked

    def _resolve_clustered(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool) -> list[BlockMeta]:
        """Cluster mode's _resolve_for_read: the keys are resolved here first, and only when that comes up short is
        it undone and the read done as before (_fetch_missing from peers, then _resolve_for_read). So a read that
        finds everything here costs what it costs with cluster mode off (checking for missing keys first cost a
        64-block Pin a tenth), and any other gets exactly the answer it got before."""
        missing: list[bytes] = []
        try:
            metas, looked = self._pin_present(caller, fingerprint_id, keys, prefix, missing)
        except KVStoreError:  # e.g. a block under another fingerprint: the usual path raises it, after its fetch
            metas, looked = None, 0
        if metas is not None and len(metas) == len(keys) and not missing:
            if self.hbm is not None:
                self.hbm.note_reads(metas)
            return metas
        if metas is not None:
            self._unpin(metas)
            if prefix:  # the prefix pass counted lookup hits and misses: the pass below counts them again
                self.counters[Event.LOOKUP_BLOCKS_HIT] -= len(metas)
                self.counters[Event.LOOKUP_BLOCKS_MISS] -= looked - len(metas)
        self._fetch_missing(caller, fingerprint_id, keys, prefix)
        return self._resolve_for_read(caller, fingerprint_id, keys, prefix)

    def _unpin(self, metas: Sequence[BlockMeta]) -> None:
        if metas:
            with self._locked as table:
                table.unpin_blocks(metas)

    def get(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> BlockStream:
        """Yields (key, payload, checksum) in order; raises BlockNotFoundError before yielding if any is missing.

        A host copy's payload is a view of its slot, not a copy: the blocks stay pinned until the generator
        is exhausted or closed, so a caller that copies a payload later must not ask for more before it does."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        if self.remote is not None:
            return self._stream(self._resolve_clustered(caller, fingerprint_id, keys, prefix=False), views=True)
        return self._stream(self._resolve_for_read(caller, fingerprint_id, keys), views=True)

    def _stream(self, metas: list[BlockMeta], views: bool = False) -> BlockStream:
        """The blocks' payloads, pinned until the generator ends; with views, a host copy's is a view of its slot."""
        try:
            for meta in metas:
                slot = meta.copies.get(HOST)
                if slot is not None:
                    data: bytes | memoryview = self.host.read(meta, slot) if views else bytes(self.host.read(meta, slot))
                    self.counters[Event.HITS_HOST] += 1
                else:
                    data = self.placement.read_below(meta)
                    self.counters[Event.HITS_SSD] += 1
                    self.placement.promote([(meta, data)], make_room=False)
                self.counters[Event.GETS] += 1
                self.counters[Event.BYTES_OUT] += meta.size
                yield meta.key, data, meta.checksum
        finally:
            self._unpin(metas)

    def pin(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, prefix: bool = False,
            release_pin_ids: Sequence[int] = (), packed: bool = False) -> PinInfo:
        """Pin blocks in the host pool (promoting from SSD) so a client can copy them out directly.

        With prefix, the longest present leading run is pinned instead of all or
        nothing, so an engine finds and pins its cached prefix in one round trip;
        a block that cannot be staged (corrupt on SSD, pool full of pins) ends the run.
        A caller on an event loop asks needs_staging() first and pins elsewhere when it is true.
        release_pin_ids (the caller's earlier pins) are dropped first, so the room they held is free for this one.
        packed: the answer's columns may be array('Q')s instead of lists (an answer encoded at once: the local socket's).
        """
        if release_pin_ids:
            self._check_ids(release_pin_ids, "pin ids")
        try:
            self._check_fp(fingerprint_id)
            self._check_keys(keys)
            ttl = self._ttl(ttl_ms, self.cfg.pin_ttl_s)
        except KVStoreError:
            if release_pin_ids:  # dropped whatever else the request got wrong, as a separate Unpin would have been
                self.unpin(caller, release_pin_ids)
            raise
        if prefix and len(keys) <= LOCK_CHUNK_KEYS:
            pinned = self._pin_prefix_in_host(caller, fingerprint_id, keys, ttl, release_pin_ids, packed)
            if isinstance(pinned, PinInfo):
                return pinned
            if pinned is None:  # cluster mode, keys missing here: as _resolve_clustered after its first pass
                keys = key_list(keys)  # PackedKeys: the lookups below take a list
                self._fetch_missing(caller, fingerprint_id, keys, prefix)
                pinned = self._resolve_for_read(caller, fingerprint_id, keys, prefix)
            metas = pinned
        else:
            if release_pin_ids:
                self.unpin(caller, release_pin_ids)
            keys = key_list(keys)  # PackedKeys: the lookups below take a list
            if self.remote is not None:
                metas = self._resolve_clustered(caller, fingerprint_id, keys, prefix)
            else:
                metas = self._resolve_for_read(caller, fingerprint_id, keys, prefix)
        staged = 0
        columns = host_columns(metas)  # pinned: a host copy, once there, stays until unpinned
        if columns is None:
            metas, staged = self.placement.stage(metas, prefix)
            columns = host_columns(metas)
        if not metas:
            return PinInfo(0, PinnedSlots([], [], []), 0)
        with self._locked as table:
            return self._add_pin(table, caller, metas, columns, ttl, prefix, staged)

    def _pin_prefix_in_host(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], ttl_s: float,
                            release_pin_ids: Sequence[int], packed: bool = False) -> PinInfo | list[BlockMeta] | None:
        """A prefix Pin of up to LOCK_CHUNK_KEYS keys in one hold of the store lock: the releases, the walk
        (block_table.pin_leading_columns), the quota and the pin record. An engine's prefix loads of blocks in the
        host pool end here, without the general path's three holds of the lock and second pass over the blocks. Else the
        blocks pinned so far, for pin's general path to stage from lower tiers, or None where it must look
        again (cluster mode, a key missing here: the general path asks peers first, then counts the lookups)."""
        with self._locked as table:
            if release_pin_ids:
                table.unpin(caller, release_pin_ids)
            hbm_values = self.hbm.placement_values() if self.hbm is not None else None
            run = table.pin_prefix(caller.tenant, fingerprint_id, keys, hbm_values, packed)
            metas, columns = run.metas, run.columns
            if self.remote is not None and len(metas) < len(keys):
                table.unpin_blocks(metas)
                self.counters[Event.LOOKUP_BLOCKS_HIT] -= len(metas)
                self.counters[Event.LOOKUP_BLOCKS_MISS] -= len(keys) - len(metas)
                return None
            if self.hbm is not None:
                self.hbm.note_reads(metas)
            if columns is None:
                return metas
            if not metas:
                return PinInfo(0, PinnedSlots([], [], []), 0)
            return self._add_pin(table, caller, metas, columns, ttl_s, True, 0, run)

    def _add_pin(self, table: BlockTable, caller: Caller, metas: list[BlockMeta], columns: HostColumns, ttl_s: float,
                 prefix: bool, staged: int, run: PrefixRun | None = None) -> PinInfo:
        """The pin record over blocks pin-counted and in the host pool, within the caller's quota (a prefix cut
        short to fit), and its answer; run: the prefix walk that pinned them, whose HBM placement it reuses where
        the walk read it. Lock held."""
        offsets, sizes, checksums, pinned_bytes = columns
        read = len(metas)
        kept = table.within_quota(caller, metas, prefix, pinned_bytes)
        pin = table.add_pin(caller, kept, ttl_s, pinned_bytes if len(kept) == read else None)
        expires = table.unix_ms(pin.expires_at)
        if self.hbm is None:
            hbm = None
        elif run is not None and run.placed:
            hbm = self.hbm.placement_of(run.placement, len(kept))
        else:
            hbm = self.hbm.pin_placement(table, kept)
        n = len(kept)
        in_hbm = hbm.in_hbm if hbm is not None else 0
        counters = self.counters
        counters[Event.HITS_HOST] += read - staged - in_hbm
        if staged:
            counters[Event.HITS_SSD] += staged
        if in_hbm:
            counters[Event.HITS_HBM] += in_hbm
        counters[Event.GETS] += n
        counters[Event.BYTES_OUT] += pin.size
        if n < read:
            offsets, sizes, checksums = offsets[:n], sizes[:n], checksums[:n]
        if hbm is None:
            return PinInfo(pin.pin_id, PinnedSlots(offsets, sizes, checksums), expires)
        return PinInfo(pin.pin_id, PinnedSlots(offsets, sizes, checksums, hbm.tiers, hbm.hbm_offsets), expires, hbm.pool_id)

    def needs_staging(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes], prefix: bool = False) -> bool:
        """Whether a pin of these keys would read the ssd tier (a block it would name has no host copy) or,
        in cluster mode, ask peers (one is missing): a caller on an event loop then pins from a worker
        thread. Cheap, and only advice: a block may move between this answer and the pin."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        tag = tenant_tag(caller.tenant)  # the UCX data plane asks for every keyed get: no per-key call
        for chunk in _chunks(keys):
            with self._locked as table:
                find = table.index.get
                for key in chunk:
                    meta = find(tag + key)
                    if meta is None and self.remote is not None:
                        return True
                    if meta is None or meta.fingerprint_id != fingerprint_id:
                        if prefix:
                            return False  # the pin's run ends here
                    elif HOST not in meta.copies:
                        return True
        return False

    def unpin(self, caller: Caller, pin_ids: Sequence[int]) -> int:
        self._check_ids(pin_ids, "pin ids")
        with self._locked as table:
            return table.unpin(caller, pin_ids)

    # ---- data-plane access: slots a transfer engine may touch ------------------------

    def pinned_slots(self, caller: Caller, pin_id: int) -> PinnedSlots:
        """Slots of a live pin the caller owns, for a data plane that sends them (e.g. UCX)."""
        with self._locked as table:
            pin = table.live_pin(caller, pin_id)
            if any(HOST not in m.copies for m in pin.blocks):
                raise LeaseError(f"pin {pin_id} names a block no longer in the host pool")
            return PinnedSlots.of(pin.blocks, hbm=self.hbm.pin_placement(table, pin.blocks) if self.hbm is not None else None)

    def claim_write_slots(self, caller: Caller, lease_ids: Sequence[int], hold_s: float | None = None) -> list[Slot]:
        """The slot of each reserved lease, renewed for hold_s so expiry cannot free a slot mid-receive."""
        self._check_ids(lease_ids, "lease ids")
        with self._locked as table:
            leases = [table.writable_lease(caller, lid) for lid in lease_ids]
            for lease in leases:
                table.hold(lease, hold_s or self.cfg.lease_ttl_s)
            return [lease.slot for lease in leases]

    # ---- peers: blocks by storage key, for the cluster's remote tier ----------------------------

    def read_stored(self, fingerprint_id: bytes, skeys: Sequence[bytes]) -> Iterator[tuple[bytes, bytes, int]]:
        """For a peer node: the leading run of these storage keys' blocks under fingerprint_id, streamed as
        get does (pinned until sent). A peer acts for every tenant; the storage key names the tenant."""
        metas: list[BlockMeta] = []
        for chunk in _chunks(skeys):
            with self._locked as table:
                find, found = table.index.get, []
                for skey in chunk:
                    meta = find(skey)
                    if meta is None or meta.fingerprint_id != fingerprint_id:
                        break
                    found.append(meta)
                table.pin_blocks(found)
                table.index.touch(found)
            metas += found
            if len(found) < len(chunk):
                break
        return self._stream(metas)

    def adopt(self, tenant: str, fingerprint_id: bytes, blocks: Sequence[tuple[bytes, bytes | memoryview, int]], since: int) -> int:
        """Blocks a peer sent, (key, payload, checksum) already checked by the caller, become the tenant's local
        blocks (placement.adopt); how many leading ones are now present. Never over a block that exists here, and
        none if an operator's delete ran since `since` (self.deletions when the fetch began): the peer may not have
        applied that delete yet, and its copy must not bring a deleted block back here."""
        metas = [(BlockMeta(storage_key(tenant, key), tenant, fingerprint_id, len(data), crc, origin=Origin.COPY), data)
                 for key, data, crc in blocks]
        return self.placement.adopt(metas, lambda: self.deletions == since)

    def reserve_copies(self, tenant: str, fingerprint_id: bytes, blocks: Sequence[tuple[bytes, int, int]]) -> tuple[list[BlockMeta], list[Slot | None]]:
        """Host slots a peer's blocks (key, size, checksum) are about to be received into, straight from the
        network; (their metas, their slots: None where the block is here already or found no room). Pass both
        to settle_copies, whatever happens."""
        metas = [BlockMeta(storage_key(tenant, key), tenant, fingerprint_id, size, crc, origin=Origin.COPY) for key, size, crc in blocks]
        return metas, self.placement.reserve_copies(metas)

    def settle_copies(self, reserved: tuple[list[BlockMeta], list[Slot | None]], landed: int, since: int) -> int:
        """The first `landed` reserved copies (received whole and checked by the caller) become local blocks (as in
        adopt, `since` guards against an operator's delete meanwhile); the other slots are released. How many
        leading blocks are now present."""
        metas, slots = reserved
        return self.placement.settle_copies(metas, slots, landed, lambda: self.deletions == since)

    def describe(self, skeys: Sequence[bytes]) -> list[tuple[str, bytes, int, int] | None]:
        """(tenant, fingerprint id, size, checksum) of each storage key's block here, None where absent: what a
        node that asks a peer to take copies tells it about them."""
        out: list[tuple[str, bytes, int, int] | None] = []
        for chunk in _chunks(skeys):
            with self._locked as table:
                find = table.index.get
                out += [None if (m := find(skey)) is None else (m.tenant, m.fingerprint_id, m.size, m.checksum) for skey in chunk]
        return out

    def mark_copies(self, skeys: Sequence[bytes], origin: Origin | None = None, elsewhere: bool | None = None) -> int:
        """Record what cluster mode learnt of these blocks (those here): their origin (raised only: a replica stays one
        when it is later read through) and whether another node holds them too. Eviction reads both. How many were here."""
        marked = 0
        for chunk in _chunks(skeys):
            with self._locked as table:
                for skey in chunk:
                    if (meta := table.index.get(skey)) is None:
                        continue
                    marked += 1
                    if origin is not None and (meta.origin == Origin.COPY or (meta.origin != Origin.LOCAL and origin > meta.origin)):
                        meta.origin = origin
                    if elsewhere is not None:
                        meta.elsewhere = elsewhere
        return marked

    def drop(self, skeys: Sequence[bytes]) -> int:
        """Remove these blocks (unpinned ones only) from every tier: their bytes moved to another node (a spill). How many went."""
        dropped = 0
        for chunk in _chunks(skeys):
            with self._locked as table:
                for skey in chunk:
                    meta = table.index.get(skey)
                    if meta is not None and meta.pins == 0:
                        dropped += table.delete(meta)
        self.placement.erase_pending()
        return dropped

    def sole_copies(self, tier: Tier, limit_bytes: int, scan: int = 16384) -> list[BlockMeta]:
        """Unpinned blocks with a copy in tier that no other node is known to hold (eviction.keep_rank 2), least
        recently used first, up to limit_bytes, among the `scan` least recently used (the walk holds the store lock):
        what a full node spills to peers before it would drop them."""
        out, total = [], 0
        with self._locked as table:
            for n, meta in enumerate(table.index.in_lru_order(tier)):
                if total >= limit_bytes or n >= scan:
                    break
                if meta.pins == 0 and keep_rank(meta) == 2:
                    out.append(meta)
                    total += meta.size
        return out

    def catalog(self) -> list[tuple[bytes, bytes, int, int]]:
        """(storage key, fingerprint id, size, checksum) of every block here: what a resync announces."""
        with self._locked as table:
            return [(m.skey, m.fingerprint_id, m.size, m.checksum) for m in table.index]

    # ---- deletion -----------------------------------------------------------------

    def delete(self, caller: Caller, fingerprint_id: bytes, keys: Sequence[bytes]) -> int:
        """Delete the caller's blocks of these keys; answers once their ssd records are gone (SsdWriteError if LMDB refuses)."""
        self._check_fp(fingerprint_id)
        self._check_keys(keys)
        deleted = 0
        for chunk in _chunks(keys):
            with self._locked as table:
                metas = [m for k in chunk if (m := table.find(caller.tenant, fingerprint_id, k)) is not None]
                deleted += sum(table.delete(meta) for meta in metas)
        self.placement.erase_pending()
        return deleted

    # ---- placement ------------------------------------------------------------------

    def demote_cold(self) -> int:
        """Above the high watermark, demote LRU unpinned blocks until under the low one (placement.py)."""
        return self.placement.demote_cold()

    def promote_hot(self) -> PromotionReport | None:
        """Copy blocks read often lately into the HBM tier, if there is one (hbm_placement.py)."""
        return self.hbm.promote_hot() if self.hbm is not None else None

    def reap_expired(self) -> None:
        if self.placement.stopped:
            return
        with self._locked as table:
            table.reap()

    def settle_reads(self) -> None:
        """Apply the LRU touches prefix Pins queued to answer first (BlockIndex.touch_later): after a door has sent
        its answer, and each background tick. Whatever reads the LRU orders applies them itself before."""
        if self.table.index.pending_touch_blocks and not self.placement.stopped:
            with self._locked as table:
                table.index.flush_touches()

    # ---- lifecycle and stats ------------------------------------------------------

    def flush_to_ssd(self, batch_bytes: int = 64 << 20) -> int:
        """Write every host-only block to LMDB, batch_bytes of payload a transaction; returns how many (placement.py)."""
        return self.placement.flush(batch_bytes)

    def close(self) -> None:
        """Flush the host tier (persist_on_shutdown) and close the tiers; logs failures, never raises."""
        with self._locked:
            if self.closed:
                return
            self.closed = True
            self._changed.notify_all()
        try:
            if self.cfg.persist_on_shutdown:
                flushed = self.flush_to_ssd()
                log.info("flushed host tier to ssd", extra={"blocks": flushed})
        except Exception:
            log.exception("flushing the host tier failed")
        with self.placement.writer, self._lock:
            self.placement.stopped = True
            try:
                self.ssd.close()
            except SsdWriteError as err:
                log.error("closing the ssd tier failed: %s", err)
            except Exception:
                log.exception("closing the ssd tier failed")
            finally:
                self.host.close()
                if self.hbm is not None:
                    self.hbm.close()

    def stats(self) -> StoreStats:
        self.reap_expired()
        with self._locked as table:
            hbm = (self.hbm.tier,) if self.hbm is not None and self.hbm.available else ()
            tiers = tuple(TierStats(t.tier, t.capacity_bytes, t.used_bytes, table.index.blocks_in(t.tier)) for t in (*hbm, self.host, self.ssd))
            return StoreStats(tiers, len(table.index), len(table.leases), len(table.pins), dict(self.counters))

    # ---- admin: what kvstore/operations.py does, on the public side of the lock ----------

    def blocks(self, match: Callable[[BlockView], bool]) -> list[BlockView]:
        """The blocks an operator's selector matches, in storage-key order (stable for paging)."""
        now_unix, now = time.time(), time.monotonic()
        with self._locked as table:
            views = [v for m in table.index if match(v := table.block_view(m, now_unix, now))]
        return sorted(views, key=lambda v: v.skey)

    def _matching(self, table: BlockTable, match: Callable[[BlockView], bool]) -> list[BlockMeta]:
        now_unix, now = time.time(), time.monotonic()
        return [m for m in table.index if match(table.block_view(m, now_unix, now))]

    def evict(self, match: Callable[[BlockView], bool]) -> EvictReport:
        """Remove matching blocks from every tier; pinned blocks are never evicted."""
        with self._locked as table:
            metas = self._matching(table, match)
            victims = [m for m in metas if m.pins == 0]
            for meta in victims:
                table.delete(meta)
            self.counters[Event.ADMIN_EVICTIONS] += len(victims)
        self.placement.erase_pending()
        return EvictReport(evicted=len(victims), bytes=sum(m.size for m in victims), skipped_pinned=len(metas) - len(victims))

    def evict_to_watermark(self, tier: Tier, fraction: float) -> EvictReport:
        """Evict LRU unpinned copies from one tier (HBM, HOST or SSD) until used <= fraction * capacity (placement.py;
        from HBM only the copies go, hbm_placement.py)."""
        if tier == HBM:
            return self.hbm.evict_to_watermark(fraction) if self.hbm is not None else EvictReport()
        return self.placement.evict_to_watermark(tier, fraction)

    def delete_blocks(self, match: Callable[[BlockView], bool], match_lease: Callable[[LeaseView], bool]) -> Deletion:
        """Delete matching blocks, pinned or not (readers keep their copy until they unpin), and revoke
        matching write leases: a written-but-uncommitted block matches too, and revoking its lease frees
        (and zeroes) its slot, so the writer's later Commit fails and the deleted data cannot come back."""
        with self._locked as table:
            self.deletions += 1
            metas = self._matching(table, match)
            for meta in metas:
                table.delete(meta)
            leases, _ = table.revoke(lambda v: v.kind == "write" and match_lease(v))
            self.counters[Event.ADMIN_DELETES] += len(metas)
        self.placement.erase_pending()
        return Deletion(len(metas), sum(m.size for m in metas), leases, tuple(metas))

    def readers_left(self, deletion: Deletion) -> int:
        """How many deleted blocks readers still hold."""
        with self._locked:
            return sum(1 for m in deletion.blocks if m.pins)

    def scrub(self) -> tuple[int, int]:
        """After a secure delete: zero every free byte of the host pool and the unused tails of live slots,
        and rewrite the ssd tier so no freed LMDB page keeps a deleted payload. (host bytes zeroed, ssd bytes rewritten)."""
        scrubbed = self.placement.scrub_host()
        rewritten = self.placement.rewrite_below()
        self.counters[Event.SECURE_DELETES] += 1
        return scrubbed, rewritten

    def lease_views(self) -> list[LeaseView]:
        """Every write lease and read pin, as an operator sees them."""
        with self._locked as table:
            return table.lease_views()

    def revoke(self, match: Callable[[LeaseView], bool]) -> tuple[int, int]:
        """End the leases and drop the pins match names; (leases, pins)."""
        with self._locked as table:
            return table.revoke(match)

    def tenant_usage(self) -> list[TenantUsage]:
        usage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with self._locked as table:
            for meta in table.index:
                usage[meta.tenant][0] += 1
                usage[meta.tenant][1] += meta.size
        return [TenantUsage(t, n, b) for t, (n, b) in sorted(usage.items())]

    def in_flight(self) -> int:
        """Reads holding pins plus write leases still open."""
        with self._locked as table:
            return table.in_flight()
