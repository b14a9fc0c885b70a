"""Operator actions on a running Store: select, list, evict, delete (securely), revoke, wait for quiet.

Owns what a selector means and what each admin action does to the store, working
under the store's lock through its placement helpers. It refuses gRPC (that is
admin_service.py) and on-disk formats (the tiers own how bytes are scrubbed).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

from kvwire.errors import InvalidRequestError
from kvstore.index import BlockMeta
from kvstore.leases import WriteLease
from kvstore.store import Store
from kvwire.v1 import kvstore_pb2 as pb


@dataclass(frozen=True)
class Selector:
    """Set fields are ANDed; an unset field matches every block."""

    tenant: str = ""
    fingerprint_id: bytes = b""
    tier: int = pb.TIER_UNSPECIFIED
    min_age_s: float = 0.0
    keys: frozenset[bytes] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.tenant or self.fingerprint_id or self.tier or self.min_age_s or self.keys)

    def matches(self, meta: BlockMeta, now: float) -> bool:
        return (
            (not self.tenant or meta.tenant == self.tenant)
            and (not self.fingerprint_id or meta.fingerprint_id == self.fingerprint_id)
            and (not self.tier or meta.tier == self.tier)
            and (not self.min_age_s or now - meta.created >= self.min_age_s)
            and (not self.keys or meta.key in self.keys)
        )

    def matches_lease(self, lease: WriteLease) -> bool:
        """A write lease is a block in the making: in the host tier, and younger than any age."""
        return (
            (not self.tenant or lease.tenant == self.tenant)
            and (not self.fingerprint_id or lease.fingerprint_id == self.fingerprint_id)
            and (not self.tier or self.tier == pb.TIER_HOST)
            and not self.min_age_s
            and (not self.keys or lease.skey[8:] in self.keys)
        )


@dataclass(frozen=True)
class BlockView:
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    key: bytes
    tier: int
    on_ssd: bool
    size: int
    pins: int
    age_s: float
    idle_s: float


@dataclass(frozen=True)
class EvictReport:
    evicted: int = 0  # blocks gone from the store
    demoted: int = 0  # copies dropped from one tier; the block stays readable from another
    bytes: int = 0
    skipped_pinned: int = 0


@dataclass(frozen=True)
class DeleteReport:
    deleted: int
    bytes: int
    pending_pinned: int
    scrubbed_host_bytes: int = 0
    ssd_bytes_rewritten: int = 0


@dataclass(frozen=True)
class LeaseView:
    id: int
    kind: str  # "write" or "pin"
    owner: str
    tenant: str
    fingerprint_id: bytes
    keys: tuple[bytes, ...]
    expires_unix_ms: int
    size: int


class Operations:
    def __init__(self, store: Store) -> None:
        self.store = store

    def _select(self, sel: Selector) -> list[BlockMeta]:
        """Matching blocks in storage-key order (stable for paging). Caller holds the lock."""
        now = time.time()
        return sorted((m for m in self.store.index if sel.matches(m, now)), key=lambda m: m.skey)

    # ---- reading --------------------------------------------------------------------

    def list_blocks(self, sel: Selector, page_size: int, after: bytes = b"") -> tuple[list[BlockView], bytes, int]:
        """One page of matches after storage key `after`, the last key of a full page (else b""), and the match count."""
        now, mono = time.time(), time.monotonic()
        with self.store._lock:
            matched = self._select(sel)
            page = [m for m in matched if m.skey > after][:page_size]
            views = [BlockView(m.skey, m.tenant, m.fingerprint_id, m.key, m.tier, m.on_ssd, m.size, m.pins, now - m.created, mono - m.last_access) for m in page]
        more = bool(page) and page[-1].skey != matched[-1].skey
        return views, (page[-1].skey if more else b""), len(matched)

    def tenant_usage(self) -> list[tuple[str, int, int]]:
        usage: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        with self.store._lock:
            for meta in self.store.index:
                usage[meta.tenant][0] += 1
                usage[meta.tenant][1] += meta.size
        return sorted((t, n, b) for t, (n, b) in usage.items())

    def leases(self, tenant: str = "", owner: str = "") -> list[LeaseView]:
        with self.store._lock:
            table = self.store.leases
            views = [
                LeaseView(l.lease_id, "write", l.owner, l.tenant, l.fingerprint_id, (l.skey[8:],), l.expires_unix_ms(), l.size)
                for l in table.by_id.values()
            ]
            for pin in table.pins.values():
                first = pin.blocks[0] if pin.blocks else None
                expires = int((time.time() + pin.expires_at - time.monotonic()) * 1000)
                views.append(
                    LeaseView(pin.pin_id, "pin", pin.owner, pin.tenant, first.fingerprint_id if first else b"", tuple(m.key for m in pin.blocks), expires, pin.size)
                )
        return sorted((v for v in views if (not tenant or v.tenant == tenant) and (not owner or v.owner == owner)), key=lambda v: v.id)

    # ---- changing ---------------------------------------------------------------------

    def revoke(self, ids: set[int], owner: str = "", tenant: str = "") -> tuple[int, int]:
        """Drop write leases and read pins named by id, owner or tenant; returns (leases, pins)."""
        if not (ids or owner or tenant):
            raise InvalidRequestError("revoke needs lease ids, an owner or a tenant")
        chosen = {v.id for v in self.leases() if v.id in ids or (owner and v.owner == owner) or (tenant and v.tenant == tenant)}
        store = self.store
        with store._lock:
            leases = [l for l in list(store.leases.by_id.values()) if l.lease_id in chosen]
            pins = [p for p in list(store.leases.pins.values()) if p.pin_id in chosen]
            for lease in leases:
                store._release_lease(lease, stale=True)  # its holder may still be writing
            for pin in pins:
                store._drop_pin(pin)
            store.counters["lease_revocations"] += len(leases)
            store.counters["pin_revocations"] += len(pins)
        return len(leases), len(pins)

    def evict(self, sel: Selector) -> EvictReport:
        """Remove matching blocks from every tier; pinned blocks are never evicted."""
        if sel.empty:
            raise InvalidRequestError("evict needs a selector (fingerprint, tenant, keys, tier, age) or a watermark")
        with self.store._lock:
            metas = self._select(sel)
            victims = [m for m in metas if m.pins == 0]
            for meta in victims:
                self.store._delete_locked(meta)
            self.store.counters["admin_evictions"] += len(victims)
        return EvictReport(evicted=len(victims), bytes=sum(m.size for m in victims), skipped_pinned=len(metas) - len(victims))

    def evict_to_watermark(self, tier: int, fraction: float) -> EvictReport:
        """Evict least recently used unpinned blocks from one tier until used <= fraction * capacity.

        From the host tier a block is demoted (written to SSD first, as the background
        worker does); from the SSD tier its copy is dropped, and with it the block
        unless a host copy remains.
        """
        if not 0 <= fraction < 1:
            raise InvalidRequestError(f"watermark must be in [0, 1), got {fraction}")
        store, index = self.store, self.store.index
        with store._lock:
            if tier == pb.TIER_SSD:
                lru, used, target = index.ssd_lru, index.ssd_used_bytes, fraction * store.ssd.capacity_bytes
            elif tier in (pb.TIER_HOST, pb.TIER_UNSPECIFIED):
                lru, used, target = index.host_lru, store.host.used_bytes, fraction * store.host.capacity_bytes
            else:
                raise InvalidRequestError(f"cannot evict to a watermark on tier {pb.Tier.Name(tier)}")
            victims, skipped = [], 0
            for skey in list(lru):
                if used <= target:
                    break
                meta = index.get(skey)
                if meta is None:
                    continue
                if meta.pins:
                    skipped += 1
                    continue
                victims.append(meta)
                used -= meta.size if tier == pb.TIER_SSD else store.host.allocator.slot_bytes(meta.size)
            if tier == pb.TIER_SSD:
                store.ssd.delete_many([m.skey for m in victims])
                for meta in victims:
                    index.set_ssd(meta, False)
                    if meta.host_offset is None:
                        store._delete_locked(meta)
                store.counters["ssd_evictions"] += len(victims)
            else:
                store._evict_from_host(victims)
            gone = sum(index.get(m.skey) is not m for m in victims)
            store.counters["admin_evictions"] += gone
        return EvictReport(evicted=gone, demoted=len(victims) - gone, bytes=sum(m.size for m in victims), skipped_pinned=skipped)

    def delete(self, sel: Selector, secure: bool = False) -> DeleteReport:
        """Delete matching blocks, pinned or not: readers keep their copy until they unpin.

        secure: wait (up to the pin TTL) for the deleted blocks' readers, then zero every
        free byte of the host pool and the unused tails of live slots, and rewrite the
        SSD tier so no freed LMDB page keeps a deleted payload (docs/security.md).
        """
        if sel.empty:
            raise InvalidRequestError("delete needs a selector (fingerprint, tenant, keys, tier, age)")
        store = self.store
        with store._lock:
            metas = self._select(sel)
            for meta in metas:
                store._delete_locked(meta)
            # A written-but-uncommitted block matches too: revoking its lease frees (and zeroes) its
            # slot, and the writer's later Commit fails, so the deleted data cannot come back.
            doomed = [lease for lease in store.leases.by_id.values() if sel.matches_lease(lease)]
            for lease in doomed:
                store._release_lease(lease, stale=True)  # its writer may still be copying: quarantine the slot
            store.counters["admin_deletes"] += len(metas)
            store.counters["lease_revocations"] += len(doomed)
        scrubbed = rewritten = 0
        if secure:
            self._wait(lambda: not any(m.pins for m in metas), store.cfg.pin_ttl_s + 2)
            with store._lock:
                scrubbed = store.host.zero_free() + self._zero_slot_tails()
                rewritten = store.ssd.rewrite_live()
                store.counters["secure_deletes"] += 1
        pending = sum(1 for m in metas if m.pins)
        return DeleteReport(len(metas), sum(m.size for m in metas), pending, scrubbed, rewritten)

    def _zero_slot_tails(self) -> int:
        """Zero the bytes past each live block in its slot: an earlier, larger block may have left them."""
        store, zeroed = self.store, 0
        owners = [(m.host_offset, m.size) for m in store.index if m.host_offset is not None]
        owners += [(l.host_offset, l.size) for l in store.leases.by_id.values() if l.host_offset is not None]
        for offset, size in owners:
            tail = store.host.allocator.slot_bytes(size) - size
            if tail:
                store.host.zero_range(offset + size, tail)
                zeroed += tail
        return zeroed

    # ---- draining ---------------------------------------------------------------------

    def in_flight(self) -> int:
        """Reads holding pins plus write leases still open."""
        with self.store._lock:
            return sum(m.pins for m in self.store.index) + len(self.store.leases.by_id)

    def _wait(self, done, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.store._lock:
                if done():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def wait_quiet(self, timeout_s: float) -> int:
        """Wait until no reader or writer is in flight (or timeout); returns how many are left."""
        self._wait(lambda: self.in_flight() == 0, timeout_s)
        return self.in_flight()
