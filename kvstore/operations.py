"""Operator actions on a running Store: select, list, evict, delete (securely), revoke, wait for quiet.

Owns what a selector means and what each admin action reports, working through the Store's
public admin methods only (the store lock and the block table stay the store's). It refuses
gRPC (that is admin_service.py) and on-disk formats (the tiers own how bytes are scrubbed).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from kvwire.errors import InvalidRequestError
from kvwire.types import Tier
from kvstore.block_table import BlockView, LeaseView
from kvstore.eviction import EvictReport
from kvstore.store import Store

__all__ = ["BlockView", "DeleteReport", "EvictReport", "LeaseView", "Operations", "Selector"]

QUIET_POLL_S = 0.02


@dataclass(frozen=True)
class Selector:
    """Set fields are ANDed; an unset field matches every block."""

    tenant: str = ""
    fingerprint_id: bytes = b""
    tier: int = Tier.UNSPECIFIED  # HBM, HOST: has a copy there; SSD: has no memory copy (on the ssd tier only)
    min_age_s: float = 0.0
    keys: frozenset[bytes] = frozenset()

    @property
    def empty(self) -> bool:
        return not (self.tenant or self.fingerprint_id or self.tier or self.min_age_s or self.keys)

    def matches(self, view: BlockView) -> bool:
        return (
            (not self.tenant or view.tenant == self.tenant)
            and (not self.fingerprint_id or view.fingerprint_id == self.fingerprint_id)
            and (not self.tier or (view.tier == self.tier if self.tier == Tier.SSD else self.tier in view.tiers))
            and (not self.min_age_s or view.age_s >= self.min_age_s)
            and (not self.keys or view.key in self.keys)
        )

    def matches_lease(self, lease: LeaseView) -> bool:
        """A write lease is a block in the making: in the host tier, and younger than any age."""
        return (
            (not self.tenant or lease.tenant == self.tenant)
            and (not self.fingerprint_id or lease.fingerprint_id == self.fingerprint_id)
            and (not self.tier or self.tier == Tier.HOST)
            and not self.min_age_s
            and (not self.keys or any(key in self.keys for key in lease.keys))
        )


@dataclass(frozen=True)
class DeleteReport:
    deleted: int
    bytes: int
    pending_pinned: int
    scrubbed_host_bytes: int = 0
    ssd_bytes_rewritten: int = 0


class Operations:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ---- reading --------------------------------------------------------------------

    def list_blocks(self, sel: Selector, page_size: int, after: bytes = b"") -> tuple[list[BlockView], bytes, int]:
        """One page of matches after storage key `after`, the last key of a full page (else b""), and the match count."""
        matched = self.store.blocks(sel.matches)
        page = [v for v in matched if v.skey > after][:page_size]
        more = bool(page) and page[-1].skey != matched[-1].skey
        return page, (page[-1].skey if more else b""), len(matched)

    def tenant_usage(self) -> list[tuple[str, int, int]]:
        """(tenant, blocks, bytes) for each tenant with blocks, by tenant."""
        return [tuple(u) for u in self.store.tenant_usage()]

    def leases(self, tenant: str = "", owner: str = "") -> list[LeaseView]:
        views = self.store.lease_views()
        return sorted((v for v in views if (not tenant or v.tenant == tenant) and (not owner or v.owner == owner)), key=lambda v: v.id)

    # ---- changing ---------------------------------------------------------------------

    def revoke(self, ids: set[int], owner: str = "", tenant: str = "") -> tuple[int, int]:
        """Drop write leases and read pins named by id, owner or tenant; returns (leases, pins)."""
        if not (ids or owner or tenant):
            raise InvalidRequestError("revoke needs lease ids, an owner or a tenant")
        return self.store.revoke(lambda v: v.id in ids or bool(owner and v.owner == owner) or bool(tenant and v.tenant == tenant))

    def evict(self, sel: Selector) -> EvictReport:
        """Remove matching blocks from every tier; pinned blocks are never evicted."""
        if sel.empty:
            raise InvalidRequestError("evict needs a selector (fingerprint, tenant, keys, tier, age) or a watermark")
        return self.store.evict(sel.matches)

    def evict_to_watermark(self, tier: int, fraction: float) -> EvictReport:
        """Evict least recently used unpinned blocks from one tier until used <= fraction * capacity.

        From the host tier a block is demoted (written to SSD first, as the background
        worker does); from the SSD tier its copy is dropped, and with it the block
        unless a host copy remains; from the HBM tier only the copy is dropped (the
        host copy stays and is served).
        """
        if not 0 <= fraction < 1:
            raise InvalidRequestError(f"watermark must be in [0, 1), got {fraction}")
        if tier not in (Tier.UNSPECIFIED, Tier.HBM, Tier.HOST, Tier.SSD):
            raise InvalidRequestError(f"cannot evict to a watermark on tier {_tier_name(tier)}")
        return self.store.evict_to_watermark(Tier.HOST if tier == Tier.UNSPECIFIED else Tier(tier), fraction)

    def delete(self, sel: Selector, secure: bool = False, reader_wait_s: float | None = None) -> DeleteReport:
        """Delete matching blocks, pinned or not: readers keep their copy until they unpin.

        secure: wait for the deleted blocks' readers, then zero every free byte of the host
        pool and the unused tails of live slots, and rewrite the SSD tier so no freed LMDB
        page keeps a deleted payload (docs/security.md). The wait lasts up to the pin TTL
        plus two seconds, or `reader_wait_s` when that is shorter (a caller's deadline): a
        block still pinned then is counted in `pending_pinned`, and its slot is zeroed when
        its last pin drops, like every freed slot.
        """
        if sel.empty:
            raise InvalidRequestError("delete needs a selector (fingerprint, tenant, keys, tier, age)")
        store = self.store
        deletion = store.delete_blocks(sel.matches, sel.matches_lease)
        scrubbed = rewritten = 0
        if secure:
            wait_s = store.cfg.pin_ttl_s + 2
            self._wait(lambda: store.readers_left(deletion) == 0, wait_s if reader_wait_s is None else min(wait_s, reader_wait_s))
            scrubbed, rewritten = store.scrub()
        return DeleteReport(deletion.deleted, deletion.bytes, store.readers_left(deletion), scrubbed, rewritten)

    # ---- draining ---------------------------------------------------------------------

    def in_flight(self) -> int:
        """Reads holding pins plus write leases still open."""
        return self.store.in_flight()

    @staticmethod
    def _wait(done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(QUIET_POLL_S)
        return True

    def wait_quiet(self, timeout_s: float) -> int:
        """Wait until no reader or writer is in flight (or timeout); returns how many are left."""
        self._wait(lambda: self.in_flight() == 0, timeout_s)
        return self.in_flight()


def _tier_name(tier: int) -> str:
    try:
        return Tier(tier).name
    except ValueError:
        return str(tier)
