"""Write leases and read pins, with expiry, ownership and per-tenant accounting.

A write lease makes one client the only writer of a missing key (groupcache's
singleflight, across processes); a read pin keeps a block in place while a client
copies it. Both expire, so a dead client cannot hold either forever. This module is
bookkeeping only: freeing slots and waking waiters is the store's job.

Ownership is the pair (tenant, client id): the tenant comes from the caller's token,
the client id is only a name the client picks, so two tenants choosing the same
client id still own nothing of each other's. Ids are random, not a counter, so
one caller cannot enumerate another's leases or pins; what a caller holds is
counted per tenant, so quotas (the store's) are O(1) checks.
"""
from __future__ import annotations

import secrets
import time
from collections import Counter
from dataclasses import dataclass, field

ID_BITS = 62  # random lease and pin ids: guessing a live one is hopeless, and ownership is checked anyway


@dataclass
class WriteLease:
    lease_id: int
    skey: bytes
    tenant: str
    fingerprint_id: bytes
    owner: str  # the holder's client id, within its tenant
    expires_at: float
    size: int = 0  # bytes reserved for the block (0 until Reserve); counted against the tenant
    host_offset: int | None = None

    def expires_unix_ms(self) -> int:
        return int((time.time() + (self.expires_at - time.monotonic())) * 1000)

    def held_by(self, tenant: str, client_id: str) -> bool:
        return self.tenant == tenant and self.owner == client_id


@dataclass
class ReadPin:
    pin_id: int
    tenant: str
    owner: str
    blocks: list  # BlockMeta objects, held so a pin outlives a concurrent delete
    expires_at: float
    size: int = 0  # payload bytes pinned; counted against the tenant

    def held_by(self, tenant: str, client_id: str) -> bool:
        return self.tenant == tenant and self.owner == client_id


@dataclass
class LeaseTable:
    by_id: dict[int, WriteLease] = field(default_factory=dict)
    by_skey: dict[bytes, WriteLease] = field(default_factory=dict)
    pins: dict[int, ReadPin] = field(default_factory=dict)
    held_bytes: Counter = field(default_factory=Counter)  # tenant -> bytes reserved or pinned
    held_ids: Counter = field(default_factory=Counter)  # tenant -> leases plus pins

    def _new_id(self) -> int:
        while True:  # one id space for leases and pins: an id names at most one of them
            candidate = secrets.randbits(ID_BITS) or 1
            if candidate not in self.by_id and candidate not in self.pins:
                return candidate

    def grant(self, skey: bytes, tenant: str, fingerprint_id: bytes, owner: str, ttl_s: float) -> WriteLease:
        lease = WriteLease(self._new_id(), skey, tenant, fingerprint_id, owner, time.monotonic() + ttl_s)
        self.by_id[lease.lease_id] = lease
        self.by_skey[skey] = lease
        self.held_ids[tenant] += 1
        return lease

    def set_size(self, lease: WriteLease, size: int) -> None:
        self.held_bytes[lease.tenant] += size - lease.size
        lease.size = size

    def active(self, skey: bytes) -> WriteLease | None:
        lease = self.by_skey.get(skey)
        if lease is not None and lease.expires_at <= time.monotonic():
            return None
        return lease

    def owned_lease(self, lease_id: int, tenant: str, client_id: str) -> WriteLease | None:
        """The live lease of that id if this caller holds it; None otherwise, whichever the reason."""
        lease = self.by_id.get(lease_id)
        if lease is None or lease.expires_at <= time.monotonic() or not lease.held_by(tenant, client_id):
            return None
        return lease

    def drop(self, lease: WriteLease) -> None:
        if self.by_id.pop(lease.lease_id, None) is None:
            return
        if self.by_skey.get(lease.skey) is lease:
            del self.by_skey[lease.skey]
        self.held_ids[lease.tenant] -= 1
        self.held_bytes[lease.tenant] -= lease.size

    def expired_leases(self, now: float) -> list[WriteLease]:
        return [lease for lease in self.by_id.values() if lease.expires_at <= now]

    def add_pin(self, tenant: str, owner: str, blocks: list, ttl_s: float) -> ReadPin:
        pin = ReadPin(self._new_id(), tenant, owner, blocks, time.monotonic() + ttl_s, sum(m.size for m in blocks))
        self.pins[pin.pin_id] = pin
        self.held_ids[tenant] += 1
        self.held_bytes[tenant] += pin.size
        return pin

    def owned_pin(self, pin_id: int, tenant: str, client_id: str) -> ReadPin | None:
        pin = self.pins.get(pin_id)
        if pin is None or not pin.held_by(tenant, client_id):
            return None
        return pin

    def drop_pin(self, pin: ReadPin) -> bool:
        if self.pins.pop(pin.pin_id, None) is None:
            return False
        self.held_ids[pin.tenant] -= 1
        self.held_bytes[pin.tenant] -= pin.size
        return True

    def expired_pins(self, now: float) -> list[ReadPin]:
        return [pin for pin in self.pins.values() if pin.expires_at <= now]
